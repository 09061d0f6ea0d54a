"""Streaming sinks: COG (with resume, parts, int8, float16), Zarr (geo-embeddings), GeoParquet."""

import importlib.util
import json

import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.crs import CRS

from deo_cli.io.grid import Grid
from deo_cli.io.writers import (
    COG_TILE_BYTES,
    GeoParquetChipWriter,
    LinearQuantization,
    RasterLayout,
    StreamingRasterWriter,
    TiledWriter,
    ZarrWriter,
    finish_cog,
    partial_paths,
)
from tests.infer.helpers import assert_valid_cog

needs_zarr = pytest.mark.skipif(importlib.util.find_spec("zarr") is None, reason="zarr 3 needs Python 3.11+")

GRID = Grid(CRS.from_epsg(32631), Affine(160.0, 0, 400000.0, 0, -160.0, 5000000.0), 37, 50)


def field(count=6, grid=GRID, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(count, grid.height, grid.width)).astype(np.float32)
    a[:, :3, :4] = np.nan
    return a


def layout(count=6, **kw):
    return RasterLayout(
        count=count,
        descriptions=tuple(f"emb_{i:04d}" for i in range(count)),
        tags={"DEO_MODEL": "test", "DEO_TILING": json.dumps({"chip_size": 224})},
        **kw,
    )


def write_all(writer, data, block=16, upto=None):
    h = data.shape[1] if upto is None else upto
    for r in range(0, h, block):
        writer.write_rows(r, data[:, r : min(r + block, h)])


@pytest.mark.parametrize(
    "count, dtype, side",
    [
        (1, "uint8", 256),
        (10, "float32", 256),
        (64, "float32", 128),
        (384, "float32", 64),
        (384, "int8", 128),
        (1024, "float32", 64),
    ],
)
def test_cog_tile_side_keeps_a_tile_within_its_byte_budget(count, dtype, side):
    lay = RasterLayout(count=count, dtype=dtype)
    assert lay.cog_blocksize == side
    tile = side * side * count * np.dtype(dtype).itemsize
    assert tile <= COG_TILE_BYTES or side == 64  # 64 px is the floor
    assert (
        side == 256 or (2 * side) ** 2 * count * np.dtype(dtype).itemsize > COG_TILE_BYTES
    )  # the largest that fits
    assert RasterLayout(count=count, dtype=dtype, blocksize=32).cog_blocksize == 32


def test_many_band_cog_has_small_tiles(tmp_path):
    grid = Grid(GRID.crs, GRID.transform, 150, 70)
    data = field(count=200, grid=grid)
    w = StreamingRasterWriter(tmp_path / "emb.tif", grid, layout(200))
    write_all(w, data)
    out = w.finish()
    assert_valid_cog(out)
    with rasterio.open(out) as ds:
        assert ds.block_shapes[0] == (64, 64) and ds.overviews(1) == [2, 4]
        np.testing.assert_array_equal(ds.read(), data)


def test_cog_values_georeference_metadata(tmp_path):
    data = field()
    w = StreamingRasterWriter(tmp_path / "emb.tif", GRID, layout())
    write_all(w, data)
    out = w.finish()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["emb.tif"]  # temporaries gone
    assert_valid_cog(out)
    with rasterio.open(out) as ds:
        assert ds.crs == GRID.crs and ds.transform == GRID.transform and ds.shape == (50, 37)
        assert ds.descriptions[0] == "emb_0000" and ds.tags()["DEO_MODEL"] == "test"
        assert np.isnan(ds.nodata) and ds.dtypes[0] == "float32"
        st = ds.tags(ns="IMAGE_STRUCTURE")
        assert st["COMPRESSION"] == "DEFLATE" and st["PREDICTOR"] == "3"
        np.testing.assert_array_equal(ds.read(), data)
    # overviews: NaN-aware 2 x 2 means (as GDAL's "average"), the odd last column averaged alone
    with rasterio.open(out, overview_level=0) as ov:
        assert ov.shape == (25, 19)
        got = ov.read()
    pad = np.full((6, 50, 38), np.nan, np.float32)
    pad[:, :, :37] = data
    q = pad.reshape(6, 25, 2, 19, 2)
    quads = q.transpose(0, 1, 3, 2, 4).reshape(6, 25, 19, 4)
    n = np.isfinite(quads).sum(-1)
    expected = np.where(n > 0, np.nansum(quads, -1) / np.maximum(n, 1), np.nan)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6, equal_nan=True)
    assert np.isnan(got[:, 0, 0]).all() and not np.isnan(got[:, 2, 2]).any()


