"""Metrics of the paper's tables (docs/method.md §3.1), in NumPy, plus bootstrap intervals.

- segmentation: macro mIoU over classes (``ignore_index`` excluded) from a confusion matrix;
- change detection: F1 and IoU of the change class;
- classification: overall accuracy; multi-label micro F1 (BigEarthNet).

:class:`ConfusionMatrix` accumulates over batches, so a whole test split never has to sit in
memory; :func:`bootstrap_ci` resamples per-sample statistics for a 95 % interval (as GEO-Bench
and torchgeo-bench report).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


class ConfusionMatrix:
    """``num_classes`` x ``num_classes`` counts (rows: truth, columns: prediction)."""

    def __init__(self, num_classes: int, ignore_index: int | None = None):
        self.num_classes = int(num_classes)
        self.ignore_index = ignore_index
        self.matrix = np.zeros((num_classes, num_classes), dtype=np.int64)

    def update(self, pred, target) -> np.ndarray:
        """Add predictions and truths (any shape, integer classes); returns this batch's matrix."""
        p = np.asarray(pred).ravel().astype(np.int64)
        t = np.asarray(target).ravel().astype(np.int64)
        keep = (t >= 0) & (t < self.num_classes)
        if self.ignore_index is not None:
            keep &= t != self.ignore_index
        p, t = p[keep], t[keep]
        if p.size and (p.min() < 0 or p.max() >= self.num_classes):
            raise ValueError("prediction outside 0..num_classes-1")
        batch = np.bincount(t * self.num_classes + p, minlength=self.num_classes**2).reshape(
            self.num_classes, -1
        )
        self.matrix += batch
        return batch

    def iou(self) -> np.ndarray:
        return iou_from_confusion(self.matrix)

    def miou(self) -> float:
        return miou_from_confusion(self.matrix)

    def accuracy(self) -> float:
        total = self.matrix.sum()
        return float(np.trace(self.matrix) / total) if total else float("nan")

    def f1(self, cls: int = 1) -> float:
        return f1_from_confusion(self.matrix, cls)


def iou_from_confusion(m: np.ndarray) -> np.ndarray:
    """Per-class IoU; NaN for classes absent from both truth and prediction."""
    tp = np.diag(m).astype(np.float64)
    denom = m.sum(0) + m.sum(1) - tp
    return np.divide(tp, denom, out=np.full(len(tp), np.nan), where=denom > 0)


def miou_from_confusion(m: np.ndarray) -> float:
    """Macro mean IoU over the classes present (docs/method.md §3.1: macro mIoU)."""
    iou = iou_from_confusion(m)
    return float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan")


def f1_from_confusion(m: np.ndarray, cls: int = 1) -> float:
    """F1 of class ``cls`` (OSCD/LEVIR: the change class)."""
    tp = float(m[cls, cls])
    fp = float(m[:, cls].sum() - tp)
    fn = float(m[cls, :].sum() - tp)
    return 2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) > 0 else float("nan")


def binary_scores(pred, target, valid=None) -> dict[str, float]:
    """Precision, recall, F1 and IoU of the positive class (change), and overall accuracy."""
    p = np.asarray(pred, bool).ravel()
    t = np.asarray(target, bool).ravel()
    if valid is not None:
        v = np.asarray(valid, bool).ravel()
        p, t = p[v], t[v]
    tp = float(np.sum(p & t))
    fp = float(np.sum(p & ~t))
    fn = float(np.sum(~p & t))
    tn = float(np.sum(~p & ~t))
    nan = float("nan")
    return {
        "precision": tp / (tp + fp) if tp + fp else nan,
        "recall": tp / (tp + fn) if tp + fn else nan,
        "f1": 2 * tp / (2 * tp + fp + fn) if 2 * tp + fp + fn else nan,
        "iou": tp / (tp + fp + fn) if tp + fp + fn else nan,
        "accuracy": (tp + tn) / (tp + tn + fp + fn) if p.size else nan,
    }


def overall_accuracy(pred, target) -> float:
    p, t = np.asarray(pred).ravel(), np.asarray(target).ravel()
    return float(np.mean(p == t)) if p.size else float("nan")


def multilabel_micro_f1(pred, target) -> float:
    """Micro-averaged F1 over all (sample, label) pairs (docs/method.md §3.1: m-bigearthnet)."""
    p, t = np.asarray(pred, bool), np.asarray(target, bool)
    tp = float(np.sum(p & t))
    fp = float(np.sum(p & ~t))
    fn = float(np.sum(~p & t))
    return 2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) else float("nan")


def bootstrap_ci(
    per_sample: list | np.ndarray,
    statistic: Callable[[np.ndarray], float],
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float]:
    """A percentile bootstrap interval for ``statistic`` over resampled test samples.

    ``per_sample`` is indexable by a sample index array: for mIoU pass the per-sample confusion
    matrices (N, K, K) and ``statistic=lambda m: miou_from_confusion(m.sum(0))``; for accuracy a
    boolean vector and ``np.mean``.
    """
    data = np.asarray(per_sample)
    n = len(data)
    if n == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    stats = np.empty(n_boot)
    for i in range(n_boot):
        stats[i] = statistic(data[rng.integers(0, n, n)])
    lo, hi = np.nanpercentile(stats, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(lo), float(hi)
