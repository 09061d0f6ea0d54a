"""STAC test data on local files only: COGs made from ../shared/data, items and an
ItemCollection over them, and a STAC API (landing page, conformance, /search, files with HTTP
ranges) served on 127.0.0.1.

The six BigEarthNet patches (120 x 120 px at 10 m, 12 band files each, in EPSG:32629, 32633 and
32635) become six items. Half name their assets as Earth Search does (``red``, ``nir08`` with
``eo:bands``; a ``visual`` TCI, ``-jp2`` copies), half as the Planetary Computer does (``B04``
with STAC 1.1 ``bands``), so both naming styles are read.
"""

from __future__ import annotations

import http.server
import json
import re
import threading
import urllib.parse
from pathlib import Path

import numpy as np
import rasterio
import rasterio.shutil

from deo_cli.sensors import DEO_S2_MANIFEST, S2_BANDS

DEO_BANDS = tuple(DEO_S2_MANIFEST.bands)

BIGEARTHNET = "bigearthnet_s2_example"
#: Earth Search's asset keys (common names) for the Sentinel-2 bands.
EARTH_SEARCH = {"B01": "coastal", "B02": "blue", "B03": "green", "B04": "red", "B05": "rededge1",
                "B06": "rededge2", "B07": "rededge3", "B08": "nir", "B8A": "nir08", "B09": "nir09",
                "B11": "swir16", "B12": "swir22"}  # fmt: skip
COG = "image/tiff; application=geotiff; profile=cloud-optimized"


def patch_folders(shared_data: Path) -> list[Path]:
    return sorted(p for p in (shared_data / BIGEARTHNET).iterdir() if p.is_dir())


def make_cogs(folder: Path, out: Path) -> dict[str, Path]:
    """Each band file of a BigEarthNet patch as a COG under ``out`` (band -> path)."""
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for f in sorted(folder.glob("*_B*.tif")):
        band = f.stem.rsplit("_", 1)[-1]
        dst = out / f"{band}.tif"
        if not dst.exists():
            rasterio.shutil.copy(f, dst, driver="COG", blocksize=128, overviews="NONE")
        files[band] = dst
    return files


def item_dict(
    folder: Path, files: dict[str, Path], style: str, href_of, cloud: float, item_id=None, when=None
) -> dict:
    """A STAC 1.1 item for one patch; ``href_of(path)`` gives each asset's href (``item_id`` and
    ``when``: else from the BigEarthNet folder name)."""
    from rasterio.warp import transform_bounds, transform_geom

    ref = files["B02"]
    with rasterio.open(ref) as ds:
        bounds, crs = ds.bounds, ds.crs
    w, s, e, n = transform_bounds(crs, "EPSG:4326", *bounds, densify_pts=21)
    geom = transform_geom(crs, "EPSG:4326", {"type": "Polygon", "coordinates": [[
        (bounds.left, bounds.bottom), (bounds.right, bounds.bottom), (bounds.right, bounds.top),
        (bounds.left, bounds.top), (bounds.left, bounds.bottom)]]})  # fmt: skip
    name = item_id or folder.name  # S2A_MSIL2A_20170613T101031_87_48
    if when is None:
        d = re.search(r"_(\d{8})T(\d{5,6})_", name)
        t = d.group(2).rjust(6, "0")  # BigEarthNet names drop a leading 0 (T93020); seconds may read 61
        when = (
            f"{d.group(1)[:4]}-{d.group(1)[4:6]}-{d.group(1)[6:]}T{t[:2]}:{t[2:4]}:{min(int(t[4:]), 59):02d}Z"
        )
    dt = when
    assets = {}
    for band, path in files.items():
        if style == "earth-search":
            key = EARTH_SEARCH[band]
            assets[key] = {"href": href_of(path), "type": COG, "roles": ["data"],
                           "eo:bands": [{"name": key, "common_name": key}]}  # fmt: skip
            if band == "B04":  # the JPEG2000 copy Earth Search also lists: left out (COG preferred)
                assets["red-jp2"] = {"href": href_of(path), "type": "image/jp2", "roles": ["data"],
                                     "eo:bands": [{"name": "red", "common_name": "red"}]}  # fmt: skip
        else:
            assets[band] = {"href": href_of(path), "type": COG, "roles": ["data"],
                            "bands": [{"name": band}]}  # fmt: skip
    assets["visual"] = {"href": href_of(files["B04"]), "type": COG, "roles": ["visual"],
                        "eo:bands": [{"name": "red"}]}  # fmt: skip
    assets["metadata"] = {
        "href": href_of(files["B02"].with_name("metadata.xml")),
        "type": "application/xml",
        "roles": ["metadata"],
    }
    return {
        "type": "Feature",
        "stac_version": "1.1.0",
        "stac_extensions": [],
        "id": name,
        "collection": "sentinel-2-l2a",
        "geometry": geom,
        "bbox": [w, s, e, n],
        "properties": {"datetime": dt, "platform": "sentinel-2" + name[2].lower(), "eo:cloud_cover": cloud},
        "links": [],
        "assets": assets,
    }


