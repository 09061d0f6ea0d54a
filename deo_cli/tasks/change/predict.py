"""``deo detect-change``: change scores, masks and polygons from two dates of DEO features.

:func:`run_detect_change` is what the command line calls (a notebook can too)::

    result = run_detect_change("before.tif", "after.tif", "change.tif", ChangeRecipe())

The two dates are put on one grid and read in lockstep (:mod:`deo_cli.tasks.change.pair`); the
score is zero-shot, a trained head's or CVA's (:mod:`deo_cli.tasks.change.model`,
:mod:`deo_cli.tasks.change.cva`), streamed by :mod:`deo_cli.tasks.change.score`.

**Threshold** (:mod:`deo_cli.tasks.change.threshold`): a rule on the valid scores' histogram
(``--threshold-method``: the 99.25th percentile by default for zero-shot and CVA scores; Otsu,
Otsu on the log score, Kittler-Illingworth, triangle, median + k MAD), ``--threshold`` or
``--percentile``; with a head, the threshold stored in the head
file (:func:`~deo_cli.tasks.change.train.transfer_threshold`: the F1-best threshold on its
validation chips, pulled toward 0.5 by ``threshold_shrink``, fully by default).
``score > threshold`` is change.

**Outputs** (each written atomically, none left behind on failure):

- score COG (``-o``): float32, NaN nodata, average overviews, band ``change_score``;
- mask COG (``--mask``, default ``<stem>_mask.tif``): uint8, 1 change, 0 no change, 255
  nodata, colour table (change red, no change black, nodata transparent), mode overviews;
- ``--polygons``: GeoParquet/GPKG of the mask's 8-connected change regions in the source CRS
  with ``area`` (CRS units²), ``pixels``, ``score_mean``, ``score_max``; ``--min-area`` drops
  small ones; metadata in the file (key ``deo``);
- ``--preview``: before | after | after with the change in red;
- ``<stem>.recipe.yaml``: the resolved recipe.

Tags on both COGs: mode (zero-shot/supervised), score definition, layers, stride, model,
weights and checksum, head, both dates' sources, band manifest, normalisation of each date,
tiling, threshold (value, method), recipe hash, deo version.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import rasterio
from rasterio.windows import Window
from torch import nn

from deo_cli import __version__
from deo_cli.errors import DataError, UsageError
from deo_cli.infer.chips import ChipReader
from deo_cli.infer.dense import CogSink, aligned_plan, gdal_tags, with_used_overlap
from deo_cli.infer.headfile import head_manifests, load_head
from deo_cli.infer.runner import block_rows_for, run_dense, stream_options
from deo_cli.infer.tiling import check_chip_memory, resolve_overlap
from deo_cli.io.atomic import check_output, outputs_locked
from deo_cli.io.grid import Grid
from deo_cli.io.raster import Scene
from deo_cli.io.writers import RasterLayout
from deo_cli.progress import NullProgress, Progress
from deo_cli.recipes import ChangeRecipe, recipe_hash, recipe_path_for, save_recipe
from deo_cli.runtime import resolve_runtime
from deo_cli.tasks.change.cva import CVA_CHIP, CvaChange, same_scale
from deo_cli.tasks.change.model import (
    MASK_COLORMAP,
    MASK_NODATA,
    build_change_model,
    build_zero_shot_model,
    parse_layers,
)
from deo_cli.tasks.change.pair import PairChipReader, open_dates, prepare_dates
from deo_cli.tasks.change.score import ScoreSink
from deo_cli.tasks.change.threshold import (
    DEFAULT_METHOD,
    ScoreHistogram,
    Threshold,
    choose_threshold,
    implausible,
)

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Masks and polygons
# ---------------------------------------------------------------------------------------------


def write_mask(score_path: Path, mask: CogSink, threshold: float, finish: bool = True) -> tuple[int, int]:
    """Threshold the score COG block by block into ``mask``; returns (changed, valid) pixels.
    ``finish=False`` leaves ``mask.finish()`` to the caller (to tag it with the counts first)."""
    changed = valid_n = 0
    with rasterio.open(score_path) as ds:
        for r0 in range(0, ds.height, mask.block_rows):
            k = min(mask.block_rows, ds.height - r0)
            s = ds.read(1, window=Window(0, r0, ds.width, k))
            ok = np.isfinite(s)
            m = np.where(ok, (s > threshold).astype(np.float32), float(MASK_NODATA))
            changed += int((m == 1).sum())
            valid_n += int(ok.sum())
            mask.write_rows(r0, m[None].astype(np.float32))
    if finish:
        mask.finish()
    return changed, valid_n


def write_polygons(
    mask_path: Path,
    score_path: Path,
    out: Path,
    min_area: float,
    simplify: float,
    overwrite: bool,
    metadata: dict,
    min_pixels: int = 0,
    stride: int = 1,
) -> int:
    """Vectorise the mask's change pixels (whole mask in memory; it is one byte per pixel);
    regions of less than ``min_area`` (CRS units²) or covering fewer than ``min_pixels`` input
    pixels (a mask pixel on a stride-``stride`` grid covers ``stride²``) are dropped.

    Why ``min_pixels`` 2 by default (``ChangeRecipe.min_pixels``): on the four OSCD cities
    (``benchmarks/results/oscd_thresholds.json``, ``speckle``), 24-30 % of the CVA mask's
    regions were single 10 m pixels and 0-3 % of those touched a changed pixel, against 12-17 %
    of the larger regions; dropping them did not lower the pixel F1. Single 40 m cells of the
    zero-shot mask (about half its regions) touched change as often as larger regions (12-22 %
    against 0-37 %), so a stride-4 mask pixel (16 input pixels) is kept."""
    from deo_cli.io.vector import polygonize, write_vectors

    with rasterio.open(mask_path) as m, rasterio.open(score_path) as s:
        mask = m.read(1)
        score = s.read(1)
        grid = Grid(m.crs, m.transform, m.width, m.height)
    gdf = polygonize(
        mask == 1,
        grid,
        score=score,
        min_area=min_area,
        simplify=simplify,
        valid=mask != MASK_NODATA,
        min_pixels=-(-int(min_pixels) // (stride * stride)),  # input pixels -> mask pixels
    )
    write_vectors(gdf, out, overwrite=overwrite, metadata=metadata)
    return len(gdf)


# ---------------------------------------------------------------------------------------------
# detect-change
# ---------------------------------------------------------------------------------------------


@dataclass
class ChangeResult:
    before: str
    after: str
    output: Path
    mask: Path
    mode: str
    threshold: Threshold
    changed_fraction: float
    crs: str | None
    grid: tuple[int, int]
    resolution: tuple[float, float]
    polygons: Path | None = None
    polygon_count: int | None = None
    preview: Path | None = None
    recipe: Path | None = None
    seconds: float = 0.0
    chips: int = 0
    extra: dict = field(default_factory=dict)


def default_mask_path(output: Path) -> Path:
    return output.with_name(f"{output.stem}_mask{output.suffix or '.tif'}")


def _crs_text(crs) -> str | None:
    if crs is None:
        return None
    epsg = crs.to_epsg()
    return f"EPSG:{epsg}" if epsg else crs.to_string()


def _threshold_method(recipe: ChangeRecipe, supervised: bool) -> str:
    """The rule: ``auto`` is ``fixed`` with a --threshold, ``percentile`` with a --percentile,
    the head's threshold when supervised, else
    :data:`~deo_cli.tasks.change.threshold.DEFAULT_METHOD`."""
    m = recipe.threshold_method
    if recipe.threshold is not None and recipe.percentile is not None:
        raise UsageError("--threshold and --percentile both given", "pass one of them")
    if m == "auto":
        if recipe.threshold is not None:
            return "fixed"
        if recipe.percentile is not None:
            return "percentile"
        return "head" if supervised else DEFAULT_METHOD
    if m == "fixed" and recipe.threshold is None:
        raise UsageError("--threshold-method fixed needs a value", "pass --threshold VALUE")
    return m


def _change_mode(recipe: ChangeRecipe, head) -> str:
    """``supervised`` (a --head), ``cva`` or ``zero-shot`` (--method)."""
    if head is None:
        return recipe.method
    if recipe.method == "cva":
        raise UsageError("--method cva takes no --head", "drop --head, or --method cva")
    return "supervised"


def _check_zero_shot_settings(recipe: ChangeRecipe, spec) -> None:
    """A bad --layer, an impossible chip size or overlap fail before the weights load
    (aligned_plan checks them again)."""
    parse_layers(spec, recipe.layer)
    align, chip = max(spec.feature_strides), recipe.tiling.chip_size or spec.input_size
    check_chip_memory(chip, recipe.runtime.batch_size, 2 * len(spec.manifest.bands), align, spec.input_size)
    resolve_overlap(chip, align, recipe.tiling.overlap)


def _score_model(mode: str, recipe: ChangeRecipe, hf, encoder, weights) -> tuple[nn.Module, dict, dict]:
    """The score model, what it is (model name, weights) and its score's description."""
    from deo_cli.models import get_model_spec

    if mode == "supervised":
        model, enc = build_change_model(hf, weights)
        describe = {
            "score": "P(change): softmax of the siamese head's blended logits",
            "fusion": hf.head.get("fusion"),
            "stride": 1,
        }
    elif mode == "cva":
        spec = encoder.spec if encoder is not None else get_model_spec(recipe.model.name)
        model = CvaChange(spec, recipe.tiling.chip_size or CVA_CHIP)
        return (
            model,
            {"name": f"cva (bands of {spec.name})", "weights": "none", "sha256": None},
            model.describe(),
        )
    else:
        model = build_zero_shot_model(recipe, encoder)
        enc, describe = model.encoder, model.describe()
    who = {"name": enc.name, "weights": enc.weights_uri or "random", "sha256": enc.weights_sha256}
    return model, who, describe


