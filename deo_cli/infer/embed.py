"""``deo embed``: georeferenced DEO embeddings from scenes of any size.

:func:`run_embed` is what the command line calls (a notebook can too)::

    from deo_cli.recipes import EmbedRecipe
    results = run_embed(["scene.tif"], Path("emb.tif"), EmbedRecipe())

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

Several scenes write one output each into a folder; a scene that fails does not stop the
others (its error is in its :class:`EmbedResult`). ``--resume`` skips finished outputs and
continues interrupted rasters from their last checkpointed row block (see
:mod:`deo_cli.io.writers`). ``--gpus N`` runs N ranks, each computing a band of rows
(:mod:`deo_cli.infer.distributed`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import re
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
from deo_cli.infer.distributed import RankInfo, run_ranks
from deo_cli.infer.model import EncoderFeatures, resolve_layer
from deo_cli.infer.prepare import InputPlan, open_input, prepare_input
from deo_cli.infer.runner import (
    RunStats,
    _forward,
    block_rows_for,
    masked_mean,
    run_dense,
    run_pooled,
    split_rows,
)
from deo_cli.infer.schedule import balance, parse_shard, peak_rss_mb, scene_mode, shard_of
from deo_cli.infer.tiling import TilePlan, check_chip_memory, resolve_overlap, round_up
from deo_cli.io.atomic import check_output, outputs_locked
from deo_cli.io.catalog import SceneRecord, update_catalog
from deo_cli.io.grid import Grid
from deo_cli.io.sources import resolve_source
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
from deo_cli.runtime import Runtime, check_gpus, resolve_runtime, seed_everything

log = logging.getLogger(__name__)

SUFFIX = {"cog": ".tif", "zarr": ".zarr", "parquet": ".parquet"}
#: File name extensions of each output format (the first is the one deo suggests).
FORMAT_SUFFIXES = {"cog": (".tif", ".tiff"), "zarr": (".zarr",), "parquet": (".parquet", ".geoparquet")}
FORMAT_NAMES = {"cog": "a COG (GeoTIFF)", "zarr": "a Zarr store", "parquet": "GeoParquet"}
#: Names that say "one output file" (several scenes need a folder instead).
OUTPUT_SUFFIXES = (".tif", ".tiff", ".zarr", ".parquet", ".geoparquet")
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


def check_output_suffix(path: Path, fmt: str, option: str = "-o", why: str = "") -> None:
    """Refuse an output file name whose extension is not ``fmt``'s (a GeoParquet file named
    ``e.tif``, a COG named ``e.xyz``): one :class:`UsageError` naming the extension, the format
    (``why`` says what chose it, e.g. `` (--pool mean)``) and the name to use instead."""
    exts = FORMAT_SUFFIXES[fmt]
    if path.suffix.lower() in exts:
        return
    got = f"the extension {path.suffix}" if path.suffix else "no extension"
    raise UsageError(
        f"{option} {path.name} has {got}, but the output is {FORMAT_NAMES[fmt]}{why}",
        f"use {option} {path.with_suffix(exts[0])}",
    )


def format_reason(recipe: EmbedRecipe) -> str:
    """What chose the output format, for messages: `` (--pool mean)``, `` (output.format zarr)``."""
    if recipe.output.pool != "none":
        return f" (--pool {recipe.output.pool})"
    if recipe.output.format != "auto":
        return f" (output.format {recipe.output.format})"
    return ""


def scene_stem(name: str) -> str:
    """A file-name stem for a scene name (``sample:paris`` -> ``paris``, ``a/b.tif`` -> ``b``)."""
    text = name.split(":", 1)[1] if name.startswith("sample:") else name
    text = text.rstrip("/").rsplit("/", 1)[-1]
    for suf in (".tif", ".tiff", ".vrt", ".jp2"):
        if text.lower().endswith(suf):
            text = text[: -len(suf)]
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text) or "scene"


def plan_outputs(sources: list[str], output: Path, fmt: str, why: str = "") -> list[Path | None]:
    """One output path per scene: ``output`` itself for one scene and a file name, else
    ``output/<scene><suffix>`` (``None`` where the scene cannot be resolved; it fails later).

    Several scenes with ``output`` named like an output file (``emb.tif``, ``v.parquet``,
    ``e.zarr``) that is not an existing folder are refused: a folder called ``emb.tif`` is
    never what was meant. A file name whose extension is not the format's is refused
    (:func:`check_output_suffix`; ``why`` says what chose the format)."""
    is_folder = output.is_dir() and output.suffix.lower() != ".zarr"
    if len(sources) > 1 and not is_folder and output.suffix.lower() in OUTPUT_SUFFIXES:
        raise UsageError(
            f"{len(sources)} scenes need an output folder, but -o {output} names a file",
            f"give a folder (-o {output.with_suffix('')}/) or one scene per run",
        )
    folder = len(sources) > 1 or is_folder or not output.suffix
    if not folder:
        check_output_suffix(output, fmt, "-o", why)
        return [output]
    out: list[Path | None] = []
    seen: dict[str, str] = {}
    for s in sources:
        try:
            stem = scene_stem(resolve_source(s).name)
        except DeoError:
            out.append(None)
            continue
        if stem in seen:
            raise UsageError(
                f"scenes {seen[stem]} and {s} would both be written to {output / (stem + SUFFIX[fmt])}",
                "embed them in separate runs or rename one",
            )
        seen[stem] = s
        out.append(output / (stem + SUFFIX[fmt]))
    return out


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


def stream_options(tiling, rt: Runtime, progress: Progress | None, description: str) -> dict:
    """The keyword arguments of :func:`~deo_cli.infer.runner.run_dense` for a recipe's
    ``tiling`` section and a resolved runtime."""
    return dict(
        blend=tiling.blend,
        max_nodata_fraction=tiling.max_nodata_fraction,
        batch_size=rt.batch_size,
        num_workers=rt.num_workers,
        micro_batch=rt.micro_batch,
        device=rt.device,
        precision=rt.precision,
        progress=progress,
        description=description,
    )


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
                calibrate_int8(reader, model, rt.device, rt.precision, t.max_nodata_fraction)
                if ranks.is_main
                else None
            )
            quant = ranks.broadcast(quant)
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

    # several ranks: each writes a row band into its own part file; rank 0 assembles the COG
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
    return out_grid, {"stats": stats, "plan": plan}


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


# ---------------------------------------------------------------------------------------------
# Several scenes
# ---------------------------------------------------------------------------------------------


def _preview_for(preview: Path | None, out: Path, many: bool) -> Path | None:
    if preview is None or not many:
        return preview
    return preview.with_name(f"{preview.stem}_{out.stem}{preview.suffix or '.png'}")


def _run(
    sources: list,
    output: Path,
    recipe: EmbedRecipe,
    *,
    overwrite: bool = False,
    resume: bool = False,
    preview: Path | None = None,
    progress: Progress | None = None,
    model=None,
    ranks: RankInfo | None = None,
    outs: list[Path | None] | None = None,
    many: bool | None = None,
) -> list[EmbedResult]:
    with _capped_gdal_cache():
        return _run_capped(
            sources,
            output,
            recipe,
            overwrite=overwrite,
            resume=resume,
            preview=preview,
            progress=progress,
            model=model,
            ranks=ranks,
            outs=outs,
            many=len(sources) > 1 if many is None else many,
        )


def _capped_gdal_cache():
    """GDAL's block cache capped for the run (its default, 5 % of RAM, would grow with the scene)."""
    import rasterio

    from deo_cli.infer.runner import READ_CACHE_BYTES

    return rasterio.Env(GDAL_CACHEMAX=READ_CACHE_BYTES)


