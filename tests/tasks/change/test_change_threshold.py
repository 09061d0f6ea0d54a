"""Thresholds from streamed score histograms (Otsu, Otsu on the log, Kittler-Illingworth,
triangle, median + k MAD, percentile, fixed), the plausibility of the flagged share, AUC and
best-threshold F1 from histograms; the validation F1 cut of a head."""

import numpy as np
import pytest

from deo_cli.errors import UsageError
from deo_cli.tasks.change.threshold import (
    DEFAULT_METHOD,
    DEFAULT_PERCENTILE,
    METHODS,
    ScoreHistogram,
    Threshold,
    choose_threshold,
    implausible,
    otsu_threshold,
)
from deo_cli.tasks.change.train import best_f1_threshold, f1_at, transfer_threshold


def _bimodal(seed=0):
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.normal(0.2, 0.03, 9000), rng.normal(0.9, 0.05, 1000)]).clip(0, 2)


def test_otsu_splits_two_modes_and_the_streamed_histogram_agrees():
    v = _bimodal()
    t = otsu_threshold(v)
    assert 0.35 < t < 0.75
    h = ScoreHistogram(0.0, 2.0)
    for block in np.array_split(v, 7):  # block by block, as the sink sees rows
        h.add(block)
    h.add(np.array([np.nan, np.inf]))  # non-finite scores are not counted
    assert h.total == v.size
    assert h.vmin == pytest.approx(v.min()) and h.vmax == pytest.approx(v.max())
    # the fine bins quantise the 256 Otsu bins' edges by at most one fine bin (2 / 65536)
    assert abs(h.otsu() - t) <= (v.max() - v.min()) / 256 + 2 * 2 / 65536
    # with a gap between the modes every cut inside it ties: the middle of the gap is taken
    gap = np.r_[np.full(50, 0.1), np.full(50, 0.9)]
    assert otsu_threshold(gap) == pytest.approx(0.5, abs=0.01)


def test_percentile_and_fixed():
    v = np.linspace(0.0, 1.0, 100001)
    h = ScoreHistogram(0.0, 1.0)
    h.add(v)
    for q in (5, 50, 95, 99.5):
        assert h.percentile(q) == pytest.approx(np.percentile(v, q), abs=2e-5)
    assert choose_threshold(h, "percentile", percentile=90).value == pytest.approx(0.9, abs=2e-5)
    assert choose_threshold(h, "fixed", threshold=0.3).value == 0.3
    assert h.fraction_above(0.75) == pytest.approx(0.25, abs=1e-3)
    with pytest.raises(UsageError):
        choose_threshold(h, "fixed")
    with pytest.raises(UsageError):
        choose_threshold(h, "percentile", percentile=120)
    assert np.isnan(ScoreHistogram(0, 1).otsu())


def test_best_f1_threshold_finds_the_separating_cut():
    prob = np.array([0.1, 0.2, 0.3, 0.62, 0.7, 0.9, 0.4])
    target = np.array([0, 0, 0, 1, 1, 1, 0], bool)
    thr, f1 = best_f1_threshold(prob, target)
    assert f1 == pytest.approx(1.0) and 0.4 <= thr < 0.62
    # brute force over the same candidates
    cands = np.round(np.arange(0.05, 0.96, 0.01), 2)
    rng = np.random.default_rng(1)
    p, t = rng.random(500), rng.random(500) < 0.2
    p[t] += 0.2
    best = max(
        (2 * np.sum((p > c) & t) / (np.sum(p > c) + t.sum()), -c) for c in cands
    )  # ties: the lowest cut, as best_f1_threshold
    thr, f1 = best_f1_threshold(p, t)
    assert f1 == pytest.approx(best[0]) and thr == pytest.approx(-best[1])


def test_transfer_threshold_pulls_the_validation_optimum_toward_one_half():
    # bordeaux, pretrained: validation picked 0.81
    assert transfer_threshold(0.81, 1.0) == 0.5  # the default: the head's trained decision
    assert transfer_threshold(0.81, 0.5) == pytest.approx(0.655)
    assert transfer_threshold(0.81, 0.0) == pytest.approx(0.81)  # the validation optimum
    assert transfer_threshold(0.3, 0.5) == pytest.approx(0.4)  # from below too
    with pytest.raises(ValueError):
        transfer_threshold(0.7, 1.5)
    prob = np.array([0.1, 0.45, 0.55, 0.9])
    target = np.array([0, 1, 0, 1], bool)
    assert f1_at(prob, target, 0.5) == pytest.approx(0.5)  # TP 1, FP 1, FN 1
    assert f1_at(prob, target, 0.4) == pytest.approx(0.8)  # TP 2, FP 1
    assert np.isnan(f1_at(prob, np.zeros(4, bool), 0.95))


# ---------------------------------------------------------------------------------------------
# The rules for rare change, from the streamed histogram
# ---------------------------------------------------------------------------------------------


def _rare(seed=0, n=200_000, share=0.01):
    """Scores of a scene where ``share`` changed: a log-normal no-change mode with a long tail,
    and a small change mode far above it (cosine distances, in [0, 2])."""
    rng = np.random.default_rng(seed)
    k = int(n * share)
    quiet = rng.lognormal(np.log(0.05), 0.5, n - k)
    change = rng.normal(0.9, 0.1, k)
    return np.concatenate([quiet, change]).clip(0, 2), k