def date_record(scene: Scene) -> dict:
    """A date's scene, files and acquisition time with where it came from (None: unknown, e.g.
    old-style Sentinel-2 tile names, whose time is the processing time;
    :mod:`deo_cli.io.scenedate`)."""
    from deo_cli.io.scenedate import acquisition_time

    source = "STAC item" if scene.stac else acquisition_time(scene.paths, scene.tags)[1]
    return {
        "scene": scene.name,
        "paths": list(scene.paths),
        "datetime": scene.datetime,
        "datetime_source": source,
    }


def _choose(hist: ScoreHistogram, method: str, recipe: ChangeRecipe, hf) -> Threshold:
    if method == "head":
        return Threshold(float(hf.threshold if hf.threshold is not None else 0.5), "head")
    return choose_threshold(hist, method, recipe.threshold, recipe.percentile, recipe.mad_k)


def flag_summary(thr: Threshold, changed: int, valid: int) -> dict:
    """What the mask's ``deo_threshold`` tag holds: the rule, the threshold, the flagged share
    and, where implausible for the rule, the warning
    (:func:`~deo_cli.tasks.change.threshold.implausible`)."""
    fraction = changed / valid if valid else float("nan")
    return {
        **thr.describe(),
        "flagged_pixels": int(changed),
        "valid_pixels": int(valid),
        "flagged_fraction": fraction,
        "warning": implausible(thr, fraction),
    }


