import numpy as np
import pytest
import torch

from deo_cli.data.normalize import Normalizer, scene_rgb_max
from deo_cli.sensors import DEO_S2_MANIFEST


def test_normalizer_matches_method_md_formula():
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 6000, (2, 10, 4, 5)).astype(np.float32)
    n = Normalizer.from_manifest(DEO_S2_MANIFEST, unit_factor=1.0, rgb_max=4000.0)
    y = n(x)
    m, s = np.array(DEO_S2_MANIFEST.mean), np.array(DEO_S2_MANIFEST.std)
    rgb = np.clip(x[:, :3] / 4000.0, 0, 1)
    np.testing.assert_allclose(y[:, :3], (rgb - m[:3, None, None]) / s[:3, None, None], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        y[:, 3:], (x[:, 3:] - m[3:, None, None]) / s[3:, None, None], rtol=1e-5, atol=1e-5
    )
    # torch gives the same numbers
    yt = n(torch.from_numpy(x))
    np.testing.assert_allclose(yt.numpy(), y, rtol=1e-5, atol=1e-5)


def test_reflectance_input_is_converted_to_dn():
    x = np.full((10, 2, 2), 0.2, np.float32)
    dn = Normalizer.from_manifest(DEO_S2_MANIFEST, 1.0, rgb_max=2000.0)(x * 10000)
    refl = Normalizer.from_manifest(DEO_S2_MANIFEST, 10000.0, rgb_max=0.2)(x)
    np.testing.assert_allclose(refl, dn, rtol=1e-5, atol=1e-5)


def test_max_scaled_bands_need_a_scale():
    with pytest.raises(ValueError, match="rgb_max is required"):
        Normalizer.from_manifest(DEO_S2_MANIFEST)


def test_scene_rgb_max_is_robust_percentile():
    v = np.concatenate([np.linspace(0, 1000, 100000), [1e6]])  # one saturated outlier
    valid = np.ones_like(v, bool)
    assert 990 < scene_rgb_max(v, valid) <= 1000
    with pytest.raises(ValueError):
        scene_rgb_max(np.zeros(4), np.zeros(4, bool))
