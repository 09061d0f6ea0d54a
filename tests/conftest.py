"""Shared fixtures: the real Sentinel-2 data beside the checkout, and small raster factories."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` beside the checkout (real Sentinel-2 data; see each folder's SOURCE.md)."""
    if not SHARED_DATA.is_dir():
        pytest.fail(f"test data not found at {SHARED_DATA}: clone the project beside ../shared")
    return SHARED_DATA


@pytest.fixture
def one_torch_thread():
    """One torch thread for the test: tiny models run many small ops, and two threads on the
    (shared) 2 cores mostly wait for each other."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def write_raster(
    path,
    data,
    crs="EPSG:32633",
    transform=None,
    descriptions=None,
    nodata=None,
    dtype=None,
):
    """Write ``data`` (bands, rows, cols) as a tiled GeoTIFF; returns the path.

    ``transform`` defaults to 10 m pixels at (500000, 5000000); ``crs=None`` writes no georeference.
    """
    import numpy as np
    import rasterio
    from affine import Affine

    data = np.asarray(data)
    if data.ndim == 2:
        data = data[None]
    profile = {
        "driver": "GTiff",
        "count": data.shape[0],
        "height": data.shape[1],
        "width": data.shape[2],
        "dtype": dtype or data.dtype.name,
    }
    if crs is not None:
        profile["crs"] = crs
        profile["transform"] = transform or Affine(10.0, 0, 500000.0, 0, -10.0, 5000000.0)
    if nodata is not None:
        profile["nodata"] = nodata
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data.astype(profile["dtype"]))
        for i, d in enumerate(descriptions or [], start=1):
            dst.set_band_description(i, d)
    return Path(path)


@pytest.fixture
def make_raster(tmp_path):
    """Factory: ``make_raster(name, data, **kw)`` writes a GeoTIFF under ``tmp_path``."""

    def make(name, data, **kw):
        return write_raster(tmp_path / name, data, **kw)

    return make
