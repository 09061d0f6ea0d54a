"""From a change score to a change mask: histogram rules, a fixed value or a percentile.

Scores can be far larger than memory (a score on the input grid of a 100 km scene), so every
threshold is computed from a histogram that the score sink fills block by block while the
scores stream to disk (:class:`ScoreHistogram`), never from an array of every score. The
histogram has :data:`FINE_BINS` bins over the score's known range (``[0, 2]`` for a cosine
distance, ``[0, 1]`` for a probability, ``[0, 16]`` for the CVA baseline) and records the exact
minimum and maximum. The rules (``--threshold-method``):

- ``otsu``: the fine bins between the observed minimum and maximum merged into
  :data:`OTSU_BINS` (256) bins, and the cut maximising the between-class variance; where several
  cuts tie (an empty gap between two modes), the middle of the tied run. :func:`otsu_threshold`
  does the same from an array. Otsu assumes two comparable populations; when change is rare
  (1-3 % of an OSCD scene) it cuts through the no-change mode and flags a large share of it;
- ``otsu-log``: Otsu on the 256-bin histogram of ``log(score)`` (a long right tail becomes
  more symmetric);
- ``kittler``: Kittler-Illingworth minimum error: the cut minimising the classification error
  of two Gaussians fitted to either side (each side's variance floored at a bin's, 1/12 of a
  bin width squared);
- ``triangle``: the triangle method for a unimodal histogram with a long tail: on 256 bins,
  the line from the peak to the end of the longer tail; the cut is the bin farthest below it;
- ``mad``: a robust tail rule: ``median + k * 1.4826 * MAD`` (the MAD scaled to a Gaussian's
  standard deviation), ``k`` = ``mad_k``;
- ``percentile``: the score below which ``p`` % of the valid scores lie, interpolated inside
  the fine bin that holds it (error below one fine bin: 2/65536 for cosine distances); the
  flagged share is then ``100 - p`` % by construction;
- ``fixed``: the value given.

Scores that all lie within :data:`MIN_SPREAD` of the score range (two identical dates) give
their maximum under every histogram rule: nothing changed. A location is *changed* when its
score is strictly above the threshold. Which rule is the default, and why, is in
:data:`DEFAULT_METHOD`'s comment.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from deo_cli.errors import UsageError

#: Bins of the streaming histogram over the score's range.
FINE_BINS = 1 << 16
#: Bins Otsu's method (and Kittler-Illingworth, triangle) work on, between the observed
#: minimum and maximum.
OTSU_BINS = 256
#: Scores spread over less than this share of the score range hold no two classes: a
#: histogram rule's threshold is then their maximum (nothing changed), not a cut through noise.
MIN_SPREAD = 1e-4
#: The MAD of a Gaussian times this is its standard deviation.
MAD_SCALE = 1.4826

#: Rules computed from the histogram alone (no parameter but ``mad``'s k and the percentile).
HISTOGRAM_METHODS = ("otsu", "otsu-log", "kittler", "triangle", "mad", "percentile")
METHODS = (*HISTOGRAM_METHODS, "fixed")
#: One line per rule, for the summary, the masks' tags and ``--help``.
RULES = {
    "otsu": "Otsu (between-class variance)",
    "otsu-log": "Otsu on log(score)",
    "kittler": "Kittler-Illingworth minimum error",
    "triangle": "triangle (peak to tail)",
    "mad": "median + k * 1.4826 * MAD",
    "percentile": "percentile of the scores",
    "fixed": "fixed value",
    "head": "the change head's P(change) threshold",
}
#: Above this flagged share a histogram rule (or a fixed or head threshold) is warned about:
#: change is rare in most scenes (1-3 % of an OSCD city), and a rule that cut through the
#: no-change mode flags a large share of the scene (Otsu: 29 % where 1 % had changed).
PLAUSIBLE_MAX_FRACTION = 0.20

#: Default rule of zero-shot and CVA scores, from the leave-one-city-out comparison on the
#: four OSCD cities of ``../shared/data`` (``benchmarks/oscd_thresholds.py``, results in
#: ``benchmarks/results/oscd_thresholds.json``; scores of deo_swin_test random and pretrained,
#: deo_swin_t random, CVA). Change is 0.29-1.64 % of those cities. Every rule that looks for
#: the boundary in the histogram (Otsu, Otsu on the log, Kittler-Illingworth, triangle, MAD)
#: flagged 8-45 times the true change fraction in some city (Otsu 14-41 % in three of four),
#: because no-change scores have a long tail of their own; the percentile had the best or
#: near-best pooled F1 with every score and the smallest fraction error. So the flagged share
#: is a stated prior, not a finding: the percentile chosen as the best pooled F1 among those
#: flagging within 3x of the true change fraction in every city (99.25: 0.75 % flagged).
#: A prior fitted to those four cities: over all 14 OSCD training cities change covers 0.29-3.76 %
#: (median 2.0 %), where 98.5 (1.5 % flagged) is within 3x in 13 of 14 and 99.25 in 7 (README).
DEFAULT_METHOD = "percentile"
#: Default percentile of the ``percentile`` rule (see :data:`DEFAULT_METHOD`).
DEFAULT_PERCENTILE = 99.25
#: Default k of the ``mad`` rule: the best pooled F1 of the CVA score on the same cities
#: (the DEO scores' best was 3).
DEFAULT_MAD_K = 4.0


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


def _kittler_cut(hist: np.ndarray, edges: np.ndarray) -> float:
    """The Kittler-Illingworth minimum-error cut: argmin over cuts of
    ``P1 ln v1 + P2 ln v2 - 2 (P1 ln P1 + P2 ln P2)`` (``v`` each side's variance, floored at
    a bin's ``width**2 / 12``)."""
    p = np.asarray(hist, np.float64)
    p = p / p.sum()
    x = (edges[:-1] + edges[1:]) / 2
    floor = (edges[1] - edges[0]) ** 2 / 12
    p1 = np.cumsum(p)[:-1]
    p2 = 1.0 - p1
    s1, q1 = np.cumsum(p * x)[:-1], np.cumsum(p * x * x)[:-1]
    s2, q2 = (p * x).sum() - s1, (p * x * x).sum() - q1
    ok = (p1 > 1e-12) & (p2 > 1e-12)
    if not ok.any():
        return float(edges[-1])
    p1, p2, s1, s2, q1, q2 = (a[ok] for a in (p1, p2, s1, s2, q1, q2))
    v1 = np.maximum(q1 / p1 - (s1 / p1) ** 2, floor)
    v2 = np.maximum(q2 / p2 - (s2 / p2) ** 2, floor)
    j = p1 * np.log(v1) + p2 * np.log(v2) - 2 * (p1 * np.log(p1) + p2 * np.log(p2))
    return float(edges[1:-1][ok][int(np.argmin(j))])


def _triangle_cut(hist: np.ndarray, edges: np.ndarray) -> float:
    """The triangle cut: the line from the peak ``(i_p, h_p)`` to the end of the longer tail
    ``(i_e, 0)`` (the last or first non-empty bin); the cut is the upper edge of the bin
    farthest below that line (the lower edge when the tail is on the left)."""
    h = np.asarray(hist, np.float64)
    nz = np.flatnonzero(h > 0)
    peak = int(np.argmax(h))
    right = nz[-1] - peak >= peak - nz[0]
    end = int(nz[-1] if right else nz[0])
    if end == peak:
        return float(edges[peak + 1])
    idx = np.arange(min(peak, end), max(peak, end) + 1)
    # distance below the line through (peak, h_p) and (end, 0), up to a constant factor
    dist = h[peak] * (end - idx) / (end - peak) - h[idx]
    k = int(idx[int(np.argmax(dist))])
    return float(edges[k + 1] if right else edges[k])


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

    @classmethod
    def of(cls, scores: np.ndarray, lo: float, hi: float, bins: int = FINE_BINS) -> ScoreHistogram:
        """The histogram of an array of scores (tests, benchmarks)."""
        h = cls(lo, hi, bins)
        h.add(scores)
        return h

    @property
    def edges(self) -> np.ndarray:
        return np.linspace(self.lo, self.hi, self.bins + 1)

    @property
    def centers(self) -> np.ndarray:
        e = self.edges
        return (e[:-1] + e[1:]) / 2

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
        self.counts += np.bincount(self.bin_of(v), minlength=self.bins)

    def bin_of(self, values: np.ndarray) -> np.ndarray:
        """The fine bin of each value (values outside the range: the end bins)."""
        idx = ((np.asarray(values, np.float64) - self.lo) * (self.bins / (self.hi - self.lo))).astype(
            np.int64
        )
        return np.clip(idx, 0, self.bins - 1)

    def _flat(self) -> bool:
        """True when the scores hold no two classes (see :data:`MIN_SPREAD`)."""
        return self.vmax - self.vmin <= MIN_SPREAD * (self.hi - self.lo)

    def coarse(self, bins: int = OTSU_BINS, log: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """The fine counts merged into ``bins`` bins between the observed min and max (of the
        score, or with ``log`` of its logarithm; scores below half a fine bin count as that):
        ``(counts, edges)``."""
        floor = 0.5 * (self.hi - self.lo) / self.bins if log else -np.inf
        lo, hi = max(self.vmin, floor), max(self.vmax, floor)
        x = np.clip(self.centers, lo, hi)
        if log:
            x, lo, hi = np.log(x), np.log(lo), np.log(hi)
        idx = np.floor((x - lo) / (hi - lo) * bins).astype(np.int64)
        np.clip(idx, 0, bins - 1, out=idx)
        return np.bincount(idx, weights=self.counts, minlength=bins), np.linspace(lo, hi, bins + 1)

    def _rule(self, cut, log: bool = False, bins: int = OTSU_BINS) -> float:
        if self.total == 0:
            return float("nan")
        if self._flat():
            return self.vmax  # nothing to separate (e.g. two identical dates): no location is above
        hist, edges = self.coarse(bins, log)
        t = cut(hist, edges)
        return float(np.exp(t)) if log else t

    def otsu(self, bins: int = OTSU_BINS) -> float:
        """Otsu's threshold over ``bins`` bins between the observed min and max (see module)."""
        return self._rule(_otsu_cut, bins=bins)

    def otsu_log(self, bins: int = OTSU_BINS) -> float:
        """Otsu's threshold of ``log(score)`` (see module)."""
        return self._rule(_otsu_cut, log=True, bins=bins)

    def kittler(self, bins: int = OTSU_BINS) -> float:
        """Kittler-Illingworth's minimum-error threshold (see module)."""
        return self._rule(_kittler_cut, bins=bins)

    def triangle(self, bins: int = OTSU_BINS) -> float:
        """The triangle method's threshold (see module)."""
        return self._rule(_triangle_cut, bins=bins)

    def median_mad(self) -> tuple[float, float]:
        """The median and the median absolute deviation from it (fine-bin centres)."""
        med = self.percentile(50.0)
        dev = np.abs(self.centers - med)
        order = np.argsort(dev, kind="stable")
        cum = np.cumsum(self.counts[order])
        i = int(np.searchsorted(cum, 0.5 * cum[-1], side="left"))
        return med, float(dev[order][min(i, len(order) - 1)])

    def mad(self, k: float = DEFAULT_MAD_K) -> float:
        """``median + k * 1.4826 * MAD`` (the MAD at least one fine bin; see module)."""
        if self.total == 0:
            return float("nan")
        if self._flat():
            return self.vmax
        med, mad = self.median_mad()
        mad = max(mad, (self.hi - self.lo) / self.bins)
        return float(min(med + k * MAD_SCALE * mad, self.vmax))

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
        """About the fraction of counted scores above ``threshold`` (the fine bins above the
        one that holds it)."""
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
    method: str  # a METHODS name, or head
    parameter: float | None = None

    @property
    def rule(self) -> str:
        """The rule in words, with its parameter (``median + 6 * 1.4826 * MAD``)."""
        text = RULES.get(self.method, self.method)
        if self.method == "mad" and self.parameter is not None:
            return text.replace("k *", f"{self.parameter:g} *")
        if self.method == "percentile" and self.parameter is not None:
            return f"{self.parameter:g}th percentile of the scores"
        return text

    def describe(self) -> dict:
        return {
            "value": self.value,
            "method": self.method,
            "parameter": self.parameter,
            "rule": self.rule,
            "changed_if": "score > value",
        }


def implausible(thr: Threshold, fraction: float) -> str | None:
    """A one-line warning when the flagged ``fraction`` is implausible for the rule, else None.

    A percentile flags ``100 - p`` % by construction (that share is an assumption, not a
    finding: said when it is above :data:`PLAUSIBLE_MAX_FRACTION`); any other rule flagging more
    than :data:`PLAUSIBLE_MAX_FRACTION` of the scene has most likely cut through the no-change
    scores; a rule flagging nothing at all is said too.
    """
    pct = 100.0 * fraction
    if not np.isfinite(fraction):
        return None
    if thr.method == "percentile":
        if fraction > PLAUSIBLE_MAX_FRACTION:
            return f"--percentile {thr.parameter:g} flags {pct:.1f}% by construction; change is rarely that common"
        return None
    if fraction > PLAUSIBLE_MAX_FRACTION:
        return (
            f"{thr.method} flagged {pct:.1f}% of the scene, more than change usually covers "
            f"({100 * PLAUSIBLE_MAX_FRACTION:.0f}%); the threshold likely cut through unchanged land: "
            "look at the score map, or try --threshold-method percentile or a --threshold"
        )
    if fraction == 0.0 and thr.method != "fixed":
        return f"{thr.method} flagged nothing: every score is at or below {thr.value:.4g}"
    return None


def choose_threshold(
    hist: ScoreHistogram,
    method: str,
    threshold: float | None = None,
    percentile: float | None = None,
    mad_k: float | None = None,
) -> Threshold:
    """The :class:`Threshold` for ``method`` (one of :data:`METHODS`)."""
    if method == "fixed":
        if threshold is None:
            raise UsageError("a fixed threshold needs a value", "pass --threshold VALUE")
        return Threshold(float(threshold), "fixed")
    if method == "percentile":
        p = DEFAULT_PERCENTILE if percentile is None else float(percentile)
        if not 0.0 <= p <= 100.0:
            raise UsageError(f"--percentile {percentile} is not within 0-100", "pass e.g. --percentile 99")
        return Threshold(hist.percentile(p), "percentile", p)
    if method == "mad":
        k = DEFAULT_MAD_K if mad_k is None else float(mad_k)
        if not k >= 0:
            raise UsageError(f"mad_k {k} is negative", "pass e.g. --set mad_k=4")
        return Threshold(hist.mad(k), "mad", k)
    rules = {"otsu": hist.otsu, "otsu-log": hist.otsu_log, "kittler": hist.kittler, "triangle": hist.triangle}
    if method in rules:
        return Threshold(rules[method](), method)
    raise UsageError(f"unknown threshold method {method!r}", f"use one of {', '.join(METHODS)}")


__all__ = [
    "DEFAULT_MAD_K",
    "DEFAULT_METHOD",
    "DEFAULT_PERCENTILE",
    "FINE_BINS",
    "METHODS",
    "OTSU_BINS",
    "ScoreHistogram",
    "Threshold",
    "choose_threshold",
    "implausible",
    "otsu_threshold",
]
