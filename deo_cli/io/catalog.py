"""The catalog beside a folder of embeddings: ``index.parquet``, STAC items and collection, mosaics.

``deo embed SCENES -o out/`` writes, beside its outputs:

- ``index.parquet``: GeoParquet, one row per scene (:data:`COLUMNS`): the output's path
  (relative to the folder), its footprint in EPSG:4326 (the output's bounds, edges densified,
  transformed), the source (STAC item id or scene name, its href, datetime, platform, cloud
  cover), the model, the weights' SHA-256, layer, stride, format, the output's CRS, status (``written`` or
  ``failed`` with its one-line ``error``), seconds and chips. Rows are rebuilt from each output's
  own metadata, so a row never disagrees with its file;
- ``<output stem>.item.json``: a STAC Item per output (projection and raster extensions, the
  source's ``eo:cloud_cover`` and platform, a ``derived_from`` link to its source item), in
- ``collection.json``: a STAC Collection over every written output, so the product is served and
  searched with the same tools as its input;
- with ``--mosaic``, ``mosaic_<CRS>.vrt``: one GDAL VRT per CRS over the COG outputs.

Every rank and every shard of a job array adds its rows to the same index: :func:`update_catalog`
takes the folder's catalog lock (waiting for another shard that holds it), reads the index,
replaces the rows of the scenes it ran, and writes the index, items and collection under
temporary names renamed into place. The rows of scenes it did not run are kept, so the index of
a job array is the same as that of one process over the whole list.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import json
import logging
import math
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape

from deo_cli import __version__
from deo_cli.errors import OutputError
from deo_cli.io.atomic import write_text_atomic

try:
    import fcntl
except ImportError:  # not on Windows: no lock there
    fcntl = None

log = logging.getLogger(__name__)

INDEX = "index.parquet"
COLLECTION = "collection.json"
ITEM_SUFFIX = ".item.json"
LOCK = ".catalog.lock"
#: How long a shard waits for another one to finish updating the catalog.
LOCK_WAIT_S = 600.0

COLUMNS = (
    "output", "status", "error", "source", "source_href", "source_datetime", "source_collection",
    "platform", "cloud_cover", "model", "weights_sha256", "layer", "stride", "format", "output_crs",
    "width", "height", "seconds", "chips", "deo_version",
)  # fmt: skip
MEDIA = {
    "cog": "image/tiff; application=geotiff; profile=cloud-optimized",
    "zarr": "application/vnd.zarr",
    "parquet": "application/vnd.apache.parquet",
}
EXTENSIONS = {
    "proj": "https://stac-extensions.github.io/projection/v2.0.0/schema.json",
    "raster": "https://stac-extensions.github.io/raster/v1.1.0/schema.json",
    "eo": "https://stac-extensions.github.io/eo/v1.1.0/schema.json",
}


@dataclass
class SceneRecord:
    """What one run knows about one scene: its output and how it went."""

    output: Path
    source: str
    status: str  # written | skipped | failed
    error: str | None = None
    seconds: float | None = None
    chips: int | None = 0  # None: not known (its rank stopped before reporting)
    format: str = "cog"
    stac: dict | None = None  # the source item's identity (io/stac.py), failed scenes included


# ---------------------------------------------------------------------------------------------
# What an output holds
# ---------------------------------------------------------------------------------------------


def _decode(value):
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except ValueError:
        return value


def output_info(path: Path, fmt: str) -> dict:
    """Grid and deo metadata of an embedding output: ``crs`` (rasterio CRS), ``bounds``,
    ``transform`` (6 numbers or None), ``width``/``height``, ``count``, ``dtype``, ``nodata``
    and ``meta`` (the ``deo_*`` metadata as values)."""
    import rasterio
    from rasterio.crs import CRS

    if fmt == "cog":
        with rasterio.open(path) as ds:
            meta = {k.lower(): _decode(v) for k, v in ds.tags().items() if k.startswith("DEO_")}
            return {
                "crs": ds.crs, "bounds": tuple(ds.bounds), "transform": list(ds.transform)[:6],
                "width": ds.width, "height": ds.height, "count": ds.count, "dtype": ds.dtypes[0],
                "nodata": ds.nodata, "descriptions": ds.descriptions, "meta": meta,
                "res": ds.res, "block": ds.block_shapes[0],
                "scales": ds.scales, "offsets": ds.offsets,
            }  # fmt: skip
    if fmt == "zarr":
        attrs = json.loads((path / "zarr.json").read_text()).get("attributes", {})
        crs = attrs.get("proj:code") or attrs.get("proj:wkt2")
        h, w = attrs["spatial:shape"]
        meta = {k[4:].lower(): _decode(v) for k, v in attrs.items() if k.startswith("deo:DEO_")}
        return {"crs": CRS.from_user_input(crs) if crs else None, "bounds": tuple(attrs["spatial:bbox"]),
                "transform": attrs["spatial:transform"], "width": w, "height": h, "meta": meta}  # fmt: skip
    import pyarrow.parquet as pq

    md = pq.read_schema(path).metadata or {}
    geo = json.loads(md.get(b"geo", b"{}"))
    col = geo.get("columns", {}).get(geo.get("primary_column", "geometry"), {})
    crs = col.get("crs")
    meta = json.loads(md.get(b"deo", b"{}"))
    bbox = col.get("bbox")
    if not bbox:  # not in the metadata: the union of the chips' footprints
        import geopandas as gpd

        bbox = list(gpd.read_parquet(path, columns=["geometry"]).total_bounds)
    return {"crs": CRS.from_user_input(json.dumps(crs)) if crs else None, "bounds": tuple(bbox),
            "transform": None, "width": None, "height": None, "meta": meta}  # fmt: skip


def footprint(bounds: Sequence[float], crs, densify: int = 21):
    """The polygon of ``bounds`` (in ``crs``) in EPSG:4326, each edge densified to ``densify``
    points so a UTM tile's curved edges are followed."""
    from pyproj import Transformer
    from shapely.geometry import Polygon, box

    if crs is None or not all(math.isfinite(v) for v in bounds):
        return None
    poly = box(*bounds)
    epsg = crs.to_epsg()
    if epsg == 4326:
        return poly
    x0, y0, x1, y1 = bounds
    t = [i / (densify - 1) for i in range(densify)]
    ring = (
        [(x0 + (x1 - x0) * f, y0) for f in t]
        + [(x1, y0 + (y1 - y0) * f) for f in t[1:]]
        + [(x1 - (x1 - x0) * f, y1) for f in t[1:]]
        + [(x0, y1 - (y1 - y0) * f) for f in t[1:]]
    )
    tr = Transformer.from_crs(crs, "EPSG:4326", always_xy=True)
    xs, ys = tr.transform([p[0] for p in ring], [p[1] for p in ring])
    return Polygon(zip(xs, ys))


