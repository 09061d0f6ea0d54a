"""``deo pretrain``: DEO dual-teacher pretraining (one process or many), and ``export``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from deo_cli.cli import options as opt
from deo_cli.cli.common import default_group, load_recipe, stdout_console

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

    if resume and recipe is None and out is not None and (out / "recipe.yaml").is_file():
        recipe = str(out / "recipe.yaml")  # continue with the run's own recipe; flags still win
    r = load_recipe(
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
    from deo_cli.cli.progress import RichProgress
    from deo_cli.train.loop import run_pretrain

    result = run_pretrain(r, out, resume=resume, overwrite=overwrite, progress=RichProgress("steps"))
    if result.rank != 0:
        return  # under torchrun only rank 0 reports
    console = stdout_console()
    console.print(f"[bold]run[/bold]         {result.out}")
    console.print(f"  steps       {result.steps} of {result.total_steps}")
    if result.first_loss is not None:
        console.print(f"  loss        {result.first_loss:.4f} -> {result.last_loss:.4f}")
    if result.images_per_s:
        console.print(f"  images/s    {result.images_per_s:.1f}")
    if result.checkpoint is not None:
        console.print(f"  checkpoint  {result.checkpoint}")
    console.print(f"  metrics     {result.metrics}")


@app.command("export")
def export_cmd(
    checkpoint: Annotated[
        Path,
        typer.Argument(
            help="A checkpoint written by deo pretrain, or a run folder (its newest checkpoint).", exists=True
        ),
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="Encoder file to write (model.pt).")],
    student: Annotated[
        bool, typer.Option("--student", help="Export the student instead of the EMA teacher.")
    ] = False,
    overwrite: opt.Overwrite = False,
) -> None:
    """Write the backbone + stems + band manifest that embed, segment and bench load with --weights."""
    from deo_cli.train.checkpoint import export_encoder

    if checkpoint.is_dir():
        from deo_cli.errors import InputNotFoundError
        from deo_cli.train.checkpoint import latest_checkpoint

        newest = latest_checkpoint(checkpoint)
        if newest is None:
            raise InputNotFoundError(
                f"run folder {checkpoint} holds no checkpoint", "pass a checkpoint-*.pt file"
            )
        checkpoint = newest
    path = export_encoder(checkpoint, output, student=student, overwrite=overwrite)
    stdout_console().print(
        f"wrote {path} ({'student' if student else 'EMA teacher'} encoder of {checkpoint.name})"
    )