def _stac_of(source) -> dict | None:
    meta = getattr(source, "metadata", None)
    return meta() if callable(meta) else None


def _failed(source, out, error: DeoError, fmt: str) -> EmbedResult:
    return EmbedResult(source=str(source), output=out, error=error, format=fmt, stac=_stac_of(source))


def _check_scene(source, out, recipe, manifests, *, overwrite, resume, preview, is_main, fmt):
    """``("job", Prepared)``, ``("done", EmbedResult)`` (skipped or failed) for one scene."""
    try:
        if out is None:
            resolve_source(source)  # raises the scene's error
            raise UsageError(f"cannot name an output for {source}", "give one scene per run")
        prep = preflight(
            source,
            out,
            recipe,
            *manifests,
            overwrite=overwrite,
            resume=resume,
            preview=preview,
            is_main=is_main,
        )
    except DeoError as e:
        return "done", _failed(source, out, e, fmt)
    if prep is None:
        return "done", EmbedResult(
            source=str(source), output=out, status="skipped", format=fmt, stac=_stac_of(source)
        )
    return "job", prep


def _run_capped(
    sources: list,
    output: Path,
    recipe: EmbedRecipe,
    *,
    overwrite: bool,
    resume: bool,
    preview: Path | None,
    progress: Progress | None,
    model,
    ranks: RankInfo | None,
    outs: list[Path | None] | None = None,
    many: bool = False,
) -> list[EmbedResult]:
    ranks = ranks or RankInfo()
    fmt = output_format(output, recipe.output.pool, recipe.output.format)
    if fmt != "parquet" and preview is not None and preview.suffix.lower() not in (".png", ""):
        raise UsageError(f"--preview {preview.name} must be a .png file", "name it e.g. preview.png")
    if fmt == "parquet" and preview is not None:
        raise UsageError("--preview needs a dense output", "drop --preview, or embed without --pool")
    if outs is None:
        outs = plan_outputs(sources, output, fmt, format_reason(recipe))
    if model is not None:
        manifests = (model.manifest, getattr(model, "rgb_manifest", None))
    else:
        from deo_cli.models import get_model_spec

        spec = get_model_spec(recipe.model.name)
        manifests = (spec.manifest, spec.rgb_manifest)
    # check every scene before loading the model (and downloading its weights); several ranks
    # share the checks (scene i on rank i mod N: remote scenes are opened once, not N times)
    world = ranks.world
    checked: dict[int, tuple[str, object]] = {}
    for i, (source, out) in enumerate(zip(sources, outs)):
        if i % world == ranks.rank:
            checked[i] = _check_scene(
                source,
                out,
                recipe,
                manifests,
                overwrite=overwrite,
                resume=resume,
                preview=_preview_for(preview, out, many) if out is not None else None,
                is_main=True,
                fmt=fmt,
            )
    if world > 1:
        for part in ranks.gather(checked):
            checked.update(part)
    if not many:
        kind, what = checked[0]
        if kind == "done" and what.error is not None:
            raise what.error
    results: list[EmbedResult | None] = [None] * len(sources)
    jobs: list[tuple[int, Prepared]] = []
    for i in range(len(sources)):
        kind, what = checked[i]
        if kind == "done":
            results[i] = what
        else:
            jobs.append((i, what))
    if not jobs:
        return results
    whole = scene_mode(len(jobs), world)
    if whole:  # each rank takes whole scenes, balanced by pixels; the others are not its own
        split = balance([p.scene.width * p.scene.height for _, p in jobs], world)
        mine = [jobs[j] for j in split[ranks.rank]]
        scene_ranks = RankInfo()
    else:
        mine, scene_ranks = jobs, ranks
    if model is None:
        model = build_model(recipe)
    rt = resolve_runtime(recipe.runtime)
    if hasattr(model, "to"):
        model = model.to(rt.device)
    if ranks.is_main:
        d = _describe_model(model)
        log.info(
            "%s (level %s: stride %d, %d channels) on %s, %s%s",
            d["model"],
            d["layer"],
            d["stride"],
            d["channels"],
            rt.device,
            rt.precision_name,
            f"; {len(jobs)} scenes over {world} ranks" if whole else "",
        )
    done: dict[int, EmbedResult] = {}
    for k, prep in mine:
        try:
            r = embed_scene(
                prep.source,
                prep.out,
                model,
                recipe,
                fmt=fmt,
                runtime=rt,
                overwrite=overwrite,
                resume=resume,
                preview=_preview_for(preview, prep.out, many),
                progress=progress if ranks.is_main else None,
                ranks=scene_ranks,
                prepared=prep,
            )
        except DeoError as e:
            if not many:
                raise
            log.debug("scene %s failed", prep.source, exc_info=True)
            r = _failed(sources[k], prep.out, e, fmt)
        except Exception as e:  # noqa: BLE001 - one scene's failure must not stop the others
            if not many:
                raise
            log.error("scene %s failed", prep.source, exc_info=True)
            r = _failed(sources[k], prep.out, DeoError(f"{type(e).__name__}: {e}"), fmt)
        r.stac = _stac_of(sources[k])
        r.extra["rank"] = ranks.rank
        r.extra["peak_rss_mb"] = round(peak_rss_mb(), 1)
        done[k] = r
    if whole:
        done = _gather_results(done, ranks, [[jobs[j] for j in part] for part in split], sources, fmt)
    for k, r in done.items():
        results[k] = r
    return results


