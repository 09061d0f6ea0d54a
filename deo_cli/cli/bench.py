"""``deo bench --suite geobench``: the paper's frozen-encoder protocols as reproducible suites."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from deo_cli.cli import options as opt
from deo_cli.cli.common import default_group, load_recipe, not_built

app = typer.Typer(
    cls=default_group("run"),
    help="Benchmark a model (`deo bench --suite geobench`), or download benchmark data.",
    no_args_is_help=True,
)


@app.command(
    "run", epilog="Also: `deo bench download --suite geobench` fetches GEO-Bench into $GEO_BENCH_DIR."
)
def run_cmd(
    suite: Annotated[
        str, typer.Option("--suite", help="geobench, oscd or throughput.", rich_help_panel=opt.INPUT)
    ],
    tasks: Annotated[
        str | None,
        typer.Option(
            "--tasks",
            help="Comma-separated tasks of the suite (default: all the paper reports).",
            rich_help_panel=opt.INPUT,
        ),
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option(
            "--data", help="Data folder (default: $GEO_BENCH_DIR for geobench).", rich_help_panel=opt.INPUT
        ),
    ] = None,
    protocol: Annotated[
        str | None,
        typer.Option(
            "--protocol",
            help="linear, knn or upernet (default: the paper's per task).",
            rich_help_panel=opt.INPUT,
        ),
    ] = None,
    partition: Annotated[
        str | None, typer.Option("--partition", help="default or 0.10x_train.", rich_help_panel=opt.INPUT)
    ] = None,
    seeds: Annotated[
        str | None, typer.Option("--seeds", help="Comma-separated seeds.", rich_help_panel=opt.RUNTIME)
    ] = None,
    limit: Annotated[
        int | None,
        typer.Option(
            "--limit", help="At most N samples per split (smoke runs).", rich_help_panel=opt.RUNTIME
        ),
    ] = None,
    model: opt.Model = None,
    weights: opt.Weights = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="Folder for results.csv, results.json, recipe and log.",
            rich_help_panel=opt.OUTPUT,
        ),
    ] = None,
    resume: opt.Resume = False,
    overwrite: opt.Overwrite = False,
    device: opt.Device = None,
    precision: opt.Precision = None,
    batch_size: opt.BatchSize = None,
    num_workers: opt.NumWorkers = None,
    recipe: opt.Recipe = None,
    set_: opt.Set = None,
) -> None:
    """Run a benchmark suite and print our numbers beside the paper's."""
    from deo_cli.recipes import BenchRecipe

    load_recipe(
        BenchRecipe,
        recipe,
        set_,
        {
            "suite": suite,
            "tasks": tasks,
            "protocol": protocol,
            "partition": partition,
            "seeds": seeds,
            "limit": limit,
            "model.name": model,
            "model.weights": weights,
            "runtime.device": device,
            "runtime.precision": precision,
            "runtime.batch_size": batch_size,
            "runtime.num_workers": num_workers,
        },
        "bench",
    )
    raise not_built("deo bench", 8)


@app.command("download")
def download_cmd(
    suite: Annotated[str, typer.Option("--suite", help="Benchmark data to fetch (geobench).")] = "geobench",
    dest: Annotated[
        Path | None, typer.Option("--dest", help="Target folder (default: $GEO_BENCH_DIR).")
    ] = None,
    tasks: Annotated[
        str | None, typer.Option("--tasks", help="Comma-separated tasks (default: all).")
    ] = None,
    source: Annotated[
        str | None,
        typer.Option(
            "--source",
            help="hf://datasets/REPO (default: recursix/geo-bench-1.0), or a mirror URL with SHA256SUMS.",
        ),
    ] = None,
    revision: Annotated[
        str | None, typer.Option("--revision", help="Hub revision (default: the pinned commit).")
    ] = None,
    keep_archives: Annotated[
        bool, typer.Option("--keep-archives", help="Keep the zip files after extracting.")
    ] = False,
) -> None:
    """Fetch benchmark data: restartable (rerun to resume), every file checked against its checksum."""
    from deo_cli.bench.download import DEFAULT_BASE_URL, GEOBENCH_HF_REVISION, download_geobench
    from deo_cli.errors import UsageError

    if suite.lower() != "geobench":
        raise UsageError(
            f"deo bench download knows no suite {suite!r}",
            "use --suite geobench (OSCD: rcdaudt.github.io/oscd)",
        )
    bar = _DownloadBar()
    try:
        result = download_geobench(
            dest,
            [t.strip() for t in tasks.split(",") if t.strip()] if tasks else None,
            base_url=source or DEFAULT_BASE_URL,
            progress=bar,
            revision=revision or GEOBENCH_HF_REVISION,
            keep_archives=keep_archives,
        )
    finally:
        bar.close()
    typer.echo(
        f"GEO-Bench in {result.dest}: {len(result.fetched)} file(s) fetched, {len(result.skipped)} already complete; "
        f"tasks: {', '.join(str(t) for t in result.tasks) or 'none'}"
    )


class _DownloadBar:
    """Adapts the downloader's ``progress(stage, path, done, total)`` calls to a rich bar per file."""

    def __init__(self):
        from deo_cli.cli.progress import RichProgress

        self.bar = RichProgress("MB")
        self.key = None
        self.done = 0

    def __call__(self, stage: str, path: str, done: int, total: int | None) -> None:
        if (stage, path) != self.key:
            self.bar.start(None if total is None else max(total // 2**20, 1), f"{stage} {path}")
            self.key, self.done = (stage, path), 0
        mb = done // 2**20
        if mb > self.done:
            self.bar.advance(mb - self.done)
            self.done = mb

    def close(self) -> None:
        self.bar.finish()
