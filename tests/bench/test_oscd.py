"""Zero-shot change scores: Otsu's threshold, the per-pixel feature distance and its geometry."""

import numpy as np
import pytest
import torch

from deo_cli.bench.oscd import change_distance, otsu_threshold
from deo_cli.errors import UsageError
from deo_cli.models import build_encoder


def test_otsu_splits_two_modes():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(0.1, 0.02, 5000), rng.normal(0.8, 0.05, 500)])
    t = otsu_threshold(values)
    assert 0.2 < t < 0.7
    assert ((values > t) == (np.arange(len(values)) >= 5000)).mean() > 0.999
    assert otsu_threshold(np.full(10, 0.3)) == 0.3
    assert np.isnan(otsu_threshold(np.array([np.nan])))


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return build_encoder("deo_swin_test", weights=None)


def test_identical_dates_have_zero_distance(encoder):
    x = np.random.default_rng(1).normal(size=(10, 70, 90)).astype(np.float32)
    d = change_distance(encoder, x, x, [0, 1, 2, 3], torch.device("cpu"), chip_size=64)
    assert d.shape == (70, 90) and np.abs(d).max() < 1e-4


def test_change_shows_where_the_input_changed(encoder):
    rng = np.random.default_rng(2)
    before = rng.normal(size=(10, 128, 128)).astype(np.float32)
    after = before.copy()
    after[:, 64:96, 0:32] += 4.0  # a changed block in one corner area
    d = change_distance(encoder, before, after, [0], torch.device("cpu"))
    inside = d[68:92, 4:28].mean()
    far = d[:, 64:].mean()  # stride-4 level 0: the receptive field grows, but not across the image
    assert inside > 5 * far
    whole = change_distance(encoder, before, after, [0], torch.device("cpu"), chip_size=None)
    chipped = change_distance(encoder, before, after, [0], torch.device("cpu"), chip_size=64)
    assert whole.shape == chipped.shape == (128, 128)
    with pytest.raises(UsageError, match="outside the model's 4 levels"):
        change_distance(encoder, before, after, [7], torch.device("cpu"))
