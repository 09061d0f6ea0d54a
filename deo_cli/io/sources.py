"""Turn what a user types as a scene into the raster files that make it up.

A scene is one of:

- a multi-band raster file (GeoTIFF/COG, JPEG2000, GDAL VRT, ...), local or remote
  (``https://``, ``s3://``, ``gs://`` or a ``/vsi...`` path);
- a folder of single-band files whose names carry the band (``..._B8A.tif``, ``B04.jp2``, as in
  BigEarthNet and OSCD); a folder with no rasters at its top level (a ``.SAFE`` product) is
  searched below for band files;
- a glob (``'scenes/T31UDQ_*_B??.tif'``), or ``@list.txt`` (one path per line);
- ``sample:NAME``: a real Sentinel-2 scene that ships with deo (``sample:list`` in
  ``deo inspect`` lists them);
- a STAC item (:class:`~deo_cli.io.stac.StacScene`, or the JSON file or URL of one): its
  assets, each band named from the item (:mod:`deo_cli.io.stac`).
"""

from __future__ import annotations

import glob
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from deo_cli.errors import BandError, InputNotFoundError
from deo_cli.io.env import is_remote
from deo_cli.sensors import S2_BANDS, band_name_from_filename

log = logging.getLogger(__name__)

RASTER_SUFFIXES = (".tif", ".tiff", ".jp2", ".vrt", ".img", ".nc")
SAMPLES_DIR = Path(__file__).resolve().parent.parent / "samples"

#: Scenes shipped inside the package (see deo_cli/samples/SOURCE.md).
SAMPLES: dict[str, str] = {
    "paris-2016": "oscd_paris_20161130_l1c.tif",
    "paris-2017": "oscd_paris_20171107_l1c.tif",
}
SAMPLES["paris"] = SAMPLES["paris-2016"]


@dataclass(frozen=True)
class ResolvedSource:
    """The files of one scene and a short name to show for it."""

    name: str
    paths: tuple[str, ...]
    stacked: bool  # True: several single-band files that together form the scene
    #: Per path, the name of each of its bands given by a STAC item (None: the usual rules).
    band_names: tuple[tuple[str, ...], ...] | None = None
    #: Per path, where each of those names came from (``asset B04: bands B04/red``).
    band_labels: tuple[tuple[str, ...], ...] | None = None
    #: The STAC item's identity (:meth:`~deo_cli.io.stac.StacScene.metadata`), for outputs.
    stac: dict | None = None


def _some_names(files, n: int = 5) -> str:
    """The first ``n`` file names, comma-separated, ``...`` when there are more."""
    return ", ".join(f.name for f in files[:n]) + (" ..." if len(files) > n else "")


def sample_path(name: str) -> Path:
    """Path of a packaged sample scene (``paris``, ``paris-2016``, ``paris-2017``)."""
    key = name.strip().lower()
    if key not in SAMPLES:
        raise InputNotFoundError(
            f"no sample scene named {name!r}",
            f"use one of: {', '.join('sample:' + k for k in SAMPLES)}",
        )
    path = SAMPLES_DIR / SAMPLES[key]
    if not path.is_file():
        raise InputNotFoundError(
            f"sample scene file {path} is missing from this installation",
            "reinstall deo (pip install -e .) so the package data is present",
        )
    return path


def _has_glob(text: str) -> bool:
    return any(c in text for c in "*?[")


def _rasters_in(folder: Path, recursive: bool) -> list[Path]:
    it = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in it if p.is_file() and p.suffix.lower() in RASTER_SUFFIXES)


def _band_files(files: list[Path], where: str) -> list[Path]:
    """Keep the files whose names carry a band; for a band found several times keep the first
    of the finest resolution suffix (``_10m`` < ``_20m`` < ``_60m``, as in .SAFE products)."""
    named = [(f, band_name_from_filename(f.name)) for f in files]
    unnamed = [f for f, b in named if b is None]
    named = [(f, b) for f, b in named if b is not None]
    if not named:
        raise BandError(
            f"{where} holds {len(files)} rasters but none of their file names names a band",
            "give one multi-band file, or single-band files named like ..._B04.tif (or pass a glob)",
        )
    if unnamed:
        log.warning(
            "%s: ignoring %d raster(s) whose names carry no band: %s",
            where,
            len(unnamed),
            _some_names(unnamed),
        )

    def res_rank(p: Path) -> int:
        for i, tag in enumerate(("_10m", "_20m", "_60m")):
            if tag in p.name.lower():
                return i
        return 0

    chosen: dict[str, Path] = {}
    for f, b in sorted(named, key=lambda fb: res_rank(fb[0])):
        if b in chosen:
            if res_rank(chosen[b]) == res_rank(f) and chosen[b].parent != f.parent:
                folders = sorted({p.parent.name for p, _ in named})
                raise BandError(
                    f"{where} holds the bands of several scenes (band {b} is in {chosen[b].parent.name}/ "
                    f"and {f.parent.name}/; {len(folders)} folders)",
                    "name one scene's folder, or each of them"
                    + (f" ({where.split(' ', 1)[1]}/*, unquoted)" if where.startswith("folder ") else ""),
                )
            if res_rank(chosen[b]) == res_rank(f):
                raise BandError(
                    f"{where} holds band {b} twice ({chosen[b].name} and {f.name})",
                    "keep one file per band, or pass a glob that selects one",
                )
            continue
        chosen[b] = f
    order = {name: i for i, name in enumerate(S2_BANDS)}
    return [chosen[b] for b in sorted(chosen, key=lambda b: (order.get(b, len(order)), b))]


