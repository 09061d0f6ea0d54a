"""The ``deo`` command line: one Typer app, one module per command.

Heavy libraries (torch, rasterio, ...) are imported inside command bodies, so ``deo --help``
and ``deo CMD --help`` stay fast and never import torch.
"""

from __future__ import annotations

from typing import Annotated

import typer

from deo_cli import __version__
from deo_cli.cli import bench, change, embed, inspect, pretrain, segment
from deo_cli.cli.common import DeoGroup, setup_logging

app = typer.Typer(
    name="deo",
    cls=DeoGroup,
    help="Georeferenced DEO features, maps and benchmarks from multispectral Earth-observation rasters.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"deo {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")
    ] = False,
    verbose: Annotated[
        int, typer.Option("--verbose", "-v", count=True, help="More detail; tracebacks on errors.")
    ] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only warnings and errors.")] = False,
) -> None:
    """deo: DEO (CVPR 2026) features for Sentinel-2 and RGB imagery, as a command-line tool."""
    setup_logging(verbose, quiet)


app.command("inspect")(inspect.inspect_cmd)
app.command("embed")(embed.embed_cmd)
app.add_typer(pretrain.app, name="pretrain")
app.add_typer(segment.app, name="segment")
app.add_typer(change.app, name="detect-change")
app.add_typer(bench.app, name="bench")


def main() -> None:
    app()
