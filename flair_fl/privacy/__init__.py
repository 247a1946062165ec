"""Differential privacy. `privacy=none` is a null object: it returns the strategy as is."""

from __future__ import annotations

from typing import Any

from flwr.serverapp.strategy import Strategy


class NoPrivacy:
    """No differential privacy: the strategy runs unchanged."""

    def wrap(self, strategy: Strategy) -> Strategy:
        return strategy

    def describe(self) -> dict[str, Any]:
        return {"mechanism": "none"}