def _gather_results(done: dict, ranks: RankInfo, split, sources, fmt) -> dict:
    """Every rank's results on every rank. A rank that died (killed, out of memory) cannot send
    its own: its scenes whose outputs exist count as written, the others as failed, so rank 0
    still writes the catalog and ``--resume`` reruns only those."""
    try:
        parts = ranks.gather(done)
    except Exception as e:  # noqa: BLE001 - gloo/NCCL report a dead peer as a RuntimeError subclass
        log.error("a rank stopped before reporting its scenes (%s)", str(e).splitlines()[0][:200])
        parts = [done if r == ranks.rank else {} for r in range(ranks.world)]
    out: dict[int, EmbedResult] = {}
    for r, part in enumerate(parts):
        out.update(part)
        for k, prep in split[r]:
            if k in out:
                continue
            if prep.out.exists():
                out[k] = EmbedResult(source=str(sources[k]), output=prep.out, status="written", format=fmt,
                                     stac=_stac_of(sources[k]), extra={"rank": r})  # fmt: skip
            else:
                err = DeoError(f"rank {r} stopped before finishing it", "rerun with --resume to embed it")
                out[k] = _failed(sources[k], prep.out, err, fmt)
    return out


def _run_rank(
    sources, output, recipe, *, overwrite, resume, preview, ranks, outs=None, progress=None, many=None
):
    return _run(
        sources,
        output,
        recipe,
        overwrite=overwrite,
        resume=resume,
        preview=preview,
        progress=progress,
        ranks=ranks,
        outs=outs,
        many=many,
    )


