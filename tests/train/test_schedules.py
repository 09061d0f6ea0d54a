"""DINO-style per-iteration schedules (docs/method.md §2.9)."""

from __future__ import annotations

import numpy as np
import pytest

from deo_cli.train.schedules import cosine_schedule


def test_warmup_then_cosine_as_dino():
    s = cosine_schedule(5e-4, 1e-6, total_steps=100, warmup_steps=10)
    assert s.shape == (100,) and s.dtype == np.float64
    np.testing.assert_allclose(s[:10], np.linspace(0.0, 5e-4, 10))
    assert s[10] == pytest.approx(5e-4)
    i = np.arange(90)
    np.testing.assert_allclose(s[10:], 1e-6 + 0.5 * (5e-4 - 1e-6) * (1 + np.cos(np.pi * i / 90)))
    assert np.all(np.diff(s[10:]) < 0) and s[-1] > 1e-6 and s[-1] == pytest.approx(1e-6, abs=2e-7)


def test_momentum_and_weight_decay_rise():
    m = cosine_schedule(0.996, 1.0, total_steps=1000)
    assert m[0] == pytest.approx(0.996) and np.all(np.diff(m) > 0) and 0.99999 < m[-1] < 1.0
    wd = cosine_schedule(0.04, 0.4, total_steps=50)
    assert wd[0] == pytest.approx(0.04) and wd[-1] == pytest.approx(0.4, abs=1e-3)


def test_edges():
    assert cosine_schedule(1.0, 0.0, 0).shape == (0,)
    np.testing.assert_allclose(
        cosine_schedule(1.0, 0.0, 3, warmup_steps=3, warmup_start=0.5), [0.5, 0.75, 1.0]
    )
    with pytest.raises(ValueError, match="exceeds"):
        cosine_schedule(1.0, 0.0, 3, warmup_steps=4)
