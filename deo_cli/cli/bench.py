"""``deo bench --suite geobench``: the paper's frozen-encoder protocols as reproducible suites."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from deo_cli.cli import options as opt
from deo_cli.cli.common import default_group, load_recipe, runtime_flags, stdout_console

app = typer.Typer(
    cls=default_group("run"),
    help="Benchmark a model (`deo bench --suite geobench`), or download benchmark data.",
    no_args_is_help=True,
)


@app.command(
    "run",
    epilog="Also: `deo bench download --suite geobench` fetches GEO-Bench into $GEO_BENCH_DIR. "
    "Results go to --out (default bench-results/SUITE-TIMESTAMP): results.csv, results.json, "
    "results_and_parameters.csv, recipe.yaml, run.log.",
)
def run_cmd(
    suite: Annotated[
        str, typer.Option("--suite", help="geobench, oscd or throughput.", rich_help_panel=opt.INPUT)
    ],
    tasks: Annotated[
        str | None,
        typer.Option(
            "--tasks",
            help="Comma-separated tasks of the suite (default: all the paper reports); OSCD cities for oscd.",
            rich_help_panel=opt.INPUT,
        ),
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option(
            "--data",
            help="GEO-Bench folder or one task folder (default: $GEO_BENCH_DIR); the OSCD folder for oscd.",
            rich_help_panel=opt.INPUT,
        ),
    ] = None,
    protocol: Annotated[
        str | None,
        typer.Option(
            "--protocol",
            help="paper (default: linear probe / UPerNet per task), linear, knn, upernet, or all (paper + kNN).",
            rich_help_panel=opt.INPUT,
        ),
    ] = None,
    partition: Annotated[
        str | None,
        typer.Option("--partition", help="default, 0.10x_train, ... (GEO-Bench).", rich_help_panel=opt.INPUT),
    ] = None,
    image_size: Annotated[
        int | None,
        typer.Option(
            "--image-size",
            help="Input size in pixels (default: the paper's per task; the model's for throughput).",
            rich_help_panel=opt.INPUT,
        ),
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
    head: Annotated[
        Path | None,
        typer.Option(
            "--head",
            help="oscd: a change head from deo detect-change train; adds its supervised rows.",
            rich_help_panel=opt.MODEL,
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="Folder for results.csv, results.json, recipe and log (default: bench-results/SUITE-TIMESTAMP).",
            rich_help_panel=opt.OUTPUT,
        ),
    ] = None,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Skip rows already in --out (default: the newest bench-results/SUITE-*).",
            rich_help_panel=opt.OUTPUT,
        ),
    ] = False,
    overwrite: opt.Overwrite = False,
    device: opt.Device = None,
    precision: opt.Precision = None,
    batch_size: Annotated[
        int | None,
        typer.Option(
            "--batch-size",
            "-b",
            help="Images per encoder forward (feature extraction, throughput).",
            rich_help_panel=opt.RUNTIME,
        ),
    ] = None,
    num_workers: opt.NumWorkers = None,
    recipe: opt.Recipe = None,
    set_: opt.Set = None,
) -> None:
    """Run a benchmark suite and print our numbers beside the paper's."""
    from deo_cli.bench.run import check_suite
    from deo_cli.recipes import BenchRecipe

    r = load_recipe(
        BenchRecipe,
        recipe,
        set_,
        {
            "suite": check_suite(suite),
            "tasks": tasks,
            "data": str(data) if data is not None else None,
            "protocol": protocol,
            "partition": partition,
            "image_size": image_size,
            "seeds": seeds,
            "limit": limit,
            "model.name": model,
            "model.weights": weights,
            "oscd.head": str(head) if head is not None else None,
            **runtime_flags(device, precision, batch_size, num_workers),
        },
        "bench",
    )
    from deo_cli.bench.run import run_bench
    from deo_cli.cli.progress import RichProgress

    result = run_bench(r, out, resume=resume, overwrite=overwrite, progress=RichProgress("it"))
    if r.suite == "oscd":
        _print_oscd(result)
    else:
        _print_summary(result)


_PERCENT = {"overall_accuracy", "micro_f1", "miou", "f1", "iou"}
_SHORT = {"overall_accuracy": "OA", "micro_f1": "micro-F1", "miou": "mIoU", "f1": "F1", "iou": "IoU"}


