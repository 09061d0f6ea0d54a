"""Progress reporting without a UI dependency.

Core functions take a ``progress`` object with three methods and never import rich; the
command line passes :class:`deo_cli.cli.progress.RichProgress`, notebooks may pass their own
(or nothing: :class:`NullProgress`).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class Progress(Protocol):
    def start(self, total: int | None, description: str = "") -> None:
        """A new task of ``total`` units (``None`` = unknown)."""

    def advance(self, n: int = 1, **metrics: float) -> None:
        """``n`` more units done; ``metrics`` (loss, lr, img/s...) are shown beside the bar."""

    def finish(self) -> None:
        """The current task is complete."""


class NullProgress:
    """Reports nothing."""

    def start(self, total: int | None, description: str = "") -> None:
        pass

    def advance(self, n: int = 1, **metrics: float) -> None:
        pass

    def finish(self) -> None:
        pass
