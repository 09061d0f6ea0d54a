"""Option definitions shared by several commands (one definition, one help text).

Grouped in help panels: Input, Model, Tiling, Output, Runtime, Recipe (docs/design.md §7.1, habit 1).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

INPUT, MODEL, TILING, OUTPUT, RUNTIME, RECIPE = "Input", "Model", "Tiling", "Output", "Runtime", "Recipe"

# -- input ------------------------------------------------------------------------------------
BandNames = Annotated[
    str | None,
    typer.Option(
        "--band-names",
        help="Names of all bands in file order (e.g. B04,B03,B02 or a set name such as S2_L1C); "
        "overrides band descriptions and file names.",
        rich_help_panel=INPUT,
    ),
]
Nodata = Annotated[
    float | None,
    typer.Option(
        "--nodata", help="Treat this value as nodata too (e.g. 0 for L1C DN).", rich_help_panel=INPUT
    ),
]
Bounds = Annotated[
    str | None,
    typer.Option(
        "--bounds",
        metavar="XMIN,YMIN,XMAX,YMAX",
        help="Only this part of each scene, in its CRS (or --bounds-crs), widened to whole pixels.",
        rich_help_panel=INPUT,
    ),
]
BoundsCrs = Annotated[
    str | None,
    typer.Option(
        "--bounds-crs",
        help="CRS of --bounds, e.g. EPSG:4326 for lon/lat (default: the scene's).",
        rich_help_panel=INPUT,
    ),
]
AllowNoCrs = Annotated[
    bool,
    typer.Option(
        "--allow-no-crs",
        help="Accept rasters without a CRS (outputs stay in pixel coordinates).",
        rich_help_panel=INPUT,
    ),
]
Unit = Annotated[
    str | None,
    typer.Option(
        "--unit",
        help="Unit of the pixel values: dn (reflectance x 10^4), reflectance (0-1) or byte (0-255). "
        "Default: inferred and checked against the model.",
        rich_help_panel=INPUT,
    ),
]

# -- STAC search ------------------------------------------------------------------------------
STAC = "STAC search"
StacUrl = Annotated[
    str | None,
    typer.Option(
        "--stac",
        metavar="URL",
        help="Search this STAC API for the scenes (with --collection, --bbox, --datetime, --query); "
        "every item found is a scene.",
        rich_help_panel=STAC,
    ),
]
StacCollection = Annotated[
    list[str] | None,
    typer.Option(
        "--collection", help="Collection to search, e.g. sentinel-2-l2a (repeatable).", rich_help_panel=STAC
    ),
]
StacBbox = Annotated[
    str | None,
    typer.Option(
        "--bbox",
        metavar="W,S,E,N",
        help="Search area in longitude/latitude (EPSG:4326).",
        rich_help_panel=STAC,
    ),
]
StacDatetime = Annotated[
    str | None,
    typer.Option(
        "--datetime",
        help="Search period: 2024-06/2024-08, 2024-06-01/.., or one date.",
        rich_help_panel=STAC,
    ),
]
StacQuery = Annotated[
    list[str] | None,
    typer.Option(
        "--query",
        help="Property filter PROPERTY<op>VALUE, e.g. 'eo:cloud_cover<20' (repeatable; <, <=, >, >=, =, !=).",
        rich_help_panel=STAC,
    ),
]
StacMaxItems = Annotated[
    int | None,
    typer.Option("--max-items", help="Stop the search after this many items.", rich_help_panel=STAC),
]

# -- model ------------------------------------------------------------------------------------
Model = Annotated[
    str | None,
    typer.Option(
        "--model",
        "-m",
        help="Encoder name (deo_swin_b, deo_swin_t, deo_vit_b16, ...).",
        rich_help_panel=MODEL,
    ),
]
Weights = Annotated[
    str | None,
    typer.Option(
        "--weights",
        "-w",
        help="default (official release), random, a local file, hf://REPO/FILE[@REV], an https URL, "
        "or a checkpoint from deo pretrain.",
        rich_help_panel=MODEL,
    ),
]
Layer = Annotated[
    str | None,
    typer.Option(
        "--layer", help="Feature level to use (0-based stage/block index, or 'last').", rich_help_panel=MODEL
    ),
]

# -- tiling -----------------------------------------------------------------------------------
ChipSize = Annotated[
    int | None,
    typer.Option(
        "--chip-size",
        help="Chip size in input pixels (default: the model's input size).",
        rich_help_panel=TILING,
    ),
]
Overlap = Annotated[
    int | None,
    typer.Option(
        "--overlap", help="Overlap between neighbouring chips, in input pixels.", rich_help_panel=TILING
    ),
]

# -- output -----------------------------------------------------------------------------------
Overwrite = Annotated[
    bool,
    typer.Option("--overwrite", help="Replace outputs that already exist.", rich_help_panel=OUTPUT),
]
Resume = Annotated[
    bool,
    typer.Option(
        "--resume", help="Skip finished outputs and continue interrupted ones.", rich_help_panel=OUTPUT
    ),
]
Preview = Annotated[
    Path | None,
    typer.Option(
        "--preview", help="Also write a PNG quick-look here.", dir_okay=False, rich_help_panel=OUTPUT
    ),
]

# -- runtime ----------------------------------------------------------------------------------
Device = Annotated[
    str | None,
    typer.Option(
        "--device", help="auto (GPU when there is one), cpu, cuda, cuda:N or mps.", rich_help_panel=RUNTIME
    ),
]
Precision = Annotated[
    str | None,
    typer.Option(
        "--precision",
        help="auto (bf16/fp16 on GPU, fp32 on CPU), fp32, bf16 or fp16.",
        rich_help_panel=RUNTIME,
    ),
]
BatchSize = Annotated[
    int | None,
    typer.Option("--batch-size", "-b", help="Chips per forward pass (per GPU).", rich_help_panel=RUNTIME),
]
NumWorkers = Annotated[
    int | None,
    typer.Option(
        "--num-workers",
        help="DataLoader worker processes reading rasters (default: none on a CPU with 4 cores or "
        "fewer, where they would slow the model; else 2).",
        rich_help_panel=RUNTIME,
    ),
]
Gpus = Annotated[
    int | None,
    typer.Option(
        "--gpus", help="Processes to start on this node (one per GPU; gloo on CPU).", rich_help_panel=RUNTIME
    ),
]
Seed = Annotated[int | None, typer.Option("--seed", help="Random seed.", rich_help_panel=RUNTIME)]

# -- recipe -----------------------------------------------------------------------------------
Recipe = Annotated[
    str | None,
    typer.Option(
        "--recipe", "-r", help="Recipe YAML (a path, or a name under recipes/).", rich_help_panel=RECIPE
    ),
]
Set = Annotated[
    list[str] | None,
    typer.Option(
        "--set", help="Override a recipe key: --set optim.lr=1e-4 (repeatable).", rich_help_panel=RECIPE
    ),
]
