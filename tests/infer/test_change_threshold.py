"""Thresholds from streamed score histograms: Otsu, percentile, fixed; the validation F1 cut."""

import numpy as np
import pytest

from deo_cli.errors import UsageError
from deo_cli.infer.change import best_f1_threshold, f1_at, transfer_threshold
from deo_cli.infer.threshold import ScoreHistogram, choose_threshold, otsu_threshold


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
