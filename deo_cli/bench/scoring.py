"""Test-set scores of the paper's metrics with a 95 % bootstrap interval over test samples.

Each scorer keeps one small statistic per test sample (a correct flag, TP/FP/FN counts or a
confusion matrix), computes the metric on all of them, and resamples samples with replacement
for the interval (:func:`deo_cli.metrics.bootstrap_ci`, percentile method), as GEO-Bench and
torchgeo-bench report. The metrics are those of docs/method.md §3.1: overall accuracy (m-so2sat,
m-eurosat), multi-label micro F1 (m-bigearthnet), macro mIoU (segmentation), F1 of the change
class (OSCD).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from deo_cli.metrics import bootstrap_ci, miou_from_confusion

__all__ = ["Score", "score_accuracy", "score_change", "score_micro_f1", "score_miou"]


@dataclass(frozen=True)
class Score:
    """A metric's value on the test set and its bootstrap interval (fractions in 0-1)."""

    metric: str
    value: float
    ci_low: float
    ci_high: float
    n: int


def _f1(tp_fp_fn: np.ndarray) -> float:
    tp, fp, fn = (float(v) for v in np.asarray(tp_fp_fn).reshape(-1, 3).sum(0))
    return 2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) else float("nan")


def _ci(stats: np.ndarray, fn, n_boot: int, seed: int) -> tuple[float, float]:
    if n_boot <= 0 or len(stats) == 0:
        return float("nan"), float("nan")
    return bootstrap_ci(stats, fn, n_boot=n_boot, seed=seed)


def score_accuracy(pred, target, n_boot: int = 1000, seed: int = 0) -> Score:
    """Overall accuracy of single-label predictions."""
    correct = np.asarray(pred).ravel() == np.asarray(target).ravel()
    value = float(correct.mean()) if correct.size else float("nan")
    lo, hi = _ci(correct.astype(np.float64), np.mean, n_boot, seed)
    return Score("overall_accuracy", value, lo, hi, int(correct.size))


def score_micro_f1(pred, target, n_boot: int = 1000, seed: int = 0) -> Score:
    """Micro F1 over all (sample, label) pairs of multi-hot predictions ``(N, K)``."""
    p = np.asarray(pred, bool)
    t = np.asarray(target, bool)
    per = np.stack([(p & t).sum(1), (p & ~t).sum(1), (~p & t).sum(1)], axis=1).astype(np.int64)
    lo, hi = _ci(per, _f1, n_boot, seed)
    return Score("micro_f1", _f1(per), lo, hi, int(len(per)))


def score_miou(confusions, n_boot: int = 1000, seed: int = 0) -> Score:
    """Macro mIoU from per-sample confusion matrices ``(N, K, K)`` (summed, then IoU)."""
    cms = np.asarray(confusions, dtype=np.int64)
    value = miou_from_confusion(cms.sum(0)) if len(cms) else float("nan")
    lo, hi = _ci(cms, lambda m: miou_from_confusion(m.sum(0)), n_boot, seed)
    return Score("miou", value, lo, hi, int(len(cms)))


def score_change(tp_fp_fn, n_boot: int = 1000, seed: int = 0) -> dict[str, Score]:
    """F1 and IoU of the change class from per-sample (per-city) ``(N, 3)`` TP/FP/FN counts."""
    per = np.asarray(tp_fp_fn, dtype=np.int64).reshape(-1, 3)

    def iou(m: np.ndarray) -> float:
        tp, fp, fn = (float(v) for v in m.reshape(-1, 3).sum(0))
        return tp / (tp + fp + fn) if (tp + fp + fn) else float("nan")

    f1_lo, f1_hi = _ci(per, _f1, n_boot, seed)
    iou_lo, iou_hi = _ci(per, iou, n_boot, seed)
    return {
        "f1": Score("f1", _f1(per), f1_lo, f1_hi, len(per)),
        "iou": Score("iou", iou(per), iou_lo, iou_hi, len(per)),
    }
