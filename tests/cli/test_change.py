"""``deo detect-change`` through the command line: outputs, georeference, one-line mistakes."""

import json
import shutil

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import torch
from affine import Affine
from typer.testing import CliRunner

from deo_cli.data.normalize import Normalizer
from tests.cli.helpers import assert_one_line_error, run
from tests.infer.helpers import S2_BANDS, assert_valid_cog, smooth_scene

runner = CliRunner()
FAST = ["--model", "deo_swin_test", "--weights", "random", "--num-workers", "0", "--device", "cpu"]


def _pair(make_raster, shift=0.0, crs="EPSG:32633"):
    a = smooth_scene(96, 80, seed=7)
    b = a.copy()
    b[:, 40:70, 20:50] = np.clip(
        b[:, 40:70, 20:50].astype(np.int32) * 3 % 4000 + 300, 0, 65535
    )  # a changed block
    t = Affine(10, 0, 500000, 0, -10, 5000000)
    pa = make_raster("before.tif", a, descriptions=S2_BANDS)
    pb = make_raster(
        "after.tif", b, descriptions=S2_BANDS, crs=crs, transform=t * Affine.translation(shift, 0)
    )
    return pa, pb


def test_zero_shot_run_writes_score_mask_polygons_preview_and_recipe(make_raster, tmp_path):
    pa, pb = _pair(make_raster)
    out = tmp_path / "out" / "change.tif"
    result, _ = run(
        [
            "detect-change", str(pa), str(pb), "-o", str(out), "--polygons", str(tmp_path / "out" / "c.parquet"),
            "--preview", str(tmp_path / "out" / "c.png"), "--layer", "0", "--full-resolution", *FAST,
        ]
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    mask = tmp_path / "out" / "change_mask.tif"
    assert "change.tif + " in result.stdout and "zero-shot" in result.stdout
    # the summary states the rule, the threshold and the flagged share (a prior for a percentile)
    assert "(percentile: 99.25th percentile of the scores)" in result.stdout
    assert "% flagged (by construction)" in result.stdout
    for p in (out, mask):
        assert_valid_cog(p)
    with rasterio.open(out) as s, rasterio.open(mask) as m, rasterio.open(pa) as src:
        assert s.crs == m.crs == src.crs and s.transform == m.transform == src.transform
        assert s.shape == m.shape == src.shape
        assert s.dtypes[0] == "float32" and m.dtypes[0] == "uint8" and m.nodata == 255
        thr = json.loads(m.tags()["DEO_THRESHOLD"])
        assert thr["method"] == "percentile" and thr["parameter"] == 99.25 and thr["warning"] is None
        score, mk = s.read(1), m.read(1)
        np.testing.assert_array_equal(mk, (score > thr["value"]).astype(np.uint8))
        assert thr["flagged_pixels"] == int((mk == 1).sum()) and thr["valid_pixels"] == mk.size
        assert thr["flagged_fraction"] == pytest.approx(0.0075, abs=1e-3)
        assert json.loads(s.tags()["DEO_CHANGE_SCORE"])["layers"] == [0]
        # the changed block scores higher than the untouched rest
        assert score[45:65, 25:45].mean() > score[:30].mean()
    gdf = gpd.read_parquet(tmp_path / "out" / "c.parquet")
    assert gdf.crs.to_epsg() == 32633 and len(gdf) >= 1
    assert {"area", "pixels", "score_mean", "score_max"} <= set(gdf.columns)
    np.testing.assert_allclose(gdf["area"], gdf["pixels"] * 100.0)  # 10 m pixels, no simplification
    assert (tmp_path / "out" / "c.png").stat().st_size > 0
    assert (tmp_path / "out" / "change.recipe.yaml").exists()


def test_non_overlapping_scenes_fail_with_one_line_and_no_outputs(make_raster, tmp_path):
    pa, pb = _pair(make_raster, shift=500)  # 5 km east: no common pixel
    out = tmp_path / "out"
    out.mkdir()
    result, lines = run(
        [
            "detect-change",
            str(pa),
            str(pb),
            "-o",
            str(out / "c.tif"),
            "--polygons",
            str(out / "c.gpkg"),
            *FAST,
        ]
    )
    assert_one_line_error(result, lines, 1, "do not overlap", "EPSG:32633", "same place")
    assert list(out.iterdir()) == []


def test_other_mistakes_are_one_line(make_raster, tmp_path):
    pa, pb = _pair(make_raster)
    out = tmp_path / "c.tif"
    result, lines = run(
        ["detect-change", str(pa), str(pb), "-o", str(out), "--threshold", "0.1", "--percentile", "90", *FAST]
    )
    assert_one_line_error(result, lines, 2, "--threshold and --percentile")
    (tmp_path / "c_mask.tif").write_bytes(b"")
    result, lines = run(["detect-change", str(pa), str(pb), "-o", str(out), *FAST])
    assert_one_line_error(result, lines, 1, "c_mask.tif already exists")
    assert not out.exists()
    three = make_raster("rgbn.tif", np.ones((2, 96, 80), np.uint16) * 900, descriptions=["B08", "B11"])
    result, lines = run(["detect-change", str(pa), str(three), "-o", str(tmp_path / "d.tif"), *FAST])
    assert_one_line_error(result, lines, 1, "lacks band(s)")
    result, lines = run(
        ["detect-change", str(pa), str(pb), "-o", str(tmp_path / "e.tif"), "--layer", "9", *FAST]
    )
    assert_one_line_error(result, lines, 2, "--layer 9 is out of range")
    result, lines = run(["detect-change", str(pa), str(pb), "-o", str(tmp_path / "f.parquet"), *FAST])
    assert_one_line_error(
        result, lines, 2, "-o f.parquet has the extension .parquet", "a COG (GeoTIFF)", "f.tif"
    )
    assert not any(p.name.startswith(("d", "e", "f")) for p in tmp_path.iterdir())


def test_train_then_run_with_the_head(tmp_path):
    from tests.tasks.change.test_change_train import write_oscd

    data = write_oscd(tmp_path / "oscd")
    run_dir = tmp_path / "run"
    result, _ = run(
        [
            "detect-change", "train", "--data", str(data), "-o", str(run_dir), "--train-cities", "alpha",
            "--test-cities", "beta", "--epochs", "1", "--chip-size", "32", "--head-channels", "8",
            "--batch-size", "8", *FAST,
        ]
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "test F1" in result.stdout and (run_dir / "metrics.json").exists()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["train_cities"] == ["alpha"] and "beta" in metrics["test"]
    city = data / "images" / "beta"
    out = tmp_path / "c.tif"
    result, _ = run(
        ["detect-change", str(city / "imgs_1"), str(city / "imgs_2"), "-o", str(out), "--head", str(run_dir / "head.pt"),
         "--num-workers", "0", "--device", "cpu", "--threshold", "0.5"]
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "supervised" in result.stdout and "threshold 0.5 (fixed)" in result.stdout
    with rasterio.open(out) as s:
        assert (
            json.loads(s.tags()["DEO_HEAD"])["task"] == "change"
            and s.tags()["DEO_CHANGE_MODE"] == "supervised"
        )
    # the head was trained on 10 bands: RGB-only dates are refused before any model is loaded
    # (segment predict shares the check), with nothing written
    assert torch.load(run_dir / "head.pt", weights_only=True)["normalization"]["stem"] == "ms"
    dates = []
    for d in ("imgs_1", "imgs_2"):
        (tmp_path / "rgb" / d).mkdir(parents=True)
        for f in (city / d).glob("*_B0[234].tif"):
            shutil.copy(f, tmp_path / "rgb" / d / f.name)
        dates.append(str(tmp_path / "rgb" / d))
    result, lines = run(
        ["detect-change", *dates, "-o", str(tmp_path / "rgb.tif"), "--head", str(run_dir / "head.pt")]
    )
    assert_one_line_error(
        result, lines, 1, "change head head.pt was trained on 10 multispectral bands", "lacks B05", "imgs_1"
    )
    assert not list(tmp_path.glob("rgb*.tif"))
    # a change head is not a segmentation head, and the other way round
    result, lines = run(
        [
            "segment",
            "predict",
            str(city / "imgs_1"),
            "-o",
            str(tmp_path / "s.tif"),
            "--head",
            str(run_dir / "head.pt"),
        ]
    )
    assert_one_line_error(result, lines, 1, "is a change head, not a segment head")


def test_an_implausible_flagged_share_is_warned_in_one_line(make_raster, tmp_path):
    """Otsu on the synthetic pair finds the changed block (11.7 % of the scene): no warning;
    a fixed threshold below every score flags everything: one warning line, in the tag too."""
    pa, pb = _pair(make_raster)
    out = tmp_path / "otsu.tif"
    result, _ = run(["detect-change", str(pa), str(pb), "-o", str(out), "--threshold-method", "otsu", *FAST])
    assert result.exit_code == 0, result.output
    with rasterio.open(tmp_path / "otsu_mask.tif") as m:
        thr = json.loads(m.tags()["DEO_THRESHOLD"])
    assert thr["method"] == "otsu" and thr["warning"] is None and 0.05 < thr["flagged_fraction"] < 0.2
    assert "(otsu: Otsu (between-class variance))" in result.stdout and "(implausible" not in result.stdout
    out = tmp_path / "all.tif"
    result, lines = run(["detect-change", str(pa), str(pb), "-o", str(out), "--threshold", "-1", *FAST])
    assert result.exit_code == 0, result.output
    assert "100.00% flagged (implausible, see the warning)" in result.stdout
    warnings = [ln for ln in lines if ln.startswith("WARNING") and "flagged" in ln]
    assert len(warnings) == 1 and "fixed flagged 100.0% of the scene" in " ".join(" ".join(lines).split())
    with rasterio.open(tmp_path / "all_mask.tif") as m:
        thr = json.loads(m.tags()["DEO_THRESHOLD"])
    assert thr["flagged_fraction"] == 1.0 and thr["warning"].startswith("fixed flagged 100.0%")


def test_cva_baseline_is_the_rms_normalised_difference_on_the_input_grid(make_raster, tmp_path):
    pa, pb = _pair(make_raster)
    out = tmp_path / "cva.tif"
    result, _ = run(
        ["detect-change", str(pa), str(pb), "-o", str(out), "--method", "cva", "--polygons",
         str(tmp_path / "cva.parquet"), "--model", "deo_swin_test", "--num-workers", "0", "--device", "cpu"]
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert " cva " in result.stdout
    with rasterio.open(out) as s, rasterio.open(pa) as a, rasterio.open(pb) as b:
        assert s.transform == a.transform and s.shape == a.shape  # per pixel, on the input grid
        tags = s.tags()
        assert tags["DEO_WEIGHTS"] == "none" and tags["DEO_MODEL"] == "cva (bands of deo_swin_test)"
        assert "change vector analysis" in json.loads(tags["DEO_CHANGE_SCORE"])["score"]
        # both dates on the first date's RGB scale (DEO's manifest scales RGB per scene)
        norms = json.loads(tags["DEO_NORMALIZATION"])
        n1, n2 = (Normalizer(*(tuple(norms[d][k]) for k in ("bands", "scale", "clamp01", "mean", "std")))
                  for d in ("before", "after"))  # fmt: skip
        assert n1.scale == n2.scale and any(n1.clamp01)
        order = [list(a.descriptions).index(bd) for bd in n1.bands]
        x1, x2 = n1(a.read().astype(np.float64)[order]), n2(b.read().astype(np.float64)[order])
        expected = np.sqrt(((x2 - x1) ** 2).mean(axis=0))
        np.testing.assert_allclose(s.read(1), expected, rtol=1e-4, atol=1e-4)
        assert expected[45:65, 25:45].min() > 0 and expected[:30].max() == 0  # only the block changed
    gdf = gpd.read_parquet(tmp_path / "cva.parquet")
    assert len(gdf) >= 1 and (gdf["pixels"] >= 2).all()  # single-pixel speckle is dropped by default
    # a head is a supervised score: --method cva takes none
    result, lines = run(
        ["detect-change", str(pa), str(pb), "-o", str(tmp_path / "x.tif"), "--method", "cva",
         "--head", str(pa), *FAST]
    )  # fmt: skip
    assert_one_line_error(result, lines, 2, "--method cva takes no --head")