def run_detect_change(
    before: str,
    after: str,
    output: str | os.PathLike,
    recipe: ChangeRecipe,
    *,
    head: str | os.PathLike | None = None,
    mask: str | os.PathLike | None = None,
    polygons: str | os.PathLike | None = None,
    preview: str | os.PathLike | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
    encoder=None,
    weights: str | None = None,
) -> ChangeResult:
    """Score, threshold and (optionally) vectorise the change from ``before`` to ``after``.

    ``head``: a change head file (supervised); default zero-shot. ``encoder``: a ready encoder
    for zero-shot (tests, notebooks). Raises :class:`~deo_cli.errors.DeoError` for user mistakes,
    before any model is loaded when the inputs or outputs are wrong. The score and mask COGs
    are locked for the run (a second run on them stops with one line naming the first).
    """
    from deo_cli.infer.outputs import check_output_suffix

    output = Path(output)
    mask_path = Path(mask) if mask is not None else default_mask_path(output)
    check_output_suffix(output, "cog", "-o")
    check_output_suffix(mask_path, "cog", "--mask")
    if mask_path.resolve() == output.resolve():
        raise UsageError("--mask and -o name the same file", "choose another --mask")
    sides = (polygons, preview, recipe_path_for(output))
    with outputs_locked([output, mask_path], sides):
        return _detect_change(
            before,
            after,
            output,
            recipe,
            head=head,
            mask=mask_path,
            polygons=polygons,
            preview=preview,
            overwrite=overwrite,
            progress=progress,
            encoder=encoder,
            weights=weights,
        )