def make_items(shared_data: Path, root: Path, href_of=None, n: int | None = None) -> list[dict]:
    """Items over COGs of the BigEarthNet patches (COGs under ``root/cogs``), cloud cover 0,
    10, 20, ... in folder order."""
    href_of = href_of or (lambda p: str(p))
    items = []
    for i, folder in enumerate(patch_folders(shared_data)[:n]):
        files = make_cogs(folder, root / "cogs" / folder.name)
        style = "earth-search" if i % 2 == 0 else "planetary-computer"
        item = item_dict(folder, files, style, href_of, cloud=10.0 * i)
        path = root / "cogs" / folder.name / f"{folder.name}.json"  # the item's own file, its self link
        item["links"] = [{"rel": "self", "href": href_of(path), "type": "application/geo+json"}]
        path.write_text(json.dumps(item, indent=1))
        items.append(item)
    return items


def paris_items(shared_data: Path, root: Path, href_of=None) -> list[dict]:
    """The two OSCD Paris dates (13 band files each, EPSG:4326) as Sentinel-2 items dated in
    summer 2024 (cloud cover 5 and 12), the scenes of the README's STAC search."""
    href_of = href_of or (lambda p: str(p))
    items = []
    for i, (sub, when, cloud) in enumerate(
        (("imgs_1", "2024-06-15T10:56:21Z", 5.0), ("imgs_2", "2024-07-20T10:56:19Z", 12.0))
    ):
        item_id = f"S2{'AB'[i]}_31UDQ_{when[:10].replace('-', '')}_0_L2A"
        files = make_cogs(shared_data / "oscd_subset" / "images" / "paris" / sub, root / "cogs" / item_id)
        item = item_dict(
            root / item_id, files, "planetary-computer", href_of, cloud, item_id=item_id, when=when
        )
        path = root / "cogs" / item_id / f"{item_id}.json"
        item["links"] = [{"rel": "self", "href": href_of(path), "type": "application/geo+json"}]
        path.write_text(json.dumps(item, indent=1))
        items.append(item)
    return items


def write_item_collection(items: list[dict], path: Path) -> Path:
    path.write_text(json.dumps({"type": "FeatureCollection", "features": items}, indent=1))
    return path


# ---------------------------------------------------------------------------------------------
# A STAC API on 127.0.0.1
# ---------------------------------------------------------------------------------------------

CONFORMANCE = [
    "https://api.stacspec.org/v1.0.0/core",
    "https://api.stacspec.org/v1.0.0/item-search",
    "https://api.stacspec.org/v1.0.0/item-search#query",
]
_OPS = {"lt": np.less, "lte": np.less_equal, "gt": np.greater, "gte": np.greater_equal,
        "eq": np.equal, "neq": np.not_equal}  # fmt: skip


def _matches(item: dict, params: dict) -> bool:
    cols = params.get("collections")
    if cols and item.get("collection") not in cols:
        return False
    box = params.get("bbox")
    if box:
        w, s, e, n = item["bbox"]
        if w > box[2] or e < box[0] or s > box[3] or n < box[1]:
            return False
    when = params.get("datetime")
    if when:
        lo, _, hi = when.partition("/") if "/" in when else (when, "", when)
        t = item["properties"]["datetime"]
        if lo not in ("", "..") and t < _start(lo) or hi not in ("", "..") and t > _end(hi):
            return False
    for prop, ops in (params.get("query") or {}).items():
        v = item["properties"].get(prop)
        if v is None or not all(_OPS[op](v, ref) for op, ref in ops.items()):
            return False
    return True


