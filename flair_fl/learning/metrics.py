"""FLAIR metrics, as ml-flair's `benchmark/flair_metrics.py` defines them.

- loss: binary cross-entropy with logits, averaged over every (image, label) pair;
- precision / recall / F1 at threshold 0.5 on the sigmoid (prediction positive iff p > 0.5);
- averaged precision over Keras's 200 evenly spaced thresholds
  (-1e-7, 1/199, ..., 198/199, 1 + 1e-7): AP = -sum((R[1:] - R[:-1]) * P[:-1]);
- macro = unweighted mean over labels (a label without positives scores 0: 0/0 is 0 as in
  tf.math.divide_no_nan); F1 = harmonic mean of the macro (resp. micro) precision and recall;
- micro = every (image, label) pair pooled.

Everything derives from per-label confusion counts at each threshold, which are sums, so the
statistics of batches, users or workers can be merged with `+` and the metrics computed once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

NUM_THRESHOLDS = 200
_EPS = 1e-7


def ap_thresholds(num_thresholds: int = NUM_THRESHOLDS) -> np.ndarray:
    """Keras AUC's thresholds: [-eps, 1/(n-1), ..., (n-2)/(n-1), 1+eps] (float32)."""
    inner = [(i + 1) / (num_thresholds - 1) for i in range(num_thresholds - 2)]
    return np.array([-_EPS, *inner, 1.0 + _EPS], dtype=np.float32)


def _div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """Elementwise num / den with 0 where den == 0 (tf.math.divide_no_nan)."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    out = np.zeros(np.broadcast(num, den).shape)
    np.divide(num, den, out=out, where=den != 0)
    return out


def _f1(precision: float, recall: float) -> float:
    return float(_div(np.array(2 * precision * recall), np.array(precision + recall)))


@dataclass
class MetricState:
    """Summable statistics for the FLAIR metrics over `num_labels` labels."""

    tp: np.ndarray  # (T, L) true positives at each AP threshold
    fp: np.ndarray  # (T, L)
    fn: np.ndarray  # (T, L)
    tp_half: np.ndarray  # (L,) at threshold 0.5
    fp_half: np.ndarray
    fn_half: np.ndarray
    loss_sum: float = 0.0  # BCE summed over (image, label) pairs
    num_images: int = 0

    @classmethod
    def zeros(cls, num_labels: int, num_thresholds: int = NUM_THRESHOLDS) -> MetricState:
        grid = np.zeros((num_thresholds, num_labels), dtype=np.int64)
        row = np.zeros(num_labels, dtype=np.int64)
        return cls(grid, grid.copy(), grid.copy(), row, row.copy(), row.copy())

    @property
    def num_labels(self) -> int:
        return int(self.tp.shape[1])

    @classmethod
    def from_batch(cls, logits: torch.Tensor, targets: torch.Tensor) -> MetricState:
        """Statistics of one batch of logits and multi-hot targets, both (N, L)."""
        logits, targets = logits.detach().float(), targets.detach().float()
        n, num_labels = logits.shape
        loss_sum = F.binary_cross_entropy_with_logits(logits, targets, reduction="sum").item()
        probs = torch.sigmoid(logits)
        positive = targets > 0.5
        thresholds = torch.as_tensor(ap_thresholds(), device=logits.device)
        t = len(thresholds)
        # bin b = number of thresholds strictly below p: p is predicted positive at threshold
        # j iff j < b, so counts at j are the tail sums of a per-label histogram of b.
        bins = torch.searchsorted(thresholds, probs.contiguous(), right=False)
        label_index = torch.arange(num_labels, device=logits.device).expand(n, num_labels)
        flat = (label_index * (t + 1) + bins).reshape(-1)
        pos_hist = torch.bincount(flat[positive.reshape(-1)], minlength=num_labels * (t + 1))
        neg_hist = torch.bincount(flat[~positive.reshape(-1)], minlength=num_labels * (t + 1))
        pos_counts = pos_hist.reshape(num_labels, t + 1).cpu().numpy()
        neg_counts = neg_hist.reshape(num_labels, t + 1).cpu().numpy()
        # tail[j] = sum_{b > j} hist[b]
        pos_tail = np.cumsum(pos_counts[:, ::-1], axis=1)[:, ::-1][:, 1:].T
        neg_tail = np.cumsum(neg_counts[:, ::-1], axis=1)[:, ::-1][:, 1:].T
        num_pos = pos_counts.sum(axis=1)
        pred_half = probs > 0.5
        tp_half = (pred_half & positive).sum(0).cpu().numpy()
        fp_half = (pred_half & ~positive).sum(0).cpu().numpy()
        fn_half = (~pred_half & positive).sum(0).cpu().numpy()
        return cls(
            tp=pos_tail.astype(np.int64),
            fp=neg_tail.astype(np.int64),
            fn=(num_pos[None, :] - pos_tail).astype(np.int64),
            tp_half=tp_half.astype(np.int64),
            fp_half=fp_half.astype(np.int64),
            fn_half=fn_half.astype(np.int64),
            loss_sum=loss_sum,
            num_images=n,
        )

    def __add__(self, other: MetricState) -> MetricState:
        if other.tp.shape != self.tp.shape:
            raise ValueError(
                f"cannot merge metric states of shapes {self.tp.shape} and {other.tp.shape}"
            )
        return MetricState(
            self.tp + other.tp,
            self.fp + other.fp,
            self.fn + other.fn,
            self.tp_half + other.tp_half,
            self.fp_half + other.fp_half,
            self.fn_half + other.fn_half,
            self.loss_sum + other.loss_sum,
            self.num_images + other.num_images,
        )

    def per_label_ap(self) -> np.ndarray:
        """Averaged precision of each label (0 for a label with no positives)."""
        return _average_precision(self.tp, self.fp, self.fn)

    def compute(self) -> dict[str, float]:
        """The FLAIR metrics (ml-flair names: macro_/micro_ precision, recall, f1, ap)."""
        macro_p = float(_div(self.tp_half, self.tp_half + self.fp_half).mean())
        macro_r = float(_div(self.tp_half, self.tp_half + self.fn_half).mean())
        tp, fp, fn = self.tp_half.sum(), self.fp_half.sum(), self.fn_half.sum()
        micro_p, micro_r = float(_div(tp, tp + fp)), float(_div(tp, tp + fn))
        micro_ap = _average_precision(
            self.tp.sum(1, keepdims=True),
            self.fp.sum(1, keepdims=True),
            self.fn.sum(1, keepdims=True),
        )
        pairs = self.num_images * self.num_labels
        return {
            "loss": self.loss_sum / pairs if pairs else float("nan"),
            "macro_precision": macro_p,
            "macro_recall": macro_r,
            "macro_f1": _f1(macro_p, macro_r),
            "macro_ap": float(self.per_label_ap().mean()),
            "micro_precision": micro_p,
            "micro_recall": micro_r,
            "micro_f1": _f1(micro_p, micro_r),
            "micro_ap": float(micro_ap[0]),
            "num_images": float(self.num_images),
        }


def _average_precision(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    precision = _div(tp, tp + fp)
    recall = _div(tp, tp + fn)
    return np.asarray(-np.sum((recall[1:] - recall[:-1]) * precision[:-1], axis=0))
