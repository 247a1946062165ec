"""Differential privacy, as one swappable config node (`privacy=...`).

Every privacy option implements `Privacy`; what it does in a round it does as the round's
stages (`round_stages`, privacy/stages.py), which the round loop runs around its fold:
strategies know nothing of privacy. `privacy=none` is the null object `NoPrivacy`: its
stages are the plain mean, it asks nothing of clients and never stops a run.
`privacy=dp` / `dp_adaptive`: `central.CentralDP` (user-level, on the server);
`privacy=dp_sgd`: `local.LocalDPSGD` (sample-level DP-SGD on each client, Opacus).
Submodules are not imported here: they pull in Opacus, which only DP runs need; Flower
and torch are only named in annotations, so `python -m flair_fl.privacy calibrate` starts
without them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from torch import nn

    from flair_fl.privacy.stages import RoundPrivacy


@dataclass(frozen=True)
class PrivacyContext:
    """What a privacy mechanism needs to know about the run it protects."""

    cohort_size: int  # users sampled per round (the noise is calibrated to this)
    population_size: int  # train users the cohort is sampled from
    num_rounds: int  # planned rounds (the accountant's horizon)
    seed: int  # DP noise derives from it
    weighted_by_key: str  # the strategy's weighting key (DP needs uniform weights)


class Privacy(Protocol):
    """The interface the experiment uses; see NoPrivacy for the trivial case."""

    def round_stages(self, context: PrivacyContext) -> RoundPrivacy:
        """The stages the round loop runs (calibrated for `context`; built once)."""
        ...

    def client_settings(self) -> dict[str, Any] | None:
        """Plain settings for client-side DP (DP-SGD), or None."""
        ...

    def required_separation(self) -> int | None:
        """Rounds a user's participations must lie apart for the guarantee to hold (banded
        MF: the run then samples min-separated cohorts), or None: any cohort sampler."""
        ...

    def round_metrics(self, server_round: int) -> dict[str, float]:
        """Per-round DP figures to log (epsilon spent, clip norm, noise std, ...)."""
        ...

    def stop_reason(self, server_round: int) -> str | None:
        """Why round `server_round` must not run (budget exhausted), or None."""
        ...

    def describe(self) -> dict[str, Any]:
        """The settings in effect, printed at start and saved with the outputs."""
        ...

    def check_model(self, model: nn.Module) -> None:
        """Raise ConfigError, in the driver, if the mechanism cannot train this model."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """Mutable state for checkpoints (clip norm, accountant progress, ...)."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()` on resume."""
        ...


class NoPrivacy:
    """No differential privacy: the strategy runs unchanged."""

    def round_stages(self, context: PrivacyContext) -> RoundPrivacy:
        from flair_fl.privacy.stages import PlainMean  # numpy, Flower: only runs need them

        return PlainMean()

    def client_settings(self) -> dict[str, Any] | None:
        return None

    def required_separation(self) -> int | None:
        return None

    def round_metrics(self, server_round: int) -> dict[str, float]:
        return {}

    def stop_reason(self, server_round: int) -> str | None:
        return None

    def describe(self) -> dict[str, Any]:
        return {"mechanism": "none"}

    def check_model(self, model: nn.Module) -> None:
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
