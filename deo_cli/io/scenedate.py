"""When a scene was acquired: from its metadata or names that carry the sensing time, else unknown.

Sources, first found wins (:func:`acquisition_time` returns the time and where it came from):

1. metadata tags of the first file: Sentinel-2 product metadata as GDAL exposes it
   (``DATATAKE_1_DATATAKE_SENSING_START``, ``SENSING_TIME``, ``PRODUCT_START_TIME``,
   ``ACQUISITION_DATE``...), then the TIFF ``DATETIME`` tag;
2. a name in the files' paths (file or any folder above it) that carries the sensing time:

   - the compact Sentinel-2 naming (since December 2016): ``S2A_MSIL1C_<sensing>_N..._R..._T...``,
     and its band files ``T31UDQ_<sensing>_B02.jp2``;
   - the old product and datastrip names: ``..._V<sensing start>_<stop>`` (validity) and
     ``..._DS_..._S<sensing start>_N02.04``;
   - any other ``YYYYMMDD`` (optionally ``THHMMSS``) in a file name that is not an old-style tile;

3. the ``dates.txt`` of the OSCD layout (``<city>/imgs_1``, ``imgs_2`` beside ``dates.txt``).

Old-style Sentinel-2 tile names (``S2A_OPER_MSI_L1C_TL_EPA__20160706T155721_A000849_T30UWU_B02``)
carry the **processing** time (when the file was made, sometimes a year after the acquisition;
``A000849`` is the absolute orbit), so their date is never taken as the acquisition date: with
no other source the date is unknown (None), and deo says so once per scene.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger(__name__)

#: Metadata keys that hold the sensing (acquisition) start, in order of preference.
SENSING_KEYS = (
    "DATATAKE_1_DATATAKE_SENSING_START",
    "SENSING_TIME",
    "PRODUCT_START_TIME",
    "ACQUISITION_DATE",
    "ACQUISITION_DATETIME",
    "DATE_ACQUIRED",
)
_ISO = re.compile(r"(\d{4})-?(\d{2})-?(\d{2})(?:[T ](\d{2}):?(\d{2}):?(\d{2}))?")
_OLD_TILE = re.compile(r"S2[A-D]_OPER_MSI_L[12][AC]_TL_\w{4}_(\d{8}T\d{6})_A\d{6}")
_SENSING_NAMES = (
    re.compile(r"S2[A-D]_MSIL[12][AC]_(\d{8}T\d{6})_N\d{4}"),  # compact product
    re.compile(r"(?:^|_)T\d{2}[A-Z]{3}_(\d{8}T\d{6})_"),  # compact band file
    re.compile(r"_V(\d{8}T\d{6})_\d{8}T\d{6}"),  # old product: validity start
    re.compile(r"_DS_\w{4}_\d{8}T\d{6}_S(\d{8}T\d{6})"),  # old datastrip: sensing start
)
_ANY_DATE = re.compile(r"(?<!\d)(20\d{6})(?:T?(\d{6}))?(?!\d)")
_told: set[str] = set()


def _iso(d: str, t: str | None) -> str:
    t = t or "000000"
    return f"{d[:4]}-{d[4:6]}-{d[6:8]}T{t[:2]}:{t[2:4]}:{t[4:6]}Z"


def _from_tags(tags: dict) -> tuple[str, str] | None:
    for key in SENSING_KEYS:
        m = _ISO.match(str(tags.get(key, "")).strip())
        if m:
            d = "".join(m.groups()[:3])
            return _iso(d, "".join(m.groups()[3:]) if m.group(4) else None), f"metadata {key}"
    dt = tags.get("TIFFTAG_DATETIME")
    if dt and re.match(r"\d{4}:\d\d:\d\d \d\d:\d\d:\d\d", dt):
        return dt[:10].replace(":", "-") + "T" + dt[11:] + "Z", "metadata TIFFTAG_DATETIME"
    return None


def _from_names(paths: Sequence[str]) -> tuple[str, str] | None:
    parts = [part for p in paths[:1] for part in reversed(Path(str(p)).parts)]
    for pattern in _SENSING_NAMES:
        for part in parts:
            m = pattern.search(part)
            if m:
                return _iso(m.group(1)[:8], m.group(1)[9:]), f"name {part}"
    name = parts[0] if parts else ""
    m = None if _OLD_TILE.search(name) else _ANY_DATE.search(name)  # an old tile's is a processing time
    return (_iso(m.group(1), m.group(2)), f"name {name}") if m else None


def _from_oscd(paths: Sequence[str]) -> tuple[str, str] | None:
    folder = Path(str(paths[0])).parent
    if folder.name not in ("imgs_1", "imgs_2") or not (folder.parent / "dates.txt").is_file():
        return None
    found = dict(re.findall(r"(date_[12])\s*:\s*(\d{8})", (folder.parent / "dates.txt").read_text()))
    d = found.get("date_" + folder.name[-1])
    return (_iso(d, None), f"OSCD {folder.parent.name}/dates.txt") if d else None


def acquisition_time(paths: Sequence[str], tags: dict | None = None) -> tuple[str | None, str]:
    """``(ISO time or None, where it came from)`` for a scene of ``paths`` (see the module)."""
    if not paths:
        return None, "unknown: no files"
    for found in (_from_tags(tags or {}), _from_names(paths)):
        if found:
            return found
    local = not str(paths[0]).startswith("/vsi") and "://" not in str(paths[0])
    found = _from_oscd(paths) if local else None
    if found:
        return found
    old = next((m for p in paths[:1] if (m := _OLD_TILE.search(Path(str(p)).name))), None)
    if old is None:
        return None, "unknown: no date in the metadata or the names"
    why = (
        f"unknown: {Path(str(paths[0])).name} is an old-style Sentinel-2 tile name, whose "
        f"{old.group(1)} is the processing time, not the acquisition; no metadata or datastrip gives it"
    )
    if str(paths[0]) not in _told:
        _told.add(str(paths[0]))
        log.info("acquisition date %s", why)
    return None, why


__all__ = ["SENSING_KEYS", "acquisition_time"]
