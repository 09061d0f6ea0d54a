"""detect-change core: overlap checks, two dates in lockstep, scores, masks, polygons, reprojection."""

import numpy as np
import pytest
import rasterio
import torch
from affine import Affine
from rasterio.crs import CRS
from rasterio.warp import Resampling, calculate_default_transform, reproject

from deo_cli.errors import GeoreferenceError, OutputExistsError
from deo_cli.infer.chips import ChipReader
from deo_cli.infer.dense import CogSink
from deo_cli.infer.tiling import TilePlan
from deo_cli.io.grid import Grid
from deo_cli.io.writers import RasterLayout
from deo_cli.models import build_encoder, get_model_spec
from deo_cli.recipes import ChangeRecipe, InputSection, build_recipe
from deo_cli.tasks.change.model import MASK_NODATA, CosineChange, default_change_layers, parse_layers
from deo_cli.tasks.change.pair import PairChipReader, check_overlap, open_dates
from deo_cli.tasks.change.predict import run_detect_change, write_mask, write_polygons
from deo_cli.tasks.change.score import change_score_array
from tests.conftest import write_raster
from tests.infer.helpers import S2_BANDS, smooth_scene

PARIS_2016 = "sample:paris-2016"
PARIS_2017 = "sample:paris-2017"


def tiny_recipe(*sets) -> ChangeRecipe:
    return build_recipe(
        ChangeRecipe,
        sets=[
            "model.name=deo_swin_test",
            "model.weights=random",
            "runtime.device=cpu",
            "runtime.num_workers=0",
            "runtime.batch_size=8",
            *sets,
        ],
    )


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _grid(crs, transform, w, h):
    return Grid(CRS.from_user_input(crs), transform, w, h)


def test_check_overlap_compares_footprints_in_the_first_dates_crs():
    utm = _grid("EPSG:32631", Affine(10, 0, 448000, 0, -10, 5414000), 400, 400)  # ~Paris, 4 km
    # the same place in WGS84, shifted east by about half the width
    lon0, lat0 = 2.3, 48.88
    half = _grid("EPSG:4326", Affine(1.2e-4, 0, lon0 + 0.0, 0, -1.2e-4, lat0), 450, 300)
    share = check_overlap(utm, half)
    assert 0.0 < share < 1.0
    assert check_overlap(utm, utm) == pytest.approx(1.0)
    far = _grid("EPSG:4326", Affine(1.2e-4, 0, 13.4, 0, -1.2e-4, 52.5), 100, 100)  # Berlin
    with pytest.raises(GeoreferenceError, match="do not overlap") as e:
        check_overlap(utm, far, "BEFORE a", "AFTER b")
    assert "EPSG:32631" in e.value.one_line() and "\n" not in e.value.one_line()
    no_crs = Grid(None, Affine.identity(), 400, 400)
    assert check_overlap(no_crs, Grid(None, Affine.identity(), 400, 400)) == 1.0
    with pytest.raises(GeoreferenceError, match="only one of"):
        check_overlap(utm, no_crs)


def test_pair_reader_stacks_both_dates_and_takes_nodata_from_either(make_raster):
    a = smooth_scene(40, 40, seed=1)
    b = smooth_scene(40, 40, seed=2)
    a[:, :8, :] = 0  # nodata rows in the first date
    b[:, :, -8:] = 0  # nodata columns in the second
    pa = make_raster("a.tif", a, descriptions=S2_BANDS, nodata=0)
    pb = make_raster("b.tif", b, descriptions=S2_BANDS, nodata=0)
    first, second, info = open_dates(str(pa), str(pb), InputSection(rgb_max=3000))
    assert info["after_resampled"] is False and info["overlap_fraction"] == pytest.approx(1.0)
    from deo_cli.infer.prepare import prepare_input
    from deo_cli.sensors import DEO_S2_MANIFEST

    ia = prepare_input(first, DEO_S2_MANIFEST, None, "auto", 3000)
    ib = prepare_input(second, DEO_S2_MANIFEST, None, "auto", 3000)
    plan = TilePlan(40, 40, 32, 8, 4, pad_start=True)
    ra, rb = (
        ChipReader(first, ia.bands, ia.normalizer, plan),
        ChipReader(second, ib.bands, ib.normalizer, plan),
    )
    pair = PairChipReader(ra, rb)
    chip = plan.chips()[0]
    s, sa, sb = pair.read(chip), ra.read(chip), rb.read(chip)
    assert s.x.shape == (20, 32, 32)
    np.testing.assert_array_equal(s.x[:10], sa.x)
    np.testing.assert_array_equal(s.x[10:], sb.x)
    np.testing.assert_array_equal(s.invalid, np.maximum(sa.invalid, sb.invalid))
    assert s.invalid[:4].max() == 1.0  # rows 0..7 of the scene (chip rows 8..15): first date's nodata


