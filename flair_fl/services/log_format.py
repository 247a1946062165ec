"""The format of the run's log files (<run dir>/run.log, clients.log): Hydra's, without ANSI.

Ray colours the text of a client's error (`RayTaskError`: the actor's name in cyan) and
Flower its level names; in a file those escape codes are noise. conf/config.yaml names this
formatter for the file handlers; the console keeps the colours.
"""

from __future__ import annotations

import logging
import re

ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
FILE_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"  # Hydra's `simple`


def strip_ansi(text: str) -> str:
    """`text` without ANSI escape sequences (colours, cursor moves)."""
    return ANSI_ESCAPE.sub("", text)


class PlainFormatter(logging.Formatter):
    """Hydra's file format, with ANSI escape codes removed from the whole record (message,
    arguments and traceback)."""

    def __init__(self, fmt: str = FILE_FORMAT, datefmt: str | None = None) -> None:
        super().__init__(fmt, datefmt)

    def format(self, record: logging.LogRecord) -> str:
        return strip_ansi(super().format(record))
