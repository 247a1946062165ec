"""The one adapter around Flower's in-process simulation engine (Ray backend).

It also mends two gaps of flwr 1.41's Ray actor pool (flwr/simulation/ray_transport):
a client whose actor died (killed, out of memory) was put back into the pool, so every later
message sent to it failed too; and a client that hangs held its actor (and the end of the
simulation) forever. `guard_actor_pool` replaces dead actors with fresh ones and kills an
actor whose client runs longer than `client_timeout`, so the round loop gets an error reply
it can count and the pool keeps its size.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

from flair_fl.federated.server_app import LoopOutcome


class _DropDeprecation(logging.Filter):
    """run_simulation is the only in-process API that fits Hydra (shared/FLOWER_NOTES.md);
    its deprecation notice would otherwise open every run twice."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "DEPRECATED FEATURE" not in record.getMessage()


class ClientTimeout(RuntimeError):
    """A client ran past simulation.client_timeout; its actor was killed and replaced."""


class ClientActorDied(RuntimeError):
    """A client's actor process died (killed, out of memory); it was replaced."""


# Read by the patched pool; set per run. A new actor's first client also pays the actor's
# start (process, imports, model and data reader set-up): it gets `actor_start_timeout` more.
_GUARD: dict[str, Any] = {"client_timeout": None, "actor_start_timeout": 120.0}
_WARM: set[str] = set()  # actors that have finished a client
_GUARD_LOCK = threading.Lock()
_DEAD: set[Any] = set()  # futures whose actor was killed or died (replaced on return)


def guard_actor_pool(client_timeout: float | None, actor_start_timeout: float = 120.0) -> None:
    """Patch flwr's BasicActorPool (once per process) as described in the module doc."""
    import ray
    from flwr.simulation.ray_transport.ray_actor import BasicActorPool
    from ray.exceptions import GetTimeoutError, RayActorError

    _GUARD.update(client_timeout=client_timeout, actor_start_timeout=actor_start_timeout)
    with _GUARD_LOCK:
        if getattr(BasicActorPool, "_flair_fl_guarded", False):
            return

        def fetch_result_and_return_actor_to_pool(self: Any, future: Any) -> Any:
            actor = self._future_to_actor[future]
            actor_id = actor._actor_id.hex()
            timeout = _GUARD["client_timeout"]
            if timeout is not None and actor_id not in _WARM:
                timeout += _GUARD["actor_start_timeout"]
            try:
                _, out_message, context = ray.get(future, timeout=timeout)
            except GetTimeoutError:
                ray.kill(actor, no_restart=True)
                with _GUARD_LOCK:
                    _DEAD.add(future)
                raise ClientTimeout(
                    f"client timed out after {_GUARD['client_timeout']} s "
                    "(simulation.client_timeout); its actor was killed and replaced"
                ) from None
            except RayActorError as err:
                with _GUARD_LOCK:
                    _DEAD.add(future)
                raise ClientActorDied(
                    f"client actor died ({type(err).__name__}); it was replaced. Killed by "
                    "the out-of-memory monitor? Give clients more memory (fewer per node)"
                ) from None
            with _GUARD_LOCK:
                _WARM.add(actor_id)
            self.add_actor_back_to_pool(future)
            return out_message, context

        def add_actor_back_to_pool(self: Any, future: Any) -> None:
            actor = self._future_to_actor.pop(future)
            with _GUARD_LOCK:
                dead = future in _DEAD
                _DEAD.discard(future)
            if dead:
                actor = self.create_actor_fn()
            self.pool.append(actor)

        BasicActorPool.fetch_result_and_return_actor_to_pool = (  # type: ignore[method-assign]
            fetch_result_and_return_actor_to_pool
        )
        BasicActorPool.add_actor_back_to_pool = add_actor_back_to_pool  # type: ignore[method-assign]
        BasicActorPool._flair_fl_guarded = True  # type: ignore[attr-defined]


def run_simulation(
    server_app: ServerApp,
    client_app: ClientApp,
    num_supernodes: int,
    backend_config: dict[str, Any],
    outcome: LoopOutcome,
    client_timeout: float | None = None,
    actor_start_timeout: float = 120.0,
) -> None:
    """Run the apps to completion; re-raise any error of the ServerApp's round loop."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    from flwr.simulation import run_simulation as flwr_run_simulation

    guard_actor_pool(client_timeout, actor_start_timeout)

    flwr_log = logging.getLogger("flwr")
    flwr_log.setLevel(logging.WARNING)
    if not any(isinstance(f, _DropDeprecation) for f in flwr_log.filters):
        flwr_log.addFilter(_DropDeprecation())
    flwr_run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=num_supernodes,
        backend_name="ray",
        backend_config=backend_config,
    )
    if outcome.error is not None:
        raise outcome.error
