"""``run_bench``: one call from a resolved :class:`~deo_cli.recipes.BenchRecipe` to result rows.

The output folder (``--out``; default ``bench-results/<suite>-<YYYYmmdd-HHMMSS>``) holds::

    results.csv                  one row per (model, dataset, protocol, partition, seed, metric)
    results.json                 the same rows, as a JSON list
    results_and_parameters.csv   the same rows in GEO-Bench-2's leaderboard format (every suite)
    recipe.yaml                  the resolved recipe (rerun with --recipe recipe.yaml)
    run.log                      the run's log (appended on --resume)

Everything that can fail on the user's input (suite, tasks, partition, data folder, model name)
is checked before the folder is created. ``--resume`` reuses a folder (by default the newest
``bench-results/<suite>-*``) and skips units already in its ``results.csv``; ``--overwrite``
starts its results afresh.
"""

from __future__ import annotations

import contextlib
import datetime
import difflib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from deo_cli.bench.results import ResultsStore, SummaryRow, summarize
from deo_cli.errors import OutputExistsError, UsageError
from deo_cli.io.atomic import ensure_folder
from deo_cli.progress import NullProgress, Progress
from deo_cli.recipes import BenchRecipe, save_recipe

__all__ = ["SUITES", "BenchRun", "check_suite", "default_out", "run_bench"]

log = logging.getLogger(__name__)

SUITES = ("geobench", "oscd", "throughput")
#: Parent of the default output folders.
DEFAULT_OUT_ROOT = Path("bench-results")


@dataclass
class BenchRun:
    """What a run wrote: its folder, all rows now in ``results.csv``, and counts."""

    out: Path
    rows: list[dict]
    written: int
    skipped: int
    summary: list[SummaryRow] = field(default_factory=list)

    @property
    def csv(self) -> Path:
        return self.out / "results.csv"

    @property
    def json(self) -> Path:
        return self.out / "results.json"


def check_suite(name: str) -> str:
    """The suite ``name`` (case-insensitive), or a :class:`UsageError` with a did-you-mean."""
    low = (name or "").strip().lower()
    if low in SUITES:
        return low
    close = difflib.get_close_matches(low, SUITES, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise UsageError(f"unknown benchmark suite {name!r}", f"{hint}Suites: {', '.join(SUITES)}")


def default_out(suite: str, resume: bool = False, root: Path = DEFAULT_OUT_ROOT) -> Path:
    """``bench-results/<suite>-<timestamp>``; with ``resume``, the newest existing one."""
    if resume:
        found = sorted(p for p in root.glob(f"{suite}-*") if (p / "results.csv").is_file())
        if not found:
            raise UsageError(
                f"--resume found no earlier {suite} run under {root}/", "pass the run folder with --out"
            )
        return found[-1]
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return root / f"{suite}-{stamp}"


@contextlib.contextmanager
def _run_log(path: Path) -> Iterator[None]:
    """Copy deo's INFO log into ``path`` while the block runs (console verbosity unchanged)."""
    logger = logging.getLogger("deo_cli")
    old_level = logger.level
    effective = logger.getEffectiveLevel()
    raised = []
    if effective > logging.INFO:  # -q: keep the console quiet, but log INFO to the file
        for h in logger.handlers:
            if h.level < effective:
                raised.append((h, h.level))
                h.setLevel(effective)
        logger.setLevel(logging.INFO)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        handler.close()
        logger.setLevel(old_level)
        for h, level in raised:
            h.setLevel(level)


def _check_out(out: Path, resume: bool, overwrite: bool) -> None:
    """Fail before any work when ``out`` cannot take this run's results."""
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"output {out} is a file", "give a folder with --out")
    if ResultsStore(out).csv_path.is_file() and not resume and not overwrite:
        raise OutputExistsError(
            f"{out} already holds benchmark results",
            "pass --resume to continue it or --overwrite to restart it",
        )


def _prepare_out(out: Path, resume: bool, overwrite: bool) -> ResultsStore:
    _check_out(out, resume, overwrite)
    store = ResultsStore(out)
    if overwrite and not resume:
        store.clear()
    ensure_folder(out)
    return store


def run_bench(
    recipe: BenchRecipe,
    out: str | os.PathLike | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> BenchRun:
    """Run ``recipe.suite``; rows are appended to ``<out>/results.csv`` as each unit finishes."""
    import torch  # noqa: F401  (heavy imports only once a run starts)

    from deo_cli import __version__
    from deo_cli.bench.context import BenchContext
    from deo_cli.models import build_encoder, get_model_spec
    from deo_cli.runtime import resolve_runtime

    progress = progress or NullProgress()
    if resume and overwrite:
        raise UsageError("--resume and --overwrite contradict each other", "pass one of them")
    suite = check_suite(recipe.suite)
    get_model_spec(recipe.model.name)  # unknown model: did-you-mean, before any work
    rt = resolve_runtime(recipe.runtime)
    if suite == "geobench":
        from deo_cli.bench.geobench import plan_geobench, run_geobench

        plan = plan_geobench(recipe)
    elif suite == "oscd":
        from deo_cli.bench.oscd import plan_oscd, run_oscd

        plan = plan_oscd(recipe)
    else:
        from deo_cli.bench.throughput import run_throughput

        plan = None
    out_path = Path(out) if out is not None else default_out(suite, resume)
    _check_out(out_path, resume, overwrite)
    # weights that cannot be found or loaded fail here too, before the folder exists
    encoder = build_encoder(recipe.model.name, weights=recipe.model.weights).to(rt.device).eval()
    encoder.requires_grad_(False)
    store = _prepare_out(out_path, resume, overwrite)
    with _run_log(out_path / "run.log"):
        save_recipe(recipe, out_path / "recipe.yaml", "bench")
        log.info(
            "deo %s bench %s: model %s (weights %s) on %s, %s; results in %s",
            __version__,
            suite,
            recipe.model.name,
            recipe.model.weights,
            rt.device,
            rt.precision_name,
            out_path,
        )
        if recipe.limit:
            log.warning("--limit %d: a smoke run, not a result (the rows record the limit)", recipe.limit)
        log.info(
            "weights %s (sha256 %s)",
            getattr(encoder, "weights_uri", None) or recipe.model.weights,
            getattr(encoder, "weights_sha256", None) or "-",
        )
        ctx = BenchContext(recipe, encoder, rt, store, resume=resume, progress=progress)
        if suite == "geobench":
            run_geobench(ctx, plan)
        elif suite == "oscd":
            run_oscd(ctx, plan)
        else:
            run_throughput(ctx)
        if store.csv_path.is_file():
            store.refresh()
        rows = store.rows()
        log.info("%d row(s) written, %d unit(s) skipped; %s", ctx.written, ctx.skipped, store.csv_path)
    return BenchRun(out_path, rows, ctx.written, ctx.skipped, summarize(rows))
