"""``deo inspect SCENE...``: what deo sees in a scene (bands, grid, unit, what it satisfies)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from deo_cli.cli import options as opt
from deo_cli.cli.common import print_json, stac_scenes, stdout_console


def inspect_cmd(
    scenes: Annotated[
        list[str] | None,
        typer.Argument(
            help="Scenes: a raster file, a folder of band files, a glob, @list.txt, a URL, sample:paris, "
            "or STAC Item / ItemCollection JSON. Of several, those that are not rasters (a SOURCE.md "
            "matched by data/*) are skipped with a warning.",
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
    as_json: Annotated[
        bool, typer.Option("--json", help="Print JSON (a list, one object per scene).")
    ] = False,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Also write the JSON report to this file.", dir_okay=False),
    ] = None,
    overwrite: opt.Overwrite = False,
    bands: Annotated[
        str | None,
        typer.Option(
            "--bands",
            help="Fail (exit 1) unless every scene has these bands (a set such as S2, or B04,B08,...).",
        ),
    ] = None,
) -> None:
    """Show CRS, grid, bands (with the names deo gives them), value ranges, unit and band-set fit;
    for a STAC item, which asset gives each band."""
    from deo_cli.io.inspect import inspect_scenes, write_report

    if output is not None:
        from deo_cli.io.atomic import check_output

        check_output(output, overwrite)
    sources = stac_scenes(scenes, stac, collection, bbox, datetime, query, max_items)
    reports = inspect_scenes(sources, band_names=band_names, nodata=nodata, require=bands)
    if output is not None:
        write_report(reports, output, overwrite=overwrite)
    if as_json:
        print_json(reports)
        return
    console = stdout_console()
    for r in reports:
        _print_report(console, r)


def _fmt(v, nd=4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}g}"
    return str(v)


def _print_report(console, r: dict) -> None:
    from rich.table import Table

    from deo_cli.io.units import ZERO_WARN_FRACTION

    res = r["resolution"]
    console.print(f"[bold]{r['scene']}[/bold]  ({len(r['paths'])} file{'s' if len(r['paths']) > 1 else ''})")
    console.print(f"  CRS         {r['crs'] or 'none (pixel coordinates only)'}")
    console.print(
        f"  size        {r['width']} x {r['height']} px, resolution {_fmt(res[0], 6)} x {_fmt(res[1], 6)}"
    )
    console.print(f"  bounds      {', '.join(_fmt(v, 10) for v in r['bounds'])}")
    if r["bounds_wgs84"]:
        console.print(f"  WGS84       {', '.join(_fmt(v, 9) for v in r['bounds_wgs84'])}")
    console.print(
        f"  dtype       {', '.join(r['dtype'])}   nodata {', '.join(map(str, r['nodata'])) or 'none'}"
    )
    console.print(f"  date        {r['datetime'] or 'unknown'}")
    console.print(f"  valid       {100 * r['valid_fraction']:.1f}% of sampled pixels")
    if r["zero_fraction"] >= ZERO_WARN_FRACTION:
        console.print(
            f"  [yellow]zeros[/yellow]       {100 * r['zero_fraction']:.1f}% of valid pixels are 0 in every band:"
            " unmarked nodata? (--nodata 0)"
        )
    console.print(f"  unit        {r['unit']['label']}  ({r['unit']['reason']})")
    t = Table(show_edge=False, pad_edge=False, box=None, header_style="bold")
    for col in ("#", "band", "named by", "description", "nm", "res", "min", "max", "unit"):
        t.add_column(col)
    for b in r["bands"]:
        t.add_row(
            str(b["index"]),
            b["name"] or "[red]?[/red]",
            b["named_by"],
            b["description"] or (b["label"] or ""),
            _fmt(b["wavelength_nm"]),
            _fmt(b["resolution"][0], 4),
            _fmt(b["min"]),
            _fmt(b["max"]),
            b["unit"],
        )
    console.print(t)
    if r.get("stac"):
        _print_stac(console, r["stac"])
    for title, rows in (("band sets", r["band_sets"]), ("model inputs", r["manifests"])):
        parts = []
        for name, fit in rows.items():
            parts.append(
                f"[green]{name} ok[/green]"
                if fit["satisfied"]
                else f"[yellow]{name} missing {','.join(fit['missing'])}[/yellow]"
            )
        console.print(f"  {title:<12}" + "; ".join(parts))
    console.print()


def _print_stac(console, st: dict) -> None:
    """The STAC item and which asset gives which band (or why it is left out)."""
    from rich.table import Table

    cloud = st.get("eo:cloud_cover")
    console.print(
        f"  STAC item   {st['id']}  collection {st.get('collection') or '-'}, {st.get('platform') or '-'}, "
        f"cloud cover {_fmt(cloud) if cloud is not None else '-'}"
    )
    t = Table(show_edge=False, pad_edge=False, box=None, header_style="bold")
    for col in ("asset", "band(s)", "from", "used"):
        t.add_column(col)
    for a in st["assets"]:
        t.add_row(
            a["key"],
            ",".join(b or "?" for b in a["bands"]) or "-",
            "; ".join(a["labels"]) or "-",
            "yes" if a["used"] else f"no: {a['why']}",
        )
    console.print(t)
