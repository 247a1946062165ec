"""FLAIR metrics vs scikit-learn, an independent Keras-formula implementation, hand-worked cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import average_precision_score, precision_score, recall_score

from flair_fl.learning.metrics import MetricState

NUM_THRESHOLDS = 200


def random_batch(
    seed: int, n: int = 2000, num_labels: int = 6
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-hot targets with prevalences 5%-50% and informative logits."""
    generator = torch.Generator().manual_seed(seed)
    prevalence = torch.linspace(0.05, 0.5, num_labels)
    targets = (torch.rand(n, num_labels, generator=generator) < prevalence).float()
    logits = torch.randn(n, num_labels, generator=generator) + 1.5 * (2 * targets - 1)
    return logits, targets


def probabilities(logits: torch.Tensor) -> np.ndarray:
    """The float32 sigmoid the metric (and Keras with from_logits=True) thresholds."""
    return torch.sigmoid(logits.float()).numpy()


def keras_thresholds(num_thresholds: int = NUM_THRESHOLDS) -> np.ndarray:
    """tf.keras.metrics.AUC's default thresholds, written out from its source."""
    epsilon = 1e-7
    inner = [(i + 1) * 1.0 / (num_thresholds - 1) for i in range(num_thresholds - 2)]
    return np.array([0.0 - epsilon, *inner, 1.0 + epsilon], dtype=np.float32)


def keras_average_precision(probs: np.ndarray, positive: np.ndarray) -> float:
    """ml-flair's AveragedPrecision for one label (or pooled pairs), straight from the formula.

    Keras counts a prediction as positive at threshold t iff p > t; precision and recall use
    divide_no_nan; AP = -sum((R[1:] - R[:-1]) * P[:-1]).
    """
    predicted = probs.reshape(-1)[:, None] > keras_thresholds()[None, :]
    actual = positive.reshape(-1)[:, None].astype(bool)
    tp = (predicted & actual).sum(0).astype(np.float64)
    fp = (predicted & ~actual).sum(0).astype(np.float64)
    fn = (~predicted & actual).sum(0).astype(np.float64)
    precision = np.divide(tp, tp + fp, out=np.zeros_like(tp), where=tp + fp > 0)
    recall = np.divide(tp, tp + fn, out=np.zeros_like(tp), where=tp + fn > 0)
    return float(-np.sum((recall[1:] - recall[:-1]) * precision[:-1]))


def threshold_bins(probs: np.ndarray) -> np.ndarray:
    """How many of the 200 thresholds each probability exceeds (all the metric can see)."""
    return np.searchsorted(keras_thresholds(), probs, side="left")