def _crs_text(crs) -> str | None:
    if crs is None:
        return None
    epsg = crs.to_epsg()
    return f"EPSG:{epsg}" if epsg else crs.to_string()


def relative_output(folder: Path, output: Path) -> str:
    """``output`` relative to the catalog's ``folder``, with ``/`` (the index's ``output``)."""
    return Path(os.path.relpath(os.path.abspath(output), os.path.abspath(folder))).as_posix()


def row_for(folder: Path, rec: SceneRecord) -> dict:
    """The index row of one scene (see the module docstring); ``geometry`` is a shapely polygon."""
    rel = relative_output(folder, rec.output)
    stac = rec.stac or {}
    row = dict.fromkeys(COLUMNS)
    row.update(output=rel, status="failed" if rec.status == "failed" else "written", error=rec.error,
               source=rec.source, source_href=stac.get("href"), source_datetime=stac.get("datetime"),
               source_collection=stac.get("collection"), platform=stac.get("platform"),
               cloud_cover=stac.get("eo:cloud_cover"), format=rec.format, seconds=rec.seconds,
               chips=None if rec.chips is None else int(rec.chips), deo_version=__version__, geometry=None)  # fmt: skip
    if row["status"] == "failed":
        return row
    info = output_info(folder / rel, rec.format)
    meta = info["meta"]
    item = meta.get("deo_stac_item") or {}
    src = meta.get("deo_source") or {}
    row.update(
        source=item.get("id") or src.get("scene") or rec.source,
        source_href=item.get("href") or (";".join(src.get("paths", [])) if not item else None),
        source_datetime=item.get("datetime") or meta.get("deo_datetime"),
        source_collection=item.get("collection"),
        platform=item.get("platform"),
        cloud_cover=item.get("eo:cloud_cover"),
        model=_text(meta.get("deo_model")),
        weights_sha256=_text(meta.get("deo_weights_sha256")),
        layer=_int(meta.get("deo_layer")),
        stride=_int(meta.get("deo_stride")),
        output_crs=_crs_text(info["crs"]),
        width=info["width"],
        height=info["height"],
        deo_version=_text(meta.get("deo_version")) or __version__,
        geometry=footprint(info["bounds"], info["crs"]),
    )
    return row


