"""Read scenes band by name, window by window, with georeference and a valid mask.

:func:`open_scene` turns a scene (see :mod:`deo_cli.io.sources`) into a :class:`Scene`: the
bands it holds, each with the name deo gives it, and one pixel grid. The grid is the finest
band's (coarser bands are resampled onto it inside the same windowed read, through a GDAL
``WarpedVRT``), or a grid you pass (``grid=``; ``detect-change`` reprojects the second date
onto the first date's grid this way).

Band names come from, in this order: an explicit ``band_names`` list (file order), the band
descriptions in the file, the file name (``..._B8A.tif``). Bands with no name can be inspected
but never selected: deo does not guess a band from its position.

A :class:`Scene` pickles without its open files, so it can be handed to DataLoader workers;
each process opens its own handles.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from rasterio.crs import CRS
from rasterio.enums import MaskFlags, Resampling
from rasterio.errors import RasterioIOError, WindowError
from rasterio.vrt import WarpedVRT
from rasterio.windows import Window

from deo_cli.errors import BandError, GeoreferenceError, RasterReadError
from deo_cli.io.env import configure_gdal, gdal_path
from deo_cli.io.grid import Grid, RasterSample
from deo_cli.io.sources import resolve_source
from deo_cli.sensors import BAND_SETS, band_name_from_filename, canonical_band_name, match_bands

log = logging.getLogger(__name__)

#: Full-resolution pixels (bytes, float32, all bands of a file) read at a time when a scene
#: without overviews is decimated block by block (:meth:`Scene.overview`).
DECIMATE_CHUNK_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class BandSource:
    """One band of a scene: where it lives, what deo calls it, and its native grid."""

    path: str
    index: int  # 1-based band index in the file
    name: str  # canonical name (B04, B8A, red...), a raw label deo does not know, or "" if unnamed
    label: str  # the text the name came from
    named_by: str  # "explicit" | "description" | "filename" | "none"
    grid: Grid
    dtype: str
    nodata: float | None

    @property
    def known(self) -> bool:
        return canonical_band_name(self.name) == self.name


def every_core() -> int:
    """Decoding threads for reads nothing else runs beside: every core, or 1 when the user set
    ``GDAL_NUM_THREADS`` (GDAL then applies theirs)."""
    return 1 if "GDAL_NUM_THREADS" in os.environ else os.cpu_count() or 1


def _open(path: str, decode_threads: int = 1):
    """Open ``path`` (``decode_threads`` > 1: GDAL decodes the blocks of one read in that many
    threads; drivers read ``GDAL_NUM_THREADS`` when a file is opened)."""
    try:
        if decode_threads > 1:
            with rasterio.Env(GDAL_NUM_THREADS=str(decode_threads)):
                return rasterio.open(gdal_path(path))
        return rasterio.open(gdal_path(path))
    except RasterioIOError as e:
        msg = str(e).split("\n")[0]
        if not Path(path).exists() and not path.startswith("/vsi") and "://" not in path:
            raise RasterReadError(f"cannot open {path}: file not found", "check the path") from e
        raise RasterReadError(
            f"cannot read {path} as a raster ({msg})",
            "give a GeoTIFF/COG, JPEG2000 or VRT file GDAL can open",
        ) from e


def _explicit_names(band_names: Sequence[str] | str, total: int) -> list[str]:
    if isinstance(band_names, str):
        key = band_names.strip().upper()
        if key in BAND_SETS:
            items = list(BAND_SETS[key].bands)
        else:
            items = [s for s in re.split(r"[,\s]+", band_names) if s]
    else:
        items = list(band_names)
    if len(items) != total:
        raise BandError(
            f"--band-names lists {len(items)} names but the scene has {total} bands",
            f"give exactly {total} names, in file order",
        )
    return [canonical_band_name(s) or s for s in items]


def _datetime(paths: Sequence[str], tags: dict) -> str | None:
    """Acquisition time, or None when unknown (:func:`deo_cli.io.scenedate.acquisition_time`:
    metadata, names that carry the sensing time; never an old-style S2 tile's processing time)."""
    from deo_cli.io.scenedate import acquisition_time

    return acquisition_time(paths, tags)[0]


class Scene:
    """The bands of one scene on one grid. Use :func:`open_scene` to make one."""

    def __init__(
        self,
        name: str,
        sources: Sequence[BandSource],
        grid: Grid,
        nodata: float | None = None,
        resampling: str = "bilinear",
        datetime: str | None = None,
        tags: dict | None = None,
        stac: dict | None = None,
    ):
        self.name = name
        self.stac = stac  # the STAC item's identity when the scene is one (io/stac.py)
        self.sources = tuple(sources)
        self.grid = grid
        self.nodata = nodata  # user override, applied on top of each file's own nodata/mask
        self.resampling = resampling
        self.datetime = datetime
        self.tags = dict(tags or {})
        self._handles: dict = {}
        self._checks: dict = {}  # (path, warp, indexes) -> what validity needs reading there
        self._pid = os.getpid()
        self.decode_threads = 1

    # -- description -------------------------------------------------------------------------
    @property
    def band_names(self) -> tuple[str, ...]:
        """Names of all bands, in scene order (``band_3`` for a band that has no name)."""
        return tuple(s.name or f"band_{i + 1}" for i, s in enumerate(self.sources))

    @property
    def crs(self):
        return self.grid.crs

    @property
    def transform(self):
        return self.grid.transform

    @property
    def width(self) -> int:
        return self.grid.width

    @property
    def height(self) -> int:
        return self.grid.height

    @property
    def paths(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(s.path for s in self.sources))

    def __repr__(self) -> str:
        return f"Scene({self.name!r}, {self.width}x{self.height}, bands={list(self.band_names)})"

    def select(self, bands: Sequence[str]) -> list[int]:
        """Indices of ``bands`` (canonical names) in this scene; a clear error for missing ones."""
        names = [s.name for s in self.sources]
        bands = tuple(canonical_band_name(b) or b for b in bands)
        idx, missing = match_bands(bands, names)
        if missing:
            unnamed = [i for i, s in enumerate(self.sources) if not s.name]
            have = ", ".join(n for n in names if n) or "no named bands"
            if unnamed:
                fix = (
                    f"{len(unnamed)} of its bands carry no name: pass --band-names with all "
                    f"{len(names)} names in file order (e.g. --band-names S2_L1C)"
                )
            else:
                fix = "use a scene that has them, or choose another band set (--bands) or model"
            raise BandError(f"scene {self.name} lacks band(s) {', '.join(missing)} (it has {have})", fix)
        return idx

    # -- reading -----------------------------------------------------------------------------
    def __getstate__(self):
        state = self.__dict__.copy()
        state["_handles"] = {}
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._pid = os.getpid()

    def close(self) -> None:
        for ds in self._handles.values():
            ds.close()
        self._handles = {}

    def set_decode_threads(self, threads: int) -> None:
        """Decode each read's blocks in ``threads`` GDAL threads from now on (open files are
        reopened). Worth it where the reads are not already running beside other work
        (:func:`every_core`)."""
        threads = max(1, int(threads))
        if threads != self.decode_threads:
            self.close()
            self.decode_threads = threads

    @contextlib.contextmanager
    def decoding(self, threads: int):
        """:meth:`set_decode_threads` for the ``with`` block, the previous setting after it."""
        before = self.decode_threads
        self.set_decode_threads(threads)
        try:
            yield self
        finally:
            self.set_decode_threads(before)

    def cropped(self, bounds: Sequence[float], bounds_crs=None) -> Scene:
        """This scene restricted to ``bounds`` (xmin, ymin, xmax, ymax in ``bounds_crs``, default
        its own CRS), widened to whole pixels of its grid and cut to the scene. Its bands are read
        onto the smaller grid (the same pixels); outside it is outside the scene, as at an edge."""
        from rasterio.warp import transform_bounds

        b = [float(v) for v in bounds]
        if bounds_crs is not None and self.crs is None:
            raise GeoreferenceError(
                f"scene {self.name} has no CRS, so bounds in {bounds_crs} cannot be placed on it",
                "give the bounds in its pixel coordinates without --bounds-crs",
            )
        if bounds_crs is not None and CRS.from_user_input(bounds_crs) != self.crs:
            b = list(transform_bounds(CRS.from_user_input(bounds_crs), self.crs, *b, densify_pts=21))
        inv = ~self.transform  # pixel (col, row) of each corner: any axis orientation
        cols, rows = zip(*(inv * (x, y) for x in (b[0], b[2]) for y in (b[1], b[3])))
        eps = 1e-6  # bounds on pixel edges stay on them despite floating point
        c0, r0 = math.floor(min(cols) + eps), math.floor(min(rows) + eps)
        c1, r1 = math.ceil(max(cols) - eps), math.ceil(max(rows) - eps)
        c0, r0, c1, r1 = max(c0, 0), max(r0, 0), min(c1, self.width), min(r1, self.height)
        if c1 <= c0 or r1 <= r0:
            have = ", ".join(f"{v:.6g}" for v in self.grid.bounds)
            where = f" in {self.crs.to_string()}" if self.crs is not None else ""
            raise GeoreferenceError(
                f"bounds {', '.join(f'{v:.6g}' for v in bounds)} do not overlap scene {self.name} "
                f"(it covers {have}{where})",
                "give xmin,ymin,xmax,ymax inside it, in its CRS or with --bounds-crs",
            )
        window = Window(c0, r0, c1 - c0, r1 - r0)
        grid = Grid(self.crs, self.grid.window_transform(window), c1 - c0, r1 - r0)
        return Scene(
            self.name, self.sources, grid, self.nodata, self.resampling, self.datetime, self.tags, self.stac
        )

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _dataset(self, src: BandSource):
        if self._pid != os.getpid():  # forked: never share GDAL handles across processes
            self._handles = {}
            self._pid = os.getpid()
        warp = not src.grid.same_as(self.grid)
        key = (src.path, warp)
        ds = self._handles.get(key)
        if ds is None:
            configure_gdal()
            base = self._handles.get((src.path, False)) or _open(src.path, self.decode_threads)
            self._handles[(src.path, False)] = base
            if warp:
                ds = WarpedVRT(
                    base,
                    crs=self.grid.crs if self.grid.crs is not None else base.crs,
                    transform=self.grid.transform,
                    width=self.grid.width,
                    height=self.grid.height,
                    resampling=Resampling[self.resampling],
                    dtype="float32",  # warp in float: no rounding of interpolated DN
                )
                self._handles[key] = ds
            else:
                ds = base
        return ds

    def _band_checks(self, ds, key, indexes: list[int]) -> tuple[bool, bool]:
        """``(read_masks, may_be_nan)`` for ``indexes`` of ``ds``: a band without nodata, mask or
        alpha is valid everywhere (no mask to read), and only floating-point bands hold NaN.
        Worked out once per file and band list (GDAL's mask flags cost ~40 us per call)."""
        ck = (*key, tuple(indexes))
        if ck not in self._checks:
            flags = ds.mask_flag_enums
            self._checks[ck] = (
                any(flags[i - 1] != [MaskFlags.all_valid] for i in indexes),
                any(np.dtype(ds.dtypes[i - 1]).kind in "fc" for i in indexes),
            )
        return self._checks[ck]

    def _by_dataset(self, idx: Sequence[int]) -> dict[tuple[str, bool], list[tuple[int, BandSource]]]:
        """Bands ``idx`` grouped by the dataset they are read from, ``(path, warped)`` ->
        ``[(position in idx, source), ...]``: a multi-band file is read in one call, which
        decodes each of its blocks once."""
        groups: dict[tuple[str, bool], list[tuple[int, BandSource]]] = {}
        for pos, i in enumerate(idx):
            src = self.sources[i]
            groups.setdefault((src.path, not src.grid.same_as(self.grid)), []).append((pos, src))
        return groups

    def read(
        self,
        bands: Sequence[str] | None = None,
        window: Window | None = None,
    ) -> RasterSample:
        """Pixels of ``bands`` (all when ``None``) in ``window`` (the whole scene when ``None``).

        The window may reach outside the scene: those pixels are 0 and invalid. Values are
        float32 in the file's unit; ``valid`` is False where any selected band is nodata (file
        nodata, internal mask, the ``nodata`` override) or NaN, or outside the scene.
        """
        idx = self.select(bands) if bands is not None else list(range(len(self.sources)))
        names = tuple(self.sources[i].name or f"band_{i + 1}" for i in idx)
        if window is None:
            window = Window(0, 0, self.width, self.height)
        window = Window(int(window.col_off), int(window.row_off), int(window.width), int(window.height))
        h, w = int(window.height), int(window.width)
        data = np.zeros((len(idx), h, w), dtype=np.float32)
        valid = np.zeros((h, w), dtype=bool)
        try:
            inner = window.intersection(Window(0, 0, self.width, self.height))
        except WindowError:
            inner = None
        if inner is not None and inner.width > 0 and inner.height > 0:
            r0, c0 = int(inner.row_off - window.row_off), int(inner.col_off - window.col_off)
            ih, iw = int(inner.height), int(inner.width)
            sub_valid = np.ones((ih, iw), dtype=bool)
            for key, items in self._by_dataset(idx).items():
                ds = self._dataset(items[0][1])
                indexes = [s.index for _, s in items]
                read_masks, may_be_nan = self._band_checks(ds, key, indexes)
                first = items[0][0]
                # bands in scene order: GDAL decodes straight into ``data`` (no second copy)
                direct = [pos for pos, _ in items] == list(range(first, first + len(items)))
                target = data[first : first + len(items), r0 : r0 + ih, c0 : c0 + iw] if direct else None
                try:
                    if direct:
                        arr = ds.read(indexes=indexes, window=inner, out=target)
                    else:
                        arr = ds.read(indexes=indexes, window=inner, out_dtype="float32")
                    if read_masks:
                        sub_valid &= (ds.read_masks(indexes=indexes, window=inner) > 0).all(axis=0)
                except RasterioIOError as e:
                    raise RasterReadError(
                        f"reading {items[0][1].path} failed ({str(e).splitlines()[0]})",
                        "check the file is complete and readable (gdalinfo -checksum)",
                    ) from e
                if may_be_nan:
                    sub_valid &= np.isfinite(arr).all(axis=0)
                if self.nodata is not None:
                    sub_valid &= (arr != self.nodata).all(axis=0)
                if not direct:
                    for k, (pos, _) in enumerate(items):
                        data[pos, r0 : r0 + ih, c0 : c0 + iw] = arr[k]
            if not sub_valid.all():
                block = data[:, r0 : r0 + ih, c0 : c0 + iw]  # a view: zero invalid pixels (no NaN leaves io/)
                block[:, ~sub_valid] = 0.0
            valid[r0 : r0 + ih, c0 : c0 + iw] = sub_valid
        return RasterSample(
            data=data,
            valid=valid,
            transform=self.grid.window_transform(window),
            crs=self.grid.crs,
            band_names=names,
            window=window,
        )

    def overview(self, bands: Sequence[str] | None = None, max_pixels: int = 512 * 512) -> RasterSample:
        """The whole scene decimated to about ``max_pixels`` (nearest; uses overviews when present).

        For statistics and quick looks (unit inference, value ranges, scene-level scaling).
        """
        idx = self.select(bands) if bands is not None else list(range(len(self.sources)))
        f = max(1, int(np.ceil(np.sqrt(self.width * self.height / max_pixels))))
        h, w = -(-self.height // f), -(-self.width // f)
        data = np.zeros((len(idx), h, w), dtype=np.float32)
        valid = np.ones((h, w), dtype=bool)
        # all bands of a file together; without overviews block by block (_decimate_by_blocks)
        for key, items in self._by_dataset(idx).items():
            ds = self._dataset(items[0][1])
            indexes = [s.index for _, s in items]
            read_masks, may_be_nan = self._band_checks(ds, key, indexes)
            warped = key[1]  # resampled onto the scene's grid: GDAL's warper decimates cheaply
            if f > 1 and len(indexes) > 1 and not warped and not ds.overviews(indexes[0]):
                arr, ok = _decimate_by_blocks(ds, indexes, h, w, read_masks)
                valid &= ok
            else:
                shape = (len(indexes), h, w)
                arr = ds.read(
                    indexes=indexes, out_shape=shape, resampling=Resampling.nearest, out_dtype="float32"
                )
                if read_masks:
                    m = ds.read_masks(indexes=indexes, out_shape=shape, resampling=Resampling.nearest)
                    valid &= (m > 0).all(axis=0)
            if may_be_nan:
                valid &= np.isfinite(arr).all(axis=0)
            if self.nodata is not None:
                valid &= (arr != self.nodata).all(axis=0)
            for k, (pos, _) in enumerate(items):
                data[pos] = arr[k]
        data[:, ~valid] = 0.0
        window = Window(0, 0, self.width, self.height)
        from affine import Affine

        transform = self.transform @ Affine.scale(self.width / w, self.height / h)
        names = tuple(self.sources[i].name or f"band_{i + 1}" for i in idx)
        return RasterSample(data, valid, transform, self.crs, names, window)

    def windows(self, size: int, stride: int | None = None):
        """Row-major windows of ``size`` px stepping ``stride`` px, covering the whole scene."""
        stride = stride or size
        rows = range(0, max(self.height - size, 0) + stride, stride)
        cols = range(0, max(self.width - size, 0) + stride, stride)
        for r in rows:
            for c in cols:
                if r < self.height and c < self.width:
                    yield Window(c, r, size, size)


def _decimate_by_blocks(ds, indexes: list[int], h: int, w: int, read_masks: bool):
    """Bands ``indexes`` of ``ds`` decimated to ``h`` x ``w`` (each output pixel takes the pixel
    at its centre, as GDAL's nearest) and their joint validity, read block row by block row.

    GDAL decimates a multi-band file band by band; without overviews each pass decodes every
    block, and a scene larger than GDAL's cache is decoded once per band (10k x 10k, 10
    pixel-interleaved bands: 59 s). Here each block is decoded once, all bands together."""
    rows = ((np.arange(h) + 0.5) * ds.height / h).astype(np.int64)
    cols = ((np.arange(w) + 0.5) * ds.width / w).astype(np.int64)
    bh, bw = ds.block_shapes[indexes[0] - 1]
    chunk = max(bw, DECIMATE_CHUNK_BYTES // (4 * len(indexes) * bh) // bw * bw)
    out = np.zeros((len(indexes), h, w), np.float32)
    valid = np.ones((h, w), bool)
    for r0 in range(0, ds.height, bh):
        oi = np.nonzero((rows >= r0) & (rows < r0 + bh))[0]
        if not len(oi):
            continue
        for c0 in range(0, ds.width, chunk):
            oj = np.nonzero((cols >= c0) & (cols < c0 + chunk))[0]
            if not len(oj):
                continue
            rr, cc = rows[oi], cols[oj]
            win = Window(int(cc[0]), int(rr[0]), int(cc[-1] - cc[0] + 1), int(rr[-1] - rr[0] + 1))
            pick = np.ix_(rr - rr[0], cc - cc[0])
            block = ds.read(indexes=indexes, window=win, out_dtype="float32")
            out[:, oi[0] : oi[-1] + 1, oj[0] : oj[-1] + 1] = block[(slice(None), *pick)]
            if read_masks:
                m = ds.read_masks(indexes=indexes, window=win)
                valid[oi[0] : oi[-1] + 1, oj[0] : oj[-1] + 1] = (m[(slice(None), *pick)] > 0).all(axis=0)
    return out, valid


def _grid_of(ds) -> Grid:
    return Grid(ds.crs, ds.transform, ds.width, ds.height)


def open_scene(
    source,
    band_names: Sequence[str] | str | None = None,
    grid: Grid | None = None,
    allow_no_crs: bool = False,
    nodata: float | None = None,
    resampling: str = "bilinear",
) -> Scene:
    """Open a scene (file, folder, glob, ``@list``, URL or ``sample:NAME``) for reading by band name.

    ``band_names`` names every band in file order (a list or a band-set name such as
    ``S2_L1C``), overriding descriptions and file names. ``grid`` reads the scene on another
    grid (reprojected/resampled). ``nodata`` marks an extra nodata value (e.g. 0 for L1C DN).
    Raises :class:`GeoreferenceError` for a raster without CRS unless ``allow_no_crs``.
    """
    if resampling not in Resampling.__members__:
        raise BandError(
            f"unknown resampling {resampling!r}", f"use one of {', '.join(Resampling.__members__)}"
        )
    resolved = resolve_source(source)
    configure_gdal()
    sources: list[BandSource] = []
    tags: dict = {}
    for k, path in enumerate(resolved.paths):
        with _open(path) as ds:
            if not tags:
                tags = ds.tags()
            given = resolved.band_names[k] if resolved.band_names else None
            if given is not None and len(given) != ds.count:
                raise BandError(
                    f"STAC asset {Path(path).name} of {resolved.name} lists {len(given)} band(s) but the "
                    f"file has {ds.count}",
                    "fix the item's bands / eo:bands, or give the file itself as the scene",
                )
            fname_band = band_name_from_filename(path) if ds.count == 1 else None
            for i in range(1, ds.count + 1):
                desc = ds.descriptions[i - 1] or ""
                name, label, by = "", "", "none"
                if given is not None:  # the STAC item names it (unknown names stay unnamed)
                    name, label, by = given[i - 1], resolved.band_labels[k][i - 1], "stac"
                    if not name:
                        by = "none"
                elif desc:
                    name, label, by = canonical_band_name(desc) or desc, desc, "description"
                if given is None and (
                    (not name or by == "description" and canonical_band_name(desc) is None) and fname_band
                ):
                    name, label, by = fname_band, Path(path).name, "filename"
                sources.append(
                    BandSource(
                        path=path,
                        index=i,
                        name=name,
                        label=label,
                        named_by=by,
                        grid=_grid_of(ds),
                        dtype=ds.dtypes[i - 1],
                        nodata=ds.nodatavals[i - 1],
                    )
                )
    if band_names is not None:
        names = _explicit_names(band_names, len(sources))
        for i, (s, n) in enumerate(zip(sources, names)):
            if s.name and canonical_band_name(s.name) and s.name != n:
                log.warning(
                    "band %d of %s is labelled %r in the file; using %r as --band-names says",
                    s.index,
                    s.path,
                    s.label,
                    n,
                )
            sources[i] = BandSource(s.path, s.index, n, n, "explicit", s.grid, s.dtype, s.nodata)
    seen: dict[str, int] = {}
    for s in sources:
        if s.name and canonical_band_name(s.name):
            seen[s.name] = seen.get(s.name, 0) + 1
    dupes = [n for n, c in seen.items() if c > 1]
    if dupes:
        raise BandError(
            f"scene {resolved.name} has band(s) {', '.join(dupes)} more than once",
            "fix the band descriptions or pass --band-names in file order",
        )

    crs_set = {s.grid.crs is not None for s in sources}
    if grid is None:
        finest = min(sources, key=lambda s: (max(s.grid.res), -s.grid.width * s.grid.height))
        grid = finest.grid
        if len(crs_set) > 1:
            raise GeoreferenceError(
                f"scene {resolved.name} mixes files with and without a CRS",
                "give every band file a CRS (gdal_edit.py -a_srs) or use files from one product",
            )
    if grid.crs is None and not allow_no_crs:
        raise GeoreferenceError(
            f"scene {resolved.name} has no CRS, so its outputs could not be placed on a map",
            "add one (gdal_edit.py -a_srs EPSG:XXXX -a_ullr ...) or pass --allow-no-crs to work in pixel coordinates",
        )
    if grid.crs is not None:
        left, bottom, right, top = grid.bounds
        for s in sources:
            if s.grid.crs is None:
                raise GeoreferenceError(
                    f"band file {s.path} has no CRS but must be placed on a georeferenced grid",
                    "give it a CRS (gdal_edit.py -a_srs) first",
                )
            if s.grid.crs == grid.crs:
                l2, b2, r2, t2 = s.grid.bounds
                if l2 >= right or r2 <= left or b2 >= top or t2 <= bottom:
                    raise GeoreferenceError(
                        f"band file {Path(s.path).name} does not overlap the scene grid",
                        "check that all band files belong to the same scene",
                    )
    return Scene(
        resolved.name,
        sources,
        grid,
        nodata=nodata,
        resampling=resampling,
        datetime=(resolved.stac or {}).get("datetime") or _datetime(resolved.paths, tags),
        tags=tags,
        stac=resolved.stac,
    )