def _detect_change(
    before: str,
    after: str,
    output: Path,
    recipe: ChangeRecipe,
    *,
    head,
    mask: Path,
    polygons,
    preview,
    overwrite: bool,
    progress: Progress | None,
    encoder,
    weights: str | None,
) -> ChangeResult:
    t0 = time.perf_counter()
    progress = progress or NullProgress()
    output = Path(output)
    mask_path = Path(mask) if mask is not None else default_mask_path(output)
    poly_path = Path(polygons) if polygons is not None else None
    preview = Path(preview) if preview is not None else None
    # -- checks before any compute ---------------------------------------------------------
    rpath = _check_change_outputs(output, mask_path, poly_path, preview, overwrite)
    mode = _change_mode(recipe, head)
    supervised = mode == "supervised"
    method = _threshold_method(recipe, supervised)
    hf = load_head(head, "change") if supervised else None
    first, second, pair_info, inp_a, inp_b = _change_dates(before, after, recipe, mode, hf, encoder)

    # -- model -------------------------------------------------------------------------------
    model, who, describe = _score_model(mode, recipe, hf, encoder, weights)
    rt = resolve_runtime(recipe.runtime)
    model = model.to(rt.device)
    log.info("%s change with %s on %s, %s", mode, who["name"], rt.device, rt.precision_name)

    plan, recipe, out_grid, reader = _change_plan(mode, recipe, hf, model, rt, first, second, inp_a, inp_b)
    t = recipe.tiling
    meta = _change_metadata(mode, describe, who, hf, inp_a, inp_b, pair_info, plan, recipe, first, second)
    block_rows = block_rows_for(16)
    score_sink = _score_sink(output, out_grid, meta, recipe, block_rows, overwrite, supervised, model)
    written: list[Path] = []
    try:
        with first, second:
            stats = run_dense(
                reader,
                model,
                score_sink,
                **stream_options(t, rt, progress, f"change {first.name} -> {second.name}"),
            )
        score_sink.cog.finish()
        written.append(output)
        hist = score_sink.hist
        if hist.total == 0:
            raise DataError(
                "the two dates share no valid pixel",
                "check their nodata values and that they show the same place",
            )
        thr = _choose(hist, method, recipe, hf)
        changed, valid_n, flags, mask_meta = _write_change_mask(
            output, mask_path, out_grid, meta, thr, recipe, block_rows, overwrite
        )
        written.append(mask_path)
        res = ChangeResult(
            before=str(before),
            after=str(after),
            output=output,
            mask=mask_path,
            mode=mode,
            threshold=thr,
            changed_fraction=changed / max(valid_n, 1),
            crs=_crs_text(out_grid.crs),
            grid=(out_grid.width, out_grid.height),
            resolution=out_grid.res,
            chips=stats.chips,
            extra={"pair": pair_info, "stride": model.stride, "warning": flags["warning"]},
        )
        if poly_path is not None:
            res.polygon_count = _write_change_polygons(
                mask_path, output, poly_path, mask_meta, recipe, overwrite, model.stride
            )
            res.polygons = poly_path
            written.append(poly_path)
        if preview is not None:
            from deo_cli.infer.mappreview import write_change_preview

            with first, second:
                res.preview = write_change_preview(first, second, mask_path, preview, overwrite=overwrite)
            written.append(preview)
        res.recipe = save_recipe(recipe, rpath, "detect-change")
    except BaseException:
        score_sink.cog.abort()
        for p in written:  # all or nothing: a failed run leaves no partial set of outputs
            p.unlink(missing_ok=True)
        raise
    res.seconds = time.perf_counter() - t0
    return res


