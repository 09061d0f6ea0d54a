"""The Python API (``import deo_cli as deo``): the CLI's values and georeference as xarray objects."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import rasterio
import rioxarray
import xarray as xr
from affine import Affine

import deo_cli as deo
from deo_cli.errors import BandError, GeoreferenceError, InputNotFoundError, UsageError
from deo_cli.io.sources import sample_path
from tests.cli.helpers import run
from tests.infer.helpers import S2_BANDS, smooth_scene

FAST = ["--model", "deo_swin_test", "--weights", "random", "--num-workers", "0", "--device", "cpu"]
PARIS = str(sample_path("paris"))


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """One torch thread (tiny models: two threads on the shared 2 cores mostly wait)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def model():
    return deo.load_model("deo_swin_test", weights="random", device="cpu", num_workers=0)


@pytest.fixture(scope="module")
def cli_paris(tmp_path_factory):
    """``deo embed sample:paris`` with the tiny model: values, CRS, transform, tags."""
    out = tmp_path_factory.mktemp("cli") / "paris.tif"
    result, _ = run(["embed", "sample:paris", "-o", str(out), "--chip-size", "64", *FAST])
    assert result.exit_code == 0, result.output
    with rasterio.open(out) as ds:
        return ds.read(), ds.crs, ds.transform, ds.tags(), ds.descriptions


def _same_as_cli(emb: xr.DataArray, cli) -> None:
    values, crs, transform, tags, names = cli
    assert emb.dims == ("band", "y", "x") and emb.shape == values.shape
    np.testing.assert_array_equal(emb.values, values)
    assert emb.rio.crs == crs and emb.rio.transform() == transform
    assert tuple(emb.band.values) == names
    for key in ("DEO_MODEL", "DEO_WEIGHTS", "DEO_WEIGHTS_SHA256", "DEO_LAYER", "DEO_STRIDE", "DEO_TILING"):
        assert emb.attrs.get(key) == tags.get(key), key


