"""The wire protocol: metric records round-trip, failure codes stay apart from Flower's."""

from __future__ import annotations

import numpy as np
from flwr.common.constant import ErrorCode

from flair_fl import protocol
from flair_fl.learning.metrics import MetricState


def test_metric_state_survives_the_record() -> None:
    rng = np.random.default_rng(0)
    grids = [rng.integers(0, 50, size=(200, 3)) for _ in range(3)]
    rows = [rng.integers(0, 50, size=3) for _ in range(3)]
    state = MetricState(*grids, *rows, 12.5, 7)

    record = protocol.metric_state_to_record(state)
    back = protocol.metric_state_from_record(record, num_labels=3)

    for name in ("tp", "fp", "fn", "tp_half", "fp_half", "fn_half"):
        np.testing.assert_array_equal(getattr(back, name), getattr(state, name))
    assert (back.loss_sum, back.num_images) == (12.5, 7)
    assert record[protocol.EXAMPLES_WEIGHT_KEY] == 7 and record[protocol.UNIFORM_WEIGHT_KEY] == 1


def test_failure_kind_reads_the_error_code() -> None:
    flower_codes = {v for k, v in vars(ErrorCode).items() if k.isupper()}
    ours = {protocol.CLIENT_TIMEOUT, protocol.CLIENT_ACTOR_DIED, protocol.CLIENT_STOPPED}
    assert not ours & flower_codes, "our codes must not collide with Flower's"

    assert protocol.failure_kind(protocol.CLIENT_TIMEOUT) == "timeout"
    assert protocol.failure_kind(protocol.CLIENT_ACTOR_DIED) == "died"
    assert protocol.failure_kind(protocol.CLIENT_STOPPED) == "raised"
    assert protocol.failure_kind(ErrorCode.CLIENT_APP_RAISED_EXCEPTION) == "raised"
    assert protocol.failure_kind(ErrorCode.UNKNOWN) == "raised"
