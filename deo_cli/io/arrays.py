"""In-memory and lazy arrays as scenes: the same window reader as files (xarray, dask; no torch).

:func:`array_scene` turns an ``xr.DataArray`` (dims ``band, y, x``; ``.rio`` CRS and transform;
band names in the ``band`` coordinate or rioxarray's ``long_name``), a dask-backed one
(``rioxarray.open_rasterio(..., chunks=...)``, odc-stac, stackstac) or a NumPy array with
``bands=``, ``transform=`` and ``crs=`` into a :class:`~deo_cli.io.raster.Scene`. The scene's
bands are read through :class:`ArrayDataset`, an object with the part of a rasterio dataset that
:meth:`Scene.read <deo_cli.io.raster.Scene.read>` uses (``read``, ``read_masks``, mask flags,
dtypes), so validity, nodata and the window logic are the file reader's own, and the tiling and
streaming core reads an array exactly as it reads a file: window by window. A dask array is
computed one window at a time (its chunks under that window only), so memory stays bounded by
the window and the chunks, never by the array.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
from affine import Affine
from rasterio.crs import CRS
from rasterio.enums import MaskFlags
from rasterio.windows import Window

from deo_cli.errors import BandError, GeoreferenceError, UsageError
from deo_cli.io.grid import Grid
from deo_cli.io.raster import BandSource, Scene, _explicit_names
from deo_cli.sensors import canonical_band_name

log = logging.getLogger(__name__)


def _compute(arr) -> np.ndarray:
    """``arr`` as NumPy: a dask array computed in this thread (DataLoader workers are forked
    processes, where dask's thread pool must not be relied on), anything else as it is."""
    if hasattr(arr, "dask"):
        import dask

        (arr,) = dask.compute(arr, scheduler="synchronous")
    return np.asarray(arr)


class ArrayDataset:
    """A ``(bands, rows, cols)`` array read like a rasterio dataset (see the module docstring).

    ``array``: NumPy, dask, or anything indexable that gives NumPy (an ``xr.DataArray``'s
    ``.data``, or the DataArray itself for xarray's lazy file backends)."""

    def __init__(self, array, nodata: float | None = None):
        self.array = array
        self.count, self.height, self.width = (int(s) for s in array.shape)
        dtype = np.dtype(array.dtype)
        self.dtypes = (dtype.name,) * self.count
        finite = nodata is not None and not (isinstance(nodata, float) and np.isnan(nodata))
        self.nodata = float(nodata) if finite else None  # NaN is caught as NaN by Scene.read
        flag = [MaskFlags.nodata] if self.nodata is not None else [MaskFlags.all_valid]
        self.mask_flag_enums = tuple(flag for _ in range(self.count))
        chunks = getattr(array, "chunks", None)
        if chunks and isinstance(chunks[0], tuple):  # dask: the first chunk's rows and columns
            block = (int(chunks[1][0]), int(chunks[2][0]))
        else:
            block = (min(self.height, 512), min(self.width, 512))
        self.block_shapes = (block,) * self.count

    def overviews(self, _index: int) -> list:
        return []

    def close(self) -> None:
        pass

    def _window(self, indexes, window, out_shape=None) -> np.ndarray:
        idx = [i - 1 for i in indexes]
        if window is None:
            window = Window(0, 0, self.width, self.height)
        r0, c0 = int(window.row_off), int(window.col_off)
        r1, c1 = r0 + int(window.height), c0 + int(window.width)
        if out_shape is not None and tuple(out_shape[-2:]) != (r1 - r0, c1 - c0):
            # nearest: each output pixel takes the pixel at its centre (as GDAL's decimation)
            h, w = out_shape[-2:]
            rows = r0 + ((np.arange(h) + 0.5) * (r1 - r0) / h).astype(np.int64)
            cols = c0 + ((np.arange(w) + 0.5) * (c1 - c0) / w).astype(np.int64)
            return np.stack([_compute(self.array[i][rows][:, cols]) for i in idx])
        if idx == list(range(idx[0], idx[0] + len(idx))):
            part = self.array[idx[0] : idx[0] + len(idx), r0:r1, c0:c1]
        else:
            part = self.array[idx][:, r0:r1, c0:c1]
        return _compute(part)

    def read(self, indexes=None, window=None, out=None, out_dtype=None, out_shape=None, resampling=None):
        indexes = list(indexes) if indexes is not None else list(range(1, self.count + 1))
        arr = self._window(indexes, window, out_shape)
        if out is not None:
            out[...] = arr
            return out
        return arr.astype(out_dtype or arr.dtype, copy=False)

    def read_masks(self, indexes=None, window=None, out_shape=None, resampling=None) -> np.ndarray:
        """255 where a pixel is valid, 0 where it equals the nodata value (per band)."""
        indexes = list(indexes) if indexes is not None else list(range(1, self.count + 1))
        arr = self._window(indexes, window, out_shape)
        if self.nodata is None:
            return np.full(arr.shape, 255, np.uint8)
        return np.where(arr == self.nodata, 0, 255).astype(np.uint8)


class ArrayScene(Scene):
    """A :class:`~deo_cli.io.raster.Scene` whose bands are one array (see :func:`array_scene`).

    It pickles with its array (DataLoader workers read their own windows of it)."""

    def __init__(self, name, sources, grid, dataset: ArrayDataset, datetime=None, tags=None):
        super().__init__(name, sources, grid, nodata=None, datetime=datetime, tags=tags)
        self.dataset = dataset

    def _dataset(self, src: BandSource):
        return self.dataset

    def has_overviews(self) -> bool:
        return False

    def cropped(self, bounds, bounds_crs=None):
        raise UsageError(
            "bounds cut scenes read from files", "select the part of the array first (da.rio.clip_box)"
        )


def _names(da, bands, count: int) -> tuple[list[str], list[str], str]:
    """Band names, the labels they came from, and how (``explicit``, ``coordinate``,
    ``description``, ``none``)."""
    if bands is not None:
        names = _explicit_names(bands, count)
        return names, list(names), "explicit"
    if da is not None and "band" in da.coords:
        values = [v.item() if hasattr(v, "item") else v for v in da.coords["band"].values]
        if all(isinstance(v, str) for v in values):
            return [canonical_band_name(v) or v for v in values], values, "coordinate"
    labels = da.attrs.get("long_name") if da is not None else None
    if isinstance(labels, str):
        labels = (labels,)
    if labels is not None and len(labels) == count and all(isinstance(v, str) and v for v in labels):
        return [canonical_band_name(v) or v for v in labels], list(labels), "description"
    return [""] * count, [""] * count, "none"


def _as_band_y_x(da):
    """``da`` with dims ``(band, y, x)``: a single time step squeezed, a 2-D array one band."""
    for dim in ("time", "t"):
        if dim in da.dims:
            if da.sizes[dim] != 1:
                raise UsageError(
                    f"the array has {da.sizes[dim]} time steps; a scene is one",
                    f"select one first (da.isel({dim}=0))",
                )
            da = da.isel({dim: 0})
    if da.ndim == 2:
        da = da.expand_dims("band")
    try:
        y, x = da.rio.y_dim, da.rio.x_dim
    except Exception:  # noqa: BLE001 - rioxarray's MissingSpatialDimensionError
        raise UsageError(
            f"the array's dims {tuple(da.dims)} name no x and y",
            "give dims (band, y, x) (or x/y, longitude/latitude)",
        ) from None
    band = [d for d in da.dims if d not in (y, x)]
    if len(band) != 1:
        raise UsageError(f"the array's dims {tuple(da.dims)} are not (band, y, x)", "select one band axis")
    return da.transpose(band[0], y, x)


def array_scene(
    x,
    *,
    bands: Sequence[str] | str | None = None,
    transform=None,
    crs=None,
    nodata: float | None = None,
    name: str | None = None,
    allow_no_crs: bool = False,
) -> ArrayScene:
    """A scene over ``x``: an ``xr.DataArray`` (NumPy- or dask-backed) or a NumPy array
    ``(bands, rows, cols)``.

    ``bands``: every band's name in array order (a list or a band-set name such as ``S2_L1C``),
    overriding the array's own (the ``band`` coordinate's strings, else rioxarray's
    ``long_name``). ``transform``/``crs``: the georeference of a NumPy array (a DataArray's comes
    from ``.rio``). ``nodata``: the value marking nodata (default: the DataArray's
    ``.rio.nodata``; NaN is always nodata)."""
    da = None
    datetime = None
    if hasattr(x, "dims") and hasattr(x, "coords"):  # an xarray DataArray
        import rioxarray  # noqa: F401 - registers the .rio accessor

        da = _as_band_y_x(x)
        data = da.data if hasattr(da.data, "dask") else da  # xarray's lazy backends read windows
        if transform is None:
            transform = da.rio.transform()
        if crs is None:
            crs = da.rio.crs
        if nodata is None:
            nodata = da.rio.nodata
        if "time" in x.coords and x.coords["time"].size == 1:
            datetime = (
                str(np.datetime_as_string(np.asarray(x.coords["time"].values).ravel()[0], unit="s")) + "Z"
            )
        name = name or (str(da.name) if da.name is not None else "array")
    else:
        data = np.asarray(x)
        if data.ndim == 2:
            data = data[None]
        if data.ndim != 3:
            raise UsageError(f"a NumPy scene must be (bands, rows, cols), not {data.shape}", "reshape it")
        if transform is None:
            raise GeoreferenceError(
                "a NumPy array has no georeference", "pass transform= and crs= (or an xr.DataArray with .rio)"
            )
        name = name or "array"
    if data.dtype.kind not in "uif":
        raise UsageError(f"the array's dtype {data.dtype} is not numeric", "give integer or float pixels")
    count, height, width = (int(s) for s in data.shape)
    crs = CRS.from_user_input(crs) if crs is not None else None
    transform = Affine(*tuple(transform)[:6])
    if crs is None and not allow_no_crs:
        raise GeoreferenceError(
            f"scene {name} has no CRS, so its outputs could not be placed on a map",
            "set one (da.rio.write_crs(...) or crs=) or pass allow_no_crs=True to work in pixel coordinates",
        )
    names, labels, how = _names(da, bands, count)
    dupes = sorted({n for n in names if n and canonical_band_name(n) and names.count(n) > 1})
    if dupes:
        raise BandError(
            f"scene {name} has band(s) {', '.join(dupes)} more than once",
            "fix the band names or pass bands= in array order",
        )
    grid = Grid(crs, transform, width, height)
    dataset = ArrayDataset(data, nodata)
    path = f"<array:{name}>"
    sources = [
        BandSource(path, i + 1, n, lab, how if n else "none", grid, dataset.dtypes[i], dataset.nodata)
        for i, (n, lab) in enumerate(zip(names, labels))
    ]
    tags = {k: v for k, v in (da.attrs.items() if da is not None else ()) if isinstance(v, str)}
    return ArrayScene(name, sources, grid, dataset, datetime=datetime, tags=tags)


class ArraySink:
    """The streaming runner's sink for an output held in memory: finished row blocks go into
    one ``(channels, rows, cols)`` float32 array (NaN nodata), as a COG writer's go to disk."""

    compresses = False  # rows are copied in the runner's thread

    def __init__(self, channels: int, height: int, width: int, block_rows: int = 16):
        self.array = np.full((channels, height, width), np.nan, np.float32)
        self.block_rows = int(block_rows)
        self.rows_done = 0

    def write_rows(self, row0: int, data: np.ndarray) -> None:
        if row0 != self.rows_done:  # the stitcher releases rows in order, without gaps
            raise RuntimeError(f"rows written out of order: got {row0}, expected {self.rows_done}")
        self.array[:, row0 : row0 + data.shape[1]] = data
        self.rows_done = row0 + data.shape[1]
