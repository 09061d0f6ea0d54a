"""What every command shares: logging, the one-line error report, groups, recipe loading.

Only ``deo_cli.cli`` imports typer and rich. Nothing here imports torch: core modules are
imported inside command bodies so ``deo --help`` stays fast.
"""

from __future__ import annotations

import errno
import logging
import sys
import traceback
from typing import Any

import typer
from typer.core import TyperGroup

from deo_cli.errors import DeoError

STATE = {"verbose": 0, "quiet": False}


def stderr_console():
    from rich.console import Console

    return Console(stderr=True, highlight=False, soft_wrap=True)


def stdout_console():
    from rich.console import Console

    return Console(highlight=False, soft_wrap=True)


def setup_logging(verbose: int, quiet: bool) -> None:
    """deo's loggers to stderr through rich: INFO by default, WARNING with -q, DEBUG with -v."""
    from rich.logging import RichHandler

    STATE["verbose"], STATE["quiet"] = verbose, quiet
    level = logging.WARNING if quiet else (logging.DEBUG if verbose else logging.INFO)
    logger = logging.getLogger("deo_cli")
    logger.handlers.clear()
    handler = RichHandler(
        console=stderr_console(),
        show_time=bool(verbose),
        show_path=bool(verbose),
        markup=False,
        rich_tracebacks=False,
    )
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    logging.captureWarnings(True)
    # Third-party chatter stays at WARNING unless -vv.
    for name in ("rasterio", "fiona", "pyogrio", "urllib3", "huggingface_hub", "timm"):
        logging.getLogger(name).setLevel(logging.DEBUG if verbose > 1 else logging.WARNING)


def report_error(err: DeoError) -> None:
    if STATE["verbose"]:
        traceback.print_exception(type(err), err, err.__traceback__, file=sys.stderr)
    typer.echo(f"error: {err.one_line()}", err=True)


#: What the machine, not deo, refused: reported as one line (any other OSError is a bug).
ENVIRONMENT_ERRNOS = {
    errno.ENOSPC: "free some space, or write the output elsewhere (-o)",
    errno.EDQUOT: "free some space under your quota, or write the output elsewhere (-o)",
    errno.EACCES: "check the permissions of that file or folder",
    errno.EPERM: "check the permissions of that file or folder",
    errno.EROFS: "write the output to a writable file system (-o)",
}


def environment_error(err: OSError) -> DeoError | None:
    """A full disk, a quota or a permission refused, as a :class:`DeoError` (``None`` for
    anything else)."""
    fix = ENVIRONMENT_ERRNOS.get(err.errno)
    if fix is None:
        return None
    where = f" ({err.filename})" if err.filename else ""
    return DeoError(f"{err.strerror or err}{where}", fix)


#: The root's own flags, also accepted after the command (``deo embed x -o y -v``).
GLOBAL_FLAGS = frozenset({"-q", "--quiet", "--verbose", "-v", "-vv", "-vvv"})


def hoist_global_flags(args: list[str]) -> list[str]:
    """``args`` with :data:`GLOBAL_FLAGS` given after the command moved in front of it (up to a
    ``--``), where the root group parses them."""
    end = args.index("--") if "--" in args else len(args)
    flags = [a for a in args[1:end] if a in GLOBAL_FLAGS]
    if not flags or not args or args[0].startswith("-"):
        return args
    rest = [a for a in args[1:end] if a not in GLOBAL_FLAGS]
    return [*flags, args[0], *rest, *args[end:]]


class DeoGroup(TyperGroup):
    """The root group: turns a :class:`DeoError` (and a full disk or a refused permission, see
    :func:`environment_error`) into one line on stderr and its exit code; takes ``-v``/``-q``
    before or after the command (:func:`hoist_global_flags`)."""

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        return super().parse_args(ctx, hoist_global_flags(list(args)))

    def invoke(self, ctx) -> Any:
        try:
            return super().invoke(ctx)
        except DeoError as err:
            report_error(err)
            raise typer.Exit(err.exit_code) from None
        except OSError as os_err:
            err = environment_error(os_err)
            if err is None:
                raise
            err.__traceback__ = os_err.__traceback__
            report_error(err)
            raise typer.Exit(err.exit_code) from None
        except KeyboardInterrupt as stop:
            typer.echo(f"error: {interrupted_line(stop)}", err=True)
            raise typer.Exit(130) from None


