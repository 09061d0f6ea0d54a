"""STAC inputs: items as scenes, bands from their assets by name.

Wherever deo takes a scene it also takes:

- a STAC **Item** JSON (a file or a URL): one scene;
- an **ItemCollection** / GeoJSON **FeatureCollection** of items (a file or a URL, e.g. a saved
  search): every item is a scene;
- a static STAC **Collection** or **Catalog** JSON: every item below it;
- a **search** of a STAC API (:func:`search_items`, ``deo embed --stac URL --collection ...``).

Each item becomes a :class:`StacScene`. Its bands come from its assets **by name**, never by
position (:func:`asset_bands`): the asset's ``bands`` (STAC 1.1) or ``eo:bands`` (their
``name``, then ``common_name``: ``B04``, ``red``, ``nir08``), else the asset key (``B04``,
``red``), else its file name. Assets that are not rasters (metadata, thumbnails), that are
renderings (``visual``, ``overview`` roles), that carry no band deo knows (``SCL``, ``AOT``), or
that repeat a band another asset already gives (the JPEG2000 copy of a COG) are left out, each
with the reason (``deo inspect`` shows them). The files are read as any other scene: URLs through
GDAL's ``/vsicurl/`` (``s3://`` through ``/vsis3/``), relative hrefs against the item's location.

The item's id names the scene (and its output, ``out/<id>.tif``); its id, collection, datetime,
platform and cloud cover go into every output's metadata (:meth:`StacScene.metadata`).

pystac reads the JSON (files and URLs); pystac-client (imported only for a search) talks to APIs.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from deo_cli.errors import BandError, InputNotFoundError, UsageError
from deo_cli.sensors import band_name_from_filename, canonical_band_name

log = logging.getLogger(__name__)

STAC_SUFFIXES = (".json", ".geojson")
RASTER_MEDIA = (
    "image/tiff",
    "image/jp2",
    "application/x-hdf",
    "application/x-netcdf",
    "image/vnd.stac.geotiff",
)
RASTER_HREF = (".tif", ".tiff", ".jp2", ".vrt", ".img", ".nc")
#: Asset roles and keys of renderings, not measurements (a true-colour TCI would repeat red/green/blue).
RENDER_ROLES = {"visual", "overview", "thumbnail", "rendered_preview"}
RENDER_KEYS = {"visual", "tci", "preview", "thumbnail", "overview", "rendered_preview"}


@dataclass(frozen=True)
class StacAsset:
    """One asset of an item and what deo makes of it."""

    key: str
    href: str  # absolute: a local path or a URL
    media_type: str | None
    bands: tuple[str, ...]  # deo's name of each band of the file, in file order ("" for unknown)
    labels: tuple[str, ...]  # where each name came from: "eo:bands B04 (red)", "asset key red"
    used: bool = False
    why: str = ""  # why an asset is left out

    def to_dict(self) -> dict:
        return {
            "key": self.key,
            "href": self.href,
            "media_type": self.media_type,
            "bands": list(self.bands),
            "labels": list(self.labels),
            "used": self.used,
            "why": self.why or None,
        }


@dataclass(frozen=True)
class StacScene:
    """A STAC item as a scene: its identity and the assets deo reads as its bands."""

    id: str
    href: str | None  # the item's own JSON (file or URL) when known: outputs link to it
    collection: str | None
    datetime: str | None  # ISO 8601 UTC
    platform: str | None
    cloud_cover: float | None
    bbox: tuple[float, ...] | None
    assets: tuple[StacAsset, ...] = field(default=())

    @property
    def name(self) -> str:
        return self.id

    def __str__(self) -> str:  # messages and result rows name the item
        return self.id

    @property
    def used(self) -> tuple[StacAsset, ...]:
        return tuple(a for a in self.assets if a.used)

    def metadata(self) -> dict:
        """What travels into every output made from this item (``deo_stac_item``)."""
        return {
            "id": self.id,
            "collection": self.collection,
            "datetime": self.datetime,
            "platform": self.platform,
            "eo:cloud_cover": self.cloud_cover,
            "href": self.href,
        }

    def describe(self) -> dict:
        """The item and its asset -> band mapping (``deo inspect``)."""
        return {**self.metadata(), "bbox": list(self.bbox) if self.bbox else None,
                "assets": [a.to_dict() for a in self.assets]}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Assets -> bands
# ---------------------------------------------------------------------------------------------


def _band_entries(asset: dict) -> list[dict]:
    for key in ("bands", "eo:bands"):
        entries = asset.get(key)
        if isinstance(entries, list) and entries and all(isinstance(e, dict) for e in entries):
            return entries
    return []


def _entry_name(entry: dict) -> tuple[str, str]:
    """(deo's band name or "", the label it came from) for one ``bands``/``eo:bands`` entry."""
    name = entry.get("name")
    common = entry.get("eo:common_name") or entry.get("common_name")
    for text in (name, common):
        hit = canonical_band_name(text) if isinstance(text, str) else None
        if hit:
            what = "/".join(dict.fromkeys(str(t) for t in (name, common) if t))
            return hit, f"bands {what}"
    return "", f"bands {name or common or '?'} (unknown to deo)"


def asset_bands(key: str, asset: dict) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """deo's names of the bands of one asset, in file order, and where each came from.

    From the asset's ``bands`` / ``eo:bands`` list (each entry's ``name``, then its common name),
    else (one band) its key, else its file name; ``""`` where none names a band deo knows."""
    entries = _band_entries(asset)
    if entries:
        pairs = [_entry_name(e) for e in entries]
        return tuple(n for n, _ in pairs), tuple(lbl for _, lbl in pairs)
    hit = canonical_band_name(key)
    if hit:
        return (hit,), (f"asset key {key}",)
    href = str(asset.get("href", ""))
    hit = band_name_from_filename(urllib.parse.urlparse(href).path.rsplit("/", 1)[-1])
    hit = canonical_band_name(hit) if hit else None
    if hit:
        return (hit,), (f"file name {href.rsplit('/', 1)[-1]}",)
    return ("",), (f"asset key {key} (no band deo knows)",)


def _is_raster(asset: dict) -> bool:
    media = str(asset.get("type") or "").lower()
    if media:
        return media.startswith(RASTER_MEDIA)
    path = urllib.parse.urlparse(str(asset.get("href", ""))).path.lower()
    return path.endswith(RASTER_HREF)


def _preference(key: str, asset: dict, n_bands: int) -> tuple:
    """Lower is better, among assets that give the same band: data role, one band per file, a
    cloud-optimised GeoTIFF before a GeoTIFF before JPEG2000."""
    roles = set(asset.get("roles") or [])
    media = str(asset.get("type") or "").lower()
    path = urllib.parse.urlparse(str(asset.get("href", ""))).path.lower()
    if "cloud-optimized" in media:
        kind = 0
    elif media.startswith("image/tiff") or path.endswith((".tif", ".tiff")):
        kind = 1
    elif "jp2" in media or path.endswith(".jp2"):
        kind = 2
    else:
        kind = 3
    return (0 if "data" in roles or not roles else 1, 0 if n_bands == 1 else 1, kind)


def map_assets(assets: dict[str, dict], base: str | None) -> tuple[StacAsset, ...]:
    """Every asset of an item with the bands deo reads from it, or why it is left out."""
    out: dict[str, StacAsset] = {}
    candidates = []
    for key, a in assets.items():
        href = absolute_href(str(a.get("href", "")), base)
        media = a.get("type")
        roles = {str(r).lower() for r in a.get("roles") or []}
        if not _is_raster(a):
            out[key] = StacAsset(key, href, media, (), (), False, "not a raster")
            continue
        if roles & RENDER_ROLES or key.lower() in RENDER_KEYS:
            out[key] = StacAsset(key, href, media, (), (), False, "a rendering, not measurements")
            continue
        bands, labels = asset_bands(key, a)
        if not any(bands):
            out[key] = StacAsset(key, href, media, bands, labels, False, "no band deo knows")
            continue
        candidates.append((_preference(key, a, len(bands)), key, href, media, bands, labels))
    taken: dict[str, str] = {}
    for _, key, href, media, bands, labels in sorted(candidates, key=lambda c: c[0]):
        again = [b for b in bands if b and b in taken]
        if again:
            why = f"band {again[0]} is read from asset {taken[again[0]]}"
            out[key] = StacAsset(key, href, media, bands, labels, False, why)
            continue
        for b in bands:
            if b:
                taken[b] = key
        out[key] = StacAsset(key, href, media, bands, labels, True)
    return tuple(out[k] for k in assets)


def absolute_href(href: str, base: str | None) -> str:
    """``href`` as a local path or URL: ``file://`` stripped, relative hrefs joined to ``base``
    (the item's own file or URL)."""
    if href.startswith("file://"):
        return urllib.parse.unquote(urllib.parse.urlparse(href).path)
    if "://" in href or href.startswith("/") or not base:
        return href
    if "://" in base:
        return urllib.parse.urljoin(base, href)
    return os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(base)), href))