# --- against references on random data ---------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_ap_equals_keras_formula(seed: int) -> None:
    # Prepare
    logits, targets = random_batch(seed)
    probs, positive = probabilities(logits), targets.numpy()

    # Execute
    state = MetricState.from_batch(logits, targets)
    metrics = state.compute()

    # Assert
    per_label = [
        keras_average_precision(probs[:, k], positive[:, k]) for k in range(probs.shape[1])
    ]
    np.testing.assert_allclose(state.per_label_ap(), per_label, rtol=0, atol=1e-12)
    assert metrics["macro_ap"] == pytest.approx(np.mean(per_label), abs=1e-12)
    assert metrics["micro_ap"] == pytest.approx(keras_average_precision(probs, positive), abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
def test_ap_matches_sklearn(seed: int) -> None:
    # Prepare
    logits, targets = random_batch(seed)
    probs, positive = probabilities(logits), targets.numpy()

    # Execute
    metrics = MetricState.from_batch(logits, targets).compute()
    per_label = MetricState.from_batch(logits, targets).per_label_ap()

    # Assert 1: exactly sklearn's AP of the scores as the 200 thresholds resolve them. Keras
    # sees only which threshold interval a score falls in, so scores in one interval tie; with
    # ties sklearn's step-wise AP, sum (R_n - R_{n-1}) P_n, is the same sum as Keras's.
    bins = threshold_bins(probs)
    np.testing.assert_allclose(
        per_label, average_precision_score(positive, bins, average=None), rtol=0, atol=1e-9
    )
    assert metrics["micro_ap"] == pytest.approx(
        average_precision_score(positive, bins, average="micro"), abs=1e-9
    )
    # Assert 2: close to sklearn's AP of the raw scores. The ties inside each 1/199-wide
    # interval move AP by far less than 0.005 here (~10 scores per interval; observed gap
    # <= 0.0016 over 5 seeds): the error is bounded by the precision change inside one interval.
    assert metrics["macro_ap"] == pytest.approx(
        average_precision_score(positive, probs, average="macro"), abs=0.005
    )
    assert metrics["micro_ap"] == pytest.approx(
        average_precision_score(positive, probs, average="micro"), abs=0.005
    )


@pytest.mark.parametrize("seed", [0, 1])
def test_precision_recall_f1_match_sklearn(seed: int) -> None:
    # Prepare
    logits, targets = random_batch(seed, num_labels=5)
    predicted, positive = probabilities(logits) > 0.5, targets.numpy()

    # Execute
    metrics = MetricState.from_batch(logits, targets).compute()

    # Assert
    for average in ("macro", "micro"):
        precision = precision_score(positive, predicted, average=average, zero_division=0)
        recall = recall_score(positive, predicted, average=average, zero_division=0)
        assert metrics[f"{average}_precision"] == pytest.approx(precision, abs=1e-12)
        assert metrics[f"{average}_recall"] == pytest.approx(recall, abs=1e-12)
        # ml-flair's F1: harmonic mean of the averaged precision and recall
        assert metrics[f"{average}_f1"] == pytest.approx(
            2 * precision * recall / (precision + recall), abs=1e-12
        )


def test_loss_is_bce_with_logits_mean() -> None:
    # Prepare
    logits, targets = random_batch(3, n=300)

    # Execute
    metrics = MetricState.from_batch(logits, targets).compute()

    # Assert
    want = F.binary_cross_entropy_with_logits(logits.double(), targets.double()).item()
    assert metrics["loss"] == pytest.approx(want, rel=1e-5)
    assert metrics["num_images"] == 300


# --- summability -------------------------------------------------------------------------


def test_batches_merged_with_plus_equal_the_whole() -> None:
    # Prepare
    logits, targets = random_batch(4, n=600)
    whole = MetricState.from_batch(logits, targets)

    # Execute
    parts = [
        MetricState.from_batch(logits[a:b], targets[a:b]) for a, b in [(0, 1), (1, 250), (250, 600)]
    ]
    merged = MetricState.zeros(num_labels=6) + parts[0] + parts[1] + parts[2]

    # Assert
    for name in ("tp", "fp", "fn", "tp_half", "fp_half", "fn_half"):
        np.testing.assert_array_equal(getattr(merged, name), getattr(whole, name))
    assert merged.num_images == whole.num_images == 600
    assert merged.loss_sum == pytest.approx(whole.loss_sum, rel=1e-6)
    for key, value in whole.compute().items():
        assert merged.compute()[key] == pytest.approx(value, rel=1e-6), key


def test_merging_different_label_counts_fails() -> None:
    # Prepare
    a, b = MetricState.zeros(num_labels=3), MetricState.zeros(num_labels=4)

    # Execute / Assert
    with pytest.raises(ValueError, match="cannot merge"):
        _ = a + b


# --- hand-worked cases -------------------------------------------------------------------


def logit(p: float) -> float:
    return float(np.log(p / (1 - p)))


def test_ap_of_a_small_ranking() -> None:
    # Prepare: scores 0.9 (+), 0.8 (-), 0.3 (+), 0.1 (-). Recall falls from 1 to 1/2 when the
    # threshold passes 0.3 (precision just below: 2/3) and from 1/2 to 0 when it passes 0.9
    # (precision just below: 1): AP = 1/2 * 2/3 + 1/2 * 1 = 5/6.
    logits = torch.tensor([[logit(0.9)], [logit(0.8)], [logit(0.3)], [logit(0.1)]])
    targets = torch.tensor([[1.0], [0.0], [1.0], [0.0]])

    # Execute
    metrics = MetricState.from_batch(logits, targets).compute()

    # Assert: at 0.5, predicted {0.9, 0.8}: precision 1/2, recall 1/2
    assert metrics["macro_ap"] == pytest.approx(5 / 6)
    assert metrics["micro_ap"] == pytest.approx(5 / 6)
    assert metrics["macro_precision"] == pytest.approx(0.5)
    assert metrics["macro_recall"] == pytest.approx(0.5)
    assert metrics["macro_f1"] == pytest.approx(0.5)


def perfect_logits(targets: torch.Tensor) -> torch.Tensor:
    return 10.0 * (2 * targets - 1)


TARGETS = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0], [0.0, 0.0, 0.0], [1.0, 1.0, 0.0]])


