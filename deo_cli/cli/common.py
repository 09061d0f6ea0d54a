"""What every command shares: logging, the one-line error report, groups, recipe loading.

Only ``deo_cli.cli`` imports typer and rich. Nothing here imports torch: core modules are
imported inside command bodies so ``deo --help`` stays fast.
"""

from __future__ import annotations

import logging
import sys
import traceback
from typing import Any

import typer
from typer.core import TyperGroup

from deo_cli.errors import DeoError, NotBuiltError

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


class DeoGroup(TyperGroup):
    """The root group: turns a :class:`DeoError` into one line on stderr and its exit code."""

    def invoke(self, ctx) -> Any:
        try:
            return super().invoke(ctx)
        except DeoError as err:
            report_error(err)
            raise typer.Exit(err.exit_code) from None
        except KeyboardInterrupt:
            typer.echo(
                "error: interrupted. Outputs in progress were removed; rerun (with --resume where offered).",
                err=True,
            )
            raise typer.Exit(130) from None


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


def not_built(what: str, issue: int) -> NotBuiltError:
    """The error a command raises while its core is not built (never pretend to work)."""
    return NotBuiltError(
        f"{what} is not built yet in this version of deo",
        f"it is tracked as issue {issue}; see CHANGELOG.md for what works today",
    )


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