def interrupted_line(stop: KeyboardInterrupt) -> str:
    """What Ctrl-C left behind, in one line: the unfinished output kept for ``--resume`` (the
    core notes it on the interruption, :func:`deo_cli.errors.note_kept`), or nothing."""
    from deo_cli.errors import kept_paths

    kept = kept_paths(stop)
    if kept:
        return (
            f"interrupted. The rows finished so far are kept for --resume in {', '.join(kept)}; "
            "rerun the same command with --resume to continue"
        )
    return (
        "interrupted. Unfinished outputs were removed; rerun the command (with --resume where it offers one)"
    )


def default_group(default: str) -> type[TyperGroup]:
    """A group that runs ``default`` when the first argument is not one of its subcommands.

    ``deo pretrain --data x`` is ``deo pretrain run --data x``; ``deo pretrain export ...``
    still reaches ``export``. ``deo pretrain --help`` shows the default command's options.
    """

    class DefaultGroup(TyperGroup):
        default_command = default

        def parse_args(self, ctx, args: list[str]) -> list[str]:
            if not args or args[0] not in self.commands:
                args = [self.default_command, *args]
            return super().parse_args(ctx, args)

    return DefaultGroup


def load_recipe(schema, recipe, sets, flags: dict, command: str):
    """Resolve a command's recipe: defaults < --recipe file < --set < explicit flags."""
    from deo_cli.recipes import build_recipe

    return build_recipe(schema, file=recipe, sets=sets or (), flags=flags, command=command)


def print_json(data: Any) -> None:
    import json

    typer.echo(json.dumps(data, indent=2, default=str))


def exit_code_for(errors: int) -> None:
    """Non-zero exit when some inputs failed while others succeeded (partial failure)."""
    if errors:
        raise typer.Exit(1)


def stac_scenes(scenes, url, collections, bbox, datetime, query, max_items) -> list:
    """The scene arguments, plus the items of a STAC search when ``--stac`` is given (search
    options without ``--stac`` are a usage error; no scene at all too)."""
    from deo_cli.errors import UsageError

    scenes = list(scenes or [])
    given = [n for n, v in (("--collection", collections), ("--bbox", bbox), ("--datetime", datetime),
                            ("--query", query), ("--max-items", max_items)) if v]  # fmt: skip
    if url is None:
        if given:
            raise UsageError(f"{given[0]} filters a STAC search", "add --stac URL (the STAC API to search)")
        if not scenes:
            raise UsageError("no scene given", "pass scenes, a STAC item/collection JSON, or --stac URL")
        return scenes
    from deo_cli.io.stac import search_items

    return scenes + search_items(
        url,
        collections=collections or (),
        bbox=bbox,
        datetime=datetime,
        query=query or (),
        max_items=max_items,
    )


def input_flags(band_names, nodata, allow_no_crs, unit, bounds=None, bounds_crs=None) -> dict:
    """The recipe keys of the shared Input options (``None`` leaves the recipe's value)."""
    return {
        "input.band_names": band_names,
        "input.nodata": nodata,
        "input.allow_no_crs": allow_no_crs or None,
        "input.unit": unit,
        "input.bounds": parse_bounds(bounds) if bounds is not None else None,
        "input.bounds_crs": bounds_crs,
    }


def parse_bounds(text: str) -> list[float]:
    """``"xmin,ymin,xmax,ymax"`` (commas or spaces) as four floats; a UsageError otherwise."""
    from deo_cli.errors import UsageError

    parts = text.replace(",", " ").split()
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if len(values) != 4:
        raise UsageError(f"--bounds {text!r} is not four numbers", "give --bounds XMIN,YMIN,XMAX,YMAX")
    return values


def runtime_flags(device, precision, batch_size, num_workers, seed=None) -> dict:
    """The recipe keys of the shared Runtime options."""
    return {
        "runtime.device": device,
        "runtime.precision": precision,
        "runtime.batch_size": batch_size,
        "runtime.num_workers": num_workers,
        "runtime.seed": seed,
    }


def report_scenes(results, summary_line, last_line: str | None = None) -> None:
    """One summary line per written scene, one error line per failed one, then ``last_line``
    (e.g. where the catalog is); exit 1 if any failed."""
    console = stdout_console()
    failed = 0
    for r in results:
        if r.error is not None:
            failed += 1
            typer.echo(f"error: {r.source}: {r.error.one_line()}", err=True)
        else:
            console.print(summary_line(r))
    if last_line:
        console.print(last_line)
    if failed and len(results) > 1:
        stderr_console().print(f"{len(results) - failed} of {len(results)} scenes written, {failed} failed")
    exit_code_for(failed)


def launcher_rank() -> int:
    """This process's rank under ``torchrun`` (0 otherwise)."""
    import os

    return int(os.environ.get("RANK", "0") or 0) if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 else 0
