"""The one adapter around Flower's in-process simulation engine (Ray backend).

Before the run it patches Flower's Ray actor pool (flower_patch.py): dead actors are
replaced, a client running past `client_timeout` has its actor killed, and either comes back
as an error reply coded by why.

Stopping (stopping.py): Ray is started here, not by Flower, so that the run's signal handlers
can be put back after `ray.init` replaced the SIGTERM one.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

from flair_fl.federated import ray_node
from flair_fl.federated.flower_patch import guard_actor_pool
from flair_fl.federated.round import LoopOutcome
from flair_fl.services import stopping

log = logging.getLogger(__name__)
_FLOWER_ACTOR_LOG_LEVEL = os.environ.get("FLWR_LOG_LEVEL", "ERROR")


class _DropDeprecation(logging.Filter):
    """run_simulation is the only in-process API that fits Hydra (docs/REFERENCE.md);
    its deprecation notice would otherwise open every run twice. Once the run is stopping,
    Flower's tracebacks of the clients cut short (Ctrl-C reaches the actors too) go as well."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "DEPRECATED FEATURE" not in record.getMessage() and not stopping.requested()


def start_ray(init_args: dict[str, Any], actor_niceness: int | None = None) -> None:
    """`ray.init` as Flower's Ray backend does it (the clients import this package through
    PYTHONPATH), a local node set up for a shared machine (ray_node.py: client actors at
    `actor_niceness` above the driver's, side processes at nice 19; None keeps Ray's), then the
    run's signal handlers back in place of Ray's SIGTERM handler."""
    import ray

    if not ray.is_initialized():
        pythonpath = os.pathsep.join(sys.path)
        if os.environ.get("PYTHONPATH"):
            pythonpath = f"{pythonpath}{os.pathsep}{os.environ['PYTHONPATH']}"
        os.environ["PYTHONPATH"] = pythonpath
        # The actors' Flower warnings (e.g. "Manually terminating ClientAppActor" at the end)
        # are not the user's concern; their errors come back in the replies.
        actor_env = {"PYTHONPATH": pythonpath, "FLWR_LOG_LEVEL": _FLOWER_ACTOR_LOG_LEVEL}
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # actors' lines without ANSI colours
        ray.init(
            runtime_env={"env_vars": actor_env},
            **ray_node.local_init_args({"include_dashboard": False, **init_args}, actor_niceness),
        )
        node = getattr(ray._private.worker, "_global_node", None)
        if node is not None and getattr(node, "head", False):
            side = ray_node.side_processes(node)
            lowered = ray_node.lower_priority(side)
            ray_node.start_reaper(side)
            log.debug("Ray side processes at nice %d: %s", ray_node.SIDE_NICENESS, lowered)
    stopping.install_handlers()


def _drop_flower_console(flwr_log: logging.Logger) -> None:
    """Flower's own console handler (ANSI colours, a second copy of what propagates to the
    run's handlers) goes; its lines reach <run dir>/clients.log or, outside Hydra, the root."""
    from flwr.common.logger import ConsoleHandler

    for handler in list(flwr_log.handlers):
        if isinstance(handler, ConsoleHandler):
            flwr_log.removeHandler(handler)


def _kill_local_ray() -> None:
    """Cleanup before a forced exit: end the Ray processes this process started (a head
    started by `ray.init`; an attached cluster is left alone, it drops this job's actors)."""
    import ray

    node = getattr(ray._private.worker, "_global_node", None)
    if node is not None and getattr(node, "head", False):
        node.kill_all_processes(check_alive=False, allow_graceful=False)


def run_simulation(
    server_app: ServerApp,
    client_app: ClientApp,
    num_supernodes: int,
    backend_config: dict[str, Any],
    outcome: LoopOutcome,
    client_timeout: float | None = None,
    actor_start_timeout: float = 120.0,
    actor_niceness: int | None = None,
) -> None:
    """Run the apps to completion; re-raise any error of the ServerApp's round loop."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    from flwr.simulation import run_simulation as flwr_run_simulation

    guard_actor_pool(client_timeout, actor_start_timeout)
    stopping.raise_if_requested("before Ray started")
    start_ray(dict(backend_config.get("init_args") or {}), actor_niceness)
    remove_cleanup = stopping.add_cleanup(_kill_local_ray)

    flwr_log = logging.getLogger("flwr")
    flwr_log.setLevel(logging.WARNING)
    _drop_flower_console(flwr_log)
    if not any(isinstance(f, _DropDeprecation) for f in flwr_log.filters):
        flwr_log.addFilter(_DropDeprecation())
    try:
        flwr_run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=num_supernodes,
            backend_name="ray",
            backend_config=backend_config,
        )
    finally:
        remove_cleanup()
    if outcome.error is not None:
        raise outcome.error