def test_default_levels_swin_stages_1_to_3_vit_the_embed_level():
    swin = get_model_spec("deo_swin_b")
    assert default_change_layers(swin) == [0, 1, 2]  # strides 4, 8, 16: up to deo embed's stage 3
    assert [swin.feature_strides[lv] for lv in default_change_layers(swin)] == [4, 8, 16]
    assert parse_layers(swin, None) == parse_layers(swin, "default") == [0, 1, 2]
    assert parse_layers(swin, "2") == [2] and parse_layers(swin, "2,0") == [0, 2]
    assert parse_layers(get_model_spec("deo_swin_test"), "default") == [0, 1, 2]
    for name in ("deo_vit_b16", "deo_vit_test"):  # one stride: averaging would not refine the grid
        vit = get_model_spec(name)
        assert default_change_layers(vit) == parse_layers(vit, "default") == [3]


def test_default_zero_shot_averages_three_levels_on_the_stride_4_grid(make_raster, tmp_path):
    """The default score: levels 0, 1, 2 (as ``--layer 0,1,2``), transform = input transform x 4,
    polygons on that grid (16 input pixels each)."""
    import json

    import geopandas as gpd

    a_data = smooth_scene(64, 96, seed=8)
    b_data = a_data.copy()
    b_data[:, 20:44, 30:62] = np.clip(b_data[:, 20:44, 30:62].astype(np.int32) * 3 % 4000 + 300, 0, 65535)
    a = make_raster("a.tif", a_data, descriptions=S2_BANDS)
    b = make_raster("b.tif", b_data, descriptions=S2_BANDS)
    out = tmp_path / "c.tif"
    recipe = tiny_recipe("input.rgb_max=3000")
    res = run_detect_change(str(a), str(b), out, recipe, polygons=tmp_path / "p.parquet")
    assert res.extra["stride"] == 4
    with rasterio.open(out) as s, rasterio.open(res.mask) as m, rasterio.open(a) as src:
        assert s.crs == m.crs == src.crs
        assert s.transform == m.transform == src.transform * Affine.scale(4)
        assert s.shape == m.shape == (16, 24) and s.bounds == src.bounds
        described = json.loads(s.tags()["DEO_CHANGE_SCORE"])
        assert described["layers"] == [0, 1, 2] and described["level_strides"] == [4, 8, 16]
        assert described["stride"] == 4 and described["resized"] == "bilinear"
        written, mask = s.read(1), m.read(1)
    # the same scores as an explicit list of the three levels through the in-memory path
    from deo_cli.runtime import seed_everything

    seed_everything(0)  # the command seeds random weights with runtime.seed
    enc = build_encoder("deo_swin_test", weights="random")
    first, second, _ = open_dates(str(a), str(b), recipe.input)
    score, grid = change_score_array(first, second, CosineChange(enc, [0, 1, 2]), rgb_max=3000)
    np.testing.assert_allclose(written, score, atol=1e-6)
    assert grid.transform == src.transform * Affine.scale(4)
    gdf = gpd.read_parquet(tmp_path / "p.parquet")
    assert len(gdf) >= 1 and gdf.crs == src.crs
    np.testing.assert_allclose(gdf["area"], gdf["pixels"] * 40.0 * 40.0)  # 4 x 10 m score pixels
    assert int(gdf["pixels"].sum()) == int((mask == 1).sum())


def test_cosine_change_averages_the_levels_on_the_finest_grid():
    torch.manual_seed(0)
    enc = build_encoder("deo_swin_test", weights=None).eval()
    x = torch.randn(2, 20, 64, 64)  # both dates stacked
    with torch.no_grad():
        got = CosineChange(enc, [0, 1, 2])(x)
        feats = enc(torch.cat([x[:, :10], x[:, 10:]]))
        want = 0
        for lv in (0, 1, 2):
            a, b = feats[lv].chunk(2)
            d = (1 - torch.nn.functional.cosine_similarity(a, b, dim=1, eps=1e-6))[:, None]
            want = want + torch.nn.functional.interpolate(
                d, size=(16, 16), mode="bilinear", align_corners=False
            )
    assert got.shape == (2, 1, 16, 16)  # stride 4
    torch.testing.assert_close(got, want / 3, atol=1e-6, rtol=0)


