"""Clipping each user's update as it is folded in (central DP's per-update stage)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from flair_fl.protocol import Layout


@dataclass
class UpdateClip:
    """Turns a reply's weights into its update (reply - global) scaled to L2 norm <= C.

    `norms` keeps every received update's norm before clipping (the round's statistics and
    adaptive clipping's count); float64 throughout, as the sum it feeds.
    """

    layout: Layout  # of the global weights sent this round
    current: np.ndarray  # those weights, flat (float64)
    clip_norm: float
    norms: list[float] = field(default_factory=list)

    @property
    def clipped_fraction(self) -> float:
        """Share of updates that were scaled down (norm > C); NaN with no updates."""
        if not self.norms:
            return float("nan")
        return sum(n > self.clip_norm for n in self.norms) / len(self.norms)

    @property
    def unclipped_count(self) -> int:
        """Updates with norm <= C (the count adaptive clipping privatises)."""
        return sum(n <= self.clip_norm for n in self.norms)

    def __call__(self, layout: Layout, flat: np.ndarray) -> np.ndarray | str:
        """The clipped update of one reply's weights, or why it is rejected."""
        if layout.names != self.layout.names:
            extra = sorted(set(layout.names) - set(self.layout.names))
            if extra:
                raise ValueError(
                    "central DP clips and noises model weights only, but the clients send "
                    f"more arrays ({', '.join(extra[:3])}, ...): client state such as "
                    "SCAFFOLD's control variates would leave the privacy guarantee; use a "
                    "strategy without it"
                )
        if layout != self.layout:
            return "its arrays differ from the other replies' (names or shapes)"
        update = flat.astype(np.float64) - self.current
        norm = math.sqrt(float(np.dot(update, update)))
        if not math.isfinite(norm):
            return "non-finite values (NaN/inf) in the update"
        scale = min(1.0, self.clip_norm / norm) if norm > 0 else 1.0
        self.norms.append(norm)
        return update * scale if scale != 1.0 else update
