"""``deo embed SCENE... -o OUT``: georeferenced DEO embeddings from scenes of any size."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from deo_cli.cli import options as opt
from deo_cli.cli.common import load_recipe, not_built


def embed_cmd(
    scenes: Annotated[
        list[str],
        typer.Argument(
            help="Scenes: raster files, band folders, globs, @list.txt, URLs or sample:paris.",
            show_default=False,
        ),
    ],
    output: Annotated[
        Path,
        typer.Option(
            "--output",
            "-o",
            help="Output: emb.tif (COG), chips.parquet (with --pool), emb.zarr, or a folder for several scenes.",
            rich_help_panel=opt.OUTPUT,
        ),
    ],
    band_names: opt.BandNames = None,
    nodata: opt.Nodata = None,
    allow_no_crs: opt.AllowNoCrs = False,
    unit: opt.Unit = None,
    model: opt.Model = None,
    weights: opt.Weights = None,
    layer: opt.Layer = None,
    chip_size: opt.ChipSize = None,
    overlap: opt.Overlap = None,
    pool: Annotated[
        str | None,
        typer.Option(
            "--pool",
            help="none (dense raster), mean or cls (one vector per chip, GeoParquet).",
            rich_help_panel=opt.TILING,
        ),
    ] = None,
    dtype: Annotated[
        str | None,
        typer.Option(
            "--dtype",
            help="float32, float16 or int8 (with a stored scale/offset).",
            rich_help_panel=opt.OUTPUT,
        ),
    ] = None,
    preview: opt.Preview = None,
    overwrite: opt.Overwrite = False,
    resume: opt.Resume = False,
    device: opt.Device = None,
    precision: opt.Precision = None,
    batch_size: opt.BatchSize = None,
    num_workers: opt.NumWorkers = None,
    gpus: opt.Gpus = None,
    recipe: opt.Recipe = None,
    set_: opt.Set = None,
) -> None:
    """Write a dense embedding raster (COG or Zarr) or per-chip vectors (GeoParquet) for each scene."""
    from deo_cli.recipes import EmbedRecipe

    load_recipe(
        EmbedRecipe,
        recipe,
        set_,
        {
            "model.name": model,
            "model.weights": weights,
            "layer": layer,
            "input.band_names": band_names,
            "input.nodata": nodata,
            "input.allow_no_crs": allow_no_crs or None,
            "input.unit": unit,
            "tiling.chip_size": chip_size,
            "tiling.overlap": overlap,
            "output.pool": pool,
            "output.dtype": dtype,
            "runtime.device": device,
            "runtime.precision": precision,
            "runtime.batch_size": batch_size,
            "runtime.num_workers": num_workers,
        },
        "embed",
    )
    raise not_built("deo embed", 6)