# ---------------------------------------------------------------------------------------------
# Items -> scenes
# ---------------------------------------------------------------------------------------------


def _iso(value) -> str | None:
    if value is None:
        return None
    text = value.isoformat() if hasattr(value, "isoformat") else str(value)
    return text.replace("+00:00", "Z")


def scene_from_item(item, base: str | None = None) -> StacScene:
    """A :class:`StacScene` from a ``pystac.Item`` (``base``: where its relative hrefs start when
    it has no self link, e.g. the ItemCollection file it came in)."""
    self_href = item.get_self_href()
    base = self_href or base
    props = item.properties
    dt = item.datetime or item.common_metadata.start_datetime
    cloud = props.get("eo:cloud_cover")
    assets = {k: a.to_dict() for k, a in item.assets.items()}
    return StacScene(
        id=str(item.id),
        href=self_href,
        collection=item.collection_id,
        datetime=_iso(dt),
        platform=props.get("platform"),
        cloud_cover=float(cloud) if isinstance(cloud, (int, float)) and math.isfinite(cloud) else None,
        bbox=tuple(float(v) for v in item.bbox) if item.bbox else None,
        assets=map_assets(assets, base),
    )


def looks_like_stac(text: str) -> bool:
    """Whether a scene argument names STAC JSON: a ``.json``/``.geojson`` file or URL, or a STAC
    API item URL (``.../collections/C/items/ID``)."""
    if not isinstance(text, str) or text.startswith(("sample:", "@")):
        return False
    if "://" in text:
        path = urllib.parse.urlparse(text).path.lower()
        return path.endswith(STAC_SUFFIXES) or bool(re.search(r"/collections/[^/]+/items/[^/]+/?$", path))
    return text.lower().endswith(STAC_SUFFIXES) and Path(text).expanduser().is_file()


