"""From a change score to a change mask: Otsu, a fixed value or a percentile.

Scores can be far larger than memory (a score on the input grid of a 100 km scene), so the
threshold is computed from a histogram that the score sink fills block by block while the
scores stream to disk (:class:`ScoreHistogram`), never from an array of every score:

- the histogram has :data:`FINE_BINS` bins over the score's known range (``[0, 2]`` for a
  cosine distance, ``[0, 1]`` for a probability) and records the exact minimum and maximum;
- **Otsu** (:func:`otsu_from_histogram`): the fine bins between the observed minimum and
  maximum are merged into :data:`OTSU_BINS` (256) bins, and the cut maximising the
  between-class variance is taken; where several cuts tie (an empty gap between two modes),
  the middle of the tied run. :func:`otsu_threshold` does the same from an array, exactly as
  the benchmark's zero-shot OSCD scorer did. Scores that all lie within :data:`MIN_SPREAD` of
  the score range (two identical dates) give their maximum: nothing changed;
- **percentile**: the score below which ``p`` % of the valid scores lie, interpolated inside
  the fine bin that holds it (error below one fine bin: 2/65536 for cosine distances);
- **fixed**: the value given.

A location is *changed* when its score is strictly above the threshold.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from deo_cli.errors import UsageError

#: Bins of the streaming histogram over the score's range.
FINE_BINS = 1 << 16
#: Bins Otsu's method works on (between the observed minimum and maximum).
OTSU_BINS = 256
#: Scores spread over less than this share of the score range hold no two classes: Otsu's
#: threshold is then their maximum (nothing changed), not a cut through numerical noise.
MIN_SPREAD = 1e-4

METHODS = ("otsu", "fixed", "percentile")


def _otsu_cut(hist: np.ndarray, edges: np.ndarray) -> float:
    """The Otsu cut of a histogram with ``len(hist) + 1`` ``edges``."""
    hist = np.asarray(hist, np.float64)
    centers = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centers)
    mean0 = np.divide(m0, w0, out=np.zeros_like(m0), where=w0 > 0)
    mean1 = np.divide(m0[-1] - m0, w1, out=np.zeros_like(m0), where=w1 > 0)
    between = (w0 * w1 * (mean0 - mean1) ** 2)[:-1]
    if between.size == 0:
        return float(edges[1])
    # cuts inside an empty gap between the modes tie: take the middle of the tied run
    best = np.flatnonzero(between >= between.max() * (1 - 1e-9))
    run = best[: int(np.argmax(np.diff(np.append(best, best[-1] + 2)) > 1)) + 1]
    return float((edges[1:][run[0]] + edges[1:][run[-1]]) / 2)


def otsu_threshold(values: np.ndarray, bins: int = OTSU_BINS) -> float:
    """Otsu's threshold of the finite ``values``: the cut of a ``bins``-bin histogram between
    their minimum and maximum that maximises the between-class variance (NaN if none)."""
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    if v.size == 0:
        return float("nan")
    lo, hi = float(v.min()), float(v.max())
    if hi <= lo:
        return hi
    hist, edges = np.histogram(v, bins=bins, range=(lo, hi))
    return _otsu_cut(hist, edges)


class ScoreHistogram:
    """A fixed-range histogram of scores filled block by block, with the exact min and max.

    Scores outside ``[lo, hi]`` are clipped into the end bins (and still move min/max).
    """

    def __init__(self, lo: float, hi: float, bins: int = FINE_BINS):
        if not hi > lo:
            raise ValueError("histogram range must have hi > lo")
        self.lo, self.hi, self.bins = float(lo), float(hi), int(bins)
        self.counts = np.zeros(self.bins, np.int64)
        self.vmin, self.vmax = np.inf, -np.inf

    @property
    def edges(self) -> np.ndarray:
        return np.linspace(self.lo, self.hi, self.bins + 1)

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def add(self, scores: np.ndarray) -> None:
        """Count the finite values of ``scores`` (any shape)."""
        v = np.asarray(scores, np.float64).ravel()
        v = v[np.isfinite(v)]
        if v.size == 0:
            return
        self.vmin = min(self.vmin, float(v.min()))
        self.vmax = max(self.vmax, float(v.max()))
        idx = ((v - self.lo) * (self.bins / (self.hi - self.lo))).astype(np.int64)
        np.clip(idx, 0, self.bins - 1, out=idx)
        self.counts += np.bincount(idx, minlength=self.bins)

    def otsu(self, bins: int = OTSU_BINS) -> float:
        """Otsu's threshold over ``bins`` bins between the observed min and max (see module)."""
        if self.total == 0:
            return float("nan")
        lo, hi = self.vmin, self.vmax
        if hi - lo <= MIN_SPREAD * (self.hi - self.lo):
            return hi  # nothing to separate (e.g. two identical dates): no location is above
        edges = self.edges
        centers = (edges[:-1] + edges[1:]) / 2
        coarse = np.floor((np.clip(centers, lo, hi) - lo) / (hi - lo) * bins).astype(np.int64)
        np.clip(coarse, 0, bins - 1, out=coarse)
        hist = np.bincount(coarse, weights=self.counts, minlength=bins)
        return _otsu_cut(hist, np.linspace(lo, hi, bins + 1))

    def percentile(self, q: float) -> float:
        """The score below which ``q`` % of the counted scores lie (linear inside a fine bin)."""
        n = self.total
        if n == 0:
            return float("nan")
        target = float(q) / 100.0 * n
        cum = np.cumsum(self.counts)
        i = int(np.searchsorted(cum, target, side="left"))
        i = min(i, self.bins - 1)
        before = cum[i - 1] if i > 0 else 0
        inside = self.counts[i]
        frac = (target - before) / inside if inside else 0.0
        edges = self.edges
        value = edges[i] + frac * (edges[i + 1] - edges[i])
        return float(min(max(value, self.vmin), self.vmax))

    def fraction_above(self, threshold: float) -> float:
        """About the fraction of counted scores above ``threshold`` (for the log line)."""
        n = self.total
        if n == 0 or not np.isfinite(threshold):
            return float("nan")
        edges = self.edges
        i = int(np.searchsorted(edges, threshold, side="right")) - 1
        return float(self.counts[max(i + 1, 0) :].sum() / n)


