"""One scene of ``deo embed`` (:func:`embed_scene`; the command over several scenes is
:mod:`deo_cli.tasks.embed.predict`).

For each scene it picks the stem, unit conversion and normalisation
(:mod:`deo_cli.infer.prepare`), plans chips on the feature grid of the chosen level
(:mod:`deo_cli.infer.tiling`), streams them through the model (:mod:`deo_cli.infer.runner`)
and writes one of:

- **COG** (default): one band per feature channel (``emb_0000`` ...), CRS of the input,
  transform = input transform scaled by the feature stride (``Grid.scaled``), NaN nodata
  (``-128`` for int8), overviews by averaging, tags naming the model, weights checksum, band
  manifest, normalisation, tiling, layer, recipe hash, deo version and source scene;
- **Zarr** (``-o emb.zarr``): the same values as ``(band, y, x)`` with the ``proj:``,
  ``spatial:`` and ``geoemb:`` conventions;
- **GeoParquet** (``--pool mean|cls``): one vector per chip (``mean``: the average of the
  chosen level over the chip's valid feature pixels; ``cls``: the encoder's global vector,
  final norm + average pool for Swin, the normed CLS token for ViT), footprint polygons in the
  source CRS. Chips do not overlap unless ``--overlap`` says so; chips that are mostly nodata
  are left out.

:func:`embed_to_array` holds one scene's dense embedding in memory instead (the Python API's).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from affine import Affine

from deo_cli import __version__
from deo_cli.errors import DeoError, UsageError, note_kept
from deo_cli.infer.chips import ChipReader
from deo_cli.infer.distributed import RankInfo
from deo_cli.infer.model import EncoderFeatures, resolve_layer
from deo_cli.infer.outputs import scene_stem
from deo_cli.infer.prepare import InputPlan, open_input, prepare_input
from deo_cli.infer.runner import (
    RunStats,
    _forward,
    block_rows_for,
    masked_mean,
    run_dense,
    run_pooled,
    split_rows,
    stream_options,
)
from deo_cli.infer.tiling import TilePlan, check_chip_memory, resolve_overlap, round_up
from deo_cli.io.atomic import check_output
from deo_cli.io.grid import Grid
from deo_cli.io.writers import (
    GeoParquetChipWriter,
    LinearQuantization,
    RasterLayout,
    StreamingRasterWriter,
    TiledWriter,
    ZarrWriter,
    finish_cog,
    merge_parquet_parts,
    partial_paths,
    read_progress,
)
from deo_cli.progress import NullProgress, Progress
from deo_cli.recipes import EmbedRecipe, recipe_hash, recipe_path_for, save_recipe
from deo_cli.runtime import Runtime, resolve_runtime, seed_everything

log = logging.getLogger(__name__)
#: Chips run through the model to fit the int8 scale/offset.
CALIBRATION_CHIPS = 8


@dataclass
class EmbedResult:
    """What happened to one scene."""

    source: str
    output: Path | None = None
    status: str = "failed"  # written | skipped | failed
    error: DeoError | None = None
    format: str = "cog"
    crs: str | None = None
    grid: tuple[int, int] | None = None  # (width, height) of the output grid (or chip grid)
    resolution: tuple[float, float] | None = None
    size_bytes: int = 0
    seconds: float = 0.0
    chips: int = 0
    chips_per_second: float = 0.0
    preview: Path | None = None
    recipe: Path | None = None
    extra: dict = field(default_factory=dict)
    stac: dict | None = None  # the source STAC item's identity (io/stac.py), when it is one


# ---------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------


def output_format(output: Path, pool: str, fmt: str = "auto") -> str:
    """``cog``, ``zarr`` or ``parquet`` from the recipe and the output name."""
    suffix = output.suffix.lower()
    if fmt == "auto":
        if pool != "none":
            fmt = "parquet"
        elif suffix == ".zarr":
            fmt = "zarr"
        elif suffix in (".parquet", ".geoparquet"):
            raise UsageError(
                f"-o {output.name} asks for chip vectors but no pooling was chosen",
                "add --pool mean or --pool cls, or write a dense raster (-o emb.tif)",
            )
        else:
            fmt = "cog"
    if fmt == "parquet" and pool == "none":
        raise UsageError("GeoParquet output holds one vector per chip", "add --pool mean or --pool cls")
    if fmt != "parquet" and pool != "none":
        raise UsageError(
            f"--pool {pool} writes chip vectors to GeoParquet", "use -o NAME.parquet (or a folder)"
        )
    return fmt


def format_reason(recipe: EmbedRecipe) -> str:
    """What chose the output format, for messages: `` (--pool mean)``, `` (output.format zarr)``."""
    if recipe.output.pool != "none":
        return f" (--pool {recipe.output.pool})"
    if recipe.output.format != "auto":
        return f" (output.format {recipe.output.format})"
    return ""


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size if path.exists() else 0


def _crs_text(crs) -> str | None:
    if crs is None:
        return None
    epsg = crs.to_epsg()
    return f"EPSG:{epsg}" if epsg else crs.to_string()


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------


def build_model(recipe: EmbedRecipe) -> EncoderFeatures:
    """The encoder of ``recipe.model`` at level ``recipe.layer``, in eval mode."""
    from deo_cli.models import build_encoder, get_model_spec

    spec = get_model_spec(recipe.model.name)
    layer = resolve_layer(spec, recipe.layer)
    seed_everything(recipe.runtime.seed)  # random weights (--weights random) are reproducible
    encoder = build_encoder(recipe.model.name, weights=recipe.model.weights)
    return EncoderFeatures(encoder, layer)


def resolve_tiling(recipe: EmbedRecipe, model=None) -> EmbedRecipe:
    """Check the chip size and overlap against the model before anything is read or allocated,
    and return the recipe with the values that will be used.

    Refused (:class:`UsageError`, one line with the allowed range): a chip size that is not a
    multiple of the feature stride, or whose batch would not fit a quarter of the machine's
    memory (:func:`~deo_cli.infer.tiling.check_chip_memory`), and an overlap of half a chip or
    more (:func:`~deo_cli.infer.tiling.resolve_overlap`). An overlap that is not a multiple of
    the stride is rounded up with a warning, and the rounded value is what the saved recipe
    and the tags record. ``model``: a ready model (default: the recipe's, from its spec, so
    no weights are loaded).
    """
    t = recipe.tiling
    if model is not None:
        stride, input_size = int(model.stride), int(model.input_size)
        bands = len(model.manifest.bands)
    else:
        from deo_cli.models import get_model_spec

        spec = get_model_spec(recipe.model.name)
        stride = int(spec.feature_strides[resolve_layer(spec, recipe.layer)])
        input_size, bands = int(spec.input_size), len(spec.manifest.bands)
    chip = t.chip_size or input_size
    if chip % stride:
        raise UsageError(
            f"--chip-size {chip} is not a multiple of the feature stride {stride}",
            f"use --chip-size {round_up(chip, stride)}",
        )
    check_chip_memory(chip, recipe.runtime.batch_size, bands, stride, input_size)
    default = 0 if recipe.output.pool != "none" else None  # chip vectors: no overlap unless asked
    used = resolve_overlap(chip, stride, t.overlap, default)
    if t.overlap is None or used == t.overlap:
        return recipe
    log.warning(
        "--overlap %d rounded up to %d px, a multiple of the feature stride %d", t.overlap, used, stride
    )
    return dataclasses.replace(recipe, tiling=dataclasses.replace(t, overlap=used))


def _describe_model(model) -> dict:
    return {
        "model": getattr(model, "name", type(model).__name__),
        "weights": getattr(model, "weights_uri", None) or "random",
        "weights_sha256": getattr(model, "weights_sha256", None),
        "layer": getattr(model, "layer", None),
        "stride": int(model.stride),
        "channels": int(model.channels),
    }


# ---------------------------------------------------------------------------------------------
# Metadata
# ---------------------------------------------------------------------------------------------


def embedding_metadata(model, inp: InputPlan, plan: TilePlan, recipe: EmbedRecipe, scene, extra=None) -> dict:
    """Provenance of an embedding output (plain JSON values)."""
    meta = {
        "deo_version": __version__,
        **{f"deo_{k}": v for k, v in _describe_model(model).items()},
        "deo_band_manifest": inp.manifest.to_dict(),
        "deo_normalization": inp.describe(),
        "deo_tiling": {
            **plan.describe(),
            "blend": recipe.tiling.blend,
            "max_nodata_fraction": recipe.tiling.max_nodata_fraction,
            "edges": "edge pixels replicated outside the scene, cropped back",
            "nodata_fill": "nearest valid pixel of the chip (along rows, then columns)",
        },
        "deo_recipe_hash": recipe_hash(recipe),
        "deo_source": {"scene": scene.name, "paths": list(scene.paths)},
        "deo_datetime": scene.datetime,
    }
    if getattr(scene, "stac", None):  # id, collection, datetime, platform, cloud cover, href
        meta["deo_stac_item"] = dict(scene.stac)
    meta.update(extra or {})
    return meta


def _gdal_tags(meta: dict) -> dict[str, str]:
    out = {}
    for k, v in meta.items():
        if v is None:
            continue
        out[k.upper()] = v if isinstance(v, str) else json.dumps(v)
    return out


def _geoemb_attrs(model, scene, out_grid: Grid) -> dict:
    weights = getattr(model, "weights_uri", None) or ""
    if weights.startswith("hf://"):
        repo = "/".join(weights[5:].split("@")[0].split("/")[:2])
        ref = f"https://huggingface.co/{repo}"
    else:
        ref = f"https://github.com/wolfilip/DEO-FM#{getattr(model, 'name', 'model')}"
    attrs = {
        "geoemb:model": ref,
        "geoemb:source_data": [str(p) for p in scene.paths],
        "geoemb:build_version": f"deo {__version__}",
    }
    if out_grid.crs is not None and out_grid.crs.is_projected:
        attrs["geoemb:gsd"] = float(out_grid.res[0])
    return attrs


def _fingerprint(recipe: EmbedRecipe, model, scene, plan: TilePlan, fmt: str, part: str = "") -> str:
    blob = json.dumps(
        {
            "recipe": recipe_hash(recipe),
            "model": _describe_model(model),
            "paths": list(scene.paths),
            "grid": [scene.width, scene.height, list(tuple(scene.transform)[:6])],
            "plan": plan.describe(),
            "format": fmt,
            "part": part,
        },
        sort_keys=True,
        default=str,
    ).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


# ---------------------------------------------------------------------------------------------
# One scene
# ---------------------------------------------------------------------------------------------


def calibrate_int8(
    reader: ChipReader, model, device, precision, max_nodata_fraction: float, n: int = CALIBRATION_CHIPS
) -> LinearQuantization:
    """Fit the global int8 scale/offset on features of up to ``n`` chips spread over the scene."""
    chips = reader.plan.chips()
    picks = np.unique(np.linspace(0, len(chips) - 1, min(len(chips), 4 * n)).round().astype(int))
    values = []
    for i in picks:
        s = reader.read(chips[i])
        if s.empty:
            continue
        y = _forward(model, torch.from_numpy(s.x)[None], device, precision)[0]
        ok = s.invalid <= max_nodata_fraction
        values.append(y[:, ok].ravel())
        if len(values) >= n:
            break
    q = LinearQuantization.fit(np.concatenate(values) if values else np.zeros(0))
    log.info("int8 scale %.6g, offset %.6g (fitted on %d chips)", q.scale, q.offset, len(values))
    return q


def _layout(model, recipe: EmbedRecipe, meta: dict, quant) -> RasterLayout:
    dtype = recipe.output.dtype
    return RasterLayout(
        count=int(model.channels),
        dtype="float32",
        nodata=None,
        descriptions=tuple(f"emb_{i:04d}" for i in range(model.channels)),
        tags=_gdal_tags(meta),
        quantization=quant if dtype == "int8" else None,
        half=dtype == "float16",
        compress=recipe.output.compress,
        resampling="average",
    )


def dense_plan(scene, model, chip_size: int | None, overlap: int | None) -> tuple[TilePlan, Grid]:
    """The tile plan of a dense embedding of ``scene`` by ``model`` (``chip_size`` None: the
    model's input size) and its output grid: the scene's grid scaled by the feature stride."""
    chip = chip_size or model.input_size
    try:
        plan = TilePlan.create(scene.height, scene.width, chip, model.stride, overlap)
    except ValueError as e:
        raise UsageError(str(e), "change --chip-size or --overlap") from None
    out_grid = scene.grid.scaled(model.stride)
    assert (plan.out_height, plan.out_width) == (out_grid.height, out_grid.width)
    return plan, out_grid


def embed_to_array(
    scene, model, inp: InputPlan, recipe: EmbedRecipe, rt: Runtime, progress: Progress | None = None
) -> tuple[np.ndarray, Grid, dict[str, str]]:
    """One scene's dense embedding held in memory (the Python API's, :mod:`deo_cli.api`): the
    same plan, chips, model and stitching as a COG of ``deo embed``, into a ``(channels, rows,
    cols)`` float32 array (NaN nodata). Returns it, its grid, and the tags the COG carries."""
    from deo_cli.io.arrays import ArraySink

    t = recipe.tiling
    plan, out_grid = dense_plan(scene, model, t.chip_size, t.overlap)
    reader = ChipReader(scene, inp.bands, inp.normalizer, plan)
    sink = ArraySink(int(model.channels), out_grid.height, out_grid.width, block_rows_for(16))
    with _capped_gdal_cache(), scene:  # as run_embed: GDAL's cache must not grow with the scene
        run_dense(reader, model, sink, **stream_options(t, rt, progress, f"embedding {scene.name}"))
    meta = embedding_metadata(model, inp, plan, recipe, scene, {"deo_dtype": recipe.output.dtype})
    return sink.array, out_grid, _gdal_tags(meta)


def _dense(
    scene,
    out: Path,
    fmt: str,
    model,
    inp: InputPlan,
    recipe: EmbedRecipe,
    rt: Runtime,
    *,
    overwrite: bool,
    resume: bool,
    progress: Progress,
    ranks: RankInfo,
) -> tuple[Grid, dict]:
    t = recipe.tiling
    plan, out_grid = dense_plan(scene, model, t.chip_size, t.overlap)
    reader = ChipReader(scene, inp.bands, inp.normalizer, plan)
    block_rows = block_rows_for(16)
    common = stream_options(t, rt, progress, f"embedding {scene.name}")
    world, rank = ranks.world, ranks.rank
    part = f"-{rank}of{world}" if world > 1 else ""
    fingerprint = _fingerprint(recipe, model, scene, plan, fmt, part)

    quant = _int8_quantization(out, fmt, part, fingerprint, reader, model, recipe, rt, resume, ranks)
    meta = embedding_metadata(
        model,
        inp,
        plan,
        recipe,
        scene,
        {
            "deo_quantization": quant.to_dict()
            if quant is not None and recipe.output.dtype == "int8"
            else None,
            "deo_dtype": (
                "float16: values rounded to half precision (a COG stores them as Float32)"
                if recipe.output.dtype == "float16"
                else recipe.output.dtype
            ),
        },
    )
    layout = _layout(model, recipe, meta, quant)

    if world == 1:
        if fmt == "zarr":
            sink = ZarrWriter(
                out,
                out_grid,
                layout,
                geoemb_attrs=_geoemb_attrs(model, scene, out_grid),
                block_rows=block_rows,
                fingerprint=fingerprint,
                resume=resume,
                overwrite=overwrite,
            )
        else:
            sink = StreamingRasterWriter(
                out, out_grid, layout, block_rows, fingerprint=fingerprint, resume=resume, overwrite=overwrite
            )
        try:
            stats = run_dense(reader, model, sink, rows=(sink.rows_done, out_grid.height), **common)
            if fmt == "zarr":
                save_recipe(recipe, sink.tmp / "recipe.yaml", "embed")
            t_finish = time.perf_counter()
            sink.finish()
            stats.extra["finish_seconds"] = time.perf_counter() - t_finish
        except KeyboardInterrupt as stop:  # Ctrl-C: finished rows stay for --resume
            _stop(sink, stop)
            raise
        except BaseException:  # any other failure leaves nothing behind
            sink.abort(keep=False)
            raise
        return out_grid, {"stats": stats, "plan": plan}

    stats = _dense_ranks(
        out, fmt, out_grid, layout, reader, model, common, block_rows, fingerprint, resume, ranks
    )
    return out_grid, {"stats": stats, "plan": plan}


def _int8_quantization(
    out: Path,
    fmt: str,
    part: str,
    fingerprint: str,
    reader: ChipReader,
    model,
    recipe: EmbedRecipe,
    rt: Runtime,
    resume: bool,
    ranks: RankInfo,
) -> LinearQuantization | None:
    """The int8 scale/offset: the one an interrupted run of the same output recorded
    (``--resume``), else fitted by rank 0 (:func:`calibrate_int8`) and sent to every rank;
    ``None`` for other dtypes."""
    quant = None
    if recipe.output.dtype == "int8":
        if resume:
            tmp, side = partial_paths(out, part)
            if fmt == "zarr":
                side = tmp / "deo-progress.json"
            state = read_progress(side, fingerprint)
            if state and state.get("quantization"):
                quant = LinearQuantization.from_dict(state["quantization"])
        if quant is None:
            quant = (
                calibrate_int8(reader, model, rt.device, rt.precision, recipe.tiling.max_nodata_fraction)
                if ranks.is_main
                else None
            )
            quant = ranks.broadcast(quant)
    return quant


def _dense_ranks(
    out: Path,
    fmt: str,
    out_grid: Grid,
    layout: RasterLayout,
    reader: ChipReader,
    model,
    common: dict,
    block_rows: int,
    fingerprint: str,
    resume: bool,
    ranks: RankInfo,
) -> RunStats:
    """Several ranks: each writes a row band into its own part file; rank 0 assembles the COG."""
    world, rank = ranks.world, ranks.rank
    if fmt == "zarr":
        raise UsageError(
            "--gpus with Zarr output is not supported", "write a COG (-o emb.tif) or use --gpus 1"
        )
    lo, hi = split_rows(out_grid.height, world, block_rows)[rank]
    parts = [partial_paths(out, f"-{r}of{world}")[0] for r in range(world)]
    writer = None
    ok = True
    stats = None
    try:
        if hi > lo:
            writer = TiledWriter(
                parts[rank],
                out_grid,
                layout,
                block_rows,
                rows=(lo, hi),
                fingerprint=fingerprint,
                resume=resume,
            )
            stats = run_dense(reader, model, writer, rows=(writer.rows_done, hi), **common)
            writer.close()
    except KeyboardInterrupt as stop:  # Ctrl-C: this rank's finished rows stay for --resume
        ok = False
        if writer is not None:
            writer.close()
            if writer.rows_done > writer.row_begin:
                note_kept(stop, writer.path)
            else:
                writer.discard()
        raise
    except BaseException:
        ok = False
        if writer is not None:
            writer.discard()
        raise
    finally:  # every rank's chips in the summary, not rank 0's alone
        all_ok, chips = ranks.all_ok_and_total(ok, stats.chips if stats is not None else 0)
    if not all_ok:
        raise RuntimeError("another rank failed; rerun with --resume to continue")
    stats = stats if stats is not None else RunStats()
    stats.chips = chips
    if ranks.is_main:
        present = [p for p, (a, b) in zip(parts, split_rows(out_grid.height, world, block_rows)) if b > a]
        finish_cog(present, out, out_grid, layout, overwrite=True)
        for p in present:
            p.unlink(missing_ok=True)
            p.with_suffix(".json").unlink(missing_ok=True)
    ranks.barrier()
    return stats


def _stop(sink, stop: KeyboardInterrupt) -> None:
    """An interrupted dense output: keep its temporary file for ``--resume`` when rows are in it
    (and say so on the interruption, :func:`note_kept`), else remove it."""
    keep = sink.rows_done > 0
    sink.abort(keep=keep)
    if keep:
        note_kept(stop, sink.partial_path)


def _chip_polygon(grid: Grid, x: int, y: int, size: int):
    from shapely.geometry import Polygon

    x0, y0 = max(0, x), max(0, y)
    x1, y1 = min(grid.width, x + size), min(grid.height, y + size)
    t = grid.transform
    return Polygon([t * (x0, y0), t * (x1, y0), t * (x1, y1), t * (x0, y1)])


def _pooled(
    scene,
    out: Path,
    model,
    inp: InputPlan,
    recipe: EmbedRecipe,
    rt: Runtime,
    *,
    overwrite: bool,
    progress: Progress,
    ranks: RankInfo,
) -> tuple[Grid, dict]:
    t = recipe.tiling
    chip = t.chip_size or model.input_size
    pool = recipe.output.pool
    try:
        plan = TilePlan.create(scene.height, scene.width, chip, model.stride, t.overlap or 0, pad_start=False)
    except ValueError as e:
        raise UsageError(str(e), "change --chip-size or --overlap") from None
    if pool == "cls" and not hasattr(model, "pooled"):
        raise UsageError(f"model {model.name} has no global vector", "use --pool mean")
    dim = int(model.pooled_dim) if pool == "cls" else int(model.channels)
    reader = ChipReader(scene, inp.bands, inp.normalizer, plan)
    meta = embedding_metadata(
        model,
        inp,
        plan,
        recipe,
        scene,
        {
            "deo_pool": pool,
            "deo_pool_rule": (
                "mean of the chosen level over the chip's valid feature pixels"
                if pool == "mean"
                else "the encoder's global vector (Swin: final norm + average pool; ViT: normed CLS)"
            ),
            "geoemb:chip_layout": {
                "layout_type": "regular_grid",
                "chip_size": [plan.chip_size, plan.chip_size],
                "stride": [plan.step, plan.step],
            },
        },
    )
    thr = t.max_nodata_fraction

    def vectors(x, invalid):
        if pool == "cls":
            return model.pooled(x)
        return masked_mean(model(x), invalid, thr)

    world, rank = ranks.world, ranks.rank
    if world == 1:
        writer = GeoParquetChipWriter(out, scene.crs, dim, metadata=meta, overwrite=overwrite)
        chips = plan.chips()
    else:
        part, _ = partial_paths(out, f"-{rank}of{world}")
        writer = GeoParquetChipWriter(part, scene.crs, dim, metadata=meta, overwrite=True)
        chips = [c for c in plan.chips() if c.row % world == rank]
    stem = scene_stem(scene.name)

    def write(samples, vecs):
        ids = [f"{stem}_{s.chip.row:04d}_{s.chip.col:04d}" for s in samples]
        polys = [_chip_polygon(scene.grid, s.chip.x, s.chip.y, plan.chip_size) for s in samples]
        writer.write(ids, polys, vecs, [s.valid_fraction for s in samples], scene.name, scene.datetime)

    ok, stats = True, None
    try:
        stats = run_pooled(
            reader,
            vectors,
            write,
            max_nodata_fraction=thr,
            batch_size=rt.batch_size,
            num_workers=rt.num_workers,
            micro_batch=rt.micro_batch,
            model=model,
            device=rt.device,
            precision=rt.precision,
            chips=chips,
            progress=progress,
            description=f"embedding chips of {scene.name}",
        )
        writer.finish()
    except BaseException:
        ok = False
        writer.abort()
        raise
    finally:
        all_ok, chips = ranks.all_ok_and_total(ok, stats.chips if stats is not None else 0)
    if world > 1:
        if not all_ok:
            raise RuntimeError("another rank failed")
        stats.chips = chips
        if ranks.is_main:
            merge_parquet_parts([partial_paths(out, f"-{r}of{world}")[0] for r in range(world)], out)
        ranks.barrier()
    rows, cols = plan.shape
    chip_grid = Grid(scene.crs, scene.transform @ Affine.scale(plan.step), cols, rows)
    return chip_grid, {"stats": stats, "plan": plan}


@dataclass
class Prepared:
    """A scene checked and ready to embed (see :func:`preflight`)."""

    source: str
    out: Path
    scene: object
    inp: InputPlan
    manifests: tuple


def preflight(
    source: str,
    out: Path,
    recipe: EmbedRecipe,
    manifest,
    rgb_manifest,
    *,
    overwrite: bool = False,
    resume: bool = False,
    preview: Path | None = None,
    is_main: bool = True,
) -> Prepared | None:
    """Check one scene before any model is loaded: the output may be written, the scene opens,
    has a CRS, has the bands (or RGB for the RGB stem) and a usable unit. ``None``: the output
    exists and ``resume`` skips it. Raises :class:`DeoError`."""
    if out.exists() and resume:
        log.info("%s exists: skipped (--resume)", out)
        if is_main:  # a run killed between renaming the output and removing its resume state
            for stale in partial_paths(out):
                if stale.is_dir():
                    shutil.rmtree(stale, ignore_errors=True)
                else:
                    stale.unlink(missing_ok=True)
        return None
    if is_main:
        check_output(out, overwrite)
        if preview is not None:
            check_output(preview, overwrite)
    i = recipe.input
    scene = open_input(source, i)
    with scene:
        inp = prepare_input(scene, manifest, rgb_manifest, i.unit, i.rgb_max)
    return Prepared(str(source), out, scene, inp, (manifest, rgb_manifest))


def embed_scene(
    source: str,
    out: Path,
    model,
    recipe: EmbedRecipe,
    *,
    fmt: str = "cog",
    runtime: Runtime | None = None,
    overwrite: bool = False,
    resume: bool = False,
    preview: Path | None = None,
    progress: Progress | None = None,
    ranks: RankInfo | None = None,
    prepared: Prepared | None = None,
) -> EmbedResult:
    """Embed one scene into ``out`` (see the module docstring). Raises :class:`DeoError`.

    ``prepared`` (from :func:`preflight` with this model's manifests) saves opening it again.
    """
    t0 = time.perf_counter()
    ranks = ranks or RankInfo()
    progress = progress or NullProgress()
    rt = runtime or resolve_runtime(recipe.runtime)
    res = EmbedResult(source=str(source), output=out, format=fmt)
    manifests = (model.manifest, getattr(model, "rgb_manifest", None))
    if prepared is None or prepared.manifests != manifests:
        prepared = preflight(
            source,
            out,
            recipe,
            *manifests,
            overwrite=overwrite,
            resume=resume,
            preview=preview,
            is_main=ranks.is_main,
        )
        if prepared is None:
            res.status = "skipped"
            return res
    scene, inp = prepared.scene, prepared.inp
    with scene:
        kw = dict(progress=progress if ranks.is_main else NullProgress(), ranks=ranks, overwrite=overwrite)
        if fmt == "parquet":
            out_grid, info = _pooled(scene, out, model, inp, recipe, rt, **kw)
        else:
            out_grid, info = _dense(scene, out, fmt, model, inp, recipe, rt, resume=resume, **kw)
    if ranks.is_main:
        if fmt != "zarr":
            res.recipe = save_recipe(recipe, recipe_path_for(out), "embed")
        else:
            res.recipe = recipe_path_for(out)
        if preview is not None and fmt != "parquet":
            from deo_cli.infer.preview import write_preview

            res.preview = write_preview(out, preview, overwrite=overwrite)
    stats = info["stats"]
    res.status = "written"
    res.crs = _crs_text(out_grid.crs)
    res.grid = (out_grid.width, out_grid.height)
    res.resolution = out_grid.res
    res.size_bytes = _size(out) if ranks.is_main else 0
    res.seconds = time.perf_counter() - t0
    res.chips = stats.chips if stats else 0
    res.chips_per_second = stats.chips_per_second if stats else 0.0
    res.extra = {"stem": inp.stem, "unit": inp.unit, "plan": info["plan"].describe()}
    if stats:  # where the time went: streaming (reads, forward, stitching, writing), the COG
        res.extra["timing"] = {
            "stream_seconds": round(stats.seconds, 3),
            "model_seconds": round(stats.model_seconds, 3),
            "finish_seconds": round(stats.extra.get("finish_seconds", 0.0), 3),
        }
    return res


def _capped_gdal_cache():
    """GDAL's block cache capped for the run (its default, 5 % of RAM, would grow with the scene)."""
    import rasterio

    from deo_cli.infer.runner import READ_CACHE_BYTES

    return rasterio.Env(GDAL_CACHEMAX=READ_CACHE_BYTES)


__all__ = [
    "EmbedResult",
    "build_model",
    "embed_scene",
    "embed_to_array",
    "embedding_metadata",
    "output_format",
]
