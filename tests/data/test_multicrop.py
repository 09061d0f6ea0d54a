"""DEO multi-crop (docs/method.md §2.3-2.4): shared crop window, RGB-only photometry, max-scale, z-score."""

import math

import pytest
import torch

from deo_cli.data import multicrop
from deo_cli.data.multicrop import (
    MultiCrop,
    build_multicrop,
    collate_multicrop,
    crop_box,
    max_scale,
    solarize,
)
from deo_cli.recipes import CropsSection
from deo_cli.sensors import DEO_S2_MANIFEST as M

MEAN = torch.tensor(M.mean).reshape(-1, 1, 1)
STD = torch.tensor(M.std).reshape(-1, 1, 1)
NO_PHOTOMETRY = dict(color_jitter_p=0.0, grayscale_p=0.0, blur_p=(0.0, 0.0, 0.0), solarize_p=(0.0, 0.0, 0.0))


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def pattern_image(h=48, w=40):
    """Every band is the same smooth spatial pattern times a band factor (DN-like values)."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    base = 1.0 + torch.sin(6 * xx) * torch.cos(4 * yy) + 2 * xx  # positive, asymmetric left/right
    factors = torch.arange(1, 11, dtype=torch.float32).reshape(-1, 1, 1) * 300.0
    return base[None] * factors, base


def unnormalise(x):
    return x * STD + MEAN


def test_crop_box_follows_random_resized_crop():
    g = gen(1)
    for _ in range(200):
        top, left, h, w = crop_box(60, 80, (0.05, 0.4), g)
        assert 0 <= top and top + h <= 60 and 0 <= left and left + w <= 80
        assert 0.04 <= h * w / (60 * 80) <= 0.42  # rounding of the sides
        assert 3 / 4 - 0.05 <= w / h <= 4 / 3 + 0.05
    # Too elongated for any ratio in 3/4-4/3 at scale 1: torchvision's central fallback.
    top, left, h, w = crop_box(10, 100, (1.0, 1.0), g)
    assert (h, w) == (10, round(10 * 4 / 3)) and left == (100 - w) // 2 and top == 0


def test_counts_sizes_and_per_crop_probabilities_come_from_the_recipe():
    mc = build_multicrop(CropsSection(), M)
    assert [k.size for k in mc.global_kinds] == [224, 224] and [k.size for k in mc.local_kinds] == [96] * 10
    assert [k.scale for k in mc.global_kinds] == [(0.4, 1.0)] * 2 and mc.local_kinds[0].scale == (0.05, 0.4)
    assert [k.blur_p for k in mc.global_kinds] == [1.0, 0.1] and mc.local_kinds[0].blur_p == 0.5
    assert [k.solarize_p for k in mc.global_kinds] == [0.0, 0.2] and mc.local_kinds[0].solarize_p == 0.0
    small = build_multicrop(CropsSection(global_size=32, local_number=3, local_size=16), M)
    views = small(pattern_image()[0], gen())
    assert [tuple(v.shape) for v in views["global"]] == [(10, 32, 32)] * 2
    assert [tuple(v.shape) for v in views["local"]] == [(10, 16, 16)] * 3


def test_one_window_for_all_bands_and_rgb_max_scaled():
    image, _ = pattern_image()
    mc = MultiCrop(M.mean, M.std, global_size=32, local_size=16, local_number=4, **NO_PHOTOMETRY)
    views = mc(image, gen(3))
    for v in views["global"] + views["local"]:
        raw = unnormalise(v)
        # Every band holds the same cropped, resized (and maybe flipped) pattern.
        pattern = raw[3] / (4 * 300.0)
        for c in range(4, 10):
            torch.testing.assert_close(raw[c] / ((c + 1) * 300.0), pattern, rtol=1e-4, atol=1e-4)
        # RGB: divided by the crop's maximum over all three RGB bands, clamped (docs/method.md §2.3);
        # R = 300 x pattern, B = 900 x pattern, so B peaks at 1 and R is a third of B.
        assert raw[:3].max().item() == pytest.approx(1.0, abs=1e-5) and raw[:3].min() >= -1e-6
        torch.testing.assert_close(raw[2], pattern / pattern.max(), atol=1e-4, rtol=0)
        torch.testing.assert_close(raw[0], raw[2] / 3, atol=1e-4, rtol=0)


def test_flip_is_horizontal_and_applies_to_all_bands():
    image, base = pattern_image(40, 40)
    kw = dict(global_size=40, global_scale=(1.0, 1.0), local_number=0, **NO_PHOTOMETRY)
    plain = unnormalise(MultiCrop(M.mean, M.std, hflip_p=0.0, **kw)(image, gen())["global"][0])
    flipped = unnormalise(MultiCrop(M.mean, M.std, hflip_p=1.0, **kw)(image, gen())["global"][0])
    torch.testing.assert_close(flipped, plain.flip(-1), rtol=1e-4, atol=1e-2)
    assert not torch.allclose(plain, plain.flip(-2), atol=1.0)  # and not vertical


def test_photometric_augmentations_touch_rgb_only():
    image, _ = pattern_image()
    on = dict(color_jitter_p=1.0, grayscale_p=1.0, blur_p=(1.0, 1.0, 1.0), solarize_p=(1.0, 1.0, 1.0))
    kw = dict(global_size=32, local_size=16, local_number=2)
    a = MultiCrop(M.mean, M.std, **kw, **on)(image, gen(5))
    b = MultiCrop(M.mean, M.std, **kw, **NO_PHOTOMETRY)(image, gen(5))
    # Same generator: the first crop has the same box and flip; B5..B12 are untouched.
    torch.testing.assert_close(a["global"][0][3:], b["global"][0][3:])
    assert not torch.allclose(a["global"][0][:3], b["global"][0][:3], atol=1e-3)
    rgb = unnormalise(a["global"][0])[:3]
    torch.testing.assert_close(rgb[0], rgb[1], atol=1e-5, rtol=0)  # grayscale: equal channels
    assert rgb.min() >= -1e-5 and rgb.max() <= 1 + 1e-5


def test_solarize_has_kornia_semantics():
    x = torch.tensor([0.0, 0.2, 0.5, 0.7, 1.0])
    torch.testing.assert_close(solarize(x, 0.5), torch.tensor([0.0, 0.2, 0.5, 0.3, 0.0]))
    # The addition comes first and is clamped, then values >= threshold are inverted.
    torch.testing.assert_close(solarize(x, 0.5, 0.1), torch.tensor([0.1, 0.3, 0.4, 0.2, 0.0]))
    torch.testing.assert_close(solarize(x, 0.0), 1 - x)


@pytest.mark.parametrize("kind, blur_p", [(0, 1.0), (1, 0.1), (2, 0.5)])
def test_blur_probability_per_crop_kind(monkeypatch, kind, blur_p):
    calls = []
    real = multicrop.TF.gaussian_blur

    def spy(img, kernel_size, sigma):
        calls.append((tuple(kernel_size), sigma[0]))
        return real(img, kernel_size, sigma)

    monkeypatch.setattr(multicrop.TF, "gaussian_blur", spy)
    mc = MultiCrop(
        M.mean, M.std, global_size=12, local_size=12, local_number=1, color_jitter_p=0, grayscale_p=0
    )
    crop_kind = (mc.global_kinds + mc.local_kinds)[kind]
    g, n = gen(kind), 200
    for _ in range(n):
        mc.photometric(torch.rand(3, 12, 12), crop_kind, g)
    assert abs(len(calls) / n - blur_p) < 0.1
    assert all(k == (23, 23) and 0.1 <= s <= 2.0 for k, s in calls)


def test_blur_kernel_capped_for_tiny_crops():
    mc = MultiCrop(M.mean, M.std, global_size=8, local_number=0, blur_p=(1.0, 1.0, 1.0))
    views = mc(pattern_image()[0], gen())
    assert views["global"][0].shape == (10, 8, 8) and torch.isfinite(views["global"][0]).all()


def test_same_generator_same_views_and_nodata_is_zero():
    image, _ = pattern_image()
    valid = torch.ones(48, 40, dtype=torch.bool)
    valid[:, :20] = False  # left half nodata
    mc = MultiCrop(M.mean, M.std, global_size=32, local_size=16, local_number=2)
    a, b = mc(image, gen(9), valid=valid), mc(image, gen(9), valid=valid)
    for x, y in zip(a["global"] + a["local"], b["global"] + b["local"]):
        assert torch.equal(x, y)
    mc_full = MultiCrop(M.mean, M.std, global_size=40, global_scale=(1.0, 1.0), local_number=0, hflip_p=0.0)
    v = mc_full(image, gen(1), valid=valid)["global"][0]
    assert (v[:, :, :20] == 0).all() and (v[:, :, 21:] != 0).any()


def test_colocated_rgb_replaces_channels_0_to_2():
    image, base = pattern_image(40, 40)
    image[:3] = torch.rand(3, 40, 40) * 5000  # noise in the S2 RGB bands
    rgb_hr = torch.nn.functional.interpolate(
        base[None, None].expand(1, 3, 40, 40), size=(160, 160), mode="bilinear"
    )[0]
    kw = dict(global_size=32, local_size=16, local_number=2, **NO_PHOTOMETRY)
    views = MultiCrop(M.mean, M.std, **kw)(image, gen(4), rgb_image=rgb_hr * 77.0)
    for v in views["global"] + views["local"]:
        raw = unnormalise(v)
        expected = raw[3] / raw[3].max()  # the same box of the same pattern, max-scaled
        for c in range(3):
            assert torch.corrcoef(torch.stack([raw[c].flatten(), expected.flatten()]))[0, 1] > 0.99
            assert (raw[c] - expected).abs().mean() < 0.02


def test_max_scale_ignores_tiny_maxima_and_invalid_pixels():
    x = torch.full((3, 4, 4), 1e-8)
    assert torch.equal(max_scale(x), x)
    y = torch.ones(3, 4, 4)
    y[:, 0, 0] = 100.0
    valid = torch.ones(4, 4, dtype=torch.bool)
    valid[0, 0] = False
    assert max_scale(y, valid)[:, 1:, 1:].eq(1.0).all()


def test_collate_stacks_views_by_position():
    mc = MultiCrop(M.mean, M.std, global_size=16, local_size=8, local_number=3)
    samples = [{**mc(pattern_image()[0], gen(i)), "index": i} for i in range(4)]
    batch = collate_multicrop(samples)
    assert batch["global"].shape == (2, 4, 10, 16, 16) and batch["local"].shape == (3, 4, 10, 8, 8)
    assert batch["index"].tolist() == [0, 1, 2, 3]
    assert torch.equal(batch["local"][1, 2], samples[2]["local"][1])
    none = collate_multicrop(
        [{**MultiCrop(M.mean, M.std, global_size=8, local_number=0)(pattern_image()[0], gen()), "index": 0}]
    )
    assert none["local"] is None


def test_views_are_standardised_by_the_manifest():
    image, _ = pattern_image()
    v = MultiCrop(M.mean, M.std, global_size=32, local_number=0, **NO_PHOTOMETRY)(image, gen())["global"][0]
    assert math.isclose(
        float(unnormalise(v)[3].mean()), float((v[3] * M.std[3] + M.mean[3]).mean()), rel_tol=1e-6
    )
    assert v.dtype == torch.float32 and v.is_contiguous()
