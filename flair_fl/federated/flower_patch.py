"""The one patch of Flower internals: its Ray actor pool (flwr/simulation/ray_transport/
ray_actor.py, `BasicActorPool`), written for flwr 1.42.

It mends two gaps of that pool: a client whose actor died (killed, out of memory) was put
back into the pool, so every later message sent to it failed too; and a client that hangs
held its actor (and the end of the simulation) forever. The patched pool replaces dead
actors with fresh ones and kills an actor whose client runs longer than `client_timeout`;
such a client comes back as an error reply whose `Error.code` says why (protocol.py:
CLIENT_TIMEOUT, CLIENT_ACTOR_DIED, CLIENT_STOPPED), so the round loop counts it by code and
the pool keeps its size. A ClientApp that raised keeps Flower's own code
(CLIENT_APP_RAISED_EXCEPTION).

Once a stop is requested (stopping.py), a client still running has its actor killed
(Flower's worker threads would otherwise wait for it: minutes on real data) and no actor is
replaced.

Applying the patch first checks the flwr version and every private name it replaces or
reads; a mismatch fails at once, in one line naming the Flower file and the name, instead of
letting every round skip on errors later.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from flwr.app import Context, Error, Message

from flair_fl import protocol
from flair_fl.errors import ClientActorDied, ClientStopped, ClientTimeout, FlowerPatchMismatch
from flair_fl.services import stopping

FLWR_VERSIONS = ((1, 42), (1, 43))  # [from, to) major.minor the patch was checked against
POOL_FILE = "flwr/simulation/ray_transport/ray_actor.py"
ACTOR_FILE = "ray/actor.py"
REPLACED = ("submit", "fetch_result_and_return_actor_to_pool", "add_actor_back_to_pool")
POOL_ATTRIBUTES = ("_future_to_actor", "pool", "create_actor_fn")  # set in __init__, read
SUBMIT_PARAMETERS = ("self", "actor_fn", "job")  # job = (app_fn, message, cid, context)
WAIT_SLICE_S = 0.25  # a client's reply is awaited in slices, to see a stop request
_MARK = "_flair_fl_guarded"
_CODES = {
    ClientTimeout: protocol.CLIENT_TIMEOUT,
    ClientActorDied: protocol.CLIENT_ACTOR_DIED,
    ClientStopped: protocol.CLIENT_STOPPED,
}


@dataclass
class _Guard:
    """Settings (per run) and state the patched methods share. A new actor's first client
    also pays the actor's start (process, imports, model and data reader set-up): it gets
    `actor_start_timeout` more."""

    client_timeout: float | None = None
    actor_start_timeout: float = 120.0
    warm: set[str] = field(default_factory=set)  # actors that have finished a client
    dead: set[Any] = field(default_factory=set)  # futures whose actor was killed or died
    jobs: dict[Any, tuple[Message, Context]] = field(default_factory=dict)  # by future
    lock: threading.Lock = field(default_factory=threading.Lock)


_GUARD = _Guard()


def guard_actor_pool(
    client_timeout: float | None,
    actor_start_timeout: float = 120.0,
    pool_class: type | None = None,
    ray_api: Any = None,
) -> None:
    """Patch flwr's BasicActorPool (once per process) as described in the module doc.

    `pool_class` and `ray_api` (the `ray` module's wait/get/kill) default to Flower's pool
    and Ray; tests pass stand-ins."""
    import ray
    from ray.exceptions import RayActorError

    if pool_class is None:
        from flwr.simulation.ray_transport.ray_actor import BasicActorPool

        pool_class = BasicActorPool
    _GUARD.client_timeout, _GUARD.actor_start_timeout = client_timeout, actor_start_timeout
    with _GUARD.lock:
        if getattr(pool_class, _MARK, False):
            return
        check_flower(importlib.metadata.version("flwr"), pool_class, ray.actor.ActorHandle)
        _patch(pool_class, ray_api or ray, RayActorError)


def check_flower(version: str, pool_class: type, actor_class: type) -> None:
    """Raise FlowerPatchMismatch (one line) unless flwr `version` is in FLWR_VERSIONS and
    `pool_class` / `actor_class` have every name the patch replaces or reads."""
    major_minor = tuple(int(part) for part in version.split(".")[:2])
    low, high = FLWR_VERSIONS
    if not low <= major_minor < high:
        raise FlowerPatchMismatch(
            f"{__name__}: the actor-pool patch ({POOL_FILE}) was written for flwr "
            f"{low[0]}.{low[1]}.x, found flwr {version}: install flwr>={low[0]}.{low[1]},"
            f"<{high[0]}.{high[1]} or check the patch against {POOL_FILE} and widen FLWR_VERSIONS"
        )
    missing = _missing(pool_class, actor_class)
    if missing:
        raise FlowerPatchMismatch(
            f"{__name__}: flwr {version} changed what the actor-pool patch relies on: "
            f"{missing[0]}; check the patch against it"
        )


def _missing(pool_class: type, actor_class: type) -> list[str]:
    """What the patch needs and the classes lack, each as '<file>: <name> ...'."""
    where = pool_class.__qualname__
    init = vars(pool_class).get("__init__")  # the class's own: where Flower sets them
    init_names = getattr(getattr(init, "__code__", None), "co_names", ())
    missing = [
        f"{POOL_FILE}: {where}.{name} is missing"
        for name in REPLACED
        if not callable(getattr(pool_class, name, None))
    ]
    missing += [
        f"{POOL_FILE}: {where}.__init__ no longer sets self.{name}"
        for name in POOL_ATTRIBUTES
        if name not in init_names
    ]
    submit = getattr(pool_class, "submit", None)
    if callable(submit) and tuple(inspect.signature(submit).parameters) != SUBMIT_PARAMETERS:
        missing.append(f"{POOL_FILE}: {where}.submit no longer takes {SUBMIT_PARAMETERS}")
    if not hasattr(actor_class, "_actor_id"):
        missing.append(f"{ACTOR_FILE}: {actor_class.__qualname__}._actor_id is missing")
    return missing


def _patch(pool_class: Any, ray_api: Any, actor_died_error: type[BaseException]) -> None:
    """Replace the pool's three methods (see the module doc)."""
    original_submit = pool_class.submit

    def submit(self: Any, actor_fn: Any, job: tuple[Any, Message, str, Context]) -> Any:
        future = original_submit(self, actor_fn, job)
        _, message, _, context = job
        if not isinstance(message, Message):
            raise FlowerPatchMismatch(
                f"{__name__}: {POOL_FILE}: the job passed to submit no longer holds the "
                f"message second (found {type(message).__name__}); check the patch against it"
            )
        with _GUARD.lock:
            _GUARD.jobs[future] = (message, context)  # to answer for it if the client fails
        return future

    def fetch_result_and_return_actor_to_pool(self: Any, future: Any) -> tuple[Message, Context]:
        actor = self._future_to_actor[future]
        actor_id = actor._actor_id.hex()
        timeout = _GUARD.client_timeout
        if timeout is not None and actor_id not in _GUARD.warm:
            timeout += _GUARD.actor_start_timeout
        failure: RuntimeError | None = None
        try:
            if _await(ray_api, future, timeout):
                _, out_message, context = ray_api.get(future)  # a ClientApp error raises here
            else:
                ray_api.kill(actor, no_restart=True)
                failure = (
                    ClientStopped("the run is stopping")
                    if stopping.requested()
                    else (
                        ClientTimeout(
                            f"client timed out after {_GUARD.client_timeout} s "
                            "(simulation.client_timeout); its actor was killed and replaced"
                        )
                    )
                )
        except actor_died_error as err:
            failure = ClientActorDied(
                f"client actor died ({type(err).__name__}); it was replaced. Killed by "
                "the out-of-memory monitor? Give clients more memory (fewer per node)"
            )
        if failure is not None:
            with _GUARD.lock:
                _GUARD.dead.add(future)
                message, context = _GUARD.jobs[future]
            self.add_actor_back_to_pool(future)
            return error_reply(message, failure), context
        with _GUARD.lock:
            _GUARD.warm.add(actor_id)
        self.add_actor_back_to_pool(future)
        return out_message, context

    def add_actor_back_to_pool(self: Any, future: Any) -> None:
        actor = self._future_to_actor.pop(future)
        with _GUARD.lock:
            dead = future in _GUARD.dead
            _GUARD.dead.discard(future)
            _GUARD.jobs.pop(future, None)
        if dead and stopping.requested():
            return  # the run is ending: no new actor
        if dead:
            actor = self.create_actor_fn()
        self.pool.append(actor)

    pool_class.submit = submit
    pool_class.fetch_result_and_return_actor_to_pool = fetch_result_and_return_actor_to_pool
    pool_class.add_actor_back_to_pool = add_actor_back_to_pool
    setattr(pool_class, _MARK, True)


def error_reply(message: Message, failure: RuntimeError) -> Message:
    """The error reply to `message` for a client failure of the pool, coded by its type
    (the reason as Flower words the errors it makes itself)."""
    reason = f"{type(failure)}:<'{failure}'>"
    return Message(Error(code=_CODES[type(failure)], reason=reason), reply_to=message)


def _await(ray_api: Any, future: Any, timeout: float | None) -> bool:
    """Wait for `future` up to `timeout` s (None: no limit); False if it is not ready by
    then or a stop was requested."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while not stopping.requested():
        left = WAIT_SLICE_S if deadline is None else min(WAIT_SLICE_S, deadline - time.monotonic())
        if left <= 0:
            return False
        ready, _ = ray_api.wait([future], timeout=left)
        if ready:
            return True
    return False
