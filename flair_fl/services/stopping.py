"""Stopping a run on a signal: abandon the round, keep the checkpoint, exit with its status.

The signals a run handles, and the status each exits with (`STOP_SIGNALS`):

    SIGINT   Ctrl-C                                      exit 130
    SIGTERM  kill, scancel, pre-emption                  exit 143
    SIGUSR1  SLURM's warning before a time limit          exit 138, or requeued (below)
    SIGUSR2  the same (submitit's default `--signal`)     exit 140, or requeued (below)

Adding one is one line, `on_signal(signal.SIGUSR1, 138, action=requeue)`: `action` runs
after the run has stopped cleanly (checkpoint written, loggers closed, Ray down), just before
the exit. The SIGUSR signals' action hands the signal to the handler that was in place before
the run started (`pass_on`): in a submitit job (hydra/launcher=submitit_slurm) that is
submitit's checkpoint-and-requeue, which requeues the job with `resume=` its run dir and
exits with submitit's status; elsewhere there is none and the run exits 138 / 140.

How a stop goes (`handling()` installs the handlers for the length of a run):

1. The handler only records the request (`requested()`) and starts the stop hooks
   (`add_stop_hook`) in a helper thread: they make blocking waits return at once (e.g. kill
   the Ray actors still training, so Flower's worker threads are not waited for).
2. The round loop polls `requested()` while it waits for replies and before each round. It
   abandons the round in progress: the model stays the last completed round's. The run
   checkpoints that round, closes its loggers, shuts Ray down, removes its shared-memory
   files and raises `RunStopped`; run.py exits with the signal's status.
3. A second signal, or a run not out `grace_s` seconds after the first, exits at once: the
   cleanups (`add_cleanup`: shared-memory files, the Ray cluster this process started) run,
   then `os._exit(status)`. The last checkpoint is whole either way: checkpoints are written
   to a temporary name and renamed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import FrameType
from typing import Any

from flair_fl.errors import RunStopped

log = logging.getLogger(__name__)
Hook = Callable[[], None]
DEFAULT_GRACE_S = 30.0  # a clean stop takes ~1-3 s; this bounds one stuck in a library call
CLEANUP_TIMEOUT_S = 10.0  # the most a forced exit waits for its cleanups


@dataclass(frozen=True)
class StopSignal:
    """A signal that stops a run, the status the process then exits with, and an optional
    action run once the run has stopped cleanly (before the exit)."""

    signum: int
    exit_code: int
    action: Hook | None = None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name


STOP_SIGNALS: dict[int, StopSignal] = {}


def on_signal(signum: int, exit_code: int, action: Hook | None = None) -> None:
    """Make `signum` stop a run with `exit_code` (and `action`, see the module doc)."""
    STOP_SIGNALS[signum] = StopSignal(signum, exit_code, action)


def pass_on(signum: int) -> Hook:
    """An action that calls the handler `signum` had before the run (if it was a function:
    a job scheduler's, e.g. submitit's checkpoint-and-requeue, which may exit itself)."""

    def action() -> None:
        previous = _STATE.previous.get(signum)
        if callable(previous):
            previous(signum, None)

    action.__name__ = f"pass_on_{signal.Signals(signum).name}"
    return action


on_signal(signal.SIGINT, 130)  # 128 + 2, as a shell reports a Ctrl-C'd program
on_signal(signal.SIGTERM, 143)  # 128 + 15: schedulers requeue on it
# SLURM's `--signal` (sbatch --signal=USR1@120) warns a job before its time limit ends.
on_signal(signal.SIGUSR1, 138, action=pass_on(signal.SIGUSR1))  # 128 + 10
on_signal(signal.SIGUSR2, 140, action=pass_on(signal.SIGUSR2))  # 128 + 12


class _State:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.requested: StopSignal | None = None
        self.stop_hooks: list[Hook] = []
        self.cleanups: list[Hook] = []
        self.previous: dict[int, Any] = {}
        self.grace_s = DEFAULT_GRACE_S
        self.done = threading.Event()  # set when the run is out: no forced exit any more
        self.active = False  # inside handling(): only then may handlers be (re-)installed


_STATE = _State()


def requested() -> StopSignal | None:
    """The signal that asked this run to stop, or None (cheap: poll it in loops)."""
    return _STATE.requested


def raise_if_requested(where: str) -> None:
    """Raise `RunStopped` if a stop was requested (for loops that own no round state)."""
    if (stop := _STATE.requested) is not None:
        raise RunStopped(stop, where)


def _register(hooks: list[Hook], hook: Hook) -> Hook:
    hooks.append(hook)

    def remove() -> None:
        with contextlib.suppress(ValueError):
            hooks.remove(hook)

    return remove


def add_stop_hook(hook: Hook) -> Hook:
    """Run `hook` (in a helper thread) as soon as a stop is requested; returns its remover."""
    return _register(_STATE.stop_hooks, hook)


def add_cleanup(hook: Hook) -> Hook:
    """Run `hook` before a forced exit (what the process must not leave behind); returns
    its remover. On a clean stop the owners free their resources themselves."""
    return _register(_STATE.cleanups, hook)


def _run_all(hooks: list[Hook], what: str) -> None:
    for hook in list(hooks):
        try:
            hook()
        except Exception as err:  # one failing hook must not keep the others from running
            log.warning("%s %s failed: %s", what, getattr(hook, "__name__", hook), err)


def _force_exit(stop: StopSignal, why: str) -> None:
    print(f"flair-fl: {why}: exiting now (status {stop.exit_code})", file=sys.stderr, flush=True)
    worker = threading.Thread(target=_run_all, args=(_STATE.cleanups, "cleanup"), daemon=True)
    worker.start()
    worker.join(CLEANUP_TIMEOUT_S)
    os._exit(stop.exit_code)


def _after_request(stop: StopSignal, done: threading.Event, grace_s: float) -> None:
    _run_all(_STATE.stop_hooks, "stop hook")
    if not done.wait(grace_s):
        _force_exit(stop, f"the run did not stop within {grace_s:g} s of {stop.name}")


def request(signum: int) -> None:
    """Ask the run to stop as `signum` does (the signal handler; tests call it directly).
    A second request exits at once."""
    stop = STOP_SIGNALS[signum]
    if _STATE.requested is not None:
        _force_exit(stop, f"{stop.name} again")
    _STATE.requested = stop
    print(
        f"flair-fl: {stop.name}: stopping (the round in progress is abandoned, the last "
        f"checkpoint kept); {stop.name} again exits at once",
        file=sys.stderr,
        flush=True,
    )
    threading.Thread(
        target=_after_request,
        args=(stop, _STATE.done, _STATE.grace_s),
        daemon=True,
        name="flair-fl-stop",
    ).start()


def _handler(signum: int, frame: FrameType | None) -> None:
    request(signum)


def install_handlers() -> None:
    """(Re-)install the handlers: call again after a library replaced them (`ray.init`
    installs its own SIGTERM handler, which exits at once). Outside `handling()` (a library
    caller of run_experiment owns its process's signals) it does nothing."""
    if not _STATE.active or threading.current_thread() is not threading.main_thread():
        return  # only the main thread may set handlers; the first install stays in place
    for signum in STOP_SIGNALS:
        previous = signal.signal(signum, _handler)
        if previous is not _handler:
            _STATE.previous.setdefault(signum, previous)


@contextlib.contextmanager
def handling(grace_s: float = DEFAULT_GRACE_S) -> Iterator[None]:
    """Handle `STOP_SIGNALS` for the length of a run; the previous handlers come back after."""
    _STATE.reset()  # a fresh start for every run (the jobs of a multirun share a process)
    _STATE.grace_s = grace_s
    _STATE.active = True
    install_handlers()
    try:
        yield
    finally:
        _STATE.active = False
        _STATE.done.set()
        if threading.current_thread() is threading.main_thread():
            for signum, previous in _STATE.previous.items():
                signal.signal(signum, previous)
        _STATE.previous.clear()