def _text(v) -> str | None:
    """A tag's text (tags are JSON-decoded: a version "1.0" must not become a number)."""
    return None if v is None else str(v)


def _int(v):
    try:
        return int(v)
    except (TypeError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------
# The index
# ---------------------------------------------------------------------------------------------


def read_index(folder: Path) -> list[dict]:
    """The rows of ``folder/index.parquet`` (empty when there is none)."""
    path = Path(folder) / INDEX
    if not path.exists():
        return []
    import geopandas as gpd

    df = gpd.read_parquet(path)
    rows = []
    for rec in df.to_dict("records"):
        row = {k: _plain(rec.get(k)) for k in COLUMNS}
        row["geometry"] = rec.get("geometry")
        rows.append(row)
    return rows


def _plain(v):
    """pandas/numpy scalars and missing values as plain Python."""
    if v is None:
        return None
    try:
        import pandas as pd

        if pd.isna(v):
            return None
    except (TypeError, ValueError):
        pass
    if hasattr(v, "item"):
        return v.item()
    return v


def _write_index(folder: Path, rows: list[dict]) -> Path:
    import geopandas as gpd
    import pandas as pd

    df = pd.DataFrame([{k: r.get(k) for k in COLUMNS} for r in rows], columns=list(COLUMNS))
    for col in ("layer", "stride", "width", "height", "chips"):
        df[col] = df[col].astype("Int64")
    for col in ("seconds", "cloud_cover"):
        df[col] = df[col].astype("float64")
    gdf = gpd.GeoDataFrame(df, geometry=[r.get("geometry") for r in rows], crs="EPSG:4326")
    path = folder / INDEX
    tmp = folder / f".{INDEX}.tmp-{os.getpid()}"
    try:
        try:  # GeoParquet 1.1's bbox column (geopandas >= 1.0) lets readers filter by area
            gdf.to_parquet(tmp, index=False, compression="zstd", write_covering_bbox=True)
        except TypeError:
            gdf.to_parquet(tmp, index=False, compression="zstd")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    return path


@contextlib.contextmanager
def catalog_lock(folder: Path, wait_s: float = LOCK_WAIT_S):
    """The folder's catalog lock, waited for (another shard updating it holds it for seconds)."""
    if fcntl is None:
        yield
        return
    path = Path(folder) / LOCK
    t0 = time.monotonic()
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                yield  # a file system without locks: go on without one
                return
            if time.monotonic() - t0 > wait_s:
                raise OutputError(
                    f"the catalog of {folder} stayed locked for {wait_s:.0f} s",
                    f"check no deo run is stuck on it, or remove {path}",
                ) from None
            time.sleep(0.05)
            continue
        try:  # its holder removed it between our open and our lock: take the new one
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # still holding it: a waiting shard then sees a new file
        os.close(fd)


@dataclass
class CatalogResult:
    index: Path
    collection: Path | None
    items: list[Path]
    mosaics: list[Path]
    rows: int


def update_catalog(
    folder: str | os.PathLike,
    records: Iterable[SceneRecord],
    *,
    mosaic: bool = False,
    collection_id: str | None = None,
) -> CatalogResult:
    """Add this run's scenes to the folder's catalog (see the module docstring)."""
    folder = Path(folder)
    records = list(records)
    with catalog_lock(folder):
        rows = {r["output"]: r for r in read_index(folder)}
        fresh: list[str] = []
        for rec in records:
            rel = relative_output(folder, rec.output)
            old = rows.get(rel)
            if rec.status == "skipped" and old is not None and old["status"] == "written":
                continue  # finished before (--resume): its row stays, seconds included
            rows[rel] = row_for(folder, rec)
            if rec.status == "skipped" and old is not None:
                rows[rel]["seconds"] = old.get("seconds")
            fresh.append(rel)
        ordered = [rows[k] for k in sorted(rows)]
        index = _write_index(folder, ordered)
        written = [r for r in ordered if r["status"] == "written"]
        items = []
        for r in written:
            path = folder / item_name(r["output"])
            if r["output"] in fresh or not path.exists():
                items.append(write_item(folder, r, collection_id or _collection_id(folder)))
        coll = write_collection(folder, written, collection_id or _collection_id(folder)) if written else None
        mosaics = write_mosaics(folder, [r for r in written if r["format"] == "cog"]) if mosaic else []
    return CatalogResult(index, coll, items, mosaics, len(ordered))


# ---------------------------------------------------------------------------------------------
# STAC items and collection
# ---------------------------------------------------------------------------------------------


def item_name(output: str) -> str:
    """``a/b.tif`` -> ``a/b.item.json``."""
    p = Path(output)
    return (
        p.with_name(p.name.split(".")[0] + ITEM_SUFFIX).as_posix()
        if "." in p.name
        else p.as_posix() + ITEM_SUFFIX
    )


def _collection_id(folder: Path) -> str:
    name = Path(os.path.abspath(folder)).name
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name) or "embeddings"


