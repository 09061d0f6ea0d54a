"""Scoring a change score against a label: counts at a threshold, and threshold-free measures.

- :func:`counts_at`: TP/FP/FN/TN of ``score > threshold`` over the valid (finite) scores, and
  from them F1, precision, recall, IoU, the flagged and the true change fraction
  (:class:`ChangeCounts`, summable over cities for pooled numbers);
- :class:`ScoreCurve`: streamed histograms of the scores of change and of no-change pixels
  (:class:`~deo_cli.tasks.change.threshold.ScoreHistogram` fine bins), giving the ROC AUC (the
  chance that a changed pixel scores above an unchanged one; ties inside a fine bin count one half)
  and the best F1 over every threshold (an oracle: what the score could give with a perfect
  threshold, so the gap to the F1 at the chosen threshold is what the threshold costs).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from deo_cli.tasks.change.threshold import FINE_BINS, ScoreHistogram


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


@dataclass(frozen=True)
class ChangeCounts:
    """Pixel counts of a change mask against a label (valid pixels only)."""

    tp: int
    fp: int
    fn: int
    tn: int

    def __add__(self, other: ChangeCounts) -> ChangeCounts:
        return ChangeCounts(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn, self.tn + other.tn)

    @property
    def valid(self) -> int:
        return self.tp + self.fp + self.fn + self.tn

    @property
    def f1(self) -> float:
        return _ratio(2 * self.tp, 2 * self.tp + self.fp + self.fn)

    @property
    def precision(self) -> float:
        return _ratio(self.tp, self.tp + self.fp)

    @property
    def recall(self) -> float:
        return _ratio(self.tp, self.tp + self.fn)

    @property
    def iou(self) -> float:
        return _ratio(self.tp, self.tp + self.fp + self.fn)

    @property
    def flagged_fraction(self) -> float:
        return _ratio(self.tp + self.fp, self.valid)

    @property
    def change_fraction(self) -> float:
        return _ratio(self.tp + self.fn, self.valid)

    def as_dict(self) -> dict:
        return {
            "tp": self.tp,
            "fp": self.fp,
            "fn": self.fn,
            "tn": self.tn,
            "f1": self.f1,
            "precision": self.precision,
            "recall": self.recall,
            "iou": self.iou,
            "flagged_fraction": self.flagged_fraction,
            "change_fraction": self.change_fraction,
        }


def counts_at(score: np.ndarray, label: np.ndarray, threshold: float) -> ChangeCounts:
    """Counts of ``score > threshold`` against the 0/1 ``label`` over the finite scores."""
    valid = np.isfinite(score)
    pred = np.asarray(score)[valid] > threshold
    truth = np.asarray(label)[valid].astype(bool)
    tp = int(np.sum(pred & truth))
    fp = int(np.sum(pred & ~truth))
    fn = int(np.sum(~pred & truth))
    return ChangeCounts(tp, fp, fn, int(valid.sum()) - tp - fp - fn)


def everything_changed(label: np.ndarray, valid: np.ndarray | None = None) -> ChangeCounts:
    """Counts of the trivial mask that flags every valid pixel."""
    t = np.asarray(label).astype(bool)
    if valid is not None:
        t = t[np.asarray(valid, bool)]
    pos = int(t.sum())
    return ChangeCounts(pos, int(t.size) - pos, 0, 0)


class ScoreCurve:
    """Histograms of change and no-change scores over ``[lo, hi]`` (fine bins), filled per
    scene; AUC and best-threshold F1 from them (see the module docstring)."""

    def __init__(self, lo: float, hi: float, bins: int = FINE_BINS):
        self.pos = ScoreHistogram(lo, hi, bins)
        self.neg = ScoreHistogram(lo, hi, bins)

    def add(self, score: np.ndarray, label: np.ndarray) -> ScoreCurve:
        valid = np.isfinite(score)
        s = np.asarray(score)[valid]
        t = np.asarray(label)[valid].astype(bool)
        self.pos.add(s[t])
        self.neg.add(s[~t])
        return self

    def auc(self) -> float:
        """ROC AUC: P(score of a change pixel > score of a no-change pixel), ties one half."""
        p, n = self.pos.counts.astype(np.float64), self.neg.counts.astype(np.float64)
        if not p.sum() or not n.sum():
            return float("nan")
        below = np.cumsum(n) - n
        return float(np.sum(p * (below + 0.5 * n)) / (p.sum() * n.sum()))

    def best_f1(self) -> tuple[float, float]:
        """The best F1 of ``score > t`` over ``t`` at every fine-bin edge, and that ``t``."""
        p, n = self.pos.counts, self.neg.counts
        if not p.sum():
            return float("nan"), float("nan")
        tp = np.cumsum(p[::-1])[::-1]  # change pixels in the bins at or above each bin
        fp = np.cumsum(n[::-1])[::-1]
        f1 = 2 * tp / (tp + fp + p.sum())
        i = int(np.argmax(f1))
        return float(f1[i]), float(self.pos.edges[i])


__all__ = ["ChangeCounts", "ScoreCurve", "counts_at", "everything_changed"]
