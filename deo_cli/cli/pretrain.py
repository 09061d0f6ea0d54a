"""``deo pretrain``: DEO dual-teacher pretraining (one process or many), and ``export``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from deo_cli.cli import options as opt
from deo_cli.cli.common import default_group, load_recipe, not_built

app = typer.Typer(
    cls=default_group("run"),
    help="Pretrain a DEO encoder (`deo pretrain` = `deo pretrain run`), or export one for embed/segment/bench.",
    no_args_is_help=False,
)


@app.command(
    "run",
    epilog="Also: `deo pretrain export CKPT -o model.pt`. Several nodes: `torchrun ... -m deo_cli pretrain ...`.",
)
def run_cmd(
    recipe: opt.Recipe = None,
    set_: opt.Set = None,
    data: Annotated[
        str | None,
        typer.Option(
            "--data",
            help="Chips folder or glob, a CSV/Parquet manifest (ms_path[, rgb_path]), or large scenes.",
            rich_help_panel=opt.INPUT,
        ),
    ] = None,
    bands: Annotated[
        str | None,
        typer.Option(
            "--bands",
            help="Band set of the multispectral stem (S2 = DEO's 10 bands).",
            rich_help_panel=opt.INPUT,
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="Run folder: checkpoints, metrics.jsonl, recipe.yaml.",
            rich_help_panel=opt.OUTPUT,
        ),
    ] = None,
    model: opt.Model = None,
    teacher_weights: Annotated[
        str | None,
        typer.Option(
            "--teacher-weights",
            help="Optical teacher weights: default (hub), a local file or hf://...",
            rich_help_panel=opt.MODEL,
        ),
    ] = None,
    epochs: Annotated[
        int | None, typer.Option("--epochs", help="Training epochs.", rich_help_panel=opt.RUNTIME)
    ] = None,
    max_steps: Annotated[
        int | None,
        typer.Option(
            "--max-steps",
            help="Stop after this many steps (schedules keep their length).",
            rich_help_panel=opt.RUNTIME,
        ),
    ] = None,
    batch_size: opt.BatchSize = None,
    gpus: opt.Gpus = None,
    device: opt.Device = None,
    precision: opt.Precision = None,
    num_workers: opt.NumWorkers = None,
    seed: opt.Seed = None,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume", help="Continue from the newest checkpoint in --out.", rich_help_panel=opt.OUTPUT
        ),
    ] = False,
    overwrite: opt.Overwrite = False,
) -> None:
    """Train a DEO student against its EMA teacher (SimDINO) and a frozen optical teacher (DINOv3)."""
    from deo_cli.recipes import PretrainRecipe

    load_recipe(
        PretrainRecipe,
        recipe,
        set_,
        {
            "data.path": data,
            "data.bands": bands,
            "data.num_workers": num_workers,
            "model.name": model,
            "teacher.weights": teacher_weights,
            "epochs": epochs,
            "max_steps": max_steps,
            "batch_size": batch_size,
            "gpus": gpus,
            "device": device,
            "precision": precision,
            "seed": seed,
        },
        "pretrain",
    )
    raise not_built("deo pretrain", 5)


@app.command("export")
def export_cmd(
    checkpoint: Annotated[
        Path, typer.Argument(help="A checkpoint written by deo pretrain.", exists=True, dir_okay=False)
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="Encoder file to write (model.pt).")],
    student: Annotated[
        bool, typer.Option("--student", help="Export the student instead of the EMA teacher.")
    ] = False,
    overwrite: opt.Overwrite = False,
) -> None:
    """Write the backbone + stems + band manifest that embed, segment and bench load with --weights."""
    raise not_built("deo pretrain export", 5)
