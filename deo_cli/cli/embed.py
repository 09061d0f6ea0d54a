"""``deo embed SCENE... -o OUT``: georeferenced DEO embeddings from scenes of any size.

The core is :func:`deo_cli.infer.embed.run_embed`; this module only parses options, passes a
rich progress bar and prints one summary line per output (or one error line per failed scene;
exit 1 when any scene failed).
"""

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
)


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
    bounds: opt.Bounds = None,
    bounds_crs: opt.BoundsCrs = None,
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
    """Write a dense embedding raster (COG or Zarr) or per-chip vectors (GeoParquet) for each scene.

    The default level is the model's stage 3 for DEO Swin (stride 16): the map DEO distils into
    DINOv3's patch tokens. Tags name the model, weights, bands, normalisation and tiling.
    """
    from deo_cli.cli.progress import RichProgress
    from deo_cli.infer.embed import run_embed, summary_line
    from deo_cli.recipes import EmbedRecipe

    cfg = load_recipe(
        EmbedRecipe,
        recipe,
        set_,
        {
            "model.name": model,
            "model.weights": weights,
            "layer": layer,
            **input_flags(band_names, nodata, allow_no_crs, unit, bounds, bounds_crs),
            "tiling.chip_size": chip_size,
            "tiling.overlap": overlap,
            "output.pool": pool,
            "output.dtype": dtype,
            **runtime_flags(device, precision, batch_size, num_workers),
            "gpus": gpus,
        },
        "embed",
    )
    results = run_embed(
        scenes,
        output,
        cfg,
        overwrite=overwrite,
        resume=resume,
        preview=preview,
        progress=RichProgress("chips"),
    )
    report_scenes(results, summary_line)
