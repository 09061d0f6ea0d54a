"""Seams and nodata: stitched maps equal one forward pass, and nodata never leaks."""

import numpy as np
import pytest
import rasterio
import torch

from deo_cli.data.normalize import Normalizer
from deo_cli.infer.tiling import TilePlan
from deo_cli.recipes import EmbedRecipe, build_recipe
from deo_cli.sensors import DEO_S2_MANIFEST
from deo_cli.tasks.embed.predict import run_embed
from tests.infer.helpers import S2_BANDS, ConvFeatures, smooth_scene

RGB_MAX = 3000.0


def recipe(**sets):
    base = {"runtime.num_workers": 0, "runtime.batch_size": 8, "input.rgb_max": RGB_MAX}
    base.update(sets)
    return build_recipe(EmbedRecipe, sets=[f"{k}={v}" for k, v in base.items()])


def embed(path, out, model, **sets):
    (res,) = run_embed([str(path)], out, recipe(**sets), model=model)
    with rasterio.open(res.output) as ds:
        return ds.read(), ds


def whole_scene_forward(data: np.ndarray, model, pad: int = 32) -> np.ndarray:
    """One forward pass over the whole (edge-padded) scene, cropped to its feature grid."""
    s = model.stride
    h, w = data.shape[1:]
    hp, wp = (-h) % s, (-w) % s
    x = np.pad(data.astype(np.float32), ((0, 0), (pad, pad + hp), (pad, pad + wp)), mode="edge")
    x = Normalizer.from_manifest(DEO_S2_MANIFEST, 1.0, RGB_MAX)(x)
    with torch.no_grad():
        y = model(torch.from_numpy(x)[None])[0].numpy()
    o = pad // s
    return y[:, o : o + -(-h // s), o : o + -(-w // s)]


@pytest.fixture
def scene(make_raster):
    data = smooth_scene(150, 122, seed=3)
    return make_raster("scene.tif", data, descriptions=S2_BANDS), data


def test_center_blend_equals_one_forward_pass(scene, tmp_path):
    path, data = scene
    model = ConvFeatures()
    # chip 48, overlap 16: the centre blend drops the outer 2 feature px of each chip, which is
    # where the chip border reaches (the conv net's receptive field), so stitching is exact
    out, _ = embed(
        path,
        tmp_path / "emb.tif",
        model,
        **{"tiling.chip_size": 48, "tiling.overlap": 16, "tiling.blend": "center"},
    )
    ref = whole_scene_forward(data, model)
    assert out.shape == ref.shape == (8, 38, 31)
    np.testing.assert_allclose(out, ref, atol=2e-5)


def test_cosine_blend_is_seam_free(scene, tmp_path):
    path, data = scene
    model = ConvFeatures()
    sets = {"tiling.chip_size": 80, "tiling.overlap": 32, "tiling.blend": "cosine"}
    out, _ = embed(path, tmp_path / "emb.tif", model, **sets)
    ref = whole_scene_forward(data, model)
    # away from the scene edges the stitched map matches one forward pass within tolerance
    # (the cosine window gives the chip border, where the net's zero padding reaches, a small
    # weight, so the match is close but not exact; the centre blend above is exact)
    inner = (slice(None), slice(3, -3), slice(3, -3))
    err = np.abs(out[inner] - ref[inner])
    assert err.max() < 0.05 * np.abs(ref).max() and err.mean() < 0.01 * np.abs(ref).mean()
    hard, _ = embed(path, tmp_path / "hard.tif", model, **{**sets, "tiling.overlap": 0})
    assert err.max() < 0.1 * np.abs(hard[inner] - ref[inner]).max()  # without overlap: seams
    # the largest jump across a chip boundary is no larger than the largest jump inside chips
    plan = TilePlan.create(150, 122, 80, 4, 32)
    for axis, starts, size in ((2, plan.col_starts, out.shape[2]), (1, plan.row_starts, out.shape[1])):
        jumps = np.abs(np.diff(out, axis=axis)).max(axis=(0, 3 - axis))  # per boundary position
        edges = set()
        for st in starts:
            f = st // 4
            edges |= {f - 1, f + plan.n - 1}  # between pixel j and j+1
        at = [j for j in range(size - 1) if j in edges]
        inside = [j for j in range(size - 1) if j not in edges]
        assert at and jumps[at].max() <= jumps[inside].max()


def test_nodata_border_gives_nodata_there_and_the_same_features_inside(tmp_path, make_raster):
    model = ConvFeatures()
    inner = smooth_scene(96, 80, seed=5)
    b = 20  # a multiple of the stride: feature grids line up
    bordered = np.zeros((10, 96 + 2 * b, 80 + 2 * b), np.uint16)
    bordered[:, b:-b, b:-b] = inner
    p_inner = make_raster("inner.tif", inner, descriptions=S2_BANDS)
    p_border = make_raster("border.tif", bordered, descriptions=S2_BANDS, nodata=0)
    sets = {"tiling.chip_size": 48, "tiling.overlap": 16, "tiling.blend": "center"}
    a, _ = embed(p_inner, tmp_path / "a.tif", model, **sets)
    c, _ = embed(p_border, tmp_path / "c.tif", model, **sets)
    f = b // 4
    assert np.isnan(c[:, :f]).all() and np.isnan(c[:, -f:]).all()
    assert np.isnan(c[:, :, :f]).all() and np.isnan(c[:, :, -f:]).all()
    np.testing.assert_allclose(c[:, f:-f, f:-f], a, atol=2e-5)
    assert not np.isnan(a).any()


def test_values_under_a_mask_never_reach_the_features(tmp_path, make_raster):
    """Two scenes that differ only under their nodata mask give identical features."""
    from deo_cli.models import build_encoder

    enc = build_encoder("deo_swin_test", weights=None)
    from deo_cli.infer.model import EncoderFeatures

    model = EncoderFeatures(enc, 2)
    data = smooth_scene(100, 90, seed=7)
    mask = np.ones((100, 90), bool)
    mask[30:60, 20:50] = False
    garbage = data.copy()
    garbage[:, ~mask] = np.random.default_rng(0).integers(1, 65535, (10, int((~mask).sum())))
    paths = []
    for name, d in (("clean.tif", data), ("garbage.tif", garbage)):
        p = make_raster(name, d, descriptions=S2_BANDS)
        with rasterio.open(p, "r+") as ds:
            ds.write_mask(mask.astype(np.uint8) * 255)
        paths.append(p)
    a, _ = embed(paths[0], tmp_path / "a.tif", model)
    g, _ = embed(paths[1], tmp_path / "g.tif", model)
    np.testing.assert_array_equal(np.isnan(a), np.isnan(g))
    np.testing.assert_allclose(a, g, atol=1e-5, equal_nan=True)
    # the footprint of the hole is nodata (mostly invalid), the rest is not
    assert np.isnan(a[:, 2:3, 2:3]).all() and not np.isnan(a[:, 0, 0]).any()
