"""The one adapter around Flower's in-process simulation engine (Ray backend)."""

from __future__ import annotations

import logging
import os
from typing import Any

from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

from flair_fl.federated.server_app import LoopOutcome


class _DropDeprecation(logging.Filter):
    """run_simulation is the only in-process API that fits Hydra (shared/FLOWER_NOTES.md);
    its deprecation notice would otherwise open every run twice."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "DEPRECATED FEATURE" not in record.getMessage()


def run_simulation(
    server_app: ServerApp,
    client_app: ClientApp,
    num_supernodes: int,
    backend_config: dict[str, Any],
    outcome: LoopOutcome,
) -> None:
    """Run the apps to completion; re-raise any error of the ServerApp's round loop."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    from flwr.simulation import run_simulation as flwr_run_simulation

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