def test_identical_dates_score_zero_on_the_embedding_grid(make_raster, tmp_path):
    data = smooth_scene(70, 90, seed=3)
    a = make_raster("a.tif", data, descriptions=S2_BANDS)
    b = make_raster("b.tif", data, descriptions=S2_BANDS)
    out = tmp_path / "c.tif"
    res = run_detect_change(str(a), str(b), out, tiny_recipe("input.rgb_max=3000"))
    with rasterio.open(out) as s, rasterio.open(res.mask) as m, rasterio.open(a) as src:
        assert s.crs == src.crs and m.crs == src.crs
        stride = res.extra["stride"]
        assert stride == 4  # default levels 0-2 of deo_swin_test, on the finest (stride-4) grid
        assert s.transform == src.transform * Affine.scale(stride) == m.transform
        assert (s.width, s.height) == (-(-90 // 4), -(-70 // 4))
        score = s.read(1)
        assert np.isfinite(score).all() and np.abs(score).max() < 1e-4
        assert (m.read(1) == 0).all()  # nothing above the (degenerate) Otsu threshold
        assert m.colormap(1)[1] == (255, 0, 0, 255)
        assert s.tags()["DEO_CHANGE_MODE"] == "zero-shot"
    assert res.recipe is not None and res.recipe.exists()
    # outputs exist: a second run refuses before computing anything
    with pytest.raises(OutputExistsError):
        run_detect_change(str(a), str(b), out, tiny_recipe("input.rgb_max=3000"))


def test_runtime_micro_batch_reaches_the_forward_and_keeps_the_scores(make_raster, tmp_path, monkeypatch):
    import deo_cli.infer.runner as runner

    data = smooth_scene(64, 80, seed=5)
    a = make_raster("a.tif", data, descriptions=S2_BANDS)
    b = make_raster("b.tif", data[::-1].copy(), descriptions=S2_BANDS)
    seen = []
    forward = runner._forward

    def spy(*args, micro_batch=0, **kw):
        seen.append(micro_batch)
        return forward(*args, micro_batch=micro_batch, **kw)

    monkeypatch.setattr(runner, "_forward", spy)
    scores = {}
    for mb in (0, 1):
        out = tmp_path / f"c{mb}.tif"
        run_detect_change(str(a), str(b), out, tiny_recipe("input.rgb_max=3000", f"runtime.micro_batch={mb}"))
        with rasterio.open(out) as s:
            scores[mb] = s.read(1)
        assert seen and set(seen) == {mb or runner.CPU_MICRO_BATCH}
        seen.clear()
    np.testing.assert_allclose(scores[1], scores[0], atol=1e-5)


def test_in_memory_scores_equal_the_written_cog(make_raster, tmp_path):
    a = make_raster("a.tif", smooth_scene(64, 80, seed=4), descriptions=S2_BANDS)
    b = make_raster("b.tif", smooth_scene(64, 80, seed=5), descriptions=S2_BANDS)
    out = tmp_path / "c.tif"
    recipe = tiny_recipe("input.rgb_max=3000", "output_grid=input", "layer=0")
    res = run_detect_change(str(a), str(b), out, recipe)
    torch.manual_seed(0)
    from deo_cli.runtime import seed_everything

    seed_everything(0)  # the command seeds random weights with runtime.seed
    enc = build_encoder("deo_swin_test", weights="random")
    first, second, _ = open_dates(str(a), str(b), recipe.input)
    score, grid = change_score_array(first, second, CosineChange(enc, [0], 1), rgb_max=3000)
    with rasterio.open(out) as ds:
        np.testing.assert_allclose(ds.read(1), score, atol=1e-6)
        assert grid.transform == ds.transform and grid.shape == ds.shape
    assert res.extra["stride"] == 1


def _score_raster(tmp_path, score):
    t = Affine(10, 0, 500000, 0, -10, 5000000)
    return write_raster(tmp_path / "score.tif", score.astype(np.float32), crs="EPSG:32633", transform=t), t


def test_polygons_from_a_synthetic_score(tmp_path):
    score = np.full((40, 50), 0.1, np.float32)
    score[2:5, 3:7] = 0.9  # 3 x 4 px = 1200 m^2
    score[10:15, 20:25] = 0.8  # 5 x 5 px = 2500 m^2
    score[30, 40] = 0.7  # one pixel = 100 m^2
    score[35:, :10] = np.nan  # nodata
    path, t = _score_raster(tmp_path, score)
    grid = Grid(CRS.from_epsg(32633), t, 50, 40)
    layout = RasterLayout(count=1, dtype="uint8", nodata=MASK_NODATA, resampling="mode")
    sink = CogSink(tmp_path / "mask.tif", grid, layout, 16)
    changed, valid = write_mask(path, sink, 0.5)
    assert changed == 12 + 25 + 1 and valid == 40 * 50 - 5 * 10
    with rasterio.open(tmp_path / "mask.tif") as m:
        mask = m.read(1)
    assert (mask[35:, :10] == MASK_NODATA).all() and mask[2, 3] == 1 and mask[0, 0] == 0
    import geopandas as gpd

    n = write_polygons(tmp_path / "mask.tif", path, tmp_path / "p.parquet", 0.0, 0.0, False, {"deo_x": 1})
    gdf = gpd.read_parquet(tmp_path / "p.parquet")
    assert n == len(gdf) == 3 and gdf.crs.to_epsg() == 32633
    assert sorted(gdf["area"].round(6)) == [100.0, 1200.0, 2500.0]
    big = gdf.loc[gdf["area"].idxmax()]
    assert big["pixels"] == 25 and big["score_mean"] == pytest.approx(0.8)
    assert big.geometry.bounds == pytest.approx((500200, 4999850, 500250, 4999900))
    n = write_polygons(tmp_path / "mask.tif", path, tmp_path / "p.gpkg", 150.0, 0.0, False, {})
    gdf = gpd.read_file(tmp_path / "p.gpkg")
    assert n == len(gdf) == 2 and gdf.crs.to_epsg() == 32633
    assert sorted(gdf["area"].round(6)) == [1200.0, 2500.0]


def _reproject_to_utm(src_path, dst_path):
    with rasterio.open(src_path) as src:
        dst_crs = CRS.from_epsg(32631)
        transform, w, h = calculate_default_transform(
            src.crs, dst_crs, src.width, src.height, *src.bounds, resolution=10
        )
        prof = src.profile | {
            "crs": dst_crs,
            "transform": transform,
            "width": w,
            "height": h,
            "driver": "GTiff",
        }
        prof.pop("blockxsize", None), prof.pop("blockysize", None)
        with rasterio.open(dst_path, "w", **prof) as dst:
            for b in range(1, src.count + 1):
                reproject(
                    rasterio.band(src, b),
                    rasterio.band(dst, b),
                    resampling=Resampling.bilinear,
                    dst_nodata=0,
                )
            dst.descriptions = src.descriptions


@pytest.mark.slow
def test_a_pair_in_different_crss_gives_the_same_mask(tmp_path):
    """The second date written in UTM 31N (10 m) is warped back onto the first date's WGS84 grid.

    Two bilinear resamplings blur it slightly, so scores move a little and locations whose score
    lies near the threshold may flip: with the same threshold, at least 95 % of the score
    locations agree, and the scores correlate closely.
    """
    from deo_cli.io.sources import resolve_source

    after_path = resolve_source(PARIS_2017).paths[0]
    utm = tmp_path / "after_utm.tif"
    _reproject_to_utm(after_path, utm)
    recipe = tiny_recipe("layer=0")
    ref = run_detect_change(PARIS_2016, PARIS_2017, tmp_path / "ref.tif", recipe)
    fixed = tiny_recipe("layer=0", f"threshold={ref.threshold.value}")
    warped = run_detect_change(PARIS_2016, str(utm), tmp_path / "warped.tif", fixed)
    assert (
        warped.extra["pair"]["after_resampled"] and warped.extra["pair"]["after_native_crs"] == "EPSG:32631"
    )
    with rasterio.open(ref.output) as a, rasterio.open(warped.output) as b:
        assert a.transform == b.transform and a.crs == b.crs == CRS.from_epsg(4326)
        sa, sb = a.read(1), b.read(1)
    with rasterio.open(ref.mask) as a, rasterio.open(warped.mask) as b:
        ma, mb = a.read(1), b.read(1)
    both = (ma != MASK_NODATA) & (mb != MASK_NODATA)
    assert both.mean() > 0.95  # the UTM raster's edge may leave a thin nodata border
    agree = (ma[both] == mb[both]).mean()
    assert agree > 0.95, agree
    assert np.corrcoef(sa[both], sb[both])[0, 1] > 0.95