def _check_change_outputs(
    output: Path, mask_path: Path, poly_path: Path | None, preview: Path | None, overwrite: bool
) -> Path:
    """Every output may be written (polygons in a format that keeps the source CRS, a PNG
    preview) before anything is read; returns the recipe's path beside ``output``."""
    if poly_path is not None:
        from deo_cli.io.vector import vector_format

        if vector_format(poly_path) not in ("parquet", "GPKG", "FlatGeobuf"):
            raise UsageError(
                f"--polygons {poly_path.name}: polygons are written in the source CRS",
                "write .parquet (GeoParquet) or .gpkg",
            )
    if preview is not None and preview.suffix.lower() not in (".png", ""):
        raise UsageError(f"--preview {preview.name} must be a .png file", "name it e.g. preview.png")
    rpath = recipe_path_for(output)
    for p in (output, mask_path, poly_path, preview, rpath):
        if p is not None:
            check_output(p, overwrite)
    return rpath


def _change_dates(before, after, recipe: ChangeRecipe, mode: str, hf, encoder):
    """Both dates on the first's grid and their input plans, for the manifests of the head, the
    encoder or the recipe's model (a zero-shot run's settings are checked first); CVA scales the
    second date's RGB like the first's."""
    from deo_cli.models import get_model_spec

    if hf is not None:
        manifests = head_manifests(hf)
    elif encoder is not None:
        manifests = (encoder.manifest, encoder.rgb_manifest if encoder.has_rgb_stem else None)
    else:
        spec = get_model_spec(recipe.model.name)
        if mode == "zero-shot":
            _check_zero_shot_settings(recipe, spec)
        manifests = (spec.manifest, spec.rgb_manifest)
    first, second, pair_info = open_dates(before, after, recipe.input)
    inp_a, inp_b = prepare_dates(first, second, *manifests, recipe.input, head=hf)
    if mode == "cva":
        inp_b = same_scale(inp_a, inp_b)
    return first, second, pair_info, inp_a, inp_b


def _change_plan(mode: str, recipe: ChangeRecipe, hf, model, rt, first, second, inp_a, inp_b):
    """The tile plan on the first date's grid (chips of the head's size with a head, no overlap
    for CVA unless asked), the recipe with the overlap used, the output grid and the pair reader."""
    t = recipe.tiling
    chip = t.chip_size or (hf.chip_size if hf is not None else model.input_size)
    check_chip_memory(chip, rt.batch_size, len(inp_a.bands) + len(inp_b.bands), model.align, model.input_size)
    overlap = 0 if mode == "cva" and t.overlap is None else t.overlap  # per pixel: no overlap needed
    plan = aligned_plan(first.height, first.width, chip, model.stride, model.align, overlap)
    recipe = with_used_overlap(recipe, plan)
    out_grid = first.grid.scaled(model.stride) if model.stride > 1 else first.grid
    reader = PairChipReader(
        ChipReader(first, inp_a.bands, inp_a.normalizer, plan),
        ChipReader(second, inp_b.bands, inp_b.normalizer, plan),
    )
    return plan, recipe, out_grid, reader


def _change_metadata(
    mode: str, describe: dict, who: dict, hf, inp_a, inp_b, pair_info: dict, plan, recipe, first, second
) -> dict:
    """The provenance both COGs carry (the mask adds its threshold)."""
    t = recipe.tiling
    return {
        "deo_version": __version__,
        "deo_change_mode": mode,
        "deo_change_score": describe,
        "deo_model": who["name"],
        "deo_weights": who["weights"],
        "deo_weights_sha256": who["sha256"],
        "deo_head": hf.describe() if hf is not None else None,
        "deo_band_manifest": inp_a.manifest.to_dict(),
        "deo_normalization": {"before": inp_a.describe(), "after": inp_b.describe()},
        "deo_pair": pair_info,
        "deo_tiling": {**plan.describe(), "blend": t.blend, "max_nodata_fraction": t.max_nodata_fraction},
        "deo_recipe_hash": recipe_hash(recipe),
        "deo_before": date_record(first),
        "deo_after": date_record(second),
    }