def _parse_time(text: str | None):
    if not text:
        return None
    return _dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


def _rel(from_file: str, target: str) -> str:
    """``target`` (relative to the folder) as seen from ``from_file`` (also relative to it)."""
    rel = os.path.relpath(target, os.path.dirname(from_file) or ".")
    return rel if rel.startswith("..") else "./" + rel


def write_item(folder: Path, row: dict, collection_id: str) -> Path:
    """The STAC Item of one written output (see the module docstring)."""
    import pystac
    from pystac.extensions.projection import ProjectionExtension
    from pystac.extensions.raster import DataType, RasterBand, RasterExtension
    from shapely.geometry import mapping

    info = output_info(folder / row["output"], row["format"])
    name = item_name(row["output"])
    geom = row["geometry"]
    when = _parse_time(row["source_datetime"])
    props = {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat().replace("+00:00", "Z"),
        "deo:source": row["source"],
        "deo:model": row["model"],
        "deo:weights_sha256": row["weights_sha256"],
        "deo:layer": row["layer"],
        "deo:stride": row["stride"],
        "deo:version": row["deo_version"],
    }
    if row["platform"]:
        props["platform"] = row["platform"]
    if when is None:
        props["deo:source_datetime"] = None
    item = pystac.Item(
        id=Path(row["output"]).name.split(".")[0],
        geometry=mapping(geom) if geom is not None else None,
        bbox=list(geom.bounds) if geom is not None else None,
        datetime=when or _dt.datetime.now(_dt.timezone.utc),
        properties={k: v for k, v in props.items() if v is not None or k == "deo:source_datetime"},
        collection=collection_id,
    )
    asset = pystac.Asset(
        href=_rel(name, row["output"]),
        media_type=MEDIA.get(row["format"]),
        roles=["data"],
        title=f"{row['model']} embedding, layer {row['layer']}, stride {row['stride']}",
    )
    item.add_asset("embedding", asset)
    recipe = Path(row["output"]).with_name(Path(row["output"]).name.split(".")[0] + ".recipe.yaml")
    if (folder / recipe).exists():
        item.add_asset("recipe", pystac.Asset(href=_rel(name, recipe.as_posix()), media_type="application/yaml",
                                              roles=["metadata"], title="the resolved deo recipe"))  # fmt: skip
    proj = ProjectionExtension.ext(item, add_if_missing=True)
    crs = info["crs"]
    if crs is not None:
        epsg = crs.to_epsg()
        proj.code = f"EPSG:{epsg}" if epsg else None
        if not epsg:
            proj.wkt2 = crs.to_wkt()
    if info["transform"] is not None and info["width"]:
        proj.shape = [int(info["height"]), int(info["width"])]
        proj.transform = [float(v) for v in info["transform"]]
    proj.bbox = [float(v) for v in info["bounds"]]
    if row["format"] == "cog":
        raster = RasterExtension.ext(asset, add_if_missing=True)
        nodata = info["nodata"]
        nodata = "nan" if nodata is not None and math.isnan(nodata) else nodata
        res = float(abs(info["res"][0]))
        raster.bands = [
            RasterBand.create(
                nodata=nodata,
                data_type=DataType(info["dtype"]),
                spatial_resolution=res,
                scale=float(s) if s != 1 else None,
                offset=float(o) if o != 0 else None,
            )
            for s, o in zip(info["scales"], info["offsets"])
        ]
    if row["cloud_cover"] is not None:
        item.properties["eo:cloud_cover"] = float(row["cloud_cover"])
        item.stac_extensions.append(EXTENSIONS["eo"])
    href = row["source_href"]
    if href and ("://" in href or href.lower().endswith((".json", ".geojson"))):
        if "://" not in href and os.path.isabs(href):
            href = os.path.relpath(href, os.path.dirname(os.path.abspath(folder / name)))
        item.add_link(pystac.Link("derived_from", href, media_type="application/geo+json",
                                  title=f"source item {row['source']}"))  # fmt: skip
    for rel in ("collection", "parent", "root"):
        item.add_link(pystac.Link(rel, _rel(name, COLLECTION), media_type="application/json"))
    d = item.to_dict(include_self_link=False, transform_hrefs=False)
    path = folder / name
    write_text_atomic(path, json.dumps(d, indent=1))
    return path