def test_all_correct_scores_one() -> None:
    # Prepare / Execute
    metrics = MetricState.from_batch(perfect_logits(TARGETS), TARGETS).compute()

    # Assert
    for average in ("macro", "micro"):
        for name in ("precision", "recall", "f1", "ap"):
            assert metrics[f"{average}_{name}"] == pytest.approx(1.0), f"{average}_{name}"


def test_all_wrong_scores_zero() -> None:
    # Prepare / Execute
    metrics = MetricState.from_batch(-perfect_logits(TARGETS), TARGETS).compute()

    # Assert: precision, recall and F1 are 0. AP is not: at Keras's first threshold (-1e-7)
    # every pair is predicted positive, so the recall drop from 1 to 0 at the second threshold
    # is weighted by the prevalence, the precision of "everything positive".
    for average in ("macro", "micro"):
        for name in ("precision", "recall", "f1"):
            assert metrics[f"{average}_{name}"] == 0.0, f"{average}_{name}"
    assert metrics["macro_ap"] == pytest.approx(TARGETS.mean(0).mean().item())
    assert metrics["micro_ap"] == pytest.approx(TARGETS.mean().item())


def test_label_without_positives_counts_zero_in_macro() -> None:
    # Prepare: label 0 perfectly predicted, label 1 never present and never predicted
    targets = torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 0.0]])
    logits = perfect_logits(targets)

    # Execute
    state = MetricState.from_batch(logits, targets)
    metrics = state.compute()

    # Assert: macro averages (1 + 0) / 2; micro pools the pairs, where label 1 adds nothing
    np.testing.assert_allclose(state.per_label_ap(), [1.0, 0.0])
    assert metrics["macro_ap"] == pytest.approx(0.5)
    assert metrics["macro_precision"] == pytest.approx(0.5)
    assert metrics["macro_recall"] == pytest.approx(0.5)
    assert metrics["macro_f1"] == pytest.approx(0.5)
    assert metrics["micro_precision"] == pytest.approx(1.0)
    assert metrics["micro_recall"] == pytest.approx(1.0)
    assert metrics["micro_ap"] == pytest.approx(1.0)


def test_probability_one_half_is_negative() -> None:
    # Prepare: logit 0 -> sigmoid exactly 0.5; Keras predicts positive only for p > 0.5
    logits = torch.tensor([[0.0], [0.0], [1e-3]])
    targets = torch.tensor([[1.0], [0.0], [1.0]])

    # Execute
    state = MetricState.from_batch(logits, targets)

    # Assert
    assert torch.sigmoid(torch.tensor(0.0)).item() == 0.5
    assert state.tp_half.tolist() == [1]  # only the 1e-3 logit
    assert state.fp_half.tolist() == [0]
    assert state.fn_half.tolist() == [1]
    assert state.compute()["micro_precision"] == 1.0
    assert state.compute()["micro_recall"] == 0.5
