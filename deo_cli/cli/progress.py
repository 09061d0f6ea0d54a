"""The progress display the command line hands to core functions (see deo_cli.progress)."""

from __future__ import annotations

import time

from deo_cli.cli.common import STATE, stderr_console

#: Seconds between two progress lines when stderr is not a terminal (a log file, a batch job).
PLAIN_EVERY = 30.0


def _clock(seconds: float) -> str:
    """``h:mm:ss`` (``m:ss`` under an hour)."""
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _metrics_text(metrics: dict) -> str:
    return "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())


class PlainProgress:
    """Progress as plain lines, for stderr that is not a terminal (redirected to a file, a
    Slurm or CI log), where a redrawn bar is either invisible until the end or squeezed into
    80 columns: a line every ``every`` seconds, each with done/total, percentage, rate, elapsed
    time, ETA and the latest metrics, and a last one at the end of a task that printed any
    (a shorter task is reported by the command's summary line alone)."""

    def __init__(self, unit: str, console, every: float = PLAIN_EVERY, clock=None):
        self.unit = unit
        self.console = console
        self.every = every
        self.clock = clock or time.monotonic
        self._active = False

    def start(self, total: int | None, description: str = "") -> None:
        self.finish()
        self.total, self.description = total, description
        self.done, self.metrics, self.lines = 0, "", 0
        self._t0 = self._last = self.clock()
        self._active = True

    def advance(self, n: int = 1, **metrics: float) -> None:
        if not self._active:
            return
        self.done += n
        if metrics:
            self.metrics = _metrics_text(metrics)
        if self.clock() - self._last >= self.every:
            self._line(final=False)

    def finish(self) -> None:
        if self._active and self.lines:
            self._line(final=True)
        self._active = False

    def _line(self, final: bool) -> None:
        now = self.clock()
        self._last = now
        self.lines += 1
        elapsed = now - self._t0
        rate = self.done / elapsed if elapsed > 0 else 0.0
        parts = [f"{self.done}/{self.total} {self.unit}" if self.total else f"{self.done} {self.unit}"]
        if self.total and not final:
            parts[0] += f" ({100 * self.done / self.total:.0f} %)"
        parts.append(f"{rate:.1f} {self.unit}/s" if rate else f"- {self.unit}/s")
        if final:
            parts.append(f"done in {_clock(elapsed)}")
        else:
            parts.append(f"elapsed {_clock(elapsed)}")
            if self.total and rate:
                parts.append(f"ETA {_clock((self.total - self.done) / rate)}")
        if self.metrics:
            parts.append(self.metrics)
        head = f"{self.description}: " if self.description else ""
        self.console.print(head + ", ".join(parts), markup=False, highlight=False, soft_wrap=True)


class RichProgress:
    """A rich progress bar on stderr: done/total, rate, elapsed, ETA and the latest metrics;
    plain lines (:class:`PlainProgress`) when stderr is not a terminal.

    Silent with ``-q``.
    """

    def __init__(self, unit: str = "chips"):
        self.unit = unit
        self._progress = None
        self._task = None
        self._plain: PlainProgress | None = None

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
        console = stderr_console()
        if not console.is_terminal:
            self._plain = PlainProgress(unit, console)
            self._plain.start(total, description)
            return
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            RateColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[metrics]}"),
            console=console,
        )
        self._progress.start()
        self._task = self._progress.add_task(description, total=total, metrics="")

    def advance(self, n: int = 1, **metrics: float) -> None:
        if self._plain is not None:
            self._plain.advance(n, **metrics)
        if self._progress is None:
            return
        if metrics:
            self._progress.update(self._task, advance=n, metrics=_metrics_text(metrics))
        else:
            self._progress.update(self._task, advance=n)

    def finish(self) -> None:
        if self._plain is not None:
            self._plain.finish()
        if self._progress is not None:
            self._progress.stop()
        self._plain = None
        self._progress = None
        self._task = None
