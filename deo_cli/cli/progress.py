"""The rich progress bar the command line hands to core functions (see deo_cli.progress)."""

from __future__ import annotations

from deo_cli.cli.common import STATE, stderr_console


class RichProgress:
    """A rich progress bar on stderr: done/total, rate, elapsed, ETA and the latest metrics.

    Silent with ``-q``.
    """

    def __init__(self, unit: str = "chips"):
        self.unit = unit
        self._progress = None
        self._task = None

    def start(self, total: int | None, description: str = "") -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            ProgressColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        from rich.text import Text

        unit = self.unit

        class RateColumn(ProgressColumn):
            def render(self, task):
                speed = task.finished_speed or task.speed
                return Text(f"{speed:.1f} {unit}/s" if speed else f"- {unit}/s")

        self.finish()
        if STATE.get("quiet"):
            return
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            RateColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[metrics]}"),
            console=stderr_console(),
        )
        self._progress.start()
        self._task = self._progress.add_task(description, total=total, metrics="")

    def advance(self, n: int = 1, **metrics: float) -> None:
        if self._progress is None:
            return
        if metrics:
            text = "  ".join(
                f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()
            )
            self._progress.update(self._task, advance=n, metrics=text)
        else:
            self._progress.update(self._task, advance=n)

    def finish(self) -> None:
        if self._progress is not None:
            self._progress.stop()
        self._progress = None
        self._task = None