def _score_sink(
    output: Path, out_grid, meta: dict, recipe, block_rows: int, overwrite: bool, supervised, model
):
    """The score COG's sink (float32, NaN nodata, average overviews) and the histogram beside it."""
    score_layout = RasterLayout(
        count=1,
        dtype="float32",
        descriptions=("change_score",),
        tags=gdal_tags(meta),
        compress=recipe.compress,
        resampling="average",
    )
    return ScoreSink(
        CogSink(output, out_grid, score_layout, block_rows, None, overwrite),
        supervised,
        getattr(model, "score_range", None),
    )


def _write_change_mask(
    output: Path,
    mask_path: Path,
    out_grid,
    meta: dict,
    thr: Threshold,
    recipe,
    block_rows: int,
    overwrite: bool,
) -> tuple[int, int, dict, dict]:
    """Threshold the finished score COG into the mask COG, tagged with the rule, the threshold and
    the flagged share (:func:`flag_summary`); returns (changed, valid) pixels, that summary and the
    mask's metadata."""
    mask_meta = {
        **meta,
        "deo_threshold": thr.describe(),
        "deo_values": {"0": "no change", "1": "change", "255": "nodata"},
    }
    mask_layout = RasterLayout(
        count=1,
        dtype="uint8",
        nodata=MASK_NODATA,
        descriptions=("change",),
        tags=gdal_tags(mask_meta),
        compress=recipe.compress,
        resampling="mode",
    )
    mask_sink = CogSink(mask_path, out_grid, mask_layout, block_rows, MASK_COLORMAP, overwrite)
    try:
        changed, valid_n = write_mask(output, mask_sink, thr.value, finish=False)
        flags = flag_summary(thr, changed, valid_n)
        mask_meta["deo_threshold"] = flags
        mask_sink.layout = replace(mask_layout, tags=gdal_tags(mask_meta))
        mask_sink.finish()
    except BaseException:
        mask_sink.abort()
        raise
    log.info(
        "threshold %.6g (%s): %.2f%% of %d valid locations flagged",
        thr.value,
        thr.rule,
        100.0 * changed / max(valid_n, 1),
        valid_n,
    )
    if flags["warning"]:
        log.warning("%s", flags["warning"])
    return changed, valid_n, flags, mask_meta


def _write_change_polygons(
    mask_path: Path, output: Path, poly_path: Path, mask_meta: dict, recipe, overwrite: bool, stride: int
) -> int:
    """The mask's change regions as polygons (:func:`write_polygons`), with the mask's provenance."""
    vmeta = {
        k: v
        for k, v in mask_meta.items()
        if k
        in (
            "deo_version",
            "deo_change_mode",
            "deo_change_score",
            "deo_model",
            "deo_weights",
            "deo_before",
            "deo_after",
            "deo_threshold",
            "deo_recipe_hash",
        )
    }
    vmeta["deo_min_area"] = recipe.min_area
    vmeta["deo_min_pixels"] = recipe.min_pixels
    return write_polygons(
        mask_path,
        output,
        poly_path,
        recipe.min_area,
        recipe.simplify,
        overwrite,
        vmeta,
        recipe.min_pixels,
        stride,
    )


def summary_line(r: ChangeResult) -> str:
    """The command's summary: outputs, mode, grid, the rule and threshold, the flagged share
    (``implausible`` when :func:`~deo_cli.tasks.change.threshold.implausible` warned), polygons,
    time."""
    w, h = r.grid
    polys = f"  {r.polygon_count} polygons -> {r.polygons}" if r.polygons is not None else ""
    t = r.threshold
    rule = t.method if t.method == "fixed" else f"{t.method}: {t.rule}"
    mark = " (implausible, see the warning)" if r.extra.get("warning") else ""
    if t.method == "percentile":
        mark = " (by construction)" + mark
    return (
        f"{r.output} + {r.mask}  {r.mode}  {r.crs or 'no CRS'}  {w}x{h} px @ {r.resolution[0]:.6g}  "
        f"threshold {r.threshold.value:.4g} ({rule})  "
        f"{100 * r.changed_fraction:.2f}% flagged{mark}{polys}  {r.seconds:.1f} s"
    )


__all__ = [
    "ChangeResult",
    "run_detect_change",
    "summary_line",
]
