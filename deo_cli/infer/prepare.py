"""From a scene and a model to what the chips need: bands, stem, unit, normalisation.

One decision per scene, logged and written into the output's tags (units and statistics are where users of EO tools most often go wrong):

1. **Bands and stem.** The model's multispectral manifest is selected by band name. If the
   scene lacks some of those bands but has red, green and blue, the RGB stem is used
   (``rgb_manifest``) and the log says so; otherwise a :class:`~deo_cli.errors.BandError` lists
   the missing bands.
2. **Unit.** Inferred from a decimated read of the bands the manifest does not max-scale
   (:func:`~deo_cli.io.units.infer_unit`), or stated with ``--unit``. Reflectance 0-1 is
   converted to DN (x 10^4) for a DN model; 0-255 data is refused with one line; a unit deo
   cannot tell is refused with a hint to pass ``--unit``.
3. **RGB scale.** Max-scaled bands (DEO's RGB, docs/method.md §2.3) are divided by one scene-level
   value (:func:`~deo_cli.data.normalize.scene_rgb_max`, or ``input.rgb_max``), never per chip,
   so neighbouring chips agree.
4. **Undeclared nodata.** Pixels that are 0 in every band although no nodata value marks them
   (Sentinel-2 products outside the swath, mosaics padded with 0) would reach the model as
   data; when they are at least :data:`~deo_cli.io.units.ZERO_WARN_FRACTION` of the sample the log says so and
   suggests ``--nodata 0`` (a warning, not a guess: deo does not change the mask by itself).

Statistics come from about 512 x 512 pixels (:func:`sample_pixels`): the scene decimated when
it is small or has overviews, else a grid of small windows.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from deo_cli.data.normalize import Normalizer, scene_rgb_max
from deo_cli.errors import BandError, DataError, UnitError
from deo_cli.io.raster import Scene, every_core, open_scene
from deo_cli.io.units import ZERO_WARN_FRACTION, UnitGuess, conversion_factor, infer_unit, zero_fraction
from deo_cli.sensors import UNITS, BandManifest

log = logging.getLogger(__name__)

#: Pixels read (decimated) to infer the unit and the RGB scale.
STATS_PIXELS = 512 * 512


@dataclass(frozen=True)
class InputPlan:
    """How one scene is fed to one model."""

    bands: tuple[str, ...]  # manifest band names, read from the scene by name
    scene_bands: tuple[str, ...]  # the scene's names for them (B04 for red, ...)
    stem: str  # "ms" or "rgb"
    manifest: BandManifest
    normalizer: Normalizer
    unit: str  # the scene's unit (inferred or stated)
    unit_reason: str
    unit_factor: float
    rgb_max: float | None

    def describe(self) -> dict:
        return {
            "stem": self.stem,
            "input_bands": list(self.scene_bands),
            "unit": self.unit,
            "unit_reason": self.unit_reason,
            "unit_factor": self.unit_factor,
            "rgb_max": self.rgb_max,
            **self.normalizer.to_dict(),
        }


def open_input(source, i, grid=None, crop: bool = True) -> Scene:
    """Open ``source`` as the recipe's ``input`` section ``i`` says (band names, CRS rule, extra
    nodata, resampling; onto ``grid`` when given, else cut to ``i.bounds`` when set and ``crop``)."""
    scene = open_scene(
        source,
        band_names=i.band_names,
        grid=grid,
        allow_no_crs=i.allow_no_crs,
        nodata=i.nodata,
        resampling=i.resampling,
    )
    if not (i.bounds and crop and grid is None):
        return scene
    with scene:  # the whole scene's handles are not needed after the cut
        return scene.cropped(i.bounds, i.bounds_crs)


def _has_overviews(scene) -> bool:
    if hasattr(scene, "has_overviews"):  # a scene over an array (io/arrays.py)
        return scene.has_overviews()
    import rasterio

    from deo_cli.io.env import gdal_path

    try:
        with rasterio.open(gdal_path(scene.sources[0].path)) as ds:
            return bool(ds.overviews(scene.sources[0].index))
    except rasterio.errors.RasterioIOError:
        return False


def sample_pixels(scene, bands, max_pixels: int = STATS_PIXELS, windows: int = 8):
    """About ``max_pixels`` pixels of ``bands`` for statistics, as a (bands, rows, cols) sample.

    Scenes of at most ``max_pixels``: every pixel. Larger scenes with overviews: the scene
    decimated (:meth:`~deo_cli.io.raster.Scene.overview`). Larger scenes without overviews: a
    regular ``windows`` x ``windows`` grid of small windows, so only the tiles under them are
    decoded (a decimated read decodes every tile of the file). Nothing else runs meanwhile, so
    GDAL decodes with every core (a 4k x 4k DEFLATE scene: 0.66-0.78 -> 0.47 s).
    """
    if scene.width * scene.height <= max_pixels:
        return scene.read(bands)  # small: every pixel, in one read
    with scene.decoding(every_core()):
        if _has_overviews(scene):
            return scene.overview(bands, max_pixels=max_pixels)
        return _window_grid(scene, bands, max_pixels, windows)


def _window_grid(scene, bands, max_pixels: int, windows: int):
    """See :func:`sample_pixels`."""
    from rasterio.windows import Window

    side = max(8, int(np.sqrt(max_pixels / windows**2)))
    side_y, side_x = min(side, scene.height), min(side, scene.width)
    parts = []
    for gy in range(windows):
        y = int((gy + 0.5) * scene.height / windows - side_y / 2)
        y = min(max(0, y), scene.height - side_y)
        for gx in range(windows):
            x = int((gx + 0.5) * scene.width / windows - side_x / 2)
            x = min(max(0, x), scene.width - side_x)
            parts.append(scene.read(bands, Window(x, y, side_x, side_y)))
    first = parts[0]
    return type(first)(
        data=np.concatenate([p.data for p in parts], axis=2),
        valid=np.concatenate([p.valid for p in parts], axis=1),
        transform=first.transform,
        crs=first.crs,
        band_names=first.band_names,
        window=first.window,
    )


def choose_stem(
    scene, manifest: BandManifest, rgb_manifest: BandManifest | None, stem: str = "auto"
) -> tuple[str, BandManifest]:
    """``("ms", manifest)`` when the scene has every band, else ``("rgb", rgb_manifest)`` when it
    has red/green/blue and the model an RGB stem; else the :class:`BandError` of the MS bands.

    ``stem`` ``"ms"`` or ``"rgb"`` takes that stem (a trained head must see the input it was
    trained on; :func:`deo_cli.infer.headfile.head_input_stem` checks the bands first)."""
    if stem == "ms":
        scene.select(manifest.bands)
        return "ms", manifest
    if stem == "rgb" and rgb_manifest is not None:
        scene.select(rgb_manifest.bands)
        if len(scene.sources) > 3:
            log.info(
                "scene %s: using its %s through the RGB stem (the head was trained on RGB)",
                scene.name,
                ", ".join(rgb_manifest.bands),
            )
        return "rgb", rgb_manifest
    try:
        scene.select(manifest.bands)
        return "ms", manifest
    except BandError as err:
        if rgb_manifest is None:
            raise
        try:
            scene.select(rgb_manifest.bands)
        except BandError:
            raise err from None
        names = [s.name for s in scene.sources]
        missing = [b for b in manifest.bands if b not in names]
        msg = "scene %s lacks %s: using the model's RGB stem (%s)"
        args = (scene.name, ", ".join(missing), ", ".join(rgb_manifest.bands))
        if len(scene.sources) > 3:  # the user may have expected the multispectral stem
            log.warning(msg, *args)
        else:
            log.info(msg, *args)
        return "rgb", rgb_manifest


def prepare_input(
    scene,
    manifest: BandManifest,
    rgb_manifest: BandManifest | None = None,
    unit: str = "auto",
    rgb_max: float | None = None,
    stem: str = "auto",
) -> InputPlan:
    """Decide stem, unit conversion and normalisation for ``scene`` (see the module docstring);
    ``stem``: see :func:`choose_stem`."""
    stem, man = choose_stem(scene, manifest, rgb_manifest, stem)
    idx = scene.select(man.bands)
    scene_bands = tuple(scene.sources[i].name for i in idx)
    ov = sample_pixels(scene, man.bands)
    if not ov.valid.any():
        raise DataError(
            f"scene {scene.name} has no valid pixels", "check its nodata value and mask (--nodata)"
        )
    zero = zero_fraction(ov.data, ov.valid)
    if zero >= ZERO_WARN_FRACTION:
        log.warning(
            "scene %s: %.0f %% of its sampled pixels are 0 in every band but not marked nodata; "
            "if they lie outside the image (e.g. beyond the swath), pass --nodata 0",
            scene.name,
            100 * zero,
        )
    plain = [i for i, b in enumerate(man.bands) if b not in man.max_scaled]
    factor = 1.0
    if unit and unit != "auto":
        found = UnitGuess(unit, "stated with --unit", np.nan, np.nan, np.nan, np.nan)
    elif plain:
        dtypes = {scene.sources[idx[i]].dtype for i in plain}
        found = infer_unit(ov.data[plain][:, ov.valid], dtypes.pop() if len(dtypes) == 1 else None)
    else:
        found = UnitGuess("any", "every band is scaled per scene", np.nan, np.nan, np.nan, np.nan)
    if man.unit != "any" and plain:
        if found.unit == "unknown":
            raise UnitError(
                f"cannot tell the unit of scene {scene.name} (values {found.vmin:g} to {found.vmax:g}; "
                f"{man.name} expects {UNITS[man.unit]})",
                "pass --unit dn or --unit reflectance",
            )
        factor = conversion_factor(found.unit, man.unit, what=f"scene {scene.name}")
        if factor != 1.0:
            log.info(
                "scene %s is %s (%s): multiplying by %g to get %s",
                scene.name,
                UNITS[found.unit],
                found.reason,
                factor,
                UNITS[man.unit],
            )
    scale = None
    if man.max_scaled:
        if rgb_max is not None:
            scale = float(rgb_max)
        else:
            pos = [i for i, b in enumerate(man.bands) if b in man.max_scaled]
            scale = scene_rgb_max(ov.data[pos], ov.valid)
        log.debug("scene %s: RGB scale %g", scene.name, scale)
    normalizer = Normalizer.from_manifest(man, unit_factor=factor, rgb_max=scale)
    return InputPlan(
        tuple(man.bands), scene_bands, stem, man, normalizer, found.unit, found.reason, factor, scale
    )
