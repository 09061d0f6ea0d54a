"""``RUN/metrics.jsonl``: one JSON object per line, written by rank 0 only.

Rows: ``{"event": "start"|"resume", ...}``, ``{"step": N, "loss": ..., terms..., "lr", "wd",
"momentum", "img_per_s", ...}`` every ``log_every`` steps, ``{"event": "checkpoint", ...}``,
``{"event": "samples", ...}`` (with ``log_samples``) and ``{"event": "end", ...}``. On resume, rows
after the checkpoint's step are dropped first, so the log reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from deo_cli.io.atomic import write_text_atomic


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsLog:
    """Append-only JSONL log; a no-op when ``enabled`` is False (ranks other than 0)."""

    def __init__(self, path: str | os.PathLike, enabled: bool = True, resume_step: int | None = None):
        self.path = Path(path)
        self.enabled = enabled
        if enabled and resume_step is not None and self.path.exists():
            kept = [row for row in read_metrics(self.path) if int(row.get("step", 0)) <= resume_step]
            write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as fh:
            fh.write(json.dumps({k: _clean(v) for k, v in row.items()}) + "\n")


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """All rows of a metrics log (a torn last line, from a crash, is ignored)."""
    rows = []
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows
