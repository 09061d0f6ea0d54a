"""Scores of the paper's metrics and their bootstrap intervals."""

import numpy as np
import pytest

from deo_cli.bench.scoring import score_accuracy, score_change, score_micro_f1, score_miou


def test_accuracy_and_interval_bracket_the_value():
    rng = np.random.default_rng(0)
    target = rng.integers(0, 3, 200)
    pred = np.where(rng.random(200) < 0.7, target, (target + 1) % 3)
    s = score_accuracy(pred, target, n_boot=500)
    assert s.value == pytest.approx(np.mean(pred == target)) and s.n == 200
    assert s.ci_low < s.value < s.ci_high and s.ci_high - s.ci_low < 0.2
    perfect = score_accuracy(target, target, n_boot=100)
    assert (perfect.value, perfect.ci_low, perfect.ci_high) == (1.0, 1.0, 1.0)
    none = score_accuracy(pred, target, n_boot=0)
    assert np.isnan(none.ci_low) and np.isnan(none.ci_high)


def test_micro_f1_is_pooled_over_labels():
    target = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 0]])
    pred = np.array([[1, 0, 0], [0, 1, 1], [1, 1, 0]])
    s = score_micro_f1(pred, target, n_boot=200)
    tp, fp, fn = 4, 1, 1
    assert s.value == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert s.ci_low <= s.value <= s.ci_high


def test_miou_from_per_sample_confusions():
    a = np.array([[3, 1], [0, 4]])
    b = np.array([[5, 0], [2, 1]])
    s = score_miou(np.stack([a, b]), n_boot=200)
    m = a + b  # IoU per class on the summed matrix: 8/(8+1+2), 5/(5+2+1)
    assert s.value == pytest.approx((8 / 11 + 5 / 8) / 2)
    assert s.ci_low <= s.value <= s.ci_high and m.sum() == 16


def test_change_scores():
    counts = np.array([[10, 5, 5], [0, 0, 4], [20, 10, 0]])
    s = score_change(counts, n_boot=300)
    assert s["f1"].value == pytest.approx(60 / (60 + 15 + 9))
    assert s["iou"].value == pytest.approx(30 / (30 + 15 + 9))
    assert s["f1"].n == 3 and s["f1"].ci_low <= s["f1"].value <= s["f1"].ci_high
