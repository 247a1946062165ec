"""The round's metric fold: exact, so the order replies arrive in never shows."""

from __future__ import annotations

import itertools

from flwr.app import MetricRecord

from flair_fl.federated.aggregate import MetricsReduction


def _fold(records: list[MetricRecord]) -> dict[str, float]:
    fold = MetricsReduction("uniform-weight")
    for record in records:
        fold.add(record)
    return fold.result()


def test_metrics_fold_is_exact_in_any_arrival_order() -> None:
    # Naive float addition of these depends on the order (0.1 + 0.2 + 0.3 != 0.3 + 0.2 + 0.1)
    losses = [0.1, 0.2, 0.3, 1e-17, 0.7]
    assert len({sum(p) for p in itertools.permutations(losses)}) > 1
    records = [
        MetricRecord({"train-loss": x, "num-examples": 3, "uniform-weight": 1, "peak-rss-mb": i})
        for i, x in enumerate(losses)
    ]
    results = [_fold(list(order)) for order in itertools.permutations(records)]
    assert all(result == results[0] for result in results)
    assert results[0]["train-loss"] == 1.3 / 5  # fsum(losses) = 1.3 exactly rounded, / weight 5
    assert results[0]["num-examples"] == 15  # summed, not averaged
    assert results[0]["peak-rss-mb"] == 4  # the maximum


def test_metrics_fold_of_nothing_is_empty() -> None:
    assert _fold([]) == {}
