"""Streaming sinks for tiled inference: COG rasters, Zarr stores, GeoParquet chip vectors.

No torch here (docs/design.md §3). Every sink receives finished output rows (or chip vectors) as
they are produced, so memory never holds a whole output, and appears at its destination only
when complete (:mod:`deo_cli.io.atomic`).

**Rasters** (:class:`StreamingRasterWriter`). Row blocks go into a tiled, band-interleaved
BigTIFF (``BIGTIFF=IF_SAFER``; integer maps ZSTD level 1, floating-point features uncompressed;
tiles of ``block_rows`` rows by the COG's tile width) under a hidden temporary name beside the output,
``.NAME.partial.tif``. When the last row is in, the file is copied to a Cloud-Optimised GeoTIFF
by GDAL's COG driver (overviews, ``average`` for continuous values and ``nearest``/``mode`` for
classes, DEFLATE or ZSTD with a predictor: floating-point for floats, horizontal for integers),
written under a second temporary name and renamed into place. (Writing straight to the COG
driver would go through an in-memory copy; docs/design.md §4.) GDAL 3.10's COG driver interleaves
pixels, and its copy holds several uncompressed tiles (every band of a tile) at once, so the
tile side shrinks with the bands from 256 px down to 64 px until a tile is at most
:data:`COG_TILE_BYTES` (:attr:`RasterLayout.cog_blocksize`): 256 px up to 32 float bands,
64 px for a 384-band embedding.

**Resume.** Beside the temporary file a small JSON sidecar ``.NAME.partial.json`` records the
output rows known to be on disk (``rows_done``) and a fingerprint of the run (recipe, model,
scene, grid). The sidecar is updated after the file has been closed and reopened (flushing
GDAL's caches), at most every ``checkpoint_seconds`` and whenever the run stops on an error or
Ctrl-C. A rerun with ``resume=True`` and the same fingerprint opens the temporary file again
and continues at ``rows_done``; otherwise both are removed and the output starts afresh.

**Parts** (``--gpus N``). A writer may cover only rows ``[row_begin, row_end)`` of the grid (a
rank's share); :func:`finish_cog` then assembles the parts through a VRT into one COG.

**int8** (:class:`LinearQuantization`): ``value = q * scale + offset`` with ``q`` in -127..127
and -128 as nodata (the AEF convention); scale and offset are stored in the tags and as GDAL
band scale/offset, so GDAL-aware readers (``rasterio`` ``masked``/``scales``, QGIS, xarray's
``mask_and_scale``) can undo it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np
import rasterio
import rasterio.shutil
from affine import Affine
from rasterio.windows import Window

from deo_cli.errors import OutputExistsError, UsageError
from deo_cli.io.atomic import check_output, commit, temp_path_for, write_text_atomic
from deo_cli.io.grid import Grid

log = logging.getLogger(__name__)

#: GDAL block cache while finishing (overview levels, the COG copy; bytes); keeps memory flat.
#: GDAL's cache is one per process, shared with reading: at 64 MB the written tiles of a wide
#: embedding filled it and peak memory grew with the scene (10k x 10k, tiny model: 1061 MB
#: against 997 MB at 16 MB, the COG finish taking the same 3.7-3.9 s).
WRITER_CACHE_BYTES = 16 * 1024 * 1024
#: GDAL block cache while a :class:`TiledWriter` writes a block (bytes). Each block fills whole
#: tiles that are never written again, so holding them in the cache gains nothing: a small cache
#: sends them to disk during the write instead of keeping a whole block (15 MB for a 625 px wide,
#: 384-band embedding) in memory until later reads push it out.
TILE_WRITE_CACHE_BYTES = 4 * 1024 * 1024
#: Buffer of the final copy to the COG driver (bytes).
WRITER_SWATH_BYTES = 16 * 1024 * 1024
#: Largest uncompressed COG tile (every band of it; bytes) that :attr:`RasterLayout.cog_blocksize`
#: allows above its smallest side (64 px). GDAL 3.10's COG copy holds a few tiles at once:
#: finishing a 250 x 250 x 384 float32 raster peaked at +155 MB with 128 px tiles (25 MB each)
#: against +69 MB with 64 px (6 MB), and 625 px x 64 bands at +113 MB with 256 px (17 MB)
#: against +53 MB with 128 px. (Not below 64 px: at 32 px the copy of the overview levels
#: peaked at +151 MB for 384 bands and +278 MB for 768.)
COG_TILE_BYTES = 8 * 1024 * 1024
#: Side limits of COG tiles (pixels).
COG_MAX_BLOCKSIZE, COG_MIN_BLOCKSIZE = 256, 64
#: Bytes of source pixels read at a time while building an overview level.
OVERVIEW_READ_BYTES = 4 * 1024 * 1024

INT8_NODATA = -128


# ---------------------------------------------------------------------------------------------
# Quantisation
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LinearQuantization:
    """A global int8 code: ``value = q * scale + offset``, ``q`` in -127..127, -128 = nodata.

    :meth:`fit` takes ``offset`` as the centre of the 0.1-99.9 percentile range of sample values
    and ``scale`` so that this range spans -127..127; values outside it are clipped.
    """

    scale: float
    offset: float
    nodata: int = INT8_NODATA
    method: str = "linear"

    @classmethod
    def fit(cls, values: np.ndarray, low_pct: float = 0.1, high_pct: float = 99.9) -> LinearQuantization:
        v = np.asarray(values, np.float64).ravel()
        v = v[np.isfinite(v)]
        if v.size == 0:
            return cls(1.0 / 127.0, 0.0)
        lo, hi = (float(x) for x in np.percentile(v, [low_pct, high_pct]))
        if not hi > lo:
            hi = lo + 1.0
        return cls((hi - lo) / 254.0, (hi + lo) / 2.0)

    def encode(self, x: np.ndarray) -> np.ndarray:
        q = np.rint((x - self.offset) / self.scale)
        q = np.clip(np.nan_to_num(q, nan=self.nodata), -127, 127)
        q[~np.isfinite(x)] = self.nodata
        return q.astype(np.int8)

    def decode(self, q: np.ndarray) -> np.ndarray:
        out = q.astype(np.float32) * np.float32(self.scale) + np.float32(self.offset)
        out[q == self.nodata] = np.nan
        return out

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "original_dtype": "float32",
            "quantized_dtype": "int8",
            "scale": self.scale,
            "offset": self.offset,
            "nodata": self.nodata,
            "rule": "value = q * scale + offset; q = -128 is nodata",
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> LinearQuantization:
        return cls(float(d["scale"]), float(d["offset"]), int(d.get("nodata", INT8_NODATA)))


def encode_rows(
    data: np.ndarray, dtype: str, nodata, quantization: LinearQuantization | None, half: bool = False
) -> np.ndarray:
    """Float rows (NaN = nodata) to the stored data type (``half``: float32 values rounded to the
    nearest float16, which GDAL's ``NBITS=16`` then stores exactly; GDAL itself truncates)."""
    if quantization is not None:
        return quantization.encode(data)
    if half:
        with np.errstate(over="ignore"):  # beyond +-65504: inf, as float16 has it
            return data.astype(np.float16).astype(np.float32)
    if np.issubdtype(np.dtype(dtype), np.floating):
        return data.astype(np.float32, copy=False)
    if np.issubdtype(data.dtype, np.floating):
        bad = ~np.isfinite(data)
        data = np.where(bad, nodata if nodata is not None else 0, data)
    return data.astype(dtype)


# ---------------------------------------------------------------------------------------------
# Progress sidecars (resume)
# ---------------------------------------------------------------------------------------------


def partial_paths(path: str | os.PathLike, part: str = "") -> tuple[Path, Path]:
    """Stable temporary names for ``path`` (no process id, so a rerun can find them)."""
    path = Path(path)
    tag = f"partial{part}"
    return path.with_name(f".{path.stem}.{tag}{path.suffix}"), path.with_name(f".{path.stem}.{tag}.json")


def read_progress(sidecar: Path, fingerprint: str) -> dict | None:
    """The sidecar's content if it belongs to this run (same fingerprint), else ``None``."""
    try:
        state = json.loads(Path(sidecar).read_text())
    except (OSError, ValueError):
        return None
    if state.get("fingerprint") != fingerprint:
        return None
    return state


def _write_json(path: Path, data: dict) -> None:
    write_text_atomic(path, json.dumps(data, indent=1))


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


# ---------------------------------------------------------------------------------------------
# Raster: tiled temporary GeoTIFF, then COG
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RasterLayout:
    """What a raster output holds, beyond its grid: bands, type, nodata, metadata, compression."""

    count: int
    dtype: str = "float32"
    nodata: float | int | None = None
    descriptions: tuple[str, ...] = ()
    tags: Mapping[str, str] | None = None
    quantization: LinearQuantization | None = None
    #: ``float16``: values rounded to the nearest half-precision float; the temporary files hold
    #: them as 16-bit floats (GDAL ``NBITS=16``, uncompressed), the COG as Float32 (see
    #: :func:`finish_cog`), where the predictor and ZSTD drop the zero low bits.
    half: bool = False
    compress: str = "deflate"
    #: Overview resampling: ``average`` (continuous values) or ``nearest``/``mode`` (classes).
    resampling: str = "average"
    blocksize: int | None = None

    @property
    def stored_dtype(self) -> str:
        return "int8" if self.quantization is not None else self.dtype

    @property
    def stored_nodata(self):
        if self.quantization is not None:
            return self.quantization.nodata
        if self.nodata is None and np.issubdtype(np.dtype(self.dtype), np.floating):
            return float("nan")
        return self.nodata

    @property
    def cog_blocksize(self) -> int:
        """The COG's tile side (``blocksize`` when set): the largest of 256, 128 and 64 pixels
        whose tile, every band uncompressed, is within :data:`COG_TILE_BYTES` (else 64)."""
        if self.blocksize:
            return self.blocksize
        pixel_bytes = self.count * np.dtype(self.stored_dtype).itemsize
        bs = COG_MAX_BLOCKSIZE
        while bs > COG_MIN_BLOCKSIZE and bs * bs * pixel_bytes > COG_TILE_BYTES:
            bs //= 2
        return bs


def _gdal_tags(layout: RasterLayout) -> dict:
    return {str(k): (v if isinstance(v, str) else json.dumps(v)) for k, v in (layout.tags or {}).items()}


class TiledWriter:
    """Row blocks of a raster into a tiled temporary GeoTIFF (resumable); see the module docstring.

    Args:
        path: the temporary file to write (``.NAME.partial.tif``).
        grid: the full output grid.
        layout: bands, data type, metadata.
        block_rows: rows per tile (and per write; the stitcher releases rows in these blocks).
        rows: ``(row_begin, row_end)``: the part of the grid this file holds (default: all).
        fingerprint: identifies the run for ``resume``.
        resume: continue a matching interrupted file instead of starting afresh.
        checkpoint_seconds: how often the sidecar is brought up to date.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        grid: Grid,
        layout: RasterLayout,
        block_rows: int = 16,
        rows: tuple[int, int] | None = None,
        fingerprint: str = "",
        resume: bool = False,
        checkpoint_seconds: float = 30.0,
    ):
        self.path = Path(path)
        self.sidecar = self.path.with_suffix(".json")
        self.grid = grid
        self.layout = layout
        self.block_rows = int(block_rows)
        self.row_begin, self.row_end = rows if rows is not None else (0, grid.height)
        self.fingerprint = fingerprint
        self.checkpoint_seconds = checkpoint_seconds
        self.rows_done = self.row_begin
        self._ds = None
        self._last_checkpoint = time.monotonic()
        self._env = rasterio.Env(GDAL_CACHEMAX=TILE_WRITE_CACHE_BYTES)
        state = read_progress(self.sidecar, fingerprint) if resume else None
        if state is not None and self.path.exists():
            self.rows_done = int(state["rows_done"])
            log.info("resuming %s at row %d of %d", self.path.name, self.rows_done, self.row_end)
            self._open("r+")
        else:
            _remove(self.path)
            _remove(self.sidecar)
            self._open("w")
            self._checkpoint(force=True)

    @property
    def part_grid(self) -> Grid:
        t = self.grid.transform
        return Grid(
            self.grid.crs,
            t @ Affine.translation(0, self.row_begin),
            self.grid.width,
            self.row_end - self.row_begin,
        )

    @property
    def complete(self) -> bool:
        return self.rows_done >= self.row_end

    @property
    def compresses(self) -> bool:
        """Whether writing a block compresses it (integer data); float temporaries are stored
        uncompressed, so writing costs a copy and a disk write (see :func:`run_dense`)."""
        return np.dtype(self.layout.stored_dtype).kind != "f"

    def _profile(self) -> dict:
        g = self.part_grid
        bx = min(self.layout.cog_blocksize, max(16, -(-g.width // 16) * 16))
        prof = {
            "driver": "GTiff",
            "width": g.width,
            "height": max(1, g.height),
            "count": self.layout.count,
            "dtype": self.layout.stored_dtype,
            "nodata": self.layout.stored_nodata,
            "transform": g.transform,
            "tiled": True,
            "blockxsize": bx,
            "blockysize": max(16, -(-self.block_rows // 16) * 16),
            # band-interleaved: GDAL builds overviews band by band, and on a pixel-interleaved
            # file each band's pass would decompress every band (measured 10x slower at 384 bands)
            "interleave": "band",
            "bigtiff": "IF_SAFER",
            "sparse_ok": True,  # never pre-fill tiles: each is written once, when its rows are done
        }
        # a temporary file: integer maps (classes, int8 codes) compress well and cheaply;
        # floating-point features hardly at all (ZSTD saved ~10 % on an embedding), and
        # compressing them cost CPU the model needs (overviews of a 625 x 625 x 384 raster:
        # 8.3 s with ZSTD, 5.8 s without)
        if self.compresses:
            prof.update(compress="zstd", zstd_level=1)
        if g.crs is not None:
            prof["crs"] = g.crs
        if self.layout.half:
            prof["nbits"] = 16
        return prof

    def _open(self, mode: str) -> None:
        with self._env:
            if mode == "w":
                self.path.parent.mkdir(parents=True, exist_ok=True)
                ds = rasterio.open(self.path, "w", **self._profile())
                if self.layout.descriptions:
                    ds.descriptions = tuple(self.layout.descriptions)
                tags = _gdal_tags(self.layout)
                if tags:
                    ds.update_tags(**tags)
                if self.layout.quantization is not None:
                    q = self.layout.quantization
                    ds.scales = (q.scale,) * self.layout.count
                    ds.offsets = (q.offset,) * self.layout.count
            else:
                ds = rasterio.open(self.path, mode)
        self._ds = ds

    def _checkpoint(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_checkpoint < self.checkpoint_seconds:
            return
        if self._ds is not None and self._ds.mode != "r":
            with self._env:
                self._ds.close()
            self._ds = None
        _write_json(
            self.sidecar,
            {
                "fingerprint": self.fingerprint,
                "rows_done": self.rows_done,
                "row_begin": self.row_begin,
                "row_end": self.row_end,
                "quantization": self.layout.quantization.to_dict() if self.layout.quantization else None,
            },
        )
        self._last_checkpoint = now
        if not self.complete:
            self._open("r+")

    def write_rows(self, row0: int, data: np.ndarray) -> None:
        """Write float rows ``data`` (bands, rows, width; NaN = nodata) at output row ``row0``."""
        k = data.shape[1]
        if row0 != self.rows_done:  # the stitcher releases rows in order, without gaps
            raise RuntimeError(f"rows written out of order: got {row0}, expected {self.rows_done}")
        if row0 < self.row_begin or row0 + k > self.row_end:
            raise RuntimeError(
                f"rows {row0}..{row0 + k} outside this part ({self.row_begin}..{self.row_end})"
            )
        lay = self.layout
        arr = encode_rows(data, lay.stored_dtype, lay.stored_nodata, lay.quantization, lay.half)
        with self._env:
            self._ds.write(arr, window=Window(0, row0 - self.row_begin, self.grid.width, k))
        self.rows_done = row0 + k
        self._checkpoint(force=self.complete)

    def close(self) -> None:
        """Flush to disk and record progress (also after an error: a later ``resume`` continues)."""
        if self._ds is not None:
            self._checkpoint(force=True)
            if self._ds is not None:
                with self._env:
                    self._ds.close()
                self._ds = None

    def discard(self) -> None:
        """Remove the temporary file and its sidecar."""
        if self._ds is not None:
            with contextlib.suppress(Exception):
                self._ds.close()
            self._ds = None
        _remove(self.path)
        _remove(self.sidecar)


def _overview_count(width: int, height: int, blocksize: int) -> int:
    """At least one overview (when the raster has 2+ pixels a side), more until it fits a tile."""
    longest = max(width, height)
    if longest < 2:
        return 0
    return max(1, math.ceil(math.log2(max(longest / blocksize, 1.0))))


_GDAL_TYPES = {
    "float32": "Float32",
    "float64": "Float64",
    "int8": "Int8",
    "uint8": "Byte",
    "int16": "Int16",
    "uint16": "UInt16",
    "int32": "Int32",
    "uint32": "UInt32",
}


def _vrt(parts: Sequence[Path], grid: Grid, layout: RasterLayout, overviews: Sequence[Path] = ()) -> str:
    """A VRT of the full grid: row-band part files mosaicked, metadata, and explicit overviews."""
    with rasterio.open(parts[0]) as ds0:
        dtype = ds0.dtypes[0]
        crs_wkt = ds0.crs.to_wkt() if ds0.crs else ""
    gdal_type = _GDAL_TYPES[dtype]
    t = grid.transform
    gt = ", ".join(repr(float(v)) for v in (t.c, t.a, t.b, t.f, t.d, t.e))
    lines = [f'<VRTDataset rasterXSize="{grid.width}" rasterYSize="{grid.height}">']
    if crs_wkt:
        lines.append(f"  <SRS>{escape(crs_wkt)}</SRS>")
    lines.append(f"  <GeoTransform>{gt}</GeoTransform>")
    tags = _gdal_tags(layout)
    if tags:
        lines.append("  <Metadata>")
        lines += [f'    <MDI key="{escape(k)}">{escape(v)}</MDI>' for k, v in tags.items()]
        lines.append("  </Metadata>")
    offsets = []
    colormaps: dict[int, dict] = {}
    for i, p in enumerate(parts):
        with rasterio.open(p) as ds:
            row = round((ds.transform.f - t.f) / t.e) if t.e else 0
            offsets.append((p, row, ds.height))
            if i == 0:  # a colour table set on the (first) source travels to the COG
                for b in ds.indexes:
                    with contextlib.suppress(ValueError):
                        colormaps[b] = ds.colormap(b)
    nodata = layout.stored_nodata
    for b in range(1, layout.count + 1):
        lines.append(f'  <VRTRasterBand dataType="{gdal_type}" band="{b}">')
        if b in colormaps:
            cmap = colormaps[b]
            lines.append("    <ColorInterp>Palette</ColorInterp>")
            lines.append("    <ColorTable>")
            for v in range(max(cmap) + 1):
                c = tuple(cmap.get(v, (0, 0, 0, 0))) + (255,) * 4
                lines.append(f'      <Entry c1="{c[0]}" c2="{c[1]}" c3="{c[2]}" c4="{c[3]}"/>')
            lines.append("    </ColorTable>")
        if b - 1 < len(layout.descriptions):
            lines.append(f"    <Description>{escape(layout.descriptions[b - 1])}</Description>")
        if nodata is not None:
            nd = "nan" if isinstance(nodata, float) and math.isnan(nodata) else repr(nodata)
            lines.append(f"    <NoDataValue>{nd}</NoDataValue>")
        if layout.quantization is not None:
            lines.append(f"    <Offset>{layout.quantization.offset!r}</Offset>")
            lines.append(f"    <Scale>{layout.quantization.scale!r}</Scale>")
        for p, row, h in offsets:
            lines.append("    <SimpleSource>")
            lines.append(
                f'      <SourceFilename relativeToVRT="0">{escape(str(Path(p).resolve()))}</SourceFilename>'
            )
            lines.append(f"      <SourceBand>{b}</SourceBand>")
            lines.append(f'      <SrcRect xOff="0" yOff="0" xSize="{grid.width}" ySize="{h}"/>')
            lines.append(f'      <DstRect xOff="0" yOff="{row}" xSize="{grid.width}" ySize="{h}"/>')
            lines.append("    </SimpleSource>")
        for ov in overviews:
            lines.append("    <Overview>")
            lines.append(
                f'      <SourceFilename relativeToVRT="0">{escape(str(Path(ov).resolve()))}</SourceFilename>'
            )
            lines.append(f"      <SourceBand>{b}</SourceBand>")
            lines.append("    </Overview>")
        lines.append("  </VRTRasterBand>")
    lines.append("</VRTDataset>")
    return "\n".join(lines)


def _pool2(x: np.ndarray, resampling: str, nodata) -> np.ndarray:
    """2x2 reduction of (bands, rows, cols) float rows (NaN = nodata), odd edges kept partial:
    ``average`` ignores nodata (as GDAL's), ``nearest`` takes the top-left pixel, ``mode`` the
    most frequent valid value."""
    c, h, w = x.shape
    hp, wp = h + h % 2, w + w % 2
    if (hp, wp) != (h, w):
        pad = np.full((c, hp, wp), np.nan, np.float32)
        pad[:, :h, :w] = x
        x = pad
    q = x.reshape(c, hp // 2, 2, wp // 2, 2)
    if resampling == "nearest":
        return np.ascontiguousarray(q[:, :, 0, :, 0])
    quads = [q[:, :, i, :, j] for i in (0, 1) for j in (0, 1)]
    if resampling == "mode":
        best = np.full(quads[0].shape, np.nan, np.float32)
        best_n = np.zeros(quads[0].shape, np.int8)
        for a in quads:
            n = sum((a == b).astype(np.int8) for b in quads)
            take = np.isfinite(a) & (n > best_n)
            best[take], best_n[take] = a[take], n[take]
        return best
    # all four valid (nearly every pixel of an embedding): the plain mean, 3x faster
    out = quads[0] + quads[1]
    out += quads[2]
    out += quads[3]
    out *= 0.25
    partial = ~np.isfinite(out)
    if partial.any():  # a nodata neighbour: the mean of the valid ones (NaN if none)
        ok = np.isfinite(q)
        total = np.where(ok, q, 0.0).sum(axis=(2, 4), dtype=np.float64)
        count = ok.sum(axis=(2, 4))
        exact = np.full(total.shape, np.nan, np.float32)
        np.divide(total, count, out=exact, where=count > 0, casting="unsafe")
        np.copyto(out, exact, where=partial)
    return out


def _decode(arr: np.ndarray, layout: RasterLayout) -> np.ndarray:
    """Stored values back to floats with NaN for nodata."""
    if layout.quantization is not None:
        return layout.quantization.decode(arr)
    out = arr.astype(np.float32, copy=False)
    nd = layout.stored_nodata
    if nd is not None and not (isinstance(nd, float) and math.isnan(nd)):
        out = out.copy()
        out[arr == nd] = np.nan
    return out


def build_overviews(
    source: str | os.PathLike,
    base: Path,
    grid: Grid,
    layout: RasterLayout,
    levels: int,
    block_rows: int = 16,
) -> list[Path]:
    """Overview levels 2, 4, ... of ``source`` as temporary tiled GeoTIFFs ``base.ovrK.tif``.

    Each level is made from the one before in one streaming pass (``block_rows`` output rows by
    at most 512 columns at a time), so memory stays small and each level costs a quarter of the
    previous. (GDAL's own overview builder, run by the COG driver on a raster of hundreds of
    bands, re-reads the whole raster once per band: 56 s of CPU for a 625 x 625 x 384 raster,
    against about 1 s here.)
    """
    out: list[Path] = []
    src = Path(source)
    g = grid
    for k in range(1, levels + 1):
        og = Grid(g.crs, g.transform @ Affine.scale(2), -(-g.width // 2), -(-g.height // 2))
        path = base.with_name(f"{base.name}.ovr{k}.tif")
        w = TiledWriter(path, og, replace(layout, tags=None, descriptions=()), block_rows)
        # columns per read: a window of OVERVIEW_READ_BYTES (a few such arrays live while
        # pooling; whole rows of a 625 px x 384 band raster took 90 MB)
        col_step = max(16, OVERVIEW_READ_BYTES // (layout.count * 4 * 2 * block_rows * 2) // 16 * 16)
        with rasterio.Env(GDAL_CACHEMAX=WRITER_CACHE_BYTES // 2), rasterio.open(src) as ds:
            for r0 in range(0, og.height, block_rows):
                k_rows = min(block_rows, og.height - r0)
                block = np.empty((layout.count, k_rows, og.width), np.float32)
                for c0 in range(0, og.width, col_step):
                    kc = min(col_step, og.width - c0)
                    win = Window(
                        2 * c0, 2 * r0, min(2 * kc, g.width - 2 * c0), min(2 * k_rows, g.height - 2 * r0)
                    )
                    block[:, :, c0 : c0 + kc] = _pool2(
                        _decode(ds.read(window=win), layout), layout.resampling, None
                    )
                w.write_rows(r0, block)
        w.close()
        out.append(path)
        src, g = path, og
    return out


def finish_cog(
    sources: Sequence[str | os.PathLike],
    path: str | os.PathLike,
    grid: Grid,
    layout: RasterLayout,
    overwrite: bool = False,
) -> Path:
    """Copy finished temporary GeoTIFF(s) (row-band parts, or one file) to a COG at ``path``.

    Overviews are built first (:func:`build_overviews`), attached to the source through a VRT
    and copied as they are by the COG driver. Written under a temporary name and renamed into
    place; the sources are left for the caller.
    """
    path = Path(path)
    sources = [Path(s) for s in sources]
    tmp = temp_path_for(path, "cog")
    vrt = temp_path_for(path.with_suffix(".vrt"), "src")
    bs = layout.cog_blocksize
    levels = _overview_count(grid.width, grid.height, bs)
    ovrs: list[Path] = []
    opts = {
        "BLOCKSIZE": bs,
        "BIGTIFF": "IF_SAFER",
        "OVERVIEWS": "FORCE_USE_EXISTING" if levels else "NONE",
        # one thread: with hundreds of bands a tile is ~25 MB uncompressed, and GDAL's
        # multi-threaded compression keeps several in flight (measured +140 MB for 2 threads)
        "NUM_THREADS": 1,
    }
    comp = layout.compress.lower()
    if comp != "none":
        opts["COMPRESS"] = comp.upper()
        opts["PREDICTOR"] = "YES"  # 3 (floating point) for floats, 2 (horizontal) for integers
        if comp in ("deflate", "zstd"):
            # the fastest level: a 250 x 250 x 384 float32 embedding took 1.7 s instead of 3.0 s
            # (DEFLATE 6, GDAL's default) and came out 2.5 % larger (80 against 78 MB)
            opts["LEVEL"] = 1
    else:
        opts["COMPRESS"] = "NONE"
    # float16 (layout.half): the values are already half precision (encode_rows) and the COG
    # stays Float32. GDAL 3.10's COG (and GTiff COPY_SRC_OVERVIEWS) copy with NBITS=16 and any
    # compression fills the padding of partial edge tiles with uninitialised memory: the same
    # pixels gave files of different bytes and sizes on every run, and a small raster (mostly
    # edge tiles) came out larger than float32. As Float32 the zero low 13 bits of each value
    # compress away: 0.59-0.60 of the float32 file (true 16-bit storage would be 0.50).
    try:
        vrt.write_text(_vrt(sources, grid, layout))
        ovrs = build_overviews(vrt, temp_path_for(path, "pyramid"), grid, layout, levels)
        vrt.write_text(_vrt(sources, grid, layout, ovrs))
        # a small swath: the copy's buffer (GDAL_SWATH_SIZE, which deo's reading defaults raise
        # to 256 MB) would otherwise grow with the raster
        with rasterio.Env(GDAL_CACHEMAX=WRITER_CACHE_BYTES, GDAL_SWATH_SIZE=WRITER_SWATH_BYTES):
            rasterio.shutil.copy(str(vrt), str(tmp), driver="COG", **opts)
        commit(tmp, path, overwrite=True)
    except BaseException:
        _remove(tmp)
        raise
    finally:
        _remove(vrt)
        for p in ovrs:
            _remove(p)
            _remove(p.with_suffix(".json"))
    return path


class StreamingRasterWriter:
    """Stream row blocks into a COG at ``path``: :class:`TiledWriter`, then :func:`finish_cog`.

    ``write_rows(row0, data)`` as for :class:`TiledWriter`; ``finish()`` returns the COG path
    (call it once every row is in; ``colormap`` becomes band 1's colour table); ``abort()`` after a failure keeps the temporary file and its
    sidecar for ``resume`` (or removes them with ``keep=False``).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        grid: Grid,
        layout: RasterLayout,
        block_rows: int = 16,
        fingerprint: str = "",
        resume: bool = False,
        overwrite: bool = False,
        colormap: Mapping[int, tuple] | None = None,
    ):
        self.path = check_output(path, overwrite)
        self.overwrite = overwrite
        tmp, _ = partial_paths(self.path)
        self.grid = grid
        self.layout = layout
        self.block_rows = block_rows
        self.colormap = dict(colormap) if colormap else None
        self._writer = TiledWriter(tmp, grid, layout, block_rows, fingerprint=fingerprint, resume=resume)

    @property
    def rows_done(self) -> int:
        return self._writer.rows_done

    @property
    def partial_path(self) -> Path:
        """The temporary file that ``abort(keep=True)`` keeps for ``resume``."""
        return self._writer.path

    @property
    def compresses(self) -> bool:
        return self._writer.compresses

    def write_rows(self, row0: int, data: np.ndarray) -> None:
        self._writer.write_rows(row0, data)

    def finish(self) -> Path:
        self._writer.close()
        if not self._writer.complete:
            raise RuntimeError(
                f"{self.path.name}: only {self._writer.rows_done} of {self.grid.height} rows written"
            )
        if self.colormap:  # band 1's colour table, carried into the COG and its overviews
            with rasterio.open(self._writer.path, "r+") as ds:
                ds.write_colormap(1, self.colormap)
        out = finish_cog([self._writer.path], self.path, self.grid, self.layout, overwrite=True)
        self._writer.discard()
        return out

    def abort(self, keep: bool = True) -> None:
        if keep:
            with contextlib.suppress(Exception):
                self._writer.close()
        else:
            self._writer.discard()


# ---------------------------------------------------------------------------------------------
# Zarr (geo-embeddings convention)
# ---------------------------------------------------------------------------------------------

#: Convention registrations (zarr-conventions spec: name, uuid, schema and spec URLs).
ZARR_CONVENTIONS = {
    "proj:": {
        "schema_url": "https://raw.githubusercontent.com/zarr-conventions/geo-proj/refs/tags/v1/schema.json",
        "spec_url": "https://github.com/zarr-conventions/geo-proj/blob/v1/README.md",
        "uuid": "f17cb550-5864-4468-aeb7-f3180cfb622f",
        "name": "proj:",
        "description": "Coordinate reference system information for geospatial data",
    },
    "spatial:": {
        "schema_url": "https://raw.githubusercontent.com/zarr-conventions/spatial/refs/tags/v1/schema.json",
        "spec_url": "https://github.com/zarr-conventions/spatial/blob/v1/README.md",
        "uuid": "689b58e2-cf7b-45e0-9fff-9cfc0883d6b4",
        "name": "spatial:",
        "description": "Spatial coordinate information",
    },
    "geoemb:": {
        "schema_url": "https://raw.githubusercontent.com/geo-embeddings/embeddings-zarr-convention/refs/tags/v1/schema.json",
        "spec_url": "https://github.com/geo-embeddings/embeddings-zarr-convention/blob/v1/README.md",
        "uuid": "61c12cc5-0e28-4056-999a-480cf3fb7e4c",
        "name": "geoemb:",
        "description": "Geoembeddings convention for geospatial embedding arrays with model provenance",
    },
}


def import_zarr():
    """zarr (v3) or a one-line error: it is installed with deo on Python 3.11+."""
    try:
        import zarr
    except ImportError as e:
        raise UsageError(
            "--format zarr needs the zarr package (v3, Python 3.11+): pip install 'zarr>=3', "
            "or write a COG (--format cog)"
        ) from e
    return zarr


def geo_attributes(grid: Grid) -> dict:
    """``proj:`` and ``spatial:`` attributes for a (y, x) grid."""
    attrs: dict = {
        "spatial:dimensions": ["y", "x"],
        "spatial:shape": [grid.height, grid.width],
        "spatial:transform": [float(v) for v in tuple(grid.transform)[:6]],
        "spatial:bbox": [float(v) for v in grid.bounds],
        "spatial:registration": "pixel",
    }
    if grid.crs is not None:
        epsg = grid.crs.to_epsg()
        if epsg:
            attrs["proj:code"] = f"EPSG:{epsg}"
        attrs["proj:wkt2"] = grid.crs.to_wkt(version="WKT2_2019")
    return attrs


class ZarrWriter:
    """Row blocks into a Zarr v3 store at ``path`` (a folder), dims ``(band, y, x)``.

    The group carries the ``proj:``, ``spatial:`` and ``geoemb:`` conventions
    (``geoemb_attrs``: ``geoemb:model``, ``geoemb:source_data``, ...; ``type``, ``dimensions``
    and ``data_type`` are filled in here), the array ``embedding`` is chunked
    ``(bands, block_rows, 256)`` (one chunk holds whole vectors), and 1-D ``y``/``x`` arrays
    hold the pixel-centre coordinates, so ``xarray.open_zarr`` gives a georeferenced array.
    Written into ``.NAME.partial.zarr`` and renamed when complete; ``resume`` continues an
    interrupted store (chunks are on disk as soon as written; a JSON file in the store tracks
    ``rows_done``).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        grid: Grid,
        layout: RasterLayout,
        geoemb_attrs: Mapping | None = None,
        block_rows: int = 16,
        fingerprint: str = "",
        resume: bool = False,
        overwrite: bool = False,
    ):
        zarr = import_zarr()

        self.path = check_output(path, overwrite)
        self.tmp, _ = partial_paths(self.path)
        self.progress_file = self.tmp / "deo-progress.json"
        self.grid = grid
        self.layout = layout
        self.block_rows = block_rows
        self.fingerprint = fingerprint
        self.rows_done = 0
        state = read_progress(self.progress_file, fingerprint) if resume else None
        if state is not None:
            self.rows_done = int(state["rows_done"])
            self.root = zarr.open_group(str(self.tmp), mode="r+")
            self.array = self.root["embedding"]
            log.info("resuming %s at row %d of %d", self.path.name, self.rows_done, grid.height)
            return
        _remove(self.tmp)
        dtype = layout.stored_dtype if not layout.half else "float16"
        attrs = {"zarr_conventions": list(ZARR_CONVENTIONS.values())}
        attrs.update(geo_attributes(grid))
        attrs.update(
            {
                "geoemb:type": "pixel",
                "geoemb:dimensions": int(layout.count),
                "geoemb:data_type": dtype,
            }
        )
        attrs.update(dict(geoemb_attrs or {}))
        if layout.quantization is not None:
            q = layout.quantization
            attrs["geoemb:quantization"] = {
                "method": "linear",
                "original_dtype": "float32",
                "quantized_dtype": "int8",
                "scale": {"type": "scalar", "scale": q.scale, "offset": q.offset},
            }
        attrs.update({f"deo:{k}": v for k, v in (layout.tags or {}).items()})
        self.root = zarr.open_group(str(self.tmp), mode="w", zarr_format=3, attributes=_jsonable(attrs))
        fill = layout.stored_nodata
        if isinstance(fill, float) and math.isnan(fill):
            fill = float("nan")
        self.array = self.root.create_array(
            "embedding",
            shape=(layout.count, grid.height, grid.width),
            chunks=(layout.count, max(1, block_rows), min(256, grid.width)),
            dtype=dtype,
            fill_value=fill,
            dimension_names=("band", "y", "x"),
            attributes=_jsonable(
                {
                    "long_name": "embedding",
                    "band_names": list(layout.descriptions),
                    # CF attributes: xarray decodes int8 to floats with NaN for nodata
                    **(
                        {
                            "scale_factor": layout.quantization.scale,
                            "add_offset": layout.quantization.offset,
                            "_FillValue": layout.quantization.nodata,
                        }
                        if layout.quantization is not None
                        else {}
                    ),
                }
            ),
        )
        t = grid.transform
        ys = t.f + t.e * (np.arange(grid.height) + 0.5)
        xs = t.c + t.a * (np.arange(grid.width) + 0.5)
        for name, vals in (("y", ys), ("x", xs)):
            a = self.root.create_array(name, shape=vals.shape, dtype="float64", dimension_names=(name,))
            a[:] = vals
        self._save_progress()

    @property
    def partial_path(self) -> Path:
        """The temporary store that ``abort(keep=True)`` keeps for ``resume``."""
        return self.tmp

    def _save_progress(self) -> None:
        q = self.layout.quantization
        _write_json(
            self.progress_file,
            {
                "fingerprint": self.fingerprint,
                "rows_done": self.rows_done,
                "quantization": q.to_dict() if q is not None else None,
            },
        )

    def write_rows(self, row0: int, data: np.ndarray) -> None:
        if row0 != self.rows_done:
            raise RuntimeError(f"rows written out of order: got {row0}, expected {self.rows_done}")
        k = data.shape[1]
        lay = self.layout
        arr = encode_rows(data, lay.stored_dtype, lay.stored_nodata, lay.quantization, lay.half)
        if lay.half:
            arr = arr.astype(np.float16)
        self.array[:, row0 : row0 + k, :] = arr
        self.rows_done = row0 + k
        self._save_progress()

    def finish(self) -> Path:
        if self.rows_done < self.grid.height:
            raise RuntimeError(f"{self.path.name}: only {self.rows_done} of {self.grid.height} rows written")
        zarr = import_zarr()

        _remove(self.progress_file)
        with warnings.catch_warnings():  # "not part of the v3 spec yet": xarray reads it, others ignore it
            warnings.simplefilter("ignore", UserWarning)
            zarr.consolidate_metadata(str(self.tmp))
        commit(self.tmp, self.path, overwrite=True)
        return self.path

    def abort(self, keep: bool = True) -> None:
        if not keep:
            _remove(self.tmp)


def _jsonable(value):
    """Plain JSON values (Zarr attributes): NaN/inf floats become strings, tuples lists."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (float, np.floating)):
        v = float(value)
        return v if math.isfinite(v) else str(v)
    if isinstance(value, (np.integer,)):
        return int(value)
    if value is None or isinstance(value, (str, int, bool)):
        return value
    return str(value)


# ---------------------------------------------------------------------------------------------
# GeoParquet chip vectors
# ---------------------------------------------------------------------------------------------


def _utc(text: str | None):
    import datetime as dt

    if not text:
        return None
    t = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    return t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)


def _projjson(crs) -> dict | None:
    if crs is None:
        return None
    import pyproj

    return pyproj.CRS.from_wkt(crs.to_wkt()).to_json_dict()


class GeoParquetChipWriter:
    """One row per chip into GeoParquet 1.1, streamed in row groups (ZSTD).

    Columns: ``id`` (string), ``geometry`` (WKB footprint polygon in the source CRS),
    ``bbox`` (covering struct xmin/ymin/xmax/ymax, GeoParquet 1.1), ``embedding``
    (fixed-size list<float32>), ``valid_fraction``, ``source``, ``datetime`` (UTC timestamp or
    null). ``metadata`` (model, weights, manifest, normalisation, tiling...) goes into the file
    metadata under the key ``deo`` next to ``geo``.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        crs,
        dim: int,
        metadata: Mapping | None = None,
        row_group_size: int = 65536,
        overwrite: bool = False,
    ):
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.path = check_output(path, overwrite)
        self.tmp = temp_path_for(self.path)
        self.dim = int(dim)
        self.row_group_size = int(row_group_size)
        self.rows = 0
        self._buf: list[dict] = []
        self._bounds = [math.inf, math.inf, -math.inf, -math.inf]
        self._pa = pa
        self.schema = pa.schema(
            [
                ("id", pa.string()),
                ("geometry", pa.binary()),
                (
                    "bbox",
                    pa.struct(
                        [
                            ("xmin", pa.float64()),
                            ("ymin", pa.float64()),
                            ("xmax", pa.float64()),
                            ("ymax", pa.float64()),
                        ]
                    ),
                ),
                ("embedding", pa.list_(pa.float32(), self.dim)),
                ("valid_fraction", pa.float32()),
                ("source", pa.string()),
                ("datetime", pa.timestamp("us", tz="UTC")),
            ]
        )
        geo = {
            "version": "1.1.0",
            "primary_column": "geometry",
            "columns": {
                "geometry": {
                    "encoding": "WKB",
                    "geometry_types": ["Polygon"],
                    # PROJJSON; null = unknown (a missing key would mean OGC:CRS84)
                    "crs": _projjson(crs),
                    "covering": {
                        "bbox": {
                            "xmin": ["bbox", "xmin"],
                            "ymin": ["bbox", "ymin"],
                            "xmax": ["bbox", "xmax"],
                            "ymax": ["bbox", "ymax"],
                        }
                    },
                }
            },
        }
        meta = {
            b"geo": json.dumps(geo).encode(),
            b"deo": json.dumps(dict(metadata or {}), default=str).encode(),
        }
        self.schema = self.schema.with_metadata(meta)
        self._writer = pq.ParquetWriter(str(self.tmp), self.schema, compression="zstd")

    def write(
        self,
        ids: Sequence[str],
        polygons: Sequence,
        embeddings: np.ndarray,
        valid_fraction: Sequence[float],
        source: str,
        datetime: str | None,
    ) -> None:
        """Add chips: ``polygons`` are shapely polygons in the source CRS; ``embeddings`` (N, dim)."""
        import shapely

        emb = np.asarray(embeddings, np.float32)
        if emb.ndim != 2 or emb.shape[1] != self.dim:
            raise ValueError(f"embeddings must be (N, {self.dim}), got {emb.shape}")
        wkb = shapely.to_wkb(np.asarray(polygons, dtype=object))
        bounds = shapely.bounds(np.asarray(polygons, dtype=object))
        for i in range(len(ids)):
            self._buf.append(
                {
                    "id": ids[i],
                    "geometry": wkb[i],
                    "bbox": dict(zip(("xmin", "ymin", "xmax", "ymax"), map(float, bounds[i]))),
                    "embedding": emb[i],
                    "valid_fraction": float(valid_fraction[i]),
                    "source": source,
                    "datetime": datetime,
                }
            )
        if len(bounds):
            self._bounds = [
                min(self._bounds[0], float(bounds[:, 0].min())),
                min(self._bounds[1], float(bounds[:, 1].min())),
                max(self._bounds[2], float(bounds[:, 2].max())),
                max(self._bounds[3], float(bounds[:, 3].max())),
            ]
        if len(self._buf) >= self.row_group_size:
            self._flush()

    def _flush(self) -> None:
        if not self._buf:
            return
        pa = self._pa
        n = len(self._buf)
        emb = np.stack([r["embedding"] for r in self._buf]).astype(np.float32).ravel()
        dts = [r["datetime"] for r in self._buf]
        table = pa.table(
            {
                "id": pa.array([r["id"] for r in self._buf], pa.string()),
                "geometry": pa.array([r["geometry"] for r in self._buf], pa.binary()),
                "bbox": pa.array([r["bbox"] for r in self._buf], self.schema.field("bbox").type),
                "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb, pa.float32()), self.dim),
                "valid_fraction": pa.array([r["valid_fraction"] for r in self._buf], pa.float32()),
                "source": pa.array([r["source"] for r in self._buf], pa.string()),
                "datetime": pa.array([_utc(d) for d in dts], pa.timestamp("us", tz="UTC")),
            },
            schema=self.schema,
        )
        self._writer.write_table(table, row_group_size=self.row_group_size)
        self.rows += n
        self._buf = []

    def finish(self) -> Path:
        self._flush()
        self._writer.close()
        commit(self.tmp, self.path, overwrite=True)
        return self.path

    def abort(self, keep: bool = False) -> None:
        with contextlib.suppress(Exception):
            self._writer.close()
        _remove(self.tmp)


def merge_parquet_parts(parts: Sequence[Path], path: Path, overwrite: bool = True) -> Path:
    """Concatenate GeoParquet part files (one per rank, same schema) into ``path``, row group by
    row group; the parts are removed."""
    import pyarrow.parquet as pq

    parts = [Path(p) for p in parts if Path(p).exists()]
    if not parts:
        raise OutputExistsError(f"no parts to merge into {path}", "rerun without --resume")
    tmp = temp_path_for(path)
    schema = pq.read_schema(parts[0])
    with pq.ParquetWriter(str(tmp), schema, compression="zstd") as w:
        for p in parts:
            f = pq.ParquetFile(p)
            for i in range(f.num_row_groups):
                w.write_table(f.read_row_group(i))
    commit(tmp, path, overwrite=overwrite)
    for p in parts:
        _remove(p)
    return path