def test_int8_quantisation_roundtrip(tmp_path):
    data = field()
    q = LinearQuantization.fit(data)
    w = StreamingRasterWriter(tmp_path / "q.tif", GRID, layout(quantization=q))
    write_all(w, data)
    out = w.finish()
    assert_valid_cog(out)
    with rasterio.open(out) as ds:
        raw = ds.read()
        assert ds.dtypes[0] == "int8" and ds.nodata == -128
        assert ds.scales[0] == pytest.approx(q.scale) and ds.offsets[0] == pytest.approx(q.offset)
        assert json.loads(json.dumps(q.to_dict()))["scale"] == pytest.approx(q.scale)
    assert (raw[np.isnan(data)] == -128).all() and (raw[~np.isnan(data)] > -128).all()
    back = q.decode(raw)
    inside = np.abs(data) < 3.0  # within the fitted range: error at most half a step
    np.testing.assert_allclose(back[inside], data[inside], atol=q.scale / 2 + 1e-6)


def test_float16_storage(tmp_path):
    """float16: the values rounded to the nearest half-precision float, in a Float32 COG (GDAL
    3.10 fills partial tiles of compressed NBITS=16 COGs with uninitialised memory), the same
    bytes on every write."""
    data = field()
    paths = []
    for name in ("h1.tif", "h2.tif"):
        w = StreamingRasterWriter(tmp_path / name, GRID, layout(half=True))
        write_all(w, data)
        paths.append(w.finish())
    with rasterio.open(paths[0]) as ds:
        assert ds.dtypes[0] == "float32" and "NBITS" not in ds.tags(1, ns="IMAGE_STRUCTURE")
        np.testing.assert_array_equal(ds.read(), data.astype(np.float16).astype(np.float32))
    assert paths[0].read_bytes() == paths[1].read_bytes()


def test_resume_continues_an_interrupted_raster(tmp_path):
    data = field()
    path = tmp_path / "emb.tif"
    w = StreamingRasterWriter(path, GRID, layout(), fingerprint="run-1")
    write_all(w, data, upto=32)
    w.abort(keep=True)  # an interruption: the temporary file and its sidecar stay
    tmp, side = partial_paths(path)
    assert tmp.exists() and json.loads(side.read_text())["rows_done"] == 32 and not path.exists()
    w2 = StreamingRasterWriter(path, GRID, layout(), fingerprint="run-1", resume=True)
    assert w2.rows_done == 32
    for r in range(32, 50, 16):
        w2.write_rows(r, data[:, r : r + 16])
    with rasterio.open(w2.finish()) as ds:
        np.testing.assert_array_equal(ds.read(), data)
    # another run (different fingerprint) starts afresh
    w3 = StreamingRasterWriter(tmp_path / "b.tif", GRID, layout(), fingerprint="a")
    write_all(w3, data, upto=16)
    w3.abort(keep=True)
    assert (
        StreamingRasterWriter(tmp_path / "b.tif", GRID, layout(), fingerprint="b", resume=True).rows_done == 0
    )


def test_row_band_parts_assemble_into_one_cog(tmp_path):
    data = field()
    parts = []
    for r, (lo, hi) in enumerate([(0, 32), (32, 50)]):
        p, _ = partial_paths(tmp_path / "emb.tif", f"-{r}of2")
        tw = TiledWriter(p, GRID, layout(), 16, rows=(lo, hi))
        for row in range(lo, hi, 16):
            tw.write_rows(row, data[:, row : min(row + 16, hi)])
        tw.close()
        parts.append(p)
    out = finish_cog(parts, tmp_path / "emb.tif", GRID, layout())
    assert_valid_cog(out)
    with rasterio.open(out) as ds:
        assert ds.transform == GRID.transform and ds.descriptions[5] == "emb_0005"
        assert ds.tags()["DEO_MODEL"] == "test"
        np.testing.assert_array_equal(ds.read(), data)


