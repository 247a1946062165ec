"""A loopback HTTP server for download tests: serves bytes, honours Range, injects faults.

Every GET is recorded with its Range header, so tests can assert how a client resumed.
"""

from __future__ import annotations

import re
import threading
from collections import defaultdict
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType


@dataclass
class Served:
    """What the server answers and what it saw (URL paths include the query string)."""

    files: dict[str, bytes] = field(default_factory=dict)
    headers: dict[str, dict[str, str]] = field(default_factory=dict)  # extra, per path
    statuses: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    drops: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    requests: list[tuple[str, str | None]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def fail(self, path: str, *statuses: int) -> None:
        """Answer the next requests for `path` with these error statuses, in order."""
        self.statuses[path].extend(statuses)

    def drop(self, path: str, after: int) -> None:
        """Close the connection after `after` body bytes on the next request for `path`."""
        self.drops[path].append(after)

    def requests_for(self, path: str) -> list[str | None]:
        """The Range header (or None) of each request for `path`, in order."""
        return [rng for p, rng in self.requests if p == path]


def _handler(served: Served) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass  # keep test output clean

        def do_GET(self) -> None:
            with served.lock:
                served.requests.append((self.path, self.headers.get("Range")))
                status = served.statuses[self.path].pop(0) if served.statuses[self.path] else None
                drop = served.drops[self.path].pop(0) if served.drops[self.path] else None
            if status is not None:
                self.send_error(status)
                return
            body = served.files.get(self.path)
            if body is None:
                self.send_error(404)
                return
            start = _range_start(self.headers.get("Range"))
            if start is not None and start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.end_headers()
                return
            if start is None:
                self.send_response(200)
                start = 0
            else:
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            self.send_header("Content-Length", str(len(body) - start))
            for key, value in served.headers.get(self.path, {}).items():
                self.send_header(key, value)
            self.end_headers()
            payload = body[start:] if drop is None else body[start : start + drop]
            self.wfile.write(payload)
            self.wfile.flush()
            self.close_connection = True

    return Handler


def _range_start(header: str | None) -> int | None:
    match = re.fullmatch(r"bytes=(\d+)-", header or "")
    return int(match.group(1)) if match else None


class LoopbackServer:
    """`with LoopbackServer() as server:` serves `server.served` on 127.0.0.1."""

    def __init__(self) -> None:
        self.served = Served()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self.served))
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self) -> LoopbackServer:
        self.thread.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
