"""The embed core: resume after an interruption, ranks, layers, the model adapter."""

import json

import numpy as np
import pytest
import rasterio
import torch

from deo_cli.data.normalize import Normalizer
from deo_cli.errors import UsageError
from deo_cli.infer.model import (
    EncoderFeatures,
    default_embed_layer,
    forward_level,
    forward_levels,
    resolve_layer,
)
from deo_cli.infer.outputs import scene_stem
from deo_cli.io.writers import partial_paths
from deo_cli.models import build_encoder, get_model_spec
from deo_cli.recipes import EmbedRecipe, build_recipe
from deo_cli.sensors import DEO_S2_MANIFEST
from deo_cli.tasks.embed.predict import run_embed
from deo_cli.tasks.embed.scene import output_format
from tests.infer.helpers import S2_BANDS, ConvFeatures, smooth_scene


def recipe(*sets):
    return build_recipe(
        EmbedRecipe,
        sets=["runtime.num_workers=0", "runtime.batch_size=6", "input.rgb_max=3000", *sets],
    )


class Interrupting(torch.nn.Module):
    """Wraps a model; raises KeyboardInterrupt on call number ``stop`` (counting from 1)."""

    def __init__(self, model, stop=None):
        super().__init__()
        self.model = model
        self.stop = stop
        self.calls = 0
        self.chips = 0
        for k in ("name", "stride", "channels", "input_size", "manifest", "rgb_manifest", "layer"):
            setattr(self, k, getattr(model, k))

    def forward(self, x):
        self.calls += 1
        self.chips += x.shape[0]
        if self.stop is not None and self.chips > self.stop:  # ``stop`` chips were computed
            raise KeyboardInterrupt
        return self.model(x)


def test_resume_continues_from_the_last_finished_block(make_raster, tmp_path):
    path = make_raster("s.tif", smooth_scene(150, 122), descriptions=S2_BANDS)
    sets = ["tiling.chip_size=32", "tiling.overlap=8"]
    full = tmp_path / "full.tif"
    m_full = Interrupting(ConvFeatures())
    run_embed([str(path)], full, recipe(*sets), model=m_full)

    out = tmp_path / "emb.tif"
    m1 = Interrupting(ConvFeatures(), stop=30)  # five batches of 6
    with pytest.raises(KeyboardInterrupt):
        run_embed([str(path)], out, recipe(*sets), model=m1)
    tmp, side = partial_paths(out)
    assert not out.exists() and tmp.exists()
    assert json.loads(side.read_text())["rows_done"] == 16  # one block of 16 feature rows was final

    m2 = Interrupting(ConvFeatures())
    (res,) = run_embed([str(path)], out, recipe(*sets), model=m2, resume=True)
    assert res.status == "written" and not tmp.exists() and not side.exists()
    assert m2.chips < m_full.chips  # chip rows above row 16 were not computed again
    with rasterio.open(out) as a, rasterio.open(full) as b:
        np.testing.assert_array_equal(a.read(), b.read())
    # a finished output is skipped by --resume
    m3 = Interrupting(ConvFeatures())
    (res,) = run_embed([str(path)], out, recipe(*sets), model=m3, resume=True)
    assert res.status == "skipped" and m3.calls == 0


def test_scene_smaller_than_one_chip(make_raster, tmp_path):
    path = make_raster("tiny.tif", smooth_scene(9, 13), descriptions=S2_BANDS)
    out = tmp_path / "e.tif"
    (res,) = run_embed([str(path)], out, recipe(), model=ConvFeatures())
    with rasterio.open(out) as ds, rasterio.open(path) as src:
        assert ds.shape == (3, 4) and ds.transform == src.transform @ rasterio.Affine.scale(4)
        assert np.isfinite(ds.read()).all()
    assert res.chips == 1


