"""``deo embed`` end to end through the command line, on real Sentinel-2 data and small rasters."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from typer.testing import CliRunner

from tests.cli.helpers import assert_one_line_error, run
from tests.infer.helpers import S2_BANDS, assert_valid_cog, smooth_scene

needs_zarr = pytest.mark.skipif(importlib.util.find_spec("zarr") is None, reason="zarr 3 needs Python 3.11+")

runner = CliRunner()
FAST = ["--model", "deo_swin_test", "--weights", "random", "--num-workers", "0"]


def reference_grid(folder: Path):
    """CRS and transform of the 10 m bands of a band folder (deo's scene grid)."""
    b02 = next(folder.glob("*_B02.tif"))
    with rasterio.open(b02) as ds:
        return ds.crs, ds.transform, ds.width, ds.height


@pytest.mark.parametrize(
    "folder",
    ["oscd_subset/images/paris/imgs_1", "bigearthnet_s2_example/S2A_MSIL2A_20170613T101031_87_48"],
)
def test_real_scenes_give_georeferenced_cogs(shared_data, tmp_path, folder):
    import rioxarray

    src = shared_data / folder
    out = tmp_path / "emb.tif"
    result, _ = run(["embed", str(src), "-o", str(out), *FAST])
    assert result.exit_code == 0, result.output
    crs, transform, w, h = reference_grid(src)
    assert_valid_cog(out)
    with rasterio.open(out) as ds:
        assert ds.crs == crs
        assert ds.transform == transform * Affine.scale(16)  # stage 3 of the Swin: stride 16
        assert (ds.width, ds.height) == (-(-w // 16), -(-h // 16))
        assert ds.count == 64 and ds.descriptions[0] == "emb_0000" and ds.descriptions[-1] == "emb_0063"
        assert ds.dtypes[0] == "float32" and np.isnan(ds.nodata)
        st = ds.tags(ns="IMAGE_STRUCTURE")  # ZSTD with the floating-point predictor by default
        assert st["COMPRESSION"] == "ZSTD" and st["PREDICTOR"] == "3", st
        tags = ds.tags()
        assert (
            tags["DEO_MODEL"] == "deo_swin_test" and tags["DEO_LAYER"] == "2" and tags["DEO_STRIDE"] == "16"
        )
        assert json.loads(tags["DEO_BAND_MANIFEST"])["bands"] == S2_BANDS
        norm = json.loads(tags["DEO_NORMALIZATION"])
        assert norm["stem"] == "ms" and norm["unit"] == "dn" and norm["rgb_max"] > 0
        assert json.loads(tags["DEO_TILING"])["chip_size"] == 64
        assert tags["DEO_VERSION"] and len(tags["DEO_RECIPE_HASH"]) == 16
        assert json.loads(tags["DEO_SOURCE"])["scene"].endswith(Path(folder).name)
        a = ds.read()
        assert np.isfinite(a).all() and a.std() > 0
    xa = rioxarray.open_rasterio(out)
    assert xa.rio.crs == crs and xa.rio.transform() == transform * Affine.scale(16)
    assert xa.shape == (64, -(-h // 16), -(-w // 16))
    recipe = (tmp_path / "emb.recipe.yaml").read_text()
    assert "deo_swin_test" in recipe
    assert str(out) in result.stdout and "EPSG:" in result.stdout  # the summary line


def test_weights_random_warns_and_layer_option(make_raster, tmp_path):
    path = make_raster("s.tif", smooth_scene(80, 70), descriptions=S2_BANDS)
    out = tmp_path / "e.tif"
    result, lines = run(["embed", str(path), "-o", str(out), *FAST, "--layer", "last"])
    assert result.exit_code == 0, result.output
    assert any("random weights" in ln for ln in lines)
    with rasterio.open(out) as ds, rasterio.open(path) as src:
        assert ds.count == 128 and ds.transform == src.transform * Affine.scale(32)
        assert ds.tags()["DEO_LAYER"] == "3"


def test_missing_bands_one_line_no_file(make_raster, tmp_path):
    path = make_raster("s.tif", np.full((2, 40, 40), 1000, np.uint16), descriptions=["B08", "B11"])
    out = tmp_path / "e.tif"
    result, lines = run(["embed", str(path), "-o", str(out), *FAST])
    assert_one_line_error(result, lines, 1, "lacks band(s) B04, B03, B02, B05", "(it has B08, B11)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.tif"]


def test_no_crs_refused_unless_allowed(make_raster, tmp_path):
    path = make_raster("nocrs.tif", smooth_scene(48, 40), crs=None, descriptions=S2_BANDS)
    out = tmp_path / "e.tif"
    result, lines = run(["embed", str(path), "-o", str(out), *FAST])
    assert_one_line_error(result, lines, 1, "has no CRS", "--allow-no-crs")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nocrs.tif"]
    result, _ = run(["embed", str(path), "-o", str(out), *FAST, "--allow-no-crs"])
    assert result.exit_code == 0, result.output
    with rasterio.open(out) as ds:
        assert ds.crs is None and ds.shape == (3, 3)


def test_unreadable_file_one_line_no_file(tmp_path):
    bad = tmp_path / "bad.tif"
    bad.write_text("not a raster")
    result, lines = run(["embed", str(bad), "-o", str(tmp_path / "e.tif"), *FAST])
    assert_one_line_error(result, lines, 1, "cannot read", "bad.tif")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.tif"]
    result, lines = run(["embed", str(tmp_path / "nope.tif"), "-o", str(tmp_path / "e.tif"), *FAST])
    assert_one_line_error(result, lines, 1, "does not exist")


def test_output_exists_without_overwrite(make_raster, tmp_path):
    path = make_raster("s.tif", smooth_scene(48, 40), descriptions=S2_BANDS)
    out = tmp_path / "e.tif"
    out.write_text("keep me")
    result, lines = run(["embed", str(path), "-o", str(out), *FAST])
    assert_one_line_error(result, lines, 1, "already exists", "--overwrite")
    assert out.read_text() == "keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["e.tif", "s.tif"]
    result, _ = run(["embed", str(path), "-o", str(out), *FAST, "--overwrite"])
    assert result.exit_code == 0
    assert_valid_cog(out)


def test_units_reflectance_converted_bytes_refused(make_raster, tmp_path):
    dn = smooth_scene(64, 64, seed=2)
    p_dn = make_raster("dn.tif", dn, descriptions=S2_BANDS)
    p_ref = make_raster("ref.tif", dn.astype(np.float32) / 10000.0, descriptions=S2_BANDS)
    a, b = tmp_path / "a.tif", tmp_path / "b.tif"
    assert run(["embed", str(p_dn), "-o", str(a), *FAST])[0].exit_code == 0
    result, lines = run(["embed", str(p_ref), "-o", str(b), *FAST])
    assert result.exit_code == 0 and any("reflectance" in ln for ln in lines)
    with rasterio.open(a) as da, rasterio.open(b) as db:
        np.testing.assert_allclose(db.read(), da.read(), atol=1e-4)
        assert json.loads(db.tags()["DEO_NORMALIZATION"])["unit_factor"] == 10000.0
    p_byte = make_raster("byte.tif", (dn // 20).astype(np.uint8), descriptions=S2_BANDS)
    result, lines = run(["embed", str(p_byte), "-o", str(tmp_path / "c.tif"), *FAST])
    assert_one_line_error(result, lines, 1, "looks like 0-255", "expects DN")
    assert not (tmp_path / "c.tif").exists()
    # --unit states the unit: 8-bit values taken as DN are accepted (the user's call)
    result, _ = run(["embed", str(p_byte), "-o", str(tmp_path / "c.tif"), *FAST, "--unit", "dn"])
    assert result.exit_code == 0


def test_rgb_scene_uses_the_rgb_stem(make_raster, tmp_path):
    rgb = smooth_scene(64, 64, bands=3)
    path = make_raster("rgb.tif", rgb, descriptions=["B04", "B03", "B02"])
    out = tmp_path / "e.tif"
    result, lines = run(["embed", str(path), "-o", str(out), *FAST])
    assert result.exit_code == 0, result.output
    assert any("RGB stem" in ln for ln in lines)
    with rasterio.open(out) as ds:
        assert json.loads(ds.tags()["DEO_NORMALIZATION"])["stem"] == "rgb" and ds.count == 64


def test_several_scenes_partial_failure(make_raster, tmp_path):
    good = make_raster("good.tif", smooth_scene(48, 40), descriptions=S2_BANDS)
    bad = make_raster("bad.tif", np.ones((1, 8, 8), np.uint16), descriptions=["B08"])
    other = make_raster("other.tif", smooth_scene(40, 48, seed=1), descriptions=S2_BANDS)
    outdir = tmp_path / "out"
    result, lines = run(["embed", str(good), str(bad), str(other), "-o", str(outdir), *FAST])
    assert result.exit_code == 1
    assert sorted(p.name for p in outdir.iterdir()) == [
        "collection.json",
        "good.item.json",
        "good.recipe.yaml",
        "good.tif",
        "index.parquet",
        "other.item.json",
        "other.recipe.yaml",
        "other.tif",
    ]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1 and "bad.tif" in errors[0] and "lacks band(s)" in errors[0]
    assert_valid_cog(outdir / "other.tif")
    # the index records the failure too, with its one-line error and no footprint
    import geopandas as gpd

    index = gpd.read_parquet(outdir / "index.parquet").set_index("output")
    assert list(index.status) == ["failed", "written", "written"] and list(index.index) == [
        "bad.tif",
        "good.tif",
        "other.tif",
    ]
    assert "lacks band(s)" in index.loc["bad.tif", "error"] and index.loc["bad.tif", "geometry"] is None
    assert "catalog: " in result.stdout and "(3 scenes: 2 written, 1 failed)" in result.stdout


@pytest.mark.parametrize("name", ["emb.tif", "vectors.parquet", "emb.zarr"])
def test_several_scenes_into_a_file_name_is_refused(make_raster, tmp_path, name):
    a = make_raster("a.tif", smooth_scene(40, 40), descriptions=S2_BANDS)
    b = make_raster("b.tif", smooth_scene(40, 40, seed=1), descriptions=S2_BANDS)
    pool = ["--pool", "mean"] if name.endswith(".parquet") else []
    result, lines = run(["embed", str(a), str(b), "-o", str(tmp_path / name), *pool, *FAST])
    assert_one_line_error(
        result, lines, 2, "2 scenes need an output folder", f"-o {tmp_path / name} names a file"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tif", "b.tif"]
    # an existing folder with such a name is still a folder
    folder = tmp_path / "outs.tif"
    folder.mkdir()
    result, _ = run(["embed", str(a), str(b), "-o", str(folder), *FAST])
    assert result.exit_code == 0 and sorted(p.name for p in folder.glob("*.tif")) == ["a.tif", "b.tif"]


def test_chip_vectors_to_geoparquet(make_raster, tmp_path):
    import geopandas as gpd
    import pyarrow.parquet as pq

    data = smooth_scene(150, 130)
    data[:, :, :40] = 0  # a nodata strip: its chips are left out
    path = make_raster("s.tif", data, descriptions=S2_BANDS, nodata=0)
    for pool, dim in (("mean", 64), ("cls", 128)):
        out = tmp_path / f"{pool}.parquet"
        result, _ = run(["embed", str(path), "-o", str(out), *FAST, "--pool", pool])
        assert result.exit_code == 0, result.output
        df = gpd.read_parquet(out)
        with rasterio.open(path) as src:
            assert df.crs == src.crs
            # chips of 64 px without overlap: 3 x 3, minus the column that is mostly nodata
            assert len(df) == 6 and df["id"].iloc[0].endswith("_0000_0001")
            x0, y0 = src.transform * (64, 0)
            assert df.geometry.iloc[0].bounds == pytest.approx((x0, y0 - 640, x0 + 640, y0))
        assert np.stack(df["embedding"].to_numpy()).shape == (6, dim)
        meta = json.loads(pq.ParquetFile(out).schema_arrow.metadata[b"deo"])
        assert meta["deo_pool"] == pool and meta["deo_model"] == "deo_swin_test"


@needs_zarr
def test_zarr_output_and_preview(make_raster, tmp_path):
    import xarray as xr
    from PIL import Image

    path = make_raster("s.tif", smooth_scene(96, 80), descriptions=S2_BANDS)
    out = tmp_path / "emb.zarr"
    png = tmp_path / "emb.png"
    result, _ = run(["embed", str(path), "-o", str(out), *FAST, "--preview", str(png)])
    assert result.exit_code == 0, result.output
    ds = xr.open_zarr(out)
    assert ds["embedding"].shape == (64, 6, 5)
    attrs = ds.attrs
    assert attrs["geoemb:type"] == "pixel" and attrs["geoemb:dimensions"] == 64
    assert attrs["proj:code"] == "EPSG:32633"
    with rasterio.open(path) as src:
        assert attrs["spatial:transform"] == list(src.transform * Affine.scale(16))[:6]
    assert (out / "recipe.yaml").exists()
    img = Image.open(png)
    assert img.mode == "RGBA" and img.size == (5 * 42, 6 * 42)  # 5 x 6 px enlarged by 256 // 6


def test_dtypes_int8_and_float16(make_raster, tmp_path):
    path = make_raster("s.tif", smooth_scene(96, 80), descriptions=S2_BANDS)
    f32, i8, f16 = tmp_path / "f.tif", tmp_path / "i.tif", tmp_path / "h.tif"
    for out, extra in ((f32, []), (i8, ["--dtype", "int8"]), (f16, ["--dtype", "float16"])):
        assert run(["embed", str(path), "-o", str(out), *FAST, *extra])[0].exit_code == 0
    with rasterio.open(f32) as a, rasterio.open(i8) as q, rasterio.open(f16) as h:
        ref = a.read()
        quant = json.loads(q.tags()["DEO_QUANTIZATION"])
        assert q.dtypes[0] == "int8" and q.nodata == -128 and q.scales[0] == pytest.approx(quant["scale"])
        back = q.read().astype(np.float32) * q.scales[0] + q.offsets[0]
        # within the calibrated range (0.1-99.9 percentiles of sampled chips) the error is at
        # most half a step; values beyond it are clipped, and they are rare
        inside = np.abs(ref - q.offsets[0]) <= 127 * q.scales[0]
        assert inside.mean() > 0.99
        assert np.abs(back - ref)[inside].max() <= 0.5 * q.scales[0] + 1e-5
        np.testing.assert_allclose(h.read(), ref, rtol=2e-3, atol=1e-3)
    assert_valid_cog(i8)
    assert_valid_cog(f16)


@pytest.mark.slow
def test_sample_paris_with_the_default_model(tmp_path):
    out = tmp_path / "paris_emb.tif"
    result, lines = run(
        ["embed", "sample:paris", "-o", str(out), "--weights", "random", "--num-workers", "0"]
    )
    assert result.exit_code == 0, result.output
    with rasterio.open(out) as ds:
        assert ds.count == 512 and ds.tags()["DEO_MODEL"] == "deo_swin_b" and ds.shape == (26, 25)
    assert_valid_cog(out)


def test_bounds_embed_part_of_a_scene_like_a_cropped_file(make_raster, tmp_path):
    import yaml
    from rasterio.warp import transform_bounds

    data = smooth_scene(96, 120)
    whole = make_raster("whole.tif", data, descriptions=S2_BANDS)
    # 10 m pixels from (500000, 5000000): columns 16-95, rows 8-71 (a box reaching into pixels)
    box = (500161.0, 5000000.0 - 715.0, 500955.0, 5000000.0 - 81.0)
    part = make_raster(
        "part.tif",
        data[:, 8:72, 16:96],
        descriptions=S2_BANDS,
        transform=Affine(10, 0, 500160, 0, -10, 4999920),
    )
    bounds = ",".join(str(v) for v in box)
    result, _ = run(["embed", str(whole), "-o", str(tmp_path / "a.tif"), "--bounds", bounds, *FAST])
    assert result.exit_code == 0, result.output
    result, _ = run(["embed", str(part), "-o", str(tmp_path / "b.tif"), *FAST])
    assert result.exit_code == 0, result.output
    with rasterio.open(tmp_path / "a.tif") as a, rasterio.open(tmp_path / "b.tif") as b:
        assert a.transform == b.transform == Affine(160, 0, 500160, 0, -160, 4999920)
        assert a.crs == b.crs and a.shape == b.shape == (4, 5)
        np.testing.assert_array_equal(a.read(), b.read())
    saved = yaml.safe_load((tmp_path / "a.recipe.yaml").read_text())
    assert saved["input"]["bounds"] == list(box) and saved["input"]["bounds_crs"] is None
    # the same box in lon/lat gives the same grid (widened to the same whole pixels or one more)
    lonlat = transform_bounds("EPSG:32633", "EPSG:4326", 500165, 4999290, 500950, 4999915)
    ll = ",".join(f"{v:.9f}" for v in lonlat)
    result, _ = run(
        [
            "embed",
            str(whole),
            "-o",
            str(tmp_path / "c.tif"),
            "--bounds",
            ll,
            "--bounds-crs",
            "EPSG:4326",
            *FAST,
        ]
    )
    assert result.exit_code == 0, result.output
    with rasterio.open(tmp_path / "c.tif") as c:
        assert c.transform.c == 500160 and c.shape == (4, 5)