def _read_json(href: str) -> dict:
    import pystac

    try:
        data = pystac.StacIO.default().read_json(href)
    except json.JSONDecodeError as e:
        raise InputNotFoundError(
            f"{href} is not JSON ({e.msg} at line {e.lineno})", "give a STAC Item or ItemCollection"
        ) from e
    except OSError as e:  # a missing file, an unreachable URL (urllib's errors are OSErrors)
        raise InputNotFoundError(f"cannot read {href} ({e})", "check the path or URL") from e
    if not isinstance(data, dict):
        raise InputNotFoundError(f"{href} is not a STAC object", "give a STAC Item or ItemCollection")
    return data


def read_stac(href: str) -> list[StacScene]:
    """The scenes of a STAC Item, ItemCollection/FeatureCollection, Collection or Catalog JSON
    (a file or URL). :class:`InputNotFoundError` for JSON that is none of them."""
    import pystac

    href = os.path.expanduser(href) if "://" not in href else href
    data = _read_json(href)
    kind = data.get("type")
    try:
        if kind == "Feature":
            item = pystac.Item.from_dict(data, preserve_dict=False)
            if not item.get_self_href():
                item.set_self_href(href if "://" in href else os.path.abspath(href))
            return [scene_from_item(item)]
        if kind == "FeatureCollection":
            feats = data.get("features") or []
            scenes = []
            for f in feats:
                item = pystac.Item.from_dict(f, preserve_dict=False)
                scenes.append(scene_from_item(item, base=href if "://" in href else os.path.abspath(href)))
            if not scenes:
                raise InputNotFoundError(f"{href} holds no items", "give a collection with at least one item")
            return scenes
        if kind in ("Collection", "Catalog"):
            cat = pystac.read_file(href)
            items = sorted(cat.get_items(recursive=True), key=lambda i: i.id)
            if not items:
                raise InputNotFoundError(
                    f"STAC {kind.lower()} {href} links to no items",
                    "point at a static catalog with items, or search an API with --stac URL --collection ID",
                )
            return [scene_from_item(i) for i in items]
    except (pystac.STACError, KeyError, TypeError, ValueError) as e:
        raise InputNotFoundError(
            f"{href} is not a valid STAC {kind or 'object'} ({e})", "check the file"
        ) from e
    raise InputNotFoundError(
        f"{href} is JSON but not a STAC Item, ItemCollection or Collection (type {kind!r})",
        "give a STAC Item or ItemCollection JSON",
    )


def expand_scenes(sources: Sequence) -> list:
    """``sources`` with every STAC JSON argument replaced by its items' scenes (other arguments,
    and JSON that is not STAC, are kept as they are: they fail or open later as usual)."""
    out: list = []
    for s in sources:
        if isinstance(s, str) and looks_like_stac(s):
            try:
                out.extend(read_stac(s))
            except InputNotFoundError as e:
                if "is JSON but not a STAC" in e.problem or "is not a STAC object" in e.problem:
                    out.append(s)  # not STAC: the raster reader says what it is not
                    continue
                raise
        else:
            out.append(s)
    return out