def _launcher_rank() -> int:
    """This process's rank under ``torchrun`` (0 otherwise)."""
    return int(os.environ.get("RANK", "0") or 0) if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 else 0


@contextlib.contextmanager
def _outputs_locked(outs: list[Path | None], previews: list[Path | None]):
    """Hold every output's lock for the run (rank 0 of a ``torchrun`` job only; ``--gpus``
    children run under their parent's), and remove the temporaries that earlier runs of the
    same outputs left when they were killed (:func:`~deo_cli.io.atomic.outputs_locked`)."""
    if _launcher_rank() != 0:
        yield
        return
    with outputs_locked(outs, previews):
        yield


class EmbedResults(list):
    """The :class:`EmbedResult` of each scene (in input order), and the catalog written beside
    them (``catalog``: a :class:`~deo_cli.io.catalog.CatalogResult`, or ``None`` for one output
    file, a shard's other scenes being left out)."""

    catalog = None
    shard: tuple[int, int] | None = None
    total: int = 0


def run_embed(
    sources: list,
    output: str | Path,
    recipe: EmbedRecipe,
    *,
    overwrite: bool = False,
    resume: bool = False,
    preview: str | Path | None = None,
    progress: Progress | None = None,
    model=None,
    shard: str | tuple[int, int] | None = None,
    mosaic: bool = False,
    catalog: bool = True,
) -> EmbedResults:
    """Embed every scene of ``sources`` into ``output`` (a file for one scene, else a folder).

    ``sources``: scene arguments (files, folders, globs, URLs, STAC Item/ItemCollection JSON,
    whose items each become a scene) or :class:`~deo_cli.io.stac.StacScene` objects (a search).
    ``model``: a ready :class:`~deo_cli.infer.model.FeatureModel` (default: built from
    ``recipe.model`` and ``recipe.layer``). With one scene a :class:`DeoError` is raised; with
    several, each failure is recorded in its result and the other scenes are still written.
    Each output is locked for the run (:func:`~deo_cli.io.atomic.output_lock`): a second run
    on it stops with one line naming the first.

    ``shard`` (``"K/N"``): only the K-th of N disjoint parts of the scene list
    (:func:`~deo_cli.infer.schedule.shard_of`), for the tasks of a job array. Into a folder,
    ``catalog`` adds each scene to ``index.parquet`` and the STAC collection beside the outputs
    (:mod:`deo_cli.io.catalog`); ``mosaic`` also writes one VRT per CRS over them.
    """
    from deo_cli.io.stac import expand_scenes

    output = Path(output)
    preview = Path(preview) if preview is not None else None
    sources = expand_scenes(list(sources))
    if not sources:
        raise UsageError("no scene given", "pass one or more scenes")
    shard = parse_shard(shard)
    fmt = output_format(output, recipe.output.pool, recipe.output.format)
    if recipe.gpus > 1 and fmt == "zarr":
        raise UsageError(
            "--gpus with Zarr output is not supported", "write a COG (-o emb.tif) or use --gpus 1"
        )
    outs = plan_outputs(list(sources), output, fmt, format_reason(recipe))
    folder = _output_folder(sources, output, outs)
    if mosaic and folder is None:
        raise UsageError("--mosaic needs an output folder", f"use -o {output.with_suffix('')}/")
    if mosaic and fmt != "cog":
        raise UsageError("--mosaic builds VRTs over COG outputs", "drop --mosaic, or write COGs")
    recipe = resolve_tiling(recipe, model)
    many = len(sources) > 1
    picks = shard_of(len(sources), shard)
    if shard is not None:
        log.info("shard %d/%d: %d of %d scenes", shard[0], shard[1], len(picks), len(sources))
    mine = [sources[i] for i in picks]
    mine_outs = [outs[i] for i in picks]
    previews = [_preview_for(preview, o, many) if o is not None else None for o in mine_outs]
    results = EmbedResults()
    results.shard, results.total = shard, len(sources)
    if not mine:
        log.warning("shard %d/%d of %d scenes holds none", shard[0], shard[1], len(sources))
    else:
        with _outputs_locked(mine_outs, previews):
            results.extend(
                _dispatch(mine, output, recipe, mine_outs, overwrite, resume, preview, progress, model, many)
            )
    if folder is not None and catalog and _launcher_rank() == 0 and mine:
        results.catalog = update_catalog(folder, [_record(r) for r in results], mosaic=mosaic)
    return results


