"""``deo embed``: georeferenced DEO embeddings from scenes of any size.

:func:`run_embed` is what the command line calls (a notebook can too)::

    from deo_cli.recipes import EmbedRecipe
    results = run_embed(["scene.tif"], Path("emb.tif"), EmbedRecipe())

Each scene is embedded by :func:`~deo_cli.tasks.embed.scene.embed_scene`, which describes the
outputs. Several scenes write one output each into a folder; a scene that fails does not stop
the others (its error is in its :class:`~deo_cli.tasks.embed.scene.EmbedResult`). ``--resume``
skips finished outputs and continues interrupted rasters from their last checkpointed row block
(see :mod:`deo_cli.io.writers`). ``--gpus N`` runs N ranks, each computing a band of rows
(:mod:`deo_cli.infer.distributed`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from pathlib import Path

from deo_cli.errors import DeoError, UsageError
from deo_cli.infer.distributed import RankInfo, run_ranks
from deo_cli.infer.outputs import plan_outputs
from deo_cli.infer.schedule import balance, parse_shard, peak_rss_mb, scene_mode, shard_of
from deo_cli.io.atomic import outputs_locked
from deo_cli.io.catalog import SceneRecord, update_catalog
from deo_cli.io.sources import resolve_source
from deo_cli.progress import Progress
from deo_cli.recipes import EmbedRecipe
from deo_cli.runtime import check_gpus, resolve_runtime
from deo_cli.tasks.embed.scene import (
    EmbedResult,
    Prepared,
    _capped_gdal_cache,
    _describe_model,
    build_model,
    embed_scene,
    format_reason,
    output_format,
    preflight,
    resolve_tiling,
)

log = logging.getLogger(__name__)


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
    # check every scene before loading the model (and downloading its weights)
    world = ranks.world
    checked = _check_scenes(sources, outs, recipe, manifests, ranks, overwrite, resume, preview, many, fmt)
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
    done = _embed_jobs(
        mine, sources, model, recipe, rt, fmt, overwrite, resume, preview, progress, ranks, scene_ranks, many
    )
    if whole:
        done = _gather_results(done, ranks, [[jobs[j] for j in part] for part in split], sources, fmt)
    for k, r in done.items():
        results[k] = r
    return results


def _check_scenes(sources, outs, recipe, manifests, ranks: RankInfo, overwrite, resume, preview, many, fmt):
    """:func:`_check_scene` of every scene, on every rank. Several ranks share the checks (scene
    i on rank i mod N: remote scenes are opened once, not N times)."""
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
    return checked


def _embed_jobs(
    mine, sources, model, recipe, rt, fmt, overwrite, resume, preview, progress, ranks, scene_ranks, many
) -> dict[int, EmbedResult]:
    """:func:`embed_scene` of this rank's checked scenes, by input index. With several scenes a
    failure is recorded in its result and the others still run; with one it is raised."""
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
    return done


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
    "EmbedResults",
    "run_embed",
    "summary_line",
]
