"""``deo embed SCENE... -o OUT``: georeferenced DEO embeddings from scenes of any size.

The core is :func:`deo_cli.tasks.embed.predict.run_embed`; this module only parses options,
passes a rich progress bar and prints one summary line per output (or one error line per failed
scene; exit 1 when any scene failed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from deo_cli.cli import options as opt
from deo_cli.cli.common import (
    input_flags,
    launcher_rank,
    load_recipe,
    report_scenes,
    runtime_flags,
    stac_scenes,
)


def catalog_line(results) -> str | None:
    """``catalog: out/index.parquet (48 scenes: 47 written, 1 failed), out/collection.json``."""
    cat = getattr(results, "catalog", None)
    if cat is None:
        return None
    import pyarrow.parquet as pq

    status = pq.read_table(cat.index, columns=["status"]).column("status").to_pylist()
    parts = [f"{status.count('written')} written"] + (
        [f"{status.count('failed')} failed"] if "failed" in status else []
    )
    extra = [str(p) for p in ([cat.collection] if cat.collection else []) + list(cat.mosaics)]
    return (
        f"catalog: {cat.index} ({len(status)} scene{'s' if len(status) != 1 else ''}: {', '.join(parts)})"
        + (f", {', '.join(extra)}" if extra else "")
    )


def embed_cmd(
    output: Annotated[
        Path,
        typer.Option(
            "--output",
            "-o",
            help="Output: emb.tif (COG), chips.parquet (with --pool), emb.zarr, or a folder for several scenes.",
            rich_help_panel=opt.OUTPUT,
        ),
    ],
    scenes: Annotated[
        list[str] | None,
        typer.Argument(
            help="Scenes: raster files, band folders, globs, @list.txt, URLs, sample:paris, or STAC "
            "Item / ItemCollection JSON (every item a scene).",
            show_default=False,
        ),
    ] = None,
    stac: opt.StacUrl = None,
    collection: opt.StacCollection = None,
    bbox: opt.StacBbox = None,
    datetime: opt.StacDatetime = None,
    query: opt.StacQuery = None,
    max_items: opt.StacMaxItems = None,
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
    shard: Annotated[
        str | None,
        typer.Option(
            "--shard",
            metavar="K/N",
            help="Embed only the K-th of N disjoint parts of the scene list (a job array's task: "
            "--shard $SLURM_ARRAY_TASK_ID/N); every part adds its rows to the same index.parquet.",
            rich_help_panel=opt.RUNTIME,
        ),
    ] = None,
    mosaic: Annotated[
        bool,
        typer.Option(
            "--mosaic",
            help="Also write one VRT per CRS over the outputs (mosaic_EPSG_*.vrt).",
            rich_help_panel=opt.OUTPUT,
        ),
    ] = False,
    recipe: opt.Recipe = None,
    set_: opt.Set = None,
) -> None:
    """Write a dense embedding raster (COG or Zarr) or per-chip vectors (GeoParquet) for each scene.

    The default level is the model's stage 3 for DEO Swin (stride 16): the map DEO distils into
    DINOv3's patch tokens. Tags name the model, weights, bands, normalisation and tiling. Into a
    folder, index.parquet (one row per scene) and a STAC collection of the outputs go beside them.
    """
    from deo_cli.cli.progress import RichProgress
    from deo_cli.infer.schedule import parse_shard
    from deo_cli.recipes import EmbedRecipe
    from deo_cli.tasks.embed.predict import run_embed, summary_line

    parse_shard(shard)  # a malformed --shard before any search

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
    sources = stac_scenes(scenes, stac, collection, bbox, datetime, query, max_items)
    results = run_embed(
        sources,
        output,
        cfg,
        overwrite=overwrite,
        resume=resume,
        preview=preview,
        progress=RichProgress("chips"),
        shard=shard,
        mosaic=mosaic,
    )
    if launcher_rank() != 0:
        return  # under torchrun, rank 0 reports every rank's scenes
    report_scenes(results, summary_line, catalog_line(results))
