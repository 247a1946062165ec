"""Sample-level DP-SGD on every client (`privacy=dp_sgd`): settings, accounting, reporting.

Clients run `dp_sgd.train_local_dp_sgd`. The server does not change the aggregation (any
aggregation of DP-SGD outputs is post-processing); it only reads each reply's user id,
image count and step count to compose that user's DP-SGD runs with the same RDP
accountant the client used. Dataset sizes are treated as public, as Opacus does.
"""

from __future__ import annotations

from typing import Any

from flwr.app import Message
from torch import nn

from flair_fl.errors import ConfigError
from flair_fl.privacy import PrivacyContext
from flair_fl.privacy.accounting import SampleLevelLedger
from flair_fl.privacy.dp_sgd import DPSGDSettings, poisson_sample_rate
from flair_fl.privacy.opacus_models import require_dp_sgd_compatible
from flair_fl.privacy.stages import PlainMean
from flair_fl.protocol import EXAMPLES_WEIGHT_KEY, META_KEY


class LedgerStage(PlainMean):
    """The plain mean (DP-SGD's outputs need nothing more); after each round it records
    every accepted user's DP-SGD run in the ledger."""

    def __init__(self, privacy: LocalDPSGD):
        self.privacy = privacy

    def after_round(self, server_round: int, accepted: list[Message]) -> None:
        """Account each accepted user's DP-SGD run."""
        self.privacy.record(server_round, [r for r in accepted if not r.has_error()])


class LocalDPSGD:
    """Per-example clipping and noise in every client's local SGD (Opacus DP-SGD)."""

    def __init__(
        self,
        noise_multiplier: float = 1.0,
        max_grad_norm: float = 1.0,
        delta: float = 1e-5,
        batch_size: int = 16,
    ):
        for key, value in (
            ("noise_multiplier", noise_multiplier),
            ("max_grad_norm", max_grad_norm),
            ("batch_size", batch_size),
        ):
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise ConfigError(f"privacy.{key}={value!r}: must be a number > 0")
        if not 0.0 < delta < 1.0:
            raise ConfigError(f"privacy.delta={delta}: must be in (0, 1)")
        self.settings = DPSGDSettings(float(noise_multiplier), float(max_grad_norm), float(delta))
        self.batch_size = int(batch_size)
        self.ledger = SampleLevelLedger(self.settings.noise_multiplier, self.settings.delta)
        self.round_worst: dict[int, float] = {}
        self.rounds: int | None = None

    def round_stages(self, context: PrivacyContext) -> LedgerStage:
        self.rounds = context.num_rounds
        return LedgerStage(self)

    def client_settings(self) -> dict[str, Any] | None:
        return dict(self.settings.__dict__)

    def required_separation(self) -> int | None:
        return None  # any cohort sampling: the guarantee is per image, composed per user

    def check_model(self, model: nn.Module) -> None:
        require_dp_sgd_compatible(model)

    def record(self, server_round: int, replies: list[Message]) -> None:
        """Compose each replying user's run: rate 1/ceil(n/B), as many steps as it took."""
        worst = 0.0
        for reply in replies:
            metrics = next(iter(reply.content.metric_records.values()))
            user = str(reply.content.config_records[META_KEY]["user-id"])
            num_examples = int(metrics[EXAMPLES_WEIGHT_KEY])  # type: ignore[arg-type]
            steps = int(metrics["num-steps"])  # type: ignore[arg-type]
            rate = poisson_sample_rate(num_examples, self.batch_size)
            worst = max(worst, self.ledger.record(user, rate, steps))
        self.round_worst[server_round] = worst

    def round_metrics(self, server_round: int) -> dict[str, float]:
        return {
            "dp_sgd_epsilon": self.ledger.worst_epsilon,
            "dp_sgd_epsilon_round": self.round_worst.get(server_round, float("nan")),
        }

    def stop_reason(self, server_round: int) -> str | None:
        return None  # which users train next is not known here; no budget stop for DP-SGD

    def state_dict(self) -> dict[str, Any]:
        """Every user's DP-SGD steps so far (compact: steps per sampling rate)."""
        return {
            "user_steps": {u: dict(steps) for u, steps in self.ledger.user_steps.items()},
            "worst_epsilon": self.ledger.worst_epsilon,
            "round_worst": dict(self.round_worst),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()` on resume."""
        if not state:
            return
        self.ledger.user_steps = {u: dict(steps) for u, steps in state["user_steps"].items()}
        self.ledger.worst_epsilon = float(state["worst_epsilon"])
        self.round_worst = {int(r): float(e) for r, e in state["round_worst"].items()}

    def describe(self) -> dict[str, Any]:
        return {
            "mechanism": "dp-sgd",
            "unit": "example (one image of one user)",
            "accountant": "rdp",
            "noise_multiplier": self.settings.noise_multiplier,
            "max_grad_norm": self.settings.max_grad_norm,
            "delta": self.settings.delta,
            "batch_size": self.batch_size,
            "q": "per user: 1 / ceil(images / batch_size) on each local step",
            "rounds": self.rounds,
            "epsilon": "per round: dp_sgd_epsilon (worst user, composed over the run)",
        }