def _start(text: str) -> str:
    return text if "T" in text else (text + "-01-01")[:10] + "T00:00:00Z"


def _end(text: str) -> str:
    if "T" in text:
        return text
    if len(text) == 7:  # a month: its last day
        import calendar

        y, m = int(text[:4]), int(text[5:7])
        return f"{text}-{calendar.monthrange(y, m)[1]:02d}T23:59:59Z"
    return (text + "-12-31")[:10] + "T23:59:59Z"


class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _json(self, obj, code=200):
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header(
            "Content-Type",
            "application/geo+json" if obj.get("type") == "FeatureCollection" else "application/json",
        )
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        n = int(self.headers.get("Content-Length") or 0)
        params = json.loads(self.rfile.read(n) or b"{}")
        self.server.log.append(("POST", self.path, params))
        if self.path.split("?")[0] != "/search":
            self.send_error(404)
            return
        self._search(params)

    def do_GET(self):
        srv = self.server
        url = urllib.parse.urlparse(self.path)
        srv.log.append(("GET", self.path, None))
        base = srv.url
        if url.path in ("", "/"):
            self._json({"type": "Catalog", "id": "test-api", "stac_version": "1.1.0", "description": "deo tests",
                        "conformsTo": CONFORMANCE, "links": [
                            {"rel": "self", "href": base + "/", "type": "application/json"},
                            {"rel": "root", "href": base + "/", "type": "application/json"},
                            {"rel": "conformance", "href": base + "/conformance", "type": "application/json"},
                            {"rel": "search", "href": base + "/search", "type": "application/geo+json", "method": "GET"},
                            {"rel": "search", "href": base + "/search", "type": "application/geo+json", "method": "POST"},
                        ]})  # fmt: skip
            return
        if url.path == "/conformance":
            self._json({"conformsTo": CONFORMANCE})
            return
        if url.path == "/search":
            q = urllib.parse.parse_qs(url.query)
            params = {}
            if "collections" in q:
                params["collections"] = q["collections"][0].split(",")
            if "bbox" in q:
                params["bbox"] = [float(v) for v in q["bbox"][0].split(",")]
            for k in ("datetime", "limit", "token"):
                if k in q:
                    params[k] = q[k][0]
            if "query" in q:
                params["query"] = json.loads(q["query"][0])
            self._search(params)
            return
        self._file(url.path)

    def do_HEAD(self):
        f = self.server.root / urllib.parse.unquote(urllib.parse.urlparse(self.path).path.lstrip("/"))
        self.server.log.append(("HEAD", self.path, None))
        if not f.is_file():
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(f.stat().st_size))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()

    def _search(self, params):
        srv = self.server
        hits = [it for it in srv.items if _matches(it, params)]
        limit = int(params.get("limit") or 2)  # small pages: pystac-client must follow "next"
        start = int(params.get("token") or 0)
        page = hits[start : start + limit]
        links = []
        if start + limit < len(hits):
            nxt = {**params, "token": str(start + limit)}
            links.append({"rel": "next", "href": srv.url + "/search", "method": "POST", "body": nxt,
                          "type": "application/geo+json"})  # fmt: skip
        self._json(
            {"type": "FeatureCollection", "features": page, "links": links, "numberMatched": len(hits)}
        )

    def _file(self, path):
        """Files under ``root`` with single and multiple byte ranges (GDAL's /vsicurl/)."""
        f = self.server.root / urllib.parse.unquote(path.lstrip("/"))
        if not f.is_file():
            self.send_error(404)
            return
        data = f.read_bytes()
        rng = self.headers.get("Range")
        if not rng:
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()
            self.wfile.write(data)
            return
        spans = []
        for part in rng.split("=", 1)[1].split(","):
            a, _, b = part.strip().partition("-")
            a, b = int(a), min(int(b) if b else len(data) - 1, len(data) - 1)
            spans.append((a, b))
        if len(spans) == 1:
            a, b = spans[0]
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {a}-{b}/{len(data)}")
            self.send_header("Content-Length", str(b - a + 1))
            self.end_headers()
            self.wfile.write(data[a : b + 1])
            return
        boundary = "deo-ranges"
        body = b""
        for a, b in spans:
            body += (f"--{boundary}\r\nContent-Type: application/octet-stream\r\n"
                     f"Content-Range: bytes {a}-{b}/{len(data)}\r\n\r\n").encode() + data[a : b + 1] + b"\r\n"  # fmt: skip
        body += f"--{boundary}--\r\n".encode()
        self.send_response(206)
        self.send_header("Content-Type", f"multipart/byteranges; boundary={boundary}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class StacApi:
    """``items`` searchable at ``url``/search, files under ``root`` at ``url``/PATH."""

    def __init__(self, root: Path, items: list[dict] | None = None):
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.root = Path(root)
        self.httpd.items = list(items or [])
        self.httpd.log = []
        host, port = self.httpd.server_address[:2]
        self.httpd.url = f"http://{host}:{port}"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    @property
    def url(self) -> str:
        return self.httpd.url

    @property
    def log(self) -> list:
        return self.httpd.log

    def start(self) -> StacApi:
        self.thread.start()
        return self

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def serve_items(shared_data: Path, root: Path, n: int | None = None, make=None) -> StacApi:
    """A STAC API on 127.0.0.1 whose items' assets are COGs it serves itself (``http://`` hrefs);
    ``make(shared_data, root, href_of)`` makes the items (default: the BigEarthNet patches)."""
    api = StacApi(root)
    rel = lambda p: api.url + "/" + Path(p).relative_to(root).as_posix()  # noqa: E731
    if make is None:
        api.httpd.items = make_items(shared_data, root, href_of=rel, n=n)
    else:
        api.httpd.items = make(shared_data, root, rel)
    return api.start()


__all__ = [
    "S2_BANDS",
    "StacApi",
    "make_items",
    "paris_items",
    "serve_items",
    "synthetic_items",
    "write_item_collection",
]


def synthetic_items(
    root: Path, n: int, size: int, crss=("EPSG:32631", "EPSG:32632", "EPSG:32633"), seed=0
) -> list[dict]:
    """``n`` items, each one 10-band uint16 COG of ``size`` px (DEO's bands, named by the item's
    ``bands``, not by the file), in the CRSs of ``crss`` in turn."""
    from affine import Affine

    from tests.infer.helpers import smooth_scene

    root.mkdir(parents=True, exist_ok=True)
    bands = list(DEO_BANDS)
    items = []
    for i in range(n):
        crs = crss[i % len(crss)]
        x0, y0 = 300000.0 + 20000 * i, 5000000.0 - 10000 * (i % 3)
        path = root / f"scene_{i:03d}.tif"
        if not path.exists():
            tmp = root / f".scene_{i:03d}.tif"
            data = smooth_scene(size, size, bands=10, seed=seed + i)
            profile = {"driver": "GTiff", "width": size, "height": size, "count": 10, "dtype": "uint16",
                       "crs": crs, "transform": Affine(10, 0, x0, 0, -10, y0)}  # fmt: skip
            with rasterio.open(tmp, "w", **profile) as dst:
                dst.write(data)
            rasterio.shutil.copy(tmp, path, driver="COG", blocksize=256, compress="deflate")
            tmp.unlink()
        from rasterio.warp import transform_bounds

        with rasterio.open(path) as ds:
            bbox = list(transform_bounds(ds.crs, "EPSG:4326", *ds.bounds, densify_pts=21))
        w, s, e, nn = bbox
        items.append({
            "type": "Feature", "stac_version": "1.1.0", "stac_extensions": [], "id": f"scene_{i:03d}",
            "collection": "synthetic", "bbox": bbox,
            "geometry": {"type": "Polygon", "coordinates": [[[w, s], [e, s], [e, nn], [w, nn], [w, s]]]},
            "properties": {"datetime": f"2024-06-{1 + i % 28:02d}T10:00:00Z", "platform": "sentinel-2b",
                           "eo:cloud_cover": float(i % 50)},
            "links": [],
            "assets": {"data": {"href": str(path), "type": COG, "roles": ["data"],
                                "bands": [{"name": b} for b in bands]}},
        })  # fmt: skip
    return items
