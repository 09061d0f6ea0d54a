"""deo's raster outputs as xarray objects (xarray, rioxarray; no torch).

:func:`open_embedding` opens what ``deo embed`` writes, a COG/GeoTIFF or a Zarr store, as one
``xr.DataArray`` with dims ``(band, y, x)``: the ``band`` coordinate holds the feature names
(``emb_0000``, ...), int8 outputs are decoded with their scale/offset, nodata is NaN, the CRS and
transform are set through rioxarray's ``.rio`` accessor, and the ``DEO_*`` tags (model, weights,
layer, stride, band manifest, tiling) are in ``.attrs``. Both formats give the same object.
"""

from __future__ import annotations

import os
from pathlib import Path

from deo_cli.errors import InputNotFoundError, RasterReadError

#: The Zarr store's array and the prefix ``ZarrWriter`` gives deo's tags among its attributes.
ZARR_ARRAY = "embedding"
ZARR_TAG_PREFIX = "deo:"


def open_embedding(path: str | os.PathLike, chunks=None):
    """An embedding written by ``deo embed`` (COG/GeoTIFF or Zarr) as a georeferenced DataArray.

    ``chunks`` is passed to the reader (``None`` reads lazily without dask, ``"auto"`` or a dict
    gives dask arrays when dask is installed)."""
    p = Path(path)
    if not p.exists():
        raise InputNotFoundError(f"embedding {p} not found", "check the path (deo embed ... -o PATH)")
    if p.is_dir() or p.suffix.lower() == ".zarr":
        return _open_zarr(p, chunks)
    return _open_raster(p, chunks)


def _open_raster(path: Path, chunks):
    import rioxarray
    from rasterio.errors import RasterioIOError

    try:
        da = rioxarray.open_rasterio(path, masked=True, mask_and_scale=True, chunks=chunks)
    except RasterioIOError as e:
        raise RasterReadError(
            f"cannot read {path} as a raster ({e})", "pass a COG/GeoTIFF or a .zarr store"
        ) from None
    names = da.attrs.pop("long_name", None)
    if isinstance(names, str):
        names = (names,)
    if names is not None and len(names) == da.sizes["band"]:
        da = da.assign_coords(band=list(names))
    da.name = "embedding"
    return da


def _open_zarr(path: Path, chunks):
    import xarray as xr
    from rasterio.crs import CRS
    from rasterio.transform import Affine

    try:
        ds = xr.open_zarr(path, chunks=chunks)
    except (OSError, ValueError, KeyError) as e:
        raise RasterReadError(
            f"cannot read {path} as a Zarr store ({e})", "pass a .zarr store written by deo embed"
        ) from None
    if ZARR_ARRAY not in ds:
        raise RasterReadError(
            f"{path} has no {ZARR_ARRAY!r} array", "pass a .zarr store written by deo embed"
        )
    da = ds[ZARR_ARRAY]
    names = da.attrs.pop("band_names", None)
    if names is not None and len(names) == da.sizes["band"]:
        da = da.assign_coords(band=list(names))
    group = dict(ds.attrs)
    attrs = {k[len(ZARR_TAG_PREFIX) :]: v for k, v in group.items() if k.startswith(ZARR_TAG_PREFIX)}
    attrs.update({k: v for k, v in da.attrs.items() if k not in ("long_name",)})
    da.attrs = attrs
    crs = group.get("proj:wkt2") or group.get("proj:code")
    if crs is not None:
        da = da.rio.write_crs(CRS.from_user_input(crs))
    t = group.get("spatial:transform")
    if t is not None:
        da = da.rio.write_transform(Affine(*t[:6]))
    da.name = "embedding"
    return da