def write_collection(folder: Path, rows: list[dict], collection_id: str) -> Path:
    """``collection.json`` over the items of ``rows`` (written outputs)."""
    import pystac
    from shapely.ops import unary_union

    geoms = [r["geometry"] for r in rows if r["geometry"] is not None]
    bbox = list(unary_union(geoms).bounds) if geoms else [-180.0, -90.0, 180.0, 90.0]
    times = sorted(t for t in (_parse_time(r["source_datetime"]) for r in rows) if t is not None)
    interval = [times[0], times[-1]] if times else [None, None]
    summaries = {
        "deo:model": sorted({r["model"] for r in rows if r["model"]}),
        "deo:layer": sorted({r["layer"] for r in rows if r["layer"] is not None}),
        "deo:stride": sorted({r["stride"] for r in rows if r["stride"] is not None}),
        "deo:weights_sha256": sorted({r["weights_sha256"] for r in rows if r["weights_sha256"]}),
        "platform": sorted({r["platform"] for r in rows if r["platform"]}),
    }
    coll = pystac.Collection(
        id=collection_id,
        description=f"DEO embeddings written by deo {__version__} ({len(rows)} outputs; index.parquet has one row per scene)",
        extent=pystac.Extent(pystac.SpatialExtent([bbox]), pystac.TemporalExtent([interval])),
        license="other",
        title=f"deo embeddings: {collection_id}",
        summaries=pystac.Summaries({k: v for k, v in summaries.items() if v}),  # a summary is never empty
    )
    coll.add_link(pystac.Link("root", "./" + COLLECTION, media_type="application/json"))
    for r in rows:
        coll.add_link(pystac.Link("item", "./" + item_name(r["output"]), media_type="application/geo+json",
                                  title=r["source"]))  # fmt: skip
    coll.assets["index"] = pystac.Asset(href="./" + INDEX, media_type="application/vnd.apache.parquet",
                                        roles=["metadata"], title="one row per scene (GeoParquet)")  # fmt: skip
    d = coll.to_dict(include_self_link=False, transform_hrefs=False)
    path = folder / COLLECTION
    write_text_atomic(path, json.dumps(d, indent=1))
    return path


# ---------------------------------------------------------------------------------------------
# VRT mosaics
# ---------------------------------------------------------------------------------------------

_GDAL_TYPES = {"float32": "Float32", "float64": "Float64", "int8": "Int8", "uint8": "Byte",
               "int16": "Int16", "uint16": "UInt16", "int32": "Int32"}  # fmt: skip


