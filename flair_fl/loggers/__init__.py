"""Loggers: the driver owns all logging; actors only return metrics."""

from __future__ import annotations

import functools
import inspect
import sys
import traceback
from collections.abc import Callable
from typing import Any, Protocol

from flair_fl.errors import ConfigError


class RunLogger(Protocol):
    """What every logger (csv/jsonl, wandb, ...) implements.

    Loggers are built by `modes.build.build_loggers` from the `logger` config group: each entry's
    `_target_` is called with `out_dir` (the run directory) and `run_config` (the resolved
    config as a dict), plus its own config keys.
    """

    def log_round(self, server_round: int, metrics: dict[str, Any]) -> None: ...

    def log_summary(self, summary: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class LoggerErrors:
    """Failure count shared by the guarded loggers of one run (`summary["logger_errors"]`)."""

    def __init__(self) -> None:
        self.count = 0


# Guarded loggers not closed yet: a job that fails half-way closes them (run.py), so its
# W&B run is finished before the next job of a sweep starts.
_OPEN: list[SafeLogger] = []


class SafeLogger:
    """Runs one logger so that its failures never stop training.

    Every call (construction included) is guarded: the first error of this logger is
    printed to stderr with its traceback, every error is counted in the shared
    `LoggerErrors`, and training goes on. A logger that failed to start is skipped.
    `log_summary` writes the run's count so far to `summary["logger_errors"]`.
    """

    def __init__(
        self, name: str, create: Callable[[], RunLogger], errors: LoggerErrors | None = None
    ):
        self.name = name
        self.errors = errors if errors is not None else LoggerErrors()
        self.failures = 0
        self.inner: RunLogger | None = self._guard("start", create)
        _OPEN.append(self)

    def _guard(self, action: str, call: Callable[..., Any], *args: Any) -> Any:
        try:
            return call(*args)
        except Exception as err:
            self.failures += 1
            self.errors.count += 1
            if self.failures == 1:
                detail = "".join(traceback.format_exception(err)).rstrip()
                print(
                    f"flair-fl: logger '{self.name}' failed in {action}; training goes on "
                    f"(further errors of this logger are only counted in "
                    f"summary['logger_errors']):\n{detail}",
                    file=sys.stderr,
                    flush=True,
                )
            return None

    def log_round(self, server_round: int, metrics: dict[str, Any]) -> None:
        if self.inner is not None:
            self._guard("log_round", self.inner.log_round, server_round, metrics)

    def log_untrained(self, metrics: dict[str, Any]) -> None:
        """The untrained model's val metrics (round 0), to loggers that chart them (W&B)."""
        log_untrained = getattr(self.inner, "log_untrained", None)
        if log_untrained is not None:
            self._guard("log_untrained", log_untrained, metrics)

    def resume_from(self, last_round: int) -> None:
        """Forwarded to loggers that keep history (`LogRounds.resume`); others skip it."""
        resume_from = getattr(self.inner, "resume_from", None)
        if resume_from is not None:
            self._guard("resume_from", resume_from, last_round)

    def flush(self) -> None:
        """Forwarded to loggers that buffer (W&B), before each checkpoint; others skip it."""
        flush = getattr(self.inner, "flush", None)
        if flush is not None:
            self._guard("flush", flush)

    def log_summary(self, summary: dict[str, Any]) -> None:
        summary["logger_errors"] = self.errors.count
        if self.inner is not None:
            self._guard("log_summary", self.inner.log_summary, summary)

    def close(self) -> None:
        if self in _OPEN:
            _OPEN.remove(self)
        if self.inner is not None:
            self._guard("close", self.inner.close)
            self.inner = None
        if self.failures > 1:
            print(
                f"flair-fl: logger '{self.name}' failed {self.failures} times in all",
                file=sys.stderr,
                flush=True,
            )


def open_loggers() -> list[SafeLogger]:
    """The guarded loggers built and not closed yet."""
    return list(_OPEN)


def close_open_loggers() -> int:
    """Close every guarded logger still open (a job that failed); returns how many."""
    pending = list(_OPEN)
    for logger in pending:
        logger.close()
    return len(pending)


def start_logger(
    name: str, factory: Callable[..., RunLogger], errors: LoggerErrors, **kwargs: Any
) -> SafeLogger:
    """`factory(**kwargs)` behind a `SafeLogger`.

    Arguments the factory cannot take (a misspelt `logger.<name>` key) are a ConfigError
    raised here, before the run starts; everything that fails later is only reported.
    """
    func, args, bound = factory, (), dict(kwargs)
    if isinstance(factory, functools.partial):  # hydra `_partial_`: check the config keys too
        func, args, bound = factory.func, factory.args, {**factory.keywords, **kwargs}
    try:
        inspect.signature(func).bind(*args, **bound)
    except TypeError as err:
        raise ConfigError(f"logger.{name}: {err}") from None
    return SafeLogger(name, functools.partial(factory, **kwargs), errors)
