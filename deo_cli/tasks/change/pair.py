"""Two dates of ``deo detect-change`` on one grid, read in lockstep.

**Two dates on one grid.** The first date's grid is the output grid. The second date is
opened natively first and its footprint compared with the first's in the first date's CRS
(:func:`check_overlap`): scenes that do not overlap fail with one line before any compute.
Then it is read on the first date's grid (:func:`~deo_cli.io.raster.open_scene` with
``grid=``: a GDAL ``WarpedVRT``, ``input.resampling``, bilinear by default), so pairs in
different CRSs or resolutions work; pixels outside the second date are nodata.

**Reading in lockstep.** :class:`PairChipReader` reads each chip of one tile plan from both
dates (each with its own unit conversion and RGB scale, :mod:`deo_cli.infer.prepare`) and
concatenates them along the band axis, so the shared streaming runner
(:func:`~deo_cli.infer.runner.run_dense`) drives both dates as one input. A location is nodata
when either date's footprint there is more than ``tiling.max_nodata_fraction`` nodata.
"""

from __future__ import annotations

import logging
import math

import numpy as np
from rasterio.warp import transform_bounds

from deo_cli.errors import GeoreferenceError, UsageError
from deo_cli.infer.chips import ChipReader, ChipSample
from deo_cli.infer.headfile import head_input_stem
from deo_cli.infer.prepare import InputPlan, open_input, prepare_input
from deo_cli.io.grid import Grid
from deo_cli.io.raster import Scene

log = logging.getLogger(__name__)


def _fmt_bounds(b) -> str:
    return "(" + ", ".join(f"{v:.6g}" for v in b) + ")"


def check_overlap(
    before: Grid, after: Grid, before_name: str = "first date", after_name: str = "second date"
) -> float:
    """The share of ``before``'s footprint that ``after`` covers (footprints compared in
    ``before``'s CRS); :class:`GeoreferenceError` when they do not overlap at all."""
    if before.crs is None or after.crs is None:
        if (before.crs is None) != (after.crs is None):
            raise GeoreferenceError(
                f"only one of {before_name} and {after_name} has a CRS",
                "georeference both scenes, or neither",
            )
        if (before.width, before.height) != (after.width, after.height):
            raise GeoreferenceError(
                f"{before_name} ({before.width}x{before.height}) and {after_name} ({after.width}x{after.height}) "
                "have no CRS and differ in size, so they cannot be put on one grid",
                "georeference them (gdal_edit.py -a_srs -a_ullr)",
            )
        return 1.0
    a = before.bounds
    b = (
        after.bounds
        if after.crs == before.crs
        else transform_bounds(after.crs, before.crs, *after.bounds, densify_pts=21)
    )
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if not (w > 0 and h > 0) or not all(map(math.isfinite, b)):
        crs = before.crs.to_string()
        raise GeoreferenceError(
            f"{before_name} and {after_name} do not overlap: {before_name} covers {_fmt_bounds(a)} and "
            f"{after_name} {_fmt_bounds(b)} in {crs}",
            "pass two scenes of the same place",
        )
    return float(w * h / ((a[2] - a[0]) * (a[3] - a[1])))


def open_dates(before, after, inp) -> tuple[Scene, Scene, dict]:
    """Both dates, the second on the first's grid (after the overlap check). A date may be an
    open :class:`~deo_cli.io.raster.Scene` (an array's, :mod:`deo_cli.io.arrays`); a second
    date given so must already be on the first's grid."""
    first = before if isinstance(before, Scene) else open_input(before, inp)  # the output grid
    native = after if isinstance(after, Scene) else open_input(after, inp, crop=False)
    share = check_overlap(first.grid, native.grid, f"BEFORE {first.name}", f"AFTER {native.name}")
    native.close()
    same = native.grid.same_as(first.grid)
    if share < 0.999:
        log.warning("%s covers %.0f%% of %s; the rest is nodata", native.name, 100 * share, first.name)
    if isinstance(after, Scene) and not same:
        raise GeoreferenceError(
            f"AFTER {native.name} is not on the grid of BEFORE {first.name}",
            "put it there first (after.rio.reproject_match(before))",
        )
    second = native if isinstance(after, Scene) else open_input(after, inp, grid=first.grid)
    info = {
        "after_resampled": not same,
        "after_native_crs": native.grid.crs.to_string() if native.grid.crs is not None else None,
        "overlap_fraction": round(share, 6),
        "resampling": inp.resampling,
    }
    if not same:
        log.info("%s resampled onto the grid of %s (%s)", native.name, first.name, inp.resampling)
    return first, second, info


def prepare_dates(
    before: Scene, after: Scene, manifest, rgb_manifest, inp, head=None
) -> tuple[InputPlan, InputPlan]:
    """Each date's input plan (same stem required); with a trained ``head``, the stem it was
    trained on (:func:`~deo_cli.infer.headfile.head_input_stem`: dates without its bands are
    refused)."""
    with before, after:
        stems = [head_input_stem(head, s) if head is not None else "auto" for s in (before, after)]
        a = prepare_input(before, manifest, rgb_manifest, inp.unit, inp.rgb_max, stem=stems[0])
        b = prepare_input(after, manifest, rgb_manifest, inp.unit, inp.rgb_max, stem=stems[1])
    if a.stem != b.stem:
        raise UsageError(
            f"the first date has {'all multispectral bands' if a.stem == 'ms' else 'only RGB'} but the second "
            f"{'all multispectral bands' if b.stem == 'ms' else 'only RGB'}",
            "give both dates the same bands",
        )
    return a, b


class PairChipReader:
    """Reads each chip from both dates and stacks them: ``x`` is ``(2 * bands, C, C)``.

    The invalid fraction of a location is the larger of the two dates' (a location is nodata
    when either date is). A chip is empty when either date has no valid pixel in it.
    """

    def __init__(self, before: ChipReader, after: ChipReader):
        if before.plan != after.plan:
            raise ValueError("both dates must use one tile plan")
        self.before = before
        self.after = after
        self.plan = before.plan

    def set_decode_threads(self, threads: int) -> None:
        self.before.set_decode_threads(threads)
        self.after.set_decode_threads(threads)

    def read(self, chip) -> ChipSample:
        a = self.before.read(chip)
        b = self.after.read(chip)
        invalid = np.maximum(a.invalid, b.invalid)
        if a.empty or b.empty:
            shape = (a.x.shape[0] + b.x.shape[0], *a.x.shape[1:])
            return ChipSample(chip, np.zeros(shape, np.float32), invalid, 0.0, True)
        x = np.concatenate([a.x, b.x], axis=0)
        return ChipSample(chip, x, invalid, min(a.valid_fraction, b.valid_fraction), False)


__all__ = [
    "PairChipReader",
    "check_overlap",
    "open_dates",
]