def write_mosaics(folder: Path, rows: list[dict]) -> list[Path]:
    """One VRT per CRS over the COG outputs of ``rows``: ``mosaic_EPSG_32631.vrt``. Files of a CRS
    whose bands or data type differ from the first one's are left out with a warning."""
    groups: dict[str, list[tuple[str, dict]]] = {}
    for r in rows:
        info = output_info(folder / r["output"], "cog")
        t = info["transform"]
        if t[1] != 0 or t[3] != 0 or t[4] >= 0:
            log.warning("%s: not north-up, left out of the mosaic", r["output"])
            continue
        groups.setdefault(_crs_text(info["crs"]) or "none", []).append((r["output"], info))
    out = []
    for crs_name, files in sorted(groups.items()):
        first = files[0][1]
        same = [(p, i) for p, i in files if (i["count"], i["dtype"]) == (first["count"], first["dtype"])]
        for p, _ in files:
            if all(p != q for q, _ in same):
                log.warning("%s: bands or data type differ from %s, left out of the mosaic", p, files[0][0])
        name = f"mosaic_{crs_name.replace(':', '_')}.vrt"
        write_text_atomic(folder / name, _mosaic_xml(same))
        out.append(folder / name)
    return out


def _num(v: float) -> str:
    return repr(float(v))


def _mosaic_xml(files: list[tuple[str, dict]]) -> str:
    first = files[0][1]
    res_x = min(abs(i["transform"][0]) for _, i in files)
    res_y = min(abs(i["transform"][4]) for _, i in files)
    x0 = min(i["bounds"][0] for _, i in files)
    y1 = max(i["bounds"][3] for _, i in files)
    x1 = max(i["bounds"][2] for _, i in files)
    y0 = min(i["bounds"][1] for _, i in files)
    width, height = math.ceil((x1 - x0) / res_x - 1e-6), math.ceil((y1 - y0) / res_y - 1e-6)
    dtype = _GDAL_TYPES.get(first["dtype"], "Float32")
    nodata = first["nodata"]
    nd = "nan" if nodata is not None and math.isnan(nodata) else (None if nodata is None else _num(nodata))
    lines = [f'<VRTDataset rasterXSize="{width}" rasterYSize="{height}">']
    if first["crs"] is not None:
        lines.append(f'  <SRS dataAxisToSRSAxisMapping="1,2">{escape(first["crs"].to_wkt())}</SRS>')
    lines.append(
        f"  <GeoTransform>{_num(x0)}, {_num(res_x)}, 0, {_num(y1)}, 0, {_num(-res_y)}</GeoTransform>"
    )
    for b in range(1, first["count"] + 1):
        lines.append(f'  <VRTRasterBand dataType="{dtype}" band="{b}">')
        if nd is not None:
            lines.append(f"    <NoDataValue>{nd}</NoDataValue>")
        desc = first["descriptions"][b - 1]
        if desc:
            lines.append(f"    <Description>{escape(desc)}</Description>")
        if first["scales"][b - 1] != 1 or first["offsets"][b - 1] != 0:
            lines.append(f"    <Offset>{_num(first['offsets'][b - 1])}</Offset>")
            lines.append(f"    <Scale>{_num(first['scales'][b - 1])}</Scale>")
        for path, i in files:
            t = i["transform"]
            xo, yo = (t[2] - x0) / res_x, (y1 - t[5]) / res_y
            xs, ys = i["width"] * abs(t[0]) / res_x, i["height"] * abs(t[4]) / res_y
            bh, bw = i["block"]
            lines += [
                "    <ComplexSource>",
                f'      <SourceFilename relativeToVRT="1">{escape(path)}</SourceFilename>',
                f"      <SourceBand>{b}</SourceBand>",
                f'      <SourceProperties RasterXSize="{i["width"]}" RasterYSize="{i["height"]}" '
                f'DataType="{dtype}" BlockXSize="{bw}" BlockYSize="{bh}"/>',
                f'      <SrcRect xOff="0" yOff="0" xSize="{i["width"]}" ySize="{i["height"]}"/>',
                f'      <DstRect xOff="{xo:.10g}" yOff="{yo:.10g}" xSize="{xs:.10g}" ySize="{ys:.10g}"/>',
            ]
            if nd is not None:
                lines.append(f"      <NODATA>{nd}</NODATA>")
            lines.append("    </ComplexSource>")
        lines.append("  </VRTRasterBand>")
    lines.append("</VRTDataset>")
    return "\n".join(lines) + "\n"