# ---------------------------------------------------------------------------------------------
# Search
# ---------------------------------------------------------------------------------------------

_QUERY = re.compile(r"^\s*([A-Za-z0-9_:.\-]+)\s*(<=|>=|!=|<|>|=)\s*(.+?)\s*$")
_OPS = {"<": "lt", "<=": "lte", ">": "gt", ">=": "gte", "=": "eq", "!=": "neq"}


def parse_query(items: Sequence[str]) -> dict:
    """``["eo:cloud_cover<20", "platform=sentinel-2a"]`` -> the STAC API ``query`` object
    (numbers as numbers)."""
    query: dict = {}
    for text in items:
        m = _QUERY.match(text)
        if not m:
            raise UsageError(
                f"--query {text!r} is not PROPERTY<op>VALUE",
                "use e.g. --query 'eo:cloud_cover<20' (operators <, <=, >, >=, =, !=)",
            )
        prop, op, raw = m.groups()
        try:
            value: object = int(raw) if re.fullmatch(r"-?\d+", raw) else float(raw)
        except ValueError:
            value = raw.strip("'\"")
        query.setdefault(prop, {})[_OPS[op]] = value
    return query


def parse_bbox(text: str | Sequence[float] | None) -> list[float] | None:
    if text is None:
        return None
    parts = [p for p in re.split(r"[,\s]+", text.strip())] if isinstance(text, str) else list(text)
    try:
        vals = [float(p) for p in parts if p != ""]
    except ValueError:
        vals = []
    if len(vals) != 4 or vals[0] > vals[2] or vals[1] > vals[3]:
        raise UsageError(
            f"--bbox {text} is not W,S,E,N", "give longitudes and latitudes, e.g. --bbox 2.2,48.8,2.5,49.0"
        )
    return vals


def search_items(
    url: str,
    *,
    collections: Sequence[str] = (),
    bbox: str | Sequence[float] | None = None,
    datetime: str | None = None,
    query: Sequence[str] = (),
    max_items: int | None = None,
) -> list[StacScene]:
    """The items a STAC API search finds, as scenes, sorted by id (the same list on every
    shard of a job array, whatever order the API pages them in). Needs pystac-client."""
    try:
        from pystac_client import Client
        from pystac_client.exceptions import APIError
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise UsageError("--stac needs pystac-client", "pip install pystac-client") from e
    import requests

    q = parse_query(query) if query else None
    box = parse_bbox(bbox)
    try:
        client = Client.open(url)
        search = client.search(
            collections=list(collections) or None,
            bbox=box,
            datetime=datetime or None,
            query=q,
            max_items=max_items,
        )
        items = list(search.items())
    except APIError as e:
        if getattr(e, "status_code", None) is None:  # no answer at all: pystac-client wraps requests' error
            raise InputNotFoundError(
                f"cannot reach the STAC API at {url}", "check the URL and the network"
            ) from e
        raise InputNotFoundError(f"the STAC API at {url} refused the search ({str(e).splitlines()[0][:200]})",
                                 "check --collection, --bbox, --datetime and --query") from e  # fmt: skip
    except (requests.RequestException, OSError) as e:
        raise InputNotFoundError(
            f"cannot reach the STAC API at {url} ({type(e).__name__})", "check the URL and the network"
        ) from e
    except (ValueError, TypeError) as e:  # pystac-client's own checks of the parameters
        raise UsageError(
            f"the STAC search parameters were refused ({e})", "check --bbox and --datetime"
        ) from e
    if not items:
        raise InputNotFoundError(
            f"the STAC search at {url} found no items",
            "widen --bbox or --datetime, relax --query, or check --collection",
        )
    seen: dict[str, object] = {}
    for it in items:
        seen.setdefault(it.id, it)
    scenes = [scene_from_item(seen[k]) for k in sorted(seen)]
    log.info("STAC search at %s: %d item(s)", url, len(scenes))
    return scenes


def scene_paths(
    scene: StacScene,
) -> tuple[tuple[str, ...], tuple[tuple[str, ...], ...], tuple[tuple[str, ...], ...]]:
    """(files, each file's band names, each file's name labels) of the used assets."""
    used = scene.used
    if not used:
        have = ", ".join(f"{a.key} ({a.why})" for a in scene.assets) or "no assets"
        raise BandError(f"STAC item {scene.id} has no asset deo can read as a band ({have})",
                        "give items whose raster assets name their bands (eo:bands or band-named keys)")  # fmt: skip
    return (
        tuple(a.href for a in used),
        tuple(a.bands for a in used),
        tuple(tuple(f"asset {a.key}: {lbl}" for lbl in a.labels) for a in used),
    )