def resolve_source(source: str | os.PathLike | list | tuple) -> ResolvedSource:
    """Files making up one scene (see the module docstring for the accepted forms)."""
    from deo_cli.io.stac import StacScene, looks_like_stac, read_stac, scene_paths

    if isinstance(source, StacScene):
        paths, names, labels = scene_paths(source)
        return ResolvedSource(source.id, paths, len(paths) > 1, names, labels, source.metadata())
    if isinstance(source, str) and looks_like_stac(source):
        scenes = read_stac(source)
        if len(scenes) != 1:
            raise InputNotFoundError(
                f"{source} holds {len(scenes)} STAC items, not one scene",
                "pass it where several scenes are accepted (deo embed ITEMS.json -o folder/)",
            )
        return resolve_source(scenes[0])
    if isinstance(source, (list, tuple)):
        if not source:
            raise InputNotFoundError("an empty list of files was given as a scene", "pass at least one file")
        paths: list[str] = []
        for s in source:
            paths.extend(resolve_source(s).paths)
        first = Path(str(source[0]))
        return ResolvedSource(first.parent.name or first.name, tuple(paths), len(paths) > 1)

    text = os.fspath(source)
    if text.startswith("sample:"):
        p = sample_path(text.split(":", 1)[1])
        return ResolvedSource(text, (str(p),), False)
    if text.startswith("@"):
        listing = Path(text[1:])
        if not listing.is_file():
            raise InputNotFoundError(f"file list {listing} not found", "check the path after '@'")
        lines = [ln.strip() for ln in listing.read_text().splitlines()]
        items = [
            ln if is_remote(ln) or Path(ln).is_absolute() else str(listing.parent / ln)
            for ln in lines
            if ln and not ln.startswith("#")
        ]
        if not items:
            raise InputNotFoundError(f"file list {listing} is empty", "write one raster path per line")
        res = resolve_source(items)
        return ResolvedSource(listing.stem, res.paths, len(res.paths) > 1)
    if is_remote(text):
        return ResolvedSource(text.rsplit("/", 1)[-1], (text,), False)

    path = Path(text).expanduser()
    if path.is_dir():
        files = _rasters_in(path, recursive=False)
        if not files:
            files = _rasters_in(path, recursive=True)
            if not files:
                raise InputNotFoundError(
                    f"folder {path} holds no raster files ({', '.join(RASTER_SUFFIXES)})",
                    "point at a raster file, or a folder of single-band files",
                )
        if len(files) == 1:
            return ResolvedSource(path.name, (str(files[0]),), False)
        files = _band_files(files, f"folder {path}")
        name = f"{path.parent.name}/{path.name}" if path.parent.name else path.name
        return ResolvedSource(name, tuple(str(f) for f in files), True)
    if path.is_file():
        return ResolvedSource(path.name, (str(path),), False)
    if _has_glob(text):
        files = [Path(f) for f in sorted(glob.glob(os.path.expanduser(text)))]
        folders = [f for f in files if f.is_dir()]
        files = [f for f in files if f.is_file()]
        others: list[Path] = []
        if len(files) > 1 or folders:  # the band files of one scene: leave out what is not a raster
            others = [f for f in files if f.suffix.lower() not in RASTER_SUFFIXES]
            files = [f for f in files if f.suffix.lower() in RASTER_SUFFIXES]
        if not files:
            if folders:
                raise InputNotFoundError(
                    f"pattern {text!r} matches {len(folders)} folder(s) but no raster files",
                    "a quoted pattern is one scene's band files; to name each folder as a scene, "
                    "leave the pattern unquoted so the shell expands it",
                )
            raise InputNotFoundError(
                f"no {'raster ' if others else ''}files match {text!r}",
                "check the pattern (quote it so the shell leaves it alone)",
            )
        if others:
            log.warning(
                "pattern %r: ignoring %d file(s) that are not rasters: %s",
                text,
                len(others),
                _some_names(others),
            )
        if len(files) == 1:
            return ResolvedSource(files[0].name, (str(files[0]),), False)
        files = _band_files(files, f"pattern {text!r}")
        return ResolvedSource(Path(text).parent.name or text, tuple(str(f) for f in files), True)
    raise InputNotFoundError(f"input {text} does not exist", "check the path, or use sample:paris to try deo")