def _print_summary(result) -> None:
    """The results table (ours beside the paper's DEO, in percent like the paper) and the files."""
    from rich.table import Table

    console = stdout_console()
    if not console.is_terminal:  # files and pipes: the whole table, never cut at 80 columns
        console.width = max(console.width, 160)
    table = Table(title=f"deo bench: {result.out}", title_justify="left")
    for name in ("dataset", "protocol", "partition", "metric", "ours", "95% CI", "n", "paper DEO", "Δ"):
        table.add_column(
            name, justify="left" if name in ("dataset", "protocol", "partition", "metric") else "right"
        )
    notes = set()
    for s in result.summary:
        pct = s.metric in _PERCENT
        scale = 100.0 if pct else 1.0
        digits = 2 if pct else 1
        ours = f"{scale * s.value:.{digits}f}" + (f" ± {scale * s.std:.{digits}f}" if s.seeds > 1 else "")
        ci = "-"
        if s.ci_low is not None and s.ci_high is not None:
            ci = f"{scale * s.ci_low:.{digits}f}-{scale * s.ci_high:.{digits}f}"
        paper = delta = "-"
        if s.paper_value is not None:
            paper, delta = f"{100 * s.paper_value:.2f}", f"{100 * (s.value - s.paper_value):+.2f}"
            if s.dataset == "oscd":
                paper += "*"
                notes.add("* the paper fine-tunes the encoder for change detection; this suite is zero-shot.")
        if s.seeds > 1:
            notes.add(
                "ours: mean ± standard deviation over seeds; 95% CI: bootstrap over test samples, mean over seeds."
            )
        if s.limit:
            notes.add(f"run with --limit {s.limit}: smoke numbers, not results.")
        table.add_row(
            s.dataset,
            s.protocol,
            s.partition,
            _SHORT.get(s.metric, s.metric),
            ours,
            ci,
            str(s.n_test if s.n_test is not None else "-"),
            paper,
            delta,
        )
    console.print(table)
    for note in sorted(notes):
        console.print(note)
    console.print(
        f"{result.written} row(s) written, {result.skipped} unit(s) skipped; {result.csv}, {result.json}"
    )


#: Columns of the OSCD table: (heading, metric).
_OSCD_COLUMNS = (
    ("F1", "f1"),
    ("precision", "precision"),
    ("recall", "recall"),
    ("AUC", "auc"),
    ("best-thr. F1", "best_f1"),
    ("flagged %", "flagged_fraction"),
    ("change %", "change_fraction"),
)


def _print_oscd(result) -> None:
    """One row per city (then pooled) and method: F1, precision, recall, the threshold-free AUC
    and best-threshold F1, the flagged and the true change share (percent, AUC as is)."""
    from rich.table import Table

    console = stdout_console()
    if not console.is_terminal:
        console.width = max(console.width, 160)
    cells: dict[tuple, dict] = {}
    for row in result.rows:
        if row.get("dataset") == "oscd":
            cells.setdefault((row["partition"], row["protocol"]), {})[row["metric"]] = row["value"]
    table = Table(title=f"deo bench oscd: {result.out}", title_justify="left")
    for name in ("city", "method", *(h for h, _ in _OSCD_COLUMNS)):
        table.add_column(name, justify="left" if name in ("city", "method") else "right")
    for (city, method), m in cells.items():
        values = []
        for _, metric in _OSCD_COLUMNS:
            v = m.get(metric)
            if v is None:
                values.append("-")
            else:
                values.append(f"{v:.3f}" if metric == "auc" else f"{100 * v:.2f}")
        pooled = city in ("labelled", "official-test", "selected")
        table.add_row(f"all ({city})" if pooled else city, method, *values)
    console.print(table)
    console.print(
        "AUC and best-thr. F1 judge the score without a threshold (best-thr. F1: the best over every "
        "threshold, an oracle); F1 - best-thr. F1 is what the threshold costs. everything: every pixel flagged."
    )
    console.print(
        f"{result.written} row(s) written, {result.skipped} unit(s) skipped; {result.csv}, {result.json}"
    )


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
