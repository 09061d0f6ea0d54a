"""``deo segment train|predict``: frozen DEO encoder + UPerNet head, and class maps from scenes."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from deo_cli.cli import options as opt
from deo_cli.cli.common import (
    input_flags,
    load_recipe,
    report_scenes,
    runtime_flags,
    stdout_console,
)
from deo_cli.errors import UsageError

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
            help='YAML: classes: {VALUE: NAME or {name: NAME, color: "#rrggbb"}}, or a list of {value, name, color}; optional ignore_index, nodata.',
            rich_help_panel=opt.INPUT,
        ),
    ] = None,
    ignore_index: Annotated[
        int | None,
        typer.Option(
            "--ignore-index", help="Label value to ignore in the loss and metrics.", rich_help_panel=opt.INPUT
        ),
    ] = None,
    label_nodata: Annotated[
        float | None,
        typer.Option(
            "--label-nodata",
            help="Label value marking unlabelled pixels (besides the label rasters' own nodata).",
            rich_help_panel=opt.INPUT,
        ),
    ] = None,
    val_fraction: Annotated[
        float | None,
        typer.Option(
            "--val-fraction",
            help="Share held out for validation when --pairs has no split column (default 0.2).",
            rich_help_panel=opt.INPUT,
        ),
    ] = None,
    geobench_root: Annotated[
        str | None,
        typer.Option(
            "--geobench-root", help="GEO-Bench folder (default: $GEO_BENCH_DIR).", rich_help_panel=opt.INPUT
        ),
    ] = None,
    band_names: opt.BandNames = None,
    nodata: opt.Nodata = None,
    allow_no_crs: opt.AllowNoCrs = False,
    unit: opt.Unit = None,
    model: opt.Model = None,
    weights: opt.Weights = None,
    head: Annotated[
        str | None, typer.Option("--head", help="upernet (paper) or linear.", rich_help_panel=opt.MODEL)
    ] = None,
    head_channels: Annotated[
        int | None,
        typer.Option("--head-channels", help="UPerNet width (paper: 512).", rich_help_panel=opt.MODEL),
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
    """Train a UPerNet (or linear) head on a frozen DEO encoder; keeps the best-validation checkpoint.

    Training data: --images and --labels (matched by file name), --pairs CSV (image,label,split)
    or --geobench-task. Writes OUT/head.pt, OUT/metrics.json and OUT/recipe.yaml.
    """
    from deo_cli.cli.progress import RichProgress
    from deo_cli.recipes import SegmentTrainRecipe
    from deo_cli.tasks.segment.train import run_segment_train

    cfg = load_recipe(
        SegmentTrainRecipe,
        recipe,
        set_,
        {
            "model.name": model,
            "model.weights": weights,
            "head": head,
            "head_channels": head_channels,
            **input_flags(band_names, nodata, allow_no_crs, unit),
            "data.images": images,
            "data.labels": labels,
            "data.pairs": str(pairs) if pairs is not None else None,
            "data.geobench_task": geobench_task,
            "data.geobench_root": geobench_root,
            "data.classes": str(classes) if classes is not None else None,
            "data.label_nodata": label_nodata,
            "data.val_fraction": val_fraction,
            "chip_size": chip_size,
            "epochs": epochs,
            "ignore_index": ignore_index,
            **runtime_flags(device, precision, batch_size, num_workers, seed),
        },
        "segment",
    )
    if out is None:
        raise UsageError("deo segment train needs --out", "pass --out RUN_FOLDER")
    res = run_segment_train(cfg, out, overwrite=overwrite, progress=RichProgress("steps"))
    val = res.metrics.get("val", {})
    miou = val.get("miou")
    stdout_console().print(
        f"{res.head}  {res.classes.num_classes} classes  {res.train_chips} training / {res.val_chips} validation chips  "
        f"best epoch {res.metrics['best_epoch']}"
        + (f"  validation mIoU {miou:.4f}" if miou is not None else "")
        + f"  {res.seconds:.1f} s"
    )


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
    bounds: opt.Bounds = None,
    bounds_crs: opt.BoundsCrs = None,
    weights: Annotated[
        str | None,
        typer.Option(
            "--weights",
            "-w",
            help="Where the head's encoder weights are now (checked against the head's SHA-256).",
            rich_help_panel=opt.MODEL,
        ),
    ] = None,
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
    """Write a georeferenced class mask (COG with class names and colours) for each scene.

    The mask is on exactly the scene's grid and CRS; nodata where the scene is nodata.
    """
    from deo_cli.cli.progress import RichProgress
    from deo_cli.recipes import SegmentPredictRecipe
    from deo_cli.tasks.segment.predict import run_segment_predict, summary_line

    cfg = load_recipe(
        SegmentPredictRecipe,
        recipe,
        set_,
        {
            **input_flags(band_names, nodata, allow_no_crs, unit, bounds, bounds_crs),
            "tiling.chip_size": chip_size,
            "tiling.overlap": overlap,
            **runtime_flags(device, precision, batch_size, num_workers),
        },
        "segment",
    )
    results = run_segment_predict(
        scenes,
        output,
        head,
        cfg,
        probabilities=probabilities,
        preview=preview,
        overwrite=overwrite,
        progress=RichProgress("chips"),
        weights=weights,
    )
    report_scenes(results, summary_line)
