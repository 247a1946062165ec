"""Privacy as stages of the federated round (the loop in federated/round.py calls them).

    begin_round   before sending: the global weights (updates are measured from them) and
                  the strategy's payload (central DP refuses client state in it)
    per_update    each reply's weights as they arrive, before they are folded into the
                  round's sum: what to fold (central DP: the update clipped to C), or why
                  the reply is rejected
    on_sum        the round's sum, once: the mean the strategy's server step gets (central
                  DP: noise on the sum, divided by the sampled cohort)
    after_round   the accepted replies (metrics only), after the server step (DP-SGD's
                  per-user ledger)

Strategies know nothing of these: the server step acts on whatever mean `on_sum` returns,
so a server optimizer is post-processing of the private aggregate. `PlainMean` is the
stage of a run without server-side privacy: the weights as they are, their weighted mean.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
from flwr.app import ArrayRecord, Message

from flair_fl.protocol import Layout


class RoundSum(Protocol):
    """What the round's fold holds after the last reply (federated/aggregate.py)."""

    layout: Layout | None  # None: nothing was folded
    total: np.ndarray | None  # float64 sum of the folded updates (weighted)
    weight: float  # sum of their weights
    count: int  # updates folded


class RoundPrivacy(Protocol):
    """The privacy stages of a round (module doc)."""

    def begin_round(self, server_round: int, arrays: ArrayRecord, payload: ArrayRecord) -> None:
        """Before the round's messages go out."""
        ...

    def per_update(self, layout: Layout, flat: np.ndarray) -> np.ndarray | str:
        """One reply's flat weights -> what to fold into the sum, or why it is rejected."""
        ...

    def on_sum(self, server_round: int, summed: RoundSum) -> ArrayRecord | None:
        """The round's mean for the server step (None: the model stays as it is)."""
        ...

    def after_round(self, server_round: int, accepted: list[Message]) -> None:
        """After the server step, with the round's accepted replies (arrays removed)."""
        ...


class PlainMean:
    """No server-side privacy: every update as it is, the weighted mean of the sum."""

    def begin_round(self, server_round: int, arrays: ArrayRecord, payload: ArrayRecord) -> None:
        pass

    def per_update(self, layout: Layout, flat: np.ndarray) -> np.ndarray | str:
        return flat

    def on_sum(self, server_round: int, summed: RoundSum) -> ArrayRecord | None:
        if not summed.count or summed.layout is None or summed.total is None:
            return None
        return summed.layout.to_record((summed.total / summed.weight).astype(np.float32))

    def after_round(self, server_round: int, accepted: list[Message]) -> None:
        pass