@dataclass(frozen=True)
class Threshold:
    """The threshold used and how it was chosen (written into the mask's tags)."""

    value: float
    method: str  # otsu | fixed | percentile | head
    parameter: float | None = None

    def describe(self) -> dict:
        return {
            "value": self.value,
            "method": self.method,
            "parameter": self.parameter,
            "rule": "score > value",
        }


def choose_threshold(
    hist: ScoreHistogram,
    method: str,
    threshold: float | None = None,
    percentile: float | None = None,
) -> Threshold:
    """The :class:`Threshold` for ``method`` (``otsu``, ``fixed`` or ``percentile``)."""
    if method == "fixed":
        if threshold is None:
            raise UsageError("a fixed threshold needs a value", "pass --threshold VALUE")
        return Threshold(float(threshold), "fixed")
    if method == "percentile":
        if percentile is None or not 0.0 <= percentile <= 100.0:
            raise UsageError(f"--percentile {percentile} is not within 0-100", "pass e.g. --percentile 95")
        return Threshold(hist.percentile(percentile), "percentile", float(percentile))
    if method == "otsu":
        return Threshold(hist.otsu(), "otsu")
    raise UsageError(f"unknown threshold method {method!r}", f"use one of {', '.join(METHODS)}")


__all__ = [
    "FINE_BINS",
    "OTSU_BINS",
    "ScoreHistogram",
    "Threshold",
    "choose_threshold",
    "otsu_threshold",
]