def test_import_is_lazy_and_names_the_api():
    code = (
        "import sys, deo_cli as deo\n"
        "assert 'torch' not in sys.modules and 'xarray' not in sys.modules\n"
        "assert {'load_model', 'embed', 'detect_change', 'segment', 'open_embedding', 'DeoError'} <= set(dir(deo))\n"
        "deo.load_model\n"
        "try:\n    deo.nope\nexcept AttributeError:\n    pass\nelse:\n    raise SystemExit('no error')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert deo.DeoError is deo.errors.DeoError and deo.open_embedding is deo.io.xarrays.open_embedding


def test_cli_and_api_give_the_same_embedding(model, cli_paris, tmp_path):
    """From a path, a rioxarray DataArray and a dask-backed one: the CLI's values, CRS, transform."""
    _same_as_cli(model.embed("sample:paris", chip_size=64), cli_paris)
    _same_as_cli(deo.embed(PARIS, model, chip_size=64), cli_paris)
    da = rioxarray.open_rasterio(PARIS)  # band names in long_name (the file's descriptions)
    _same_as_cli(model.embed(da, chip_size=64), cli_paris)
    lazy = rioxarray.open_rasterio(PARIS, chunks={"band": -1, "y": 100, "x": 128})
    assert hasattr(lazy.data, "dask")
    emb = model.embed(lazy, chip_size=64)
    _same_as_cli(emb, cli_paris)
    # the stride-scaled grid: coordinates are pixel centres of the output transform
    t = emb.rio.transform()
    assert t == da.rio.transform() * Affine.scale(16)
    np.testing.assert_allclose(emb.x.values, t.c + t.a * (np.arange(emb.sizes["x"]) + 0.5))
    # .rio.to_raster of the result holds the COG's values, georeference and tags
    emb.rio.to_raster(tmp_path / "api.tif")
    with rasterio.open(tmp_path / "api.tif") as ds:
        np.testing.assert_array_equal(ds.read(), cli_paris[0])
        # rioxarray writes the transform it recomputes from the coordinates (last digit may differ)
        assert ds.crs == cli_paris[1] and ds.transform.almost_equals(cli_paris[2], 1e-15)
        assert ds.descriptions == cli_paris[4] and ds.tags()["DEO_STRIDE"] == "16"
    again = deo.open_embedding(tmp_path / "api.tif")
    assert list(again.band.values[:2]) == ["emb_0000", "emb_0001"] and str(again.attrs["DEO_LAYER"]) == "2"


def test_numpy_with_bands_transform_crs_and_named_coordinates(model, make_raster):
    data = smooth_scene(96, 80)
    t = Affine(10, 0, 500000, 0, -10, 5000000)
    path = make_raster("s.tif", data, descriptions=S2_BANDS, transform=t)
    ref = model.embed(str(path), layer=1, chip_size=64)
    assert ref.attrs["DEO_LAYER"] == "1" and ref.attrs["DEO_STRIDE"] == "8" and ref.shape == (32, 12, 10)
    arr = model.embed(data, bands=S2_BANDS, transform=t, crs="EPSG:32633", layer=1, chip_size=64)
    np.testing.assert_array_equal(arr.values, ref.values)
    assert arr.rio.crs.to_epsg() == 32633 and arr.rio.transform() == t * Affine.scale(8)
    # a DataArray whose band coordinate holds the names, in another order than the manifest's
    order = S2_BANDS[::-1]
    named = xr.DataArray(data[::-1], dims=("band", "y", "x"), coords={"band": order})
    named = named.rio.write_crs("EPSG:32633").rio.write_transform(t)
    np.testing.assert_array_equal(model.embed(named, layer=1, chip_size=64).values, ref.values)


def test_nodata_is_nan_as_in_the_cli(model, make_raster, tmp_path):
    data = smooth_scene(96, 80)
    data[:, :40, :] = 0
    path = make_raster("n.tif", data, descriptions=S2_BANDS, nodata=0)
    out = tmp_path / "n_cli.tif"
    result, _ = run(["embed", str(path), "-o", str(out), "--chip-size", "64", *FAST])
    assert result.exit_code == 0, result.output
    with rasterio.open(out) as ds:
        cli = ds.read()
    lazy = rioxarray.open_rasterio(path, chunks={"y": 32, "x": 32})  # nodata 0 in .rio.nodata
    emb = model.embed(lazy, chip_size=64)
    np.testing.assert_array_equal(emb.values, cli)
    assert np.isnan(emb.values[:, 0]).all() and np.isfinite(emb.values[:, -1]).all()


def test_a_dask_array_is_read_window_by_window():
    """Reading one window computes only the chunks under it (never the whole array)."""
    import dask.array as dsa

    from deo_cli.io.arrays import array_scene

    touched = []

    def mark(block, block_info=None):
        touched.append(tuple(block_info[0]["chunk-location"]))
        return block

    base = dsa.from_array(smooth_scene(256, 256).astype(np.float32), chunks=(10, 64, 64))
    lazy = xr.DataArray(
        base.map_blocks(mark, dtype=np.float32), dims=("band", "y", "x"), coords={"band": S2_BANDS}
    )
    lazy = lazy.rio.write_crs("EPSG:32633").rio.write_transform(Affine(10, 0, 0, 0, -10, 0))
    scene = array_scene(lazy)
    sample = scene.read(["B04", "B03"], rasterio.windows.Window(70, 10, 40, 40))
    pick = [S2_BANDS.index("B04"), S2_BANDS.index("B03")]
    np.testing.assert_array_equal(sample.data, base[pick, 10:50, 70:110].compute())
    assert set(touched) == {(0, 0, 1)} and sample.valid.all()


def test_bad_input_raises_the_cli_messages(model, make_raster, tmp_path):
    data = smooth_scene(64, 64)
    short = make_raster("short.tif", data[:2], descriptions=S2_BANDS[:2])
    result, lines = run(["embed", str(short), "-o", str(tmp_path / "x.tif"), *FAST])
    with pytest.raises(BandError) as e:
        model.embed(str(short), chip_size=64)
    assert lines == [f"error: {e.value}"] and not (tmp_path / "x.tif").exists()
    with pytest.raises(BandError, match="lacks band"):  # the same message from an array
        model.embed(rioxarray.open_rasterio(short))
    with pytest.raises(InputNotFoundError) as e:
        model.embed(str(tmp_path / "missing.tif"))
    result, lines = run(["embed", str(tmp_path / "missing.tif"), "-o", str(tmp_path / "x.tif"), *FAST])
    assert lines == [f"error: {e.value}"]
    unnamed = xr.DataArray(data, dims=("band", "y", "x")).rio.write_crs(32633)
    with pytest.raises(BandError, match="carry no name"):
        model.embed(unnamed.rio.write_transform(Affine(10, 0, 0, 0, -10, 0)))
    with pytest.raises(GeoreferenceError, match="has no CRS"):
        model.embed(xr.DataArray(data, dims=("band", "y", "x"), coords={"band": S2_BANDS}))
    with pytest.raises(GeoreferenceError, match="no georeference"):
        model.embed(data, bands=S2_BANDS)
    with pytest.raises(UsageError, match="2 time steps"):
        stack = xr.concat([unnamed, unnamed], "time")
        model.embed(stack)
    with pytest.raises(UsageError, match="not a multiple of the feature stride"):
        model.embed(str(short), chip_size=100)
    assert issubclass(type(e.value), deo.DeoError)


def test_detect_change_equals_the_cli(model, make_raster, tmp_path):
    a = smooth_scene(96, 80, seed=7)
    b = a.copy()
    b[:, 40:70, 20:50] = np.clip(b[:, 40:70, 20:50].astype(np.int32) * 3 % 4000 + 300, 0, 65535)
    pa = make_raster("before.tif", a, descriptions=S2_BANDS)
    pb = make_raster("after.tif", b, descriptions=S2_BANDS)
    out = tmp_path / "c.tif"
    result, _ = run(["detect-change", str(pa), str(pb), "-o", str(out), "--chip-size", "64", *FAST])
    assert result.exit_code == 0, result.output
    with rasterio.open(out) as s, rasterio.open(tmp_path / "c_mask.tif") as m:
        score, mask, transform, crs = s.read(1), m.read(1), s.transform, s.crs
    polys = tmp_path / "p.parquet"
    ds = deo.detect_change(str(pa), str(pb), model=model, chip_size=64, polygons=polys)
    np.testing.assert_array_equal(ds.score.values, score)
    np.testing.assert_array_equal(ds.mask.values, mask)
    assert ds.rio.crs == crs and ds.rio.transform() == transform and ds.score.rio.transform() == transform
    assert ds.attrs["mode"] == "zero-shot" and ds.attrs["threshold_rule"]
    assert ds.attrs["polygon_count"] >= 1 and polys.exists()
    # two DataArrays on one grid give the same
    da_a, da_b = rioxarray.open_rasterio(pa), rioxarray.open_rasterio(pb, chunks={"y": 48})
    again = deo.detect_change(da_a, da_b, model=model, chip_size=64)
    np.testing.assert_array_equal(again.score.values, score)
    with pytest.raises(GeoreferenceError, match="not on the grid"):
        deo.detect_change(da_a, da_b.isel(x=slice(0, 60)), model=model, chip_size=64)


def test_segment_equals_the_cli(make_raster, tmp_path):
    import torch

    from deo_cli.infer.headfile import save_head
    from deo_cli.models import build_encoder
    from tests.tasks.segment.test_segment import _head_file

    torch.manual_seed(0)
    head = tmp_path / "head.pt"
    save_head(_head_file(build_encoder("deo_swin_test", weights=None)), head)
    data = smooth_scene(96, 80)
    path = make_raster("s.tif", data, descriptions=S2_BANDS)
    out = tmp_path / "cls.tif"
    result, _ = run(
        ["segment", "predict", str(path), "-o", str(out), "--head", str(head), "--num-workers", "0"]
    )
    assert result.exit_code == 0, result.output
    with rasterio.open(out) as ds:
        ref, transform, crs, nodata = ds.read(), ds.transform, ds.crs, ds.nodata
    da = xr.DataArray(data, dims=("band", "y", "x"), coords={"band": S2_BANDS})
    da = da.rio.write_crs(crs).rio.write_transform(transform)
    classes = deo.segment(da, head, device="cpu", num_workers=0)
    assert classes.dims == ("band", "y", "x") and list(classes.band.values) == ["class"]
    np.testing.assert_array_equal(classes.values, ref)
    assert classes.rio.crs == crs and classes.rio.transform() == transform
    assert classes.rio.nodata == nodata and set(np.unique(ref)) <= {1, 2, 3}
