"""What every suite shares while it runs: the recipe, the encoder, device, the results store.

A suite asks :meth:`BenchContext.is_done` before a unit of work (``--resume`` skips units
already in ``results.csv``) and hands its finished rows to :meth:`BenchContext.emit`, which fills
the common columns (model, weights, version, recipe hash, device...) and appends them in one
write.
"""

from __future__ import annotations

import datetime
import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from deo_cli import __version__
from deo_cli.bench.results import KEY_COLUMNS, ResultsStore, unit_key
from deo_cli.progress import NullProgress, Progress
from deo_cli.recipes import BenchRecipe, recipe_hash
from deo_cli.runtime import Runtime

__all__ = ["BenchContext"]

log = logging.getLogger(__name__)


@dataclass
class BenchContext:
    recipe: BenchRecipe
    encoder: nn.Module
    rt: Runtime
    store: ResultsStore
    resume: bool = False
    progress: Progress = field(default_factory=NullProgress)
    written: int = 0
    skipped: int = 0
    _done: set = field(default_factory=set)

    def __post_init__(self):
        self._done = self.store.done() if self.resume else set()
        self._hash = recipe_hash(self.recipe)

    @property
    def device(self) -> torch.device:
        return self.rt.device

    @property
    def dtype(self) -> torch.dtype | None:
        return self.rt.precision

    def common(self) -> dict:
        """Columns every row of this run shares."""
        r = self.recipe
        return {
            "suite": r.suite,
            "model": r.model.name,
            "weights": r.model.weights,
            "weights_sha256": getattr(self.encoder, "weights_sha256", None),
            "deo_version": __version__,
            "recipe_hash": self._hash,
            "device": str(self.device),
            "precision": self.rt.precision_name,
            "limit": r.limit,
        }

    def is_done(self, **unit) -> bool:
        """Whether ``--resume`` should skip the unit with these key columns (a log line if so)."""
        row = {**self.common(), **unit}
        missing = [c for c in KEY_COLUMNS if c not in row]
        if missing:
            raise ValueError(f"unit key lacks {missing}")
        if unit_key(row) in self._done:
            self.skipped += 1
            log.info(
                "skipping %s / %s / %s / seed %s: already in %s",
                row["dataset"],
                row["protocol"],
                row["partition"],
                row["seed"],
                self.store.csv_path,
            )
            return True
        return False

    def emit(self, rows: list[dict]) -> list[dict]:
        """Complete ``rows`` with the common columns and append them (one unit, one write)."""
        now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        full = [{**self.common(), "timestamp": now, **r} for r in rows]
        self.store.append(full)
        for r in full:
            self._done.add(unit_key(r))
        self.written += len(full)
        return full