@pytest.mark.parametrize("size,chip", [(64, None), (224, 224), (48, None)])
def test_a_scene_of_one_chip_is_one_forward_pass_equal_to_the_model(make_raster, tmp_path, size, chip):
    """A scene the size of one chip (224 x 224 at --chip-size 224; 64 x 64 for the tiny model's
    default chip) is one chip and one forward pass, and its map is the network's own output
    for the normalised scene; a scene that fits one chip without O px to spare on both sides
    (48 px, chip 64, overlap 16) is that chip at the origin with the scene edge replicated."""
    torch.manual_seed(0)
    enc = build_encoder("deo_swin_test", weights=None)
    layer = default_embed_layer(enc.spec)  # stage 3 (stride 16)
    model = Interrupting(EncoderFeatures(enc, layer))
    data = smooth_scene(size, size, seed=4)
    path = make_raster("one.tif", data, descriptions=S2_BANDS)
    sets = [f"tiling.chip_size={chip}"] if chip else []
    (res,) = run_embed([str(path)], tmp_path / "emb.tif", recipe(*sets), model=model)
    assert res.chips == 1 and model.calls == 1 and model.chips == 1
    c = chip or enc.spec.input_size
    x = np.pad(data.astype(np.float32), ((0, 0), (0, c - size), (0, c - size)), mode="edge")
    x = Normalizer.from_manifest(DEO_S2_MANIFEST, 1.0, 3000.0)(x)
    with torch.no_grad():
        ref = enc(torch.from_numpy(x)[None])[layer][0].numpy()
    n = -(-size // 16)
    with rasterio.open(res.output) as ds:
        out = ds.read()
        assert json.loads(ds.tags()["DEO_TILING"])["chips"] == [1, 1]
    assert out.shape == (enc.spec.feature_channels[layer], n, n)
    np.testing.assert_allclose(out, ref[:, :n, :n], atol=1e-5, rtol=0)


def test_default_layer_is_the_finest_distilled_level():
    swin = get_model_spec("deo_swin_b")
    assert (
        default_embed_layer(swin) == 2 and swin.feature_strides[2] == 16 and swin.feature_channels[2] == 512
    )
    vit = get_model_spec("deo_vit_b16")
    assert default_embed_layer(vit) == 3
    assert resolve_layer(swin, "last") == 3 and resolve_layer(swin, "-1") == 3 and resolve_layer(swin, 0) == 0
    with pytest.raises(UsageError, match="out of range"):
        resolve_layer(swin, 4)


@pytest.mark.parametrize("name,level", [("deo_swin_test", 2), ("deo_swin_test", 0), ("deo_vit_test", 3)])
def test_truncated_forward_equals_the_full_forward(name, level):
    torch.manual_seed(0)
    enc = build_encoder(name, weights=None)
    x = torch.randn(2, 10, 64, 64)
    with torch.no_grad():
        np.testing.assert_array_equal(forward_level(enc, x, level).numpy(), enc(x)[level].numpy())
    f = EncoderFeatures(enc, level)
    assert f.stride == enc.spec.feature_strides[level] and f.channels == enc.spec.feature_channels[level]


@pytest.mark.parametrize("name", ["deo_swin_test", "deo_vit_test"])
def test_truncated_forward_of_several_levels_equals_the_full_forward(name):
    torch.manual_seed(0)
    enc = build_encoder(name, weights=None)
    x = torch.randn(2, 10, 64, 64)
    with torch.no_grad():
        full = enc(x)
        got = forward_levels(enc, x, [2, 0, 1])  # in the order asked
    assert len(got) == 3
    for g, lv in zip(got, (2, 0, 1)):
        np.testing.assert_array_equal(g.numpy(), full[lv].numpy())


def test_output_format_and_names(tmp_path):
    from pathlib import Path

    assert output_format(Path("a.tif"), "none") == "cog"
    assert output_format(Path("a.zarr"), "none") == "zarr"
    assert output_format(Path("a.parquet"), "mean") == "parquet"
    with pytest.raises(UsageError, match="--pool"):
        output_format(Path("a.parquet"), "none")
    assert scene_stem("sample:paris") == "paris"
    assert scene_stem("bigearthnet/S2A_x_87_48") == "S2A_x_87_48" and scene_stem("a b.tif") == "a_b"


@pytest.mark.slow
def test_two_ranks_on_cpu_give_the_same_raster(make_raster, tmp_path):
    path = make_raster("s.tif", smooth_scene(300, 100), descriptions=S2_BANDS)
    sets = ["model.name=deo_swin_test", "model.weights=random"]
    one, two = tmp_path / "one.tif", tmp_path / "two.tif"
    (res1,) = run_embed([str(path)], one, recipe(*sets))
    (res,) = run_embed([str(path)], two, recipe(*sets, "gpus=2", "runtime.device=cpu"))
    assert res.status == "written"
    # the summary counts every rank's chips (those at the band boundary run on both ranks)
    assert res1.chips <= res.chips < 2 * res1.chips
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "one.recipe.yaml",
        "one.tif",
        "s.tif",
        "two.recipe.yaml",
        "two.tif",
    ]
    with rasterio.open(one) as a, rasterio.open(two) as b:
        pa, pb = dict(a.profile), dict(b.profile)
        assert np.isnan(pa.pop("nodata")) and np.isnan(pb.pop("nodata")) and pa == pb
        assert b.tags()["DEO_MODEL"] == "deo_swin_test" and b.descriptions == a.descriptions
        np.testing.assert_allclose(a.read(), b.read(), atol=1e-4)
