"""``deo detect-change BEFORE AFTER -o change.tif``: change maps and polygons from DEO features."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from deo_cli.cli import options as opt
from deo_cli.cli.common import default_group, input_flags, load_recipe, runtime_flags, stdout_console

app = typer.Typer(
    cls=default_group("run"),
    help="Map change between two dates (`deo detect-change A B -o c.tif`), or train a siamese head.",
    no_args_is_help=True,
)


@app.command(
    "run", epilog="Also: `deo detect-change train --data OSCD_DIR --out RUN` for the supervised head."
)
def run_cmd(
    before: Annotated[
        str, typer.Argument(help="First-date scene (its grid is the output grid).", show_default=False)
    ],
    after: Annotated[
        str,
        typer.Argument(
            help="Second-date scene (reprojected onto the first's grid if needed).", show_default=False
        ),
    ],
    output: Annotated[
        Path,
        typer.Option(
            "--output",
            "-o",
            help="Change score COG; the mask goes beside it (*_mask.tif).",
            rich_help_panel=opt.OUTPUT,
        ),
    ],
    polygons: Annotated[
        Path | None,
        typer.Option(
            "--polygons",
            help="Also vectorise the mask: .parquet (GeoParquet) or .gpkg.",
            rich_help_panel=opt.OUTPUT,
        ),
    ] = None,
    method: Annotated[
        str | None,
        typer.Option(
            "--method",
            help="Score without --head: zero-shot (cosine distance of DEO features, default) or cva "
            "(change vector analysis: the spectral-difference baseline, no weights).",
            rich_help_panel=opt.MODEL,
        ),
    ] = None,
    threshold_method: Annotated[
        str | None,
        typer.Option(
            "--threshold-method",
            help="percentile (default: the top 0.75 %, --percentile 99.25; change is rare), otsu, "
            "otsu-log, kittler, triangle, mad (median + 4 x 1.4826 MAD; --set mad_k=K) or fixed "
            "(--threshold); with --head: the head's threshold.",
            rich_help_panel=opt.OUTPUT,
        ),
    ] = None,
    threshold: Annotated[
        float | None,
        typer.Option("--threshold", help="Fixed score threshold.", rich_help_panel=opt.OUTPUT),
    ] = None,
    percentile: Annotated[
        float | None,
        typer.Option(
            "--percentile",
            help="Threshold at this percentile of the scores (default 99.25).",
            rich_help_panel=opt.OUTPUT,
        ),
    ] = None,
    min_area: Annotated[
        float | None,
        typer.Option(
            "--min-area",
            help="Drop polygons smaller than this (CRS units squared).",
            rich_help_panel=opt.OUTPUT,
        ),
    ] = None,
    min_pixels: Annotated[
        int | None,
        typer.Option(
            "--min-pixels",
            help="Drop polygons covering fewer input pixels (default 2: single 10 m pixels, speckle; 0 keeps all).",
            rich_help_panel=opt.OUTPUT,
        ),
    ] = None,
    mask: Annotated[
        Path | None,
        typer.Option(
            "--mask",
            help="Where the mask COG goes (default: OUTPUT stem + _mask.tif).",
            rich_help_panel=opt.OUTPUT,
        ),
    ] = None,
    simplify: Annotated[
        float | None,
        typer.Option(
            "--simplify",
            help="Simplify polygons with this tolerance (CRS units).",
            rich_help_panel=opt.OUTPUT,
        ),
    ] = None,
    full_resolution: Annotated[
        bool,
        typer.Option(
            "--full-resolution",
            help="Zero-shot: upsample the score to the input grid (default: the embedding grid).",
            rich_help_panel=opt.OUTPUT,
        ),
    ] = False,
    head: Annotated[
        Path | None,
        typer.Option(
            "--head",
            help="Siamese head from detect-change train (default: zero-shot).",
            exists=True,
            dir_okay=False,
            rich_help_panel=opt.MODEL,
        ),
    ] = None,
    band_names: opt.BandNames = None,
    nodata: opt.Nodata = None,
    allow_no_crs: opt.AllowNoCrs = False,
    unit: opt.Unit = None,
    bounds: opt.Bounds = None,
    bounds_crs: opt.BoundsCrs = None,
    model: opt.Model = None,
    weights: opt.Weights = None,
    layer: Annotated[
        str | None,
        typer.Option(
            "--layer",
            help="Zero-shot feature level(s): default (Swin: levels 0,1,2 averaged on the stride-4 grid, "
            "since OSCD changes are a few 10 m pixels; ViT: deo embed's level), last, an index or a list.",
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
    """Score change per location (cosine distance of DEO embeddings, a trained head, or the CVA
    baseline) and threshold it.

    Writes the score COG (-o), the mask COG (--mask), optionally polygons and a preview; the
    second date is reprojected onto the first date's grid when they differ. The summary states
    the threshold rule, the threshold and the flagged share, and warns when that share is
    implausible for the rule.
    """
    from deo_cli.cli.progress import RichProgress
    from deo_cli.recipes import ChangeRecipe
    from deo_cli.tasks.change.predict import run_detect_change, summary_line

    cfg = load_recipe(
        ChangeRecipe,
        recipe,
        set_,
        {
            "model.name": model,
            "model.weights": weights if head is None else None,
            "layer": layer,
            **input_flags(band_names, nodata, allow_no_crs, unit, bounds, bounds_crs),
            "output_grid": "input" if full_resolution else None,
            "simplify": simplify,
            "tiling.chip_size": chip_size,
            "tiling.overlap": overlap,
            "method": method,
            "threshold_method": threshold_method,
            "threshold": threshold,
            "percentile": percentile,
            "min_area": min_area,
            "min_pixels": min_pixels,
            **runtime_flags(device, precision, batch_size, num_workers),
        },
        "detect-change",
    )
    res = run_detect_change(
        before,
        after,
        output,
        cfg,
        head=head,
        mask=mask,
        polygons=polygons,
        preview=preview,
        overwrite=overwrite,
        progress=RichProgress("chips"),
        weights=weights if head is not None else None,
    )
    stdout_console().print(summary_line(res))


@app.command("train")
def train_cmd(
    data: Annotated[
        Path,
        typer.Option(
            "--data", help="OSCD-format folder (images/, train_labels/).", rich_help_panel=opt.INPUT
        ),
    ],
    out: Annotated[
        Path,
        typer.Option(
            "--out", "-o", help="Run folder for the head, metrics and recipe.", rich_help_panel=opt.OUTPUT
        ),
    ],
    train_cities: Annotated[
        str | None,
        typer.Option("--train-cities", help="Comma-separated cities to train on.", rich_help_panel=opt.INPUT),
    ] = None,
    test_cities: Annotated[
        str | None,
        typer.Option("--test-cities", help="Comma-separated cities to test on.", rich_help_panel=opt.INPUT),
    ] = None,
    band_names: opt.BandNames = None,
    nodata: opt.Nodata = None,
    unit: opt.Unit = None,
    model: opt.Model = None,
    weights: opt.Weights = None,
    head: Annotated[
        str | None, typer.Option("--head", help="upernet (default) or linear.", rich_help_panel=opt.MODEL)
    ] = None,
    head_channels: Annotated[
        int | None,
        typer.Option("--head-channels", help="UPerNet width (paper: 512).", rich_help_panel=opt.MODEL),
    ] = None,
    fusion: Annotated[
        str | None,
        typer.Option(
            "--fusion",
            help="diff (|f1 - f2|, default) or concat (both dates stacked).",
            rich_help_panel=opt.MODEL,
        ),
    ] = None,
    class_weights: Annotated[
        str | None,
        typer.Option(
            "--class-weights",
            help="Loss weights 'no change,change' (default: 1,sqrt(no-change/change pixels)).",
            rich_help_panel=opt.MODEL,
        ),
    ] = None,
    chip_size: opt.ChipSize = None,
    val_fraction: Annotated[
        float | None,
        typer.Option(
            "--val-fraction",
            help="Share of training chips held out for validation (0.2).",
            rich_help_panel=opt.INPUT,
        ),
    ] = None,
    finetune: Annotated[
        bool,
        typer.Option(
            "--finetune", help="Fine-tune the encoder too (default: frozen).", rich_help_panel=opt.MODEL
        ),
    ] = False,
    epochs: Annotated[
        int | None, typer.Option("--epochs", help="Training epochs.", rich_help_panel=opt.RUNTIME)
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
    """Train a siamese change head (shared DEO encoder, feature difference into UPerNet) on OSCD pairs.

    Keeps the epoch with the best validation F1 of the change class and the P(change) threshold
    0.5 (--set threshold_shrink=0: the validation F1-best one); test cities are scored with the
    streaming prediction path.
    """
    from deo_cli.cli.progress import RichProgress
    from deo_cli.recipes import ChangeTrainRecipe
    from deo_cli.tasks.change.train import run_change_train

    cfg = load_recipe(
        ChangeTrainRecipe,
        recipe,
        set_,
        {
            "data": str(data),
            "train_cities": train_cities,
            "test_cities": test_cities,
            "model.name": model,
            "model.weights": weights,
            "head": head,
            "head_channels": head_channels,
            "fusion": fusion,
            "class_weights": class_weights,
            "chip_size": chip_size,
            "val_fraction": val_fraction,
            "input.band_names": band_names,
            "input.nodata": nodata,
            "input.unit": unit,
            "finetune": finetune or None,
            "epochs": epochs,
            **runtime_flags(device, precision, batch_size, num_workers, seed),
        },
        "detect-change",
    )
    res = run_change_train(cfg, out, overwrite=overwrite, progress=RichProgress("steps"))
    m = res.metrics
    line = (
        f"{res.head}  best epoch {m['best_epoch']}  threshold {m['threshold']:.2f}"
        f"  validation F1 {m['val_f1_at_threshold']:.4f}"
    )
    if "test_overall" in m:
        line += f"  test F1 {m['test_overall']['f1']:.4f} IoU {m['test_overall']['iou']:.4f}"
    stdout_console().print(line + f"  {res.seconds:.1f} s")
