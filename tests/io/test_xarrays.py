"""``open_embedding``: deo's COG and Zarr embeddings as the same georeferenced xarray object."""

import importlib.util

import numpy as np
import pytest
import rasterio

from deo_cli.errors import InputNotFoundError, RasterReadError
from deo_cli.io.xarrays import open_embedding
from tests.cli.helpers import run
from tests.infer.helpers import S2_BANDS, smooth_scene

FAST = ["--model", "deo_swin_test", "--weights", "random", "--num-workers", "0"]


@pytest.fixture
def embeddings(make_raster, tmp_path):
    path = make_raster("s.tif", smooth_scene(96, 80), descriptions=S2_BANDS)
    outs = {"cog": tmp_path / "e.tif", "int8": tmp_path / "q.tif"}
    if importlib.util.find_spec("zarr") is not None:
        outs["zarr"] = tmp_path / "e.zarr"
    for kind, out in outs.items():
        extra = ["--dtype", "int8"] if kind == "int8" else []
        result, _ = run(["embed", str(path), "-o", str(out), *FAST, *extra])
        assert result.exit_code == 0, result.output
    return outs


def test_cog_zarr_and_int8_open_alike(embeddings):
    cog = open_embedding(embeddings["cog"])
    assert cog.dims == ("band", "y", "x") and cog.shape == (64, 6, 5)
    assert list(cog.band.values[:2]) == ["emb_0000", "emb_0001"]
    with rasterio.open(embeddings["cog"]) as ds:
        ref, crs, transform = ds.read(), ds.crs, ds.transform
    np.testing.assert_array_equal(cog.values, ref)
    assert cog.rio.crs == crs and cog.rio.transform() == transform
    assert cog.attrs["DEO_MODEL"] == "deo_swin_test" and int(cog.attrs["DEO_STRIDE"]) == 16
    q = open_embedding(embeddings["int8"])
    assert q.dtype.kind == "f" and q.rio.transform() == transform
    with rasterio.open(embeddings["int8"]) as ds:
        step, offset = ds.scales[0], ds.offsets[0]
    inside = np.abs(ref - offset) <= 127 * step
    assert np.abs(q.values - ref)[inside].max() <= 0.5 * step + 1e-5  # decoded, not raw int8
    if "zarr" in embeddings:
        z = open_embedding(embeddings["zarr"])
        np.testing.assert_array_equal(z.values, ref)
        assert list(z.band.values) == list(cog.band.values)
        assert z.rio.crs == crs and z.rio.transform() == transform
        np.testing.assert_allclose(z.x.values, cog.x.values)
        np.testing.assert_allclose(z.y.values, cog.y.values)
        assert z.attrs["DEO_MODEL"] == "deo_swin_test"


def test_missing_and_unreadable_are_one_line_errors(tmp_path):
    with pytest.raises(InputNotFoundError):
        open_embedding(tmp_path / "nope.tif")
    bad = tmp_path / "bad.tif"
    bad.write_text("not a raster")
    with pytest.raises(RasterReadError):
        open_embedding(bad)
