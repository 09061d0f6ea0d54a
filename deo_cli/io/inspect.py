"""``deo inspect``: what deo sees in a scene, before it computes anything.

For each scene: CRS, size, resolution, bounds (also in WGS84), data type, nodata, the date when
known, every band with the name deo gives it (and where that name came from), its native
resolution, a sampled value range, the unit deo infers, and which band sets and model
manifests the scene satisfies (or which bands are missing). Several inputs (a shell glob)
skip what is not a raster with a warning each (:func:`inspect_scenes`). A STAC item (its JSON, an
ItemCollection, a search) is inspected as the scene its assets make, with the asset that gives
each band and why the others are left out (``stac`` in the report).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

from rasterio.warp import transform_bounds

from deo_cli.errors import InputNotFoundError, RasterReadError
from deo_cli.io.env import is_remote
from deo_cli.io.raster import every_core, open_scene
from deo_cli.io.units import infer_unit, zero_fraction
from deo_cli.sensors import BAND_SETS, MANIFESTS, band_info, match_bands, resolve_bands

log = logging.getLogger(__name__)


def _crs_text(crs) -> str | None:
    if crs is None:
        return None
    epsg = crs.to_epsg()
    return f"EPSG:{epsg}" if epsg else crs.to_string()


def _round(x: float, nd: int = 6) -> float | None:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return None
    return round(float(x), nd)


def inspect_scene(
    source,
    band_names: Sequence[str] | str | None = None,
    nodata: float | None = None,
    max_pixels: int = 256 * 256,
    require: str | Sequence[str] | None = None,
) -> dict:
    """A JSON-ready description of one scene (see the module docstring).

    ``require`` (a band set or band names) raises :class:`BandError` when the scene lacks any.
    """
    from deo_cli.io.stac import StacScene

    stac = source.describe() if isinstance(source, StacScene) else None
    scene = open_scene(source, band_names=band_names, allow_no_crs=True, nodata=nodata)
    if require is not None:
        scene.select(resolve_bands(require))
    with scene:
        scene.set_decode_threads(every_core())  # nothing else runs: decode with every core
        ov = scene.overview(max_pixels=max_pixels)
        bands = []
        for i, src in enumerate(scene.sources):
            vals = ov.data[i][ov.valid]
            g = infer_unit(vals, src.dtype)
            info = band_info(src.name) if src.name else None
            bands.append(
                {
                    "index": i + 1,
                    "name": src.name or None,
                    "named_by": src.named_by,
                    "label": src.label or None,
                    "file": src.path,
                    "band_in_file": src.index,
                    "description": info.description if info else None,
                    "wavelength_nm": info.wavelength_nm if info else None,
                    "resolution": [_round(r, 9) for r in src.grid.res],
                    "dtype": src.dtype,
                    "nodata": src.nodata,
                    "min": _round(g.vmin, 4),
                    "max": _round(g.vmax, 4),
                    "p01": _round(g.p01, 4),
                    "p99": _round(g.p99, 4),
                    "unit": g.unit,
                }
            )
        # the scene's unit: from the non-RGB bands when there are any (RGB may be 0-255 previews)
        rgb = {"B02", "B03", "B04", "red", "green", "blue"}
        pick = [i for i, s in enumerate(scene.sources) if s.name and s.name not in rgb] or list(
            range(len(scene.sources))
        )
        dtypes = {scene.sources[i].dtype for i in pick}
        unit = infer_unit(ov.data[pick][:, ov.valid], dtypes.pop() if len(dtypes) == 1 else None)
        names = [s.name for s in scene.sources]
        sets = {}
        for key, bs in BAND_SETS.items():
            _, missing = match_bands(bs.bands, names)
            sets[key] = {"satisfied": not missing, "missing": missing}
        manifests = {}
        for key, m in MANIFESTS.items():
            _, missing = match_bands(m.bands, names)
            manifests[key] = {"satisfied": not missing, "missing": missing, "unit": m.unit}
        bounds = scene.grid.bounds
        wgs84 = None
        if scene.crs is not None:
            try:
                wgs84 = [
                    _round(v, 7) for v in transform_bounds(scene.crs, "EPSG:4326", *bounds, densify_pts=21)
                ]
            except Exception:  # noqa: BLE001 - a CRS PROJ cannot transform: report it as unknown
                wgs84 = None
        valid_fraction = float(ov.valid.mean()) if ov.valid.size else 0.0
        return {
            "scene": scene.name,
            "paths": list(scene.paths),
            "crs": _crs_text(scene.crs),
            "width": scene.width,
            "height": scene.height,
            "resolution": [_round(r, 9) for r in scene.grid.res],
            "transform": [_round(v, 9) for v in scene.transform[:6]],
            "bounds": [_round(v, 6) for v in bounds],
            "bounds_wgs84": wgs84,
            "datetime": scene.datetime,
            "dtype": sorted({s.dtype for s in scene.sources}),
            "nodata": sorted(
                {s.nodata for s in scene.sources if s.nodata is not None}
                | ({nodata} if nodata is not None else set())
            ),
            "valid_fraction": _round(valid_fraction, 4),
            # valid pixels 0 in every band: nodata nobody marked (--nodata 0)?
            "zero_fraction": _round(zero_fraction(ov.data, ov.valid), 4),
            "unit": {"unit": unit.unit, "label": unit.label, "reason": unit.reason},
            "bands": bands,
            "band_sets": sets,
            "manifests": manifests,
            "value_sample_pixels": int(ov.valid.sum()),
            # a STAC item: its identity and which asset gives which band (or why none)
            "stac": stac,
        }


def inspect_scenes(
    sources: Sequence,
    band_names: Sequence[str] | str | None = None,
    nodata: float | None = None,
    require: str | Sequence[str] | None = None,
) -> list[dict]:
    """One :func:`inspect_scene` report per input.

    With several inputs (typically a shell glob such as ``data/*``, which also matches a
    ``SOURCE.md`` or a folder of notes), an input that exists but is not a raster GDAL can open
    (or a folder holding none) is skipped with one warning line each and the rest are
    inspected; a missing path, a scene that lacks ``require``'s bands, or inputs of which none
    is a raster, are errors. A single input that is not a raster is an error too.
    """
    from deo_cli.io.stac import expand_scenes

    sources = expand_scenes(list(sources))  # a STAC ItemCollection: one scene per item
    if len(sources) <= 1:
        return [inspect_scene(s, band_names=band_names, nodata=nodata, require=require) for s in sources]
    reports, skipped = [], []
    for source in sources:
        try:
            reports.append(inspect_scene(source, band_names=band_names, nodata=nodata, require=require))
        except (RasterReadError, InputNotFoundError) as e:
            if not _local_path(source):
                raise
            why = "not a raster GDAL can open" if isinstance(e, RasterReadError) else e.problem
            log.warning("skipping %s: %s", source, why)
            log.debug("%s: %s", source, e.problem)
            skipped.append(Path(str(source)).name)
    if not reports:
        raise RasterReadError(
            f"none of the {len(sources)} inputs is a raster deo can read ({', '.join(skipped[:5])}"
            f"{', ...' if len(skipped) > 5 else ''})",
            "name GeoTIFF/COG, JPEG2000 or VRT files, or folders of band files",
        )
    return reports


def _local_path(source) -> bool:
    """``source`` names an existing local file or folder (not a sample, URL, glob or list)."""
    text = str(source)
    if text.startswith(("sample:", "@")) or is_remote(text):
        return False
    return Path(text).expanduser().exists()


def write_report(reports: list[dict], path, overwrite: bool = False) -> None:
    """Write inspect reports as JSON, atomically."""
    import json

    from deo_cli.io.atomic import atomic_output

    with atomic_output(path, overwrite=overwrite) as tmp:
        tmp.write_text(json.dumps(reports, indent=2, default=str))
