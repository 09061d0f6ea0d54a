import numpy as np
import pytest

from deo_cli.metrics import (
    ConfusionMatrix,
    binary_scores,
    bootstrap_ci,
    miou_from_confusion,
    multilabel_micro_f1,
    overall_accuracy,
)


def test_confusion_matrix_miou_by_hand():
    truth = np.array([0, 0, 1, 1, 2, 2, 255])
    pred = np.array([0, 1, 1, 1, 2, 0, 2])
    cm = ConfusionMatrix(3, ignore_index=255)
    cm.update(pred, truth)
    # class 0: tp1 fp1 fn1 -> 1/3; class 1: tp2 fp1 fn0 -> 2/3; class 2: tp1 fp0 fn1 -> 1/2
    np.testing.assert_allclose(cm.iou(), [1 / 3, 2 / 3, 1 / 2])
    assert cm.miou() == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert cm.accuracy() == pytest.approx(4 / 6)
    # accumulating two halves gives the same matrix
    cm2 = ConfusionMatrix(3, ignore_index=255)
    cm2.update(pred[:3], truth[:3])
    cm2.update(pred[3:], truth[3:])
    np.testing.assert_array_equal(cm.matrix, cm2.matrix)


def test_absent_class_is_not_averaged():
    m = np.array([[5, 0, 0], [0, 5, 0], [0, 0, 0]])
    assert miou_from_confusion(m) == 1.0


def test_binary_scores_and_trivial_baseline():
    truth = np.zeros(100, bool)
    truth[:5] = True
    s = binary_scores(np.ones(100, bool), truth)  # "everything changed"
    assert s["f1"] == pytest.approx(2 * 5 / (2 * 5 + 95)) and s["recall"] == 1.0
    perfect = binary_scores(truth, truth)
    assert perfect["f1"] == 1.0 and perfect["iou"] == 1.0


def test_classification_metrics():
    assert overall_accuracy([1, 2, 3], [1, 2, 0]) == pytest.approx(2 / 3)
    pred = np.array([[1, 0, 1], [0, 1, 0]])
    true = np.array([[1, 1, 0], [0, 1, 0]])
    assert multilabel_micro_f1(pred, true) == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))


def test_bootstrap_interval_contains_the_estimate():
    rng = np.random.default_rng(0)
    correct = rng.random(500) < 0.8
    lo, hi = bootstrap_ci(correct, np.mean, n_boot=400)
    assert lo < correct.mean() < hi and hi - lo < 0.1