@needs_zarr
def test_zarr_follows_the_geo_embeddings_convention(tmp_path):
    import xarray as xr
    import zarr

    data = field()
    w = ZarrWriter(tmp_path / "emb.zarr", GRID, layout(), geoemb_attrs={"geoemb:model": "https://x/m"})
    write_all(w, data)
    out = w.finish()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["emb.zarr"]
    attrs = dict(zarr.open_group(str(out), mode="r").attrs)
    names = {c["name"] for c in attrs["zarr_conventions"]}
    assert names == {"proj:", "spatial:", "geoemb:"}
    assert attrs["geoemb:type"] == "pixel" and attrs["geoemb:dimensions"] == 6
    assert attrs["geoemb:data_type"] == "float32" and attrs["geoemb:model"] == "https://x/m"
    assert attrs["proj:code"] == "EPSG:32631"
    assert attrs["spatial:transform"] == list(GRID.transform)[:6]
    assert attrs["spatial:shape"] == [50, 37] and attrs["spatial:dimensions"] == ["y", "x"]
    ds = xr.open_zarr(out)
    emb = ds["embedding"]
    assert emb.dims == ("band", "y", "x")
    np.testing.assert_array_equal(emb.values, data)
    assert float(ds["x"][0]) == 400000.0 + 80.0 and float(ds["y"][0]) == 5000000.0 - 80.0


@needs_zarr
def test_zarr_int8_decodes_with_xarray(tmp_path):
    import xarray as xr

    data = field()
    q = LinearQuantization.fit(data)
    w = ZarrWriter(tmp_path / "q.zarr", GRID, layout(quantization=q))
    write_all(w, data)
    ds = xr.open_zarr(w.finish())
    vals = ds["embedding"].values
    inside = np.abs(data) < 3.0
    np.testing.assert_allclose(vals[inside], data[inside], atol=q.scale / 2 + 1e-5)
    assert np.isnan(vals[np.isnan(data)]).all()


def test_geoparquet_chips(tmp_path):
    import geopandas as gpd
    import pyarrow.parquet as pq
    from shapely.geometry import box

    w = GeoParquetChipWriter(
        tmp_path / "chips.parquet", GRID.crs, 4, metadata={"model": "test"}, row_group_size=2
    )
    emb = np.arange(12, dtype=np.float32).reshape(3, 4)
    polys = [box(400000 + 100 * i, 4990000, 400100 + 100 * i, 4990100) for i in range(3)]
    w.write(["a", "b", "c"], polys, emb, [1.0, 0.9, 0.8], "scene.tif", "2016-11-30T10:00:00Z")
    out = w.finish()
    df = gpd.read_parquet(out)
    assert df.crs == GRID.crs and list(df["id"]) == ["a", "b", "c"]
    assert df.geometry.iloc[1].equals(polys[1])
    np.testing.assert_array_equal(np.stack(df["embedding"].to_numpy()), emb)
    assert str(df["datetime"].iloc[0]) == "2016-11-30 10:00:00+00:00"
    f = pq.ParquetFile(out)
    meta = f.schema_arrow.metadata
    geo = json.loads(meta[b"geo"])
    assert geo["version"] == "1.1.0" and geo["columns"]["geometry"]["covering"]["bbox"]["xmin"] == [
        "bbox",
        "xmin",
    ]
    assert json.loads(meta[b"deo"]) == {"model": "test"}
    t = f.schema_arrow.field("embedding").type
    assert t.list_size == 4 and str(t.value_type) == "float"
    assert f.metadata.row_group(0).column(0).compression == "ZSTD" and f.num_row_groups == 2