def test_every_rule_from_the_histogram_and_otsu_over_flags_rare_change():
    v, k = _rare()
    h = ScoreHistogram.of(v, 0.0, 2.0)
    flagged = {m: float((v > choose_threshold(h, m).value).mean()) for m in METHODS if m != "fixed"}
    # the default: the 99.25th percentile, exact to one fine bin
    assert DEFAULT_METHOD == "percentile" and DEFAULT_PERCENTILE == 99.25
    assert choose_threshold(h, "percentile").parameter == 99.25
    assert flagged["percentile"] == pytest.approx(0.0075, abs=2e-4)
    # the 1 % of change is a separate mode here: Otsu finds it, the tail rules flag it and some
    # of the no-change tail (within a factor of 3)
    assert flagged["otsu"] == pytest.approx(0.01, abs=5e-4)
    for m in ("kittler", "triangle", "mad"):
        assert 0.01 < flagged[m] < 0.03, (m, flagged[m])
    # Otsu on the log cuts through the no-change mode: far more than 1 % flagged
    assert flagged["otsu-log"] > 0.1
    # mad: median + k * 1.4826 * MAD, as numpy computes them (to a fine bin)
    med = np.median(v)
    mad = np.median(np.abs(v - med))
    assert h.mad(4.0) == pytest.approx(med + 4.0 * 1.4826 * mad, abs=3 * 2 / 65536)
    assert choose_threshold(h, "mad", mad_k=2.5).describe()["rule"] == "median + 2.5 * 1.4826 * MAD"
    # otsu-log is Otsu of log(score)
    logs = np.log(np.maximum(v, 1 / 65536))
    assert np.log(h.otsu_log()) == pytest.approx(otsu_threshold(logs), abs=(logs.max() - logs.min()) / 128)


def test_kittler_and_triangle_on_their_textbook_histograms():
    rng = np.random.default_rng(3)
    # two Gaussians of unequal size and spread: the minimum-error cut lies between them,
    # closer to the narrow mode than Otsu's
    v = np.concatenate([rng.normal(0.3, 0.02, 50_000), rng.normal(0.7, 0.1, 5_000)])
    h = ScoreHistogram.of(v, 0.0, 2.0)
    assert 0.33 < h.kittler() < 0.5
    # a unimodal histogram with a long right tail: the triangle cut is in the tail, past the peak
    tail = rng.exponential(0.05, 100_000) + 0.1
    t = ScoreHistogram.of(tail, 0.0, 2.0).triangle()
    assert 0.15 < t < 0.5 and 0.01 < (tail > t).mean() < 0.3
    # identical dates: every histogram rule flags nothing
    flat = ScoreHistogram.of(np.full(1000, 0.25), 0.0, 2.0)
    for m in ("otsu", "otsu-log", "kittler", "triangle", "mad"):
        assert choose_threshold(flat, m).value == pytest.approx(0.25)
    with pytest.raises(UsageError, match="unknown threshold method"):
        choose_threshold(flat, "magic")


def test_the_flagged_share_is_judged_for_the_rule():
    assert implausible(Threshold(0.1, "otsu"), 0.2928) is not None
    assert "29.3%" in implausible(Threshold(0.1, "otsu"), 0.2928) and "\n" not in implausible(
        Threshold(0.1, "otsu"), 0.2928
    )
    assert implausible(Threshold(0.1, "otsu"), 0.012) is None
    assert implausible(Threshold(0.9, "triangle"), 0.0) is not None  # nothing flagged: said
    # a percentile flags 100 - p % by construction: only a large share is said
    assert implausible(Threshold(0.1, "percentile", 99.25), 0.0075) is None
    assert "by construction" in implausible(Threshold(0.1, "percentile", 70.0), 0.30)
    assert implausible(Threshold(0.5, "head"), 0.25) is not None


def test_auc_and_best_f1_from_the_histograms_match_numpy():
    from deo_cli.tasks.change.evaluate import ScoreCurve, counts_at, everything_changed

    rng = np.random.default_rng(5)
    label = rng.random(20_000) < 0.05
    score = rng.normal(0.3, 0.1, 20_000) + 0.15 * label
    score[:100] = np.nan  # nodata: not counted
    curve = ScoreCurve(0.0, 2.0).add(score, label)
    ok = np.isfinite(score)
    s, t = score[ok], label[ok]
    # Mann-Whitney: P(a changed pixel scores above an unchanged one)
    ranks = np.argsort(np.argsort(s)) + 1
    auc = (ranks[t].sum() - t.sum() * (t.sum() + 1) / 2) / (t.sum() * (~t).sum())
    assert curve.auc() == pytest.approx(auc, abs=1e-3)
    f1, thr = curve.best_f1()
    brute = max(
        2 * np.sum((s > c) & t) / (np.sum(s > c) + t.sum()) for c in np.quantile(s, np.linspace(0.5, 1, 400))
    )
    assert f1 == pytest.approx(brute, abs=5e-3) and counts_at(score, label, thr).f1 == pytest.approx(
        f1, abs=5e-3
    )
    c = counts_at(score, label, 0.4)
    assert (
        c.valid == ok.sum()
        and c.tp + c.fn == t.sum()
        and c.flagged_fraction == pytest.approx((s > 0.4).mean())
    )
    e = everything_changed(label, ok)
    assert (
        e.recall == 1.0
        and e.precision == pytest.approx(t.mean())
        and e.f1 == pytest.approx(2 * t.mean() / (1 + t.mean()))
    )