def _output_folder(sources, output: Path, outs) -> Path | None:
    """The folder the outputs go to (their catalog's), or ``None`` for one output file."""
    if len(sources) == 1 and outs[0] == output:
        return None
    return output


def _record(r: EmbedResult) -> SceneRecord:
    reported = r.status == "written" and r.grid is not None  # not by a rank that then stopped
    return SceneRecord(
        output=r.output,
        source=r.source,
        status=r.status,
        error=r.error.one_line() if r.error is not None else None,
        seconds=round(r.seconds, 3) if reported else None,
        chips=r.chips if reported else None,
        format=r.format,
        stac=r.stac,
    )


def _dispatch(sources, output, recipe, outs, overwrite, resume, preview, progress, model, many=None):
    torchrun = int(os.environ.get("WORLD_SIZE", "1") or 1) > 1  # the launcher's ranks
    if (recipe.gpus > 1 or torchrun) and model is None:
        if recipe.gpus > 1:
            rt = resolve_runtime(recipe.runtime)
            check_gpus(recipe.gpus, rt.device_spec, rt.device)
        return run_ranks(
            recipe.gpus,
            _run_rank,
            list(sources),
            output,
            recipe,
            overwrite=overwrite,
            resume=resume,
            preview=preview,
            outs=outs,
            many=many,
            main_kwargs={"progress": progress},
            tolerate_failed_ranks=bool(many),
        )
    if recipe.gpus > 1:
        log.warning("--gpus %d ignored: a model object was passed (ranks build their own)", recipe.gpus)
    return _run(
        list(sources),
        output,
        recipe,
        overwrite=overwrite,
        resume=resume,
        preview=preview,
        progress=progress,
        model=model,
        outs=outs,
        many=many,
    )


def summary_line(r: EmbedResult) -> str:
    """``emb.tif  12.3 MB  EPSG:32631  27x26 px @ 160 m  512 bands  4.2 s``-style text."""
    if r.status == "skipped":
        return f"{r.output}  skipped (exists, --resume)"
    if r.grid is None:  # finished by a rank that stopped before reporting (its file is complete)
        return f"{r.output}  written by rank {r.extra.get('rank', '?')}, which then stopped"
    size = r.size_bytes
    unit = "B"
    for u in ("kB", "MB", "GB", "TB"):
        if size < 1000:
            break
        size /= 1000.0
        unit = u
    res = r.resolution or (math.nan, math.nan)
    what = "chips" if r.format == "parquet" else "px"
    return (
        f"{r.output}  {size:.1f} {unit}  {r.crs or 'no CRS'}  "
        f"{r.grid[0]}x{r.grid[1]} {what} @ {res[0]:.6g}  {r.chips} chips in {r.seconds:.1f} s"
    )


__all__ = [
    "EmbedResult",
    "EmbedResults",
    "build_model",
    "embed_scene",
    "embed_to_array",
    "embedding_metadata",
    "output_format",
    "plan_outputs",
    "run_embed",
    "summary_line",
]
