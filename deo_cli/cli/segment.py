"""``deo segment train|predict``: frozen DEO encoder + UPerNet head, and class maps from scenes."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from deo_cli.cli import options as opt
from deo_cli.cli.common import load_recipe, not_built

app = typer.Typer(
    help="Train a segmentation head on a frozen DEO encoder, or map classes on a scene.", no_args_is_help=True
)


@app.command("train")
def train_cmd(
    images: Annotated[
        str | None,
        typer.Option("--images", help="Image rasters: a folder or glob.", rich_help_panel=opt.INPUT),
    ] = None,
    labels: Annotated[
        str | None,
        typer.Option("--labels", help="Label rasters matching --images by name.", rich_help_panel=opt.INPUT),
    ] = None,
    pairs: Annotated[
        Path | None,
        typer.Option("--pairs", help="CSV with image,label[,split] columns.", rich_help_panel=opt.INPUT),
    ] = None,
    geobench_task: Annotated[
        str | None,
        typer.Option(
            "--geobench-task",
            help="Train on a GEO-Bench segmentation task instead.",
            rich_help_panel=opt.INPUT,
        ),
    ] = None,
    classes: Annotated[
        Path | None,
        typer.Option(
            "--classes",
            help="YAML with class names (and colours, ignore index, nodata).",
            rich_help_panel=opt.INPUT,
        ),
    ] = None,
    ignore_index: Annotated[
        int | None,
        typer.Option(
            "--ignore-index", help="Label value to ignore in the loss and metrics.", rich_help_panel=opt.INPUT
        ),
    ] = None,
    band_names: opt.BandNames = None,
    model: opt.Model = None,
    weights: opt.Weights = None,
    head: Annotated[
        str | None, typer.Option("--head", help="upernet (paper) or linear.", rich_help_panel=opt.MODEL)
    ] = None,
    chip_size: opt.ChipSize = None,
    epochs: Annotated[
        int | None, typer.Option("--epochs", help="Training epochs.", rich_help_panel=opt.RUNTIME)
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="Folder for the head checkpoint, metrics and recipe.",
            rich_help_panel=opt.OUTPUT,
        ),
    ] = None,
    overwrite: opt.Overwrite = False,
    device: opt.Device = None,
    precision: opt.Precision = None,
    batch_size: opt.BatchSize = None,
    num_workers: opt.NumWorkers = None,
    seed: opt.Seed = None,
    recipe: opt.Recipe = None,
    set_: opt.Set = None,
) -> None:
    """Train a UPerNet (or linear) head on a frozen DEO encoder; keeps the best-validation checkpoint."""
    from deo_cli.recipes import SegmentTrainRecipe

    load_recipe(
        SegmentTrainRecipe,
        recipe,
        set_,
        {
            "model.name": model,
            "model.weights": weights,
            "head": head,
            "input.band_names": band_names,
            "chip_size": chip_size,
            "epochs": epochs,
            "ignore_index": ignore_index,
            "runtime.device": device,
            "runtime.precision": precision,
            "runtime.batch_size": batch_size,
            "runtime.num_workers": num_workers,
            "runtime.seed": seed,
        },
        "segment",
    )
    raise not_built("deo segment train", 7)


@app.command("predict")
def predict_cmd(
    scenes: Annotated[list[str], typer.Argument(help="Scenes to map.", show_default=False)],
    output: Annotated[
        Path,
        typer.Option(
            "--output",
            "-o",
            help="Class mask COG (or a folder for several scenes).",
            rich_help_panel=opt.OUTPUT,
        ),
    ],
    head: Annotated[
        Path,
        typer.Option(
            "--head",
            help="Head checkpoint from deo segment train.",
            exists=True,
            dir_okay=False,
            rich_help_panel=opt.MODEL,
        ),
    ],
    probabilities: Annotated[
        Path | None,
        typer.Option(
            "--probabilities", help="Also write per-class probabilities (COG).", rich_help_panel=opt.OUTPUT
        ),
    ] = None,
    band_names: opt.BandNames = None,
    nodata: opt.Nodata = None,
    allow_no_crs: opt.AllowNoCrs = False,
    unit: opt.Unit = None,
    chip_size: opt.ChipSize = None,
    overlap: opt.Overlap = None,
    preview: opt.Preview = None,
    overwrite: opt.Overwrite = False,
    device: opt.Device = None,
    precision: opt.Precision = None,
    batch_size: opt.BatchSize = None,
    num_workers: opt.NumWorkers = None,
    recipe: opt.Recipe = None,
    set_: opt.Set = None,
) -> None:
    """Write a georeferenced class mask (COG with class names and colours) for each scene."""
    from deo_cli.recipes import SegmentPredictRecipe

    load_recipe(
        SegmentPredictRecipe,
        recipe,
        set_,
        {
            "input.band_names": band_names,
            "input.nodata": nodata,
            "input.allow_no_crs": allow_no_crs or None,
            "input.unit": unit,
            "tiling.chip_size": chip_size,
            "tiling.overlap": overlap,
            "runtime.device": device,
            "runtime.precision": precision,
            "runtime.batch_size": batch_size,
            "runtime.num_workers": num_workers,
        },
        "segment",
    )
    raise not_built("deo segment predict", 7)
