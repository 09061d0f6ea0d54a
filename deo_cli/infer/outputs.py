"""Output names shared by the commands (``embed``, ``segment predict``, ``detect-change``).

An output file's extension must be its format's (:func:`check_output_suffix`); several scenes
write one output each into a folder, named after the scene (:func:`plan_outputs`,
:func:`scene_stem`).
"""

from __future__ import annotations

import re
from pathlib import Path

from deo_cli.errors import DeoError, UsageError
from deo_cli.io.sources import resolve_source

SUFFIX = {"cog": ".tif", "zarr": ".zarr", "parquet": ".parquet"}
#: File name extensions of each output format (the first is the one deo suggests).
FORMAT_SUFFIXES = {"cog": (".tif", ".tiff"), "zarr": (".zarr",), "parquet": (".parquet", ".geoparquet")}
FORMAT_NAMES = {"cog": "a COG (GeoTIFF)", "zarr": "a Zarr store", "parquet": "GeoParquet"}
#: Names that say "one output file" (several scenes need a folder instead).
OUTPUT_SUFFIXES = (".tif", ".tiff", ".zarr", ".parquet", ".geoparquet")


def check_output_suffix(path: Path, fmt: str, option: str = "-o", why: str = "") -> None:
    """Refuse an output file name whose extension is not ``fmt``'s (a GeoParquet file named
    ``e.tif``, a COG named ``e.xyz``): one :class:`UsageError` naming the extension, the format
    (``why`` says what chose it, e.g. `` (--pool mean)``) and the name to use instead."""
    exts = FORMAT_SUFFIXES[fmt]
    if path.suffix.lower() in exts:
        return
    got = f"the extension {path.suffix}" if path.suffix else "no extension"
    raise UsageError(
        f"{option} {path.name} has {got}, but the output is {FORMAT_NAMES[fmt]}{why}",
        f"use {option} {path.with_suffix(exts[0])}",
    )


def scene_stem(name: str) -> str:
    """A file-name stem for a scene name (``sample:paris`` -> ``paris``, ``a/b.tif`` -> ``b``)."""
    text = name.split(":", 1)[1] if name.startswith("sample:") else name
    text = text.rstrip("/").rsplit("/", 1)[-1]
    for suf in (".tif", ".tiff", ".vrt", ".jp2"):
        if text.lower().endswith(suf):
            text = text[: -len(suf)]
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text) or "scene"


def plan_outputs(sources: list[str], output: Path, fmt: str, why: str = "") -> list[Path | None]:
    """One output path per scene: ``output`` itself for one scene and a file name, else
    ``output/<scene><suffix>`` (``None`` where the scene cannot be resolved; it fails later).

    Several scenes with ``output`` named like an output file (``emb.tif``, ``v.parquet``,
    ``e.zarr``) that is not an existing folder are refused: a folder called ``emb.tif`` is
    never what was meant. A file name whose extension is not the format's is refused
    (:func:`check_output_suffix`; ``why`` says what chose the format)."""
    is_folder = output.is_dir() and output.suffix.lower() != ".zarr"
    if len(sources) > 1 and not is_folder and output.suffix.lower() in OUTPUT_SUFFIXES:
        raise UsageError(
            f"{len(sources)} scenes need an output folder, but -o {output} names a file",
            f"give a folder (-o {output.with_suffix('')}/) or one scene per run",
        )
    folder = len(sources) > 1 or is_folder or not output.suffix
    if not folder:
        check_output_suffix(output, fmt, "-o", why)
        return [output]
    out: list[Path | None] = []
    seen: dict[str, str] = {}
    for s in sources:
        try:
            stem = scene_stem(resolve_source(s).name)
        except DeoError:
            out.append(None)
            continue
        if stem in seen:
            raise UsageError(
                f"scenes {seen[stem]} and {s} would both be written to {output / (stem + SUFFIX[fmt])}",
                "embed them in separate runs or rename one",
            )
        seen[stem] = s
        out.append(output / (stem + SUFFIX[fmt]))
    return out


__all__ = ["check_output_suffix", "plan_outputs", "scene_stem"]
