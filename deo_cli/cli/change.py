"""``deo detect-change BEFORE AFTER -o change.tif``: change maps and polygons from DEO features."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from deo_cli.cli import options as opt
from deo_cli.cli.common import default_group, load_recipe, not_built

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
    threshold: Annotated[
        float | None,
        typer.Option(
            "--threshold", help="Fixed score threshold (default: Otsu).", rich_help_panel=opt.OUTPUT
        ),
    ] = None,
    percentile: Annotated[
        float | None,
        typer.Option(
            "--percentile", help="Threshold at this percentile of the scores.", rich_help_panel=opt.OUTPUT
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
    head: Annotated[
        Path | None,
        typer.Option(
            "--head",
            help="Siamese head from detect-change train (default: zero-shot).",
            rich_help_panel=opt.MODEL,
        ),
    ] = None,
    band_names: opt.BandNames = None,
    nodata: opt.Nodata = None,
    unit: opt.Unit = None,
    model: opt.Model = None,
    weights: opt.Weights = None,
    layer: opt.Layer = None,
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
    """Score change per location (cosine distance of DEO embeddings, or a trained head) and threshold it."""
    from deo_cli.recipes import ChangeRecipe

    load_recipe(
        ChangeRecipe,
        recipe,
        set_,
        {
            "model.name": model,
            "model.weights": weights,
            "layer": layer,
            "input.band_names": band_names,
            "input.nodata": nodata,
            "input.unit": unit,
            "tiling.chip_size": chip_size,
            "tiling.overlap": overlap,
            "threshold": threshold,
            "percentile": percentile,
            "min_area": min_area,
            "runtime.device": device,
            "runtime.precision": precision,
            "runtime.batch_size": batch_size,
            "runtime.num_workers": num_workers,
        },
        "detect-change",
    )
    raise not_built("deo detect-change", 7)


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
    model: opt.Model = None,
    weights: opt.Weights = None,
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
    seed: opt.Seed = None,
    recipe: opt.Recipe = None,
    set_: opt.Set = None,
) -> None:
    """Train a siamese change head (shared DEO encoder, feature difference into UPerNet) on OSCD pairs."""
    from deo_cli.recipes import ChangeTrainRecipe

    load_recipe(
        ChangeTrainRecipe,
        recipe,
        set_,
        {
            "model.name": model,
            "model.weights": weights,
            "finetune": finetune or None,
            "epochs": epochs,
            "runtime.device": device,
            "runtime.precision": precision,
            "runtime.batch_size": batch_size,
            "runtime.seed": seed,
        },
        "detect-change",
    )
    raise not_built("deo detect-change train", 7)
