"""Benchmark result rows: the CSV/JSON contract, atomic appends, resume, summaries.

One row per (model, dataset, protocol, partition, seed, metric) (docs/design.md §4). The first
twelve columns are torchgeo-bench's (``model, dataset, task, metric, value,
partition, seed, bands, image_size, normalization, ci_low, ci_high``); the rest record what a
reader needs to trust or reproduce the row:

- ``protocol`` (``linear``, ``knn``, ``upernet``, ``linear-seg``, ``zero-shot``, ``forward``)
  and ``suite``: torchgeo-bench's ``method`` column; several protocols share a dataset;
- ``n_train``, ``n_val``, ``n_test``, ``limit``: the samples behind the number (``limit`` set
  means a smoke run, never a result);
- ``best_epoch``, ``val_value``: the validation epoch the test number comes from;
- ``feature_dim``, ``lr``, ``epochs``, ``batch_size``, ``weight_decay``: the probe's settings;
- ``weights``, ``weights_sha256``, ``deo_version``, ``recipe_hash``: what was evaluated
  (``weights`` is ``random`` for random weights);
- ``device``, ``precision``, ``seconds``, ``timestamp``: where and how long;
- ``paper_value``: DEO's number in the paper for this dataset/partition (same 0-1 scale).

Values (``value``, ``ci_low``, ``ci_high``, ``val_value``, ``paper_value``) are fractions in
0-1, as torchgeo-bench writes them; the printed table shows percent like the paper.
Throughput rows hold images/s and MiB instead.

Rows are appended to ``results.csv`` under an exclusive ``flock`` (one ``write`` call per unit
of work, so parallel jobs can share a file, as torchgeo-bench does); ``results.json`` is the
same rows rewritten atomically after each append; ``results_and_parameters.csv`` is the
same rows again, one for one and in the same order, in GEO-Bench-2's leaderboard format
(:func:`geobench2_rows`), for every suite.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deo_cli.io.atomic import write_text_atomic

try:  # POSIX; on other systems appends are still single writes, just unlocked
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

__all__ = [
    "COLUMNS",
    "GEOBENCH2_COLUMNS",
    "GEOBENCH2_METRICS",
    "KEY_COLUMNS",
    "TORCHGEO_BENCH_COLUMNS",
    "ResultsStore",
    "SummaryRow",
    "summarize",
]

#: torchgeo-bench's columns, in its order.
TORCHGEO_BENCH_COLUMNS = (
    "model",
    "dataset",
    "task",
    "metric",
    "value",
    "partition",
    "seed",
    "bands",
    "image_size",
    "normalization",
    "ci_low",
    "ci_high",
)
#: Every column of ``results.csv``, in order.
COLUMNS = TORCHGEO_BENCH_COLUMNS + (
    "protocol",
    "suite",
    "n_train",
    "n_val",
    "n_test",
    "limit",
    "best_epoch",
    "val_value",
    "feature_dim",
    "lr",
    "epochs",
    "batch_size",
    "weight_decay",
    "weights",
    "weights_sha256",
    "deo_version",
    "recipe_hash",
    "device",
    "precision",
    "seconds",
    "timestamp",
    "paper_value",
)
#: Columns that identify one unit of work (a row's metric aside): ``--resume`` skips a unit
#: whose key is already in the file.
KEY_COLUMNS = (
    "suite",
    "model",
    "weights",
    "dataset",
    "protocol",
    "partition",
    "seed",
    "bands",
    "image_size",
    "normalization",
    "limit",
)
_INT = {
    "seed",
    "image_size",
    "n_train",
    "n_val",
    "n_test",
    "limit",
    "best_epoch",
    "feature_dim",
    "epochs",
    "batch_size",
}
_FLOAT = {"value", "ci_low", "ci_high", "val_value", "lr", "weight_decay", "seconds", "paper_value"}

#: GEO-Bench-2 leaderboard metric names.
GEOBENCH2_METRICS = {
    "overall_accuracy": "Overall_Accuracy",
    "micro_f1": "Multilabel_F1_Score",
    "miou": "Multiclass_Jaccard_Index",
}
#: ``results_and_parameters.csv`` columns (the GEO-Bench leaderboard's submission format).
GEOBENCH2_COLUMNS = (
    "backbone",
    "dataset",
    "Metric",
    "experiment_name",
    "frozen_or_full_ft",
    "batch_size_selection",
    "early_stop_patience",
    "n_trials",
    "Seed",
    "batch_size",
    "weight_decay",
    "lr",
    "test metric",
    "partition",
    "protocol",
)


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if math.isnan(value) else repr(value)
    return str(value)


def _parse(column: str, text: str) -> Any:
    if text == "":
        return None
    if column in _INT:
        try:
            return int(float(text))
        except ValueError:
            return text
    if column in _FLOAT:
        try:
            return float(text)
        except ValueError:
            return text
    return text


def unit_key(row: dict) -> tuple:
    """The key of the unit of work a row belongs to (its metric aside)."""
    return tuple(_fmt(row.get(c)) for c in KEY_COLUMNS)


@contextlib.contextmanager
def _locked(handle) -> Iterator[None]:
    if fcntl is None:
        yield
        return
    fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


class ResultsStore:
    """``results.csv`` (+ ``results.json``, ``results_and_parameters.csv``) in one folder."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.csv_path = self.folder / "results.csv"
        self.json_path = self.folder / "results.json"
        self.geobench2_path = self.folder / "results_and_parameters.csv"

    # -- reading -----------------------------------------------------------------------------

    def rows(self) -> list[dict]:
        """Every row in ``results.csv``, typed (ints, floats, ``None`` for empty cells)."""
        if not self.csv_path.is_file():
            return []
        with self.csv_path.open(newline="") as f:
            return [{k: _parse(k, v or "") for k, v in r.items() if k is not None} for r in csv.DictReader(f)]

    def done(self) -> set[tuple]:
        """Keys of the units already in the file (see :data:`KEY_COLUMNS`)."""
        return {unit_key(r) for r in self.rows()}

    # -- writing -----------------------------------------------------------------------------

    def append(self, rows: Sequence[dict]) -> None:
        """Append ``rows`` (one unit of work) in one locked write, then refresh the copies."""
        if not rows:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        unknown = sorted({k for r in rows for k in r} - set(COLUMNS))
        if unknown:
            raise ValueError(f"unknown result columns {unknown}")
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        for r in rows:
            writer.writerow([_fmt(r.get(c)) for c in COLUMNS])
        with self.csv_path.open("a+", newline="") as f, _locked(f):
            f.seek(0, os.SEEK_END)
            header = ""
            if f.tell() == 0:
                hb = io.StringIO()
                csv.writer(hb, lineterminator="\n").writerow(COLUMNS)
                header = hb.getvalue()
            f.write(header + buf.getvalue())
            f.flush()
            os.fsync(f.fileno())
        self.refresh()

    def refresh(self) -> None:
        """Rewrite ``results.json`` and ``results_and_parameters.csv`` from ``results.csv``."""
        rows = self.rows()
        write_text_atomic(self.json_path, json.dumps(rows, indent=1) + "\n")
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=GEOBENCH2_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: _fmt(v) for k, v in r.items()} for r in geobench2_rows(rows))
        write_text_atomic(self.geobench2_path, buf.getvalue())

    def clear(self) -> None:
        """Remove the result files (``--overwrite``)."""
        for p in (self.csv_path, self.json_path, self.geobench2_path):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()


def geobench2_rows(rows: Iterable[dict]) -> list[dict]:
    """``rows`` in GEO-Bench-2's leaderboard format (:data:`GEOBENCH2_COLUMNS`), one for one.

    ``Metric`` takes GEO-Bench-2's name where it has one (:data:`GEOBENCH2_METRICS`), else
    deo's (``f1``, ``iou``, ``images_per_s:...``); ``protocol`` tells trained probes from kNN,
    zero-shot and forward-only rows. Every deo protocol keeps the encoder frozen. Rows of a
    ``--limit`` smoke run carry ``-limitN`` in ``experiment_name``: they are no leaderboard
    entries.
    """
    out = []
    for r in rows:
        metric = str(r.get("metric"))
        name = f"deo-bench-{r.get('model')}-{r.get('recipe_hash')}"
        if r.get("suite") not in (None, "geobench"):
            name += f"-{r.get('suite')}"
        if r.get("limit"):
            name += f"-limit{r.get('limit')}"
        out.append(
            {
                "backbone": r.get("model"),
                "dataset": r.get("dataset"),
                "Metric": GEOBENCH2_METRICS.get(metric, metric),
                "experiment_name": name,
                "frozen_or_full_ft": "frozen",
                "batch_size_selection": "fixed",
                "early_stop_patience": None,
                "n_trials": 0,
                "Seed": r.get("seed"),
                "batch_size": r.get("batch_size"),
                "weight_decay": r.get("weight_decay"),
                "lr": r.get("lr"),
                "test metric": r.get("value"),
                "partition": r.get("partition"),
                "protocol": r.get("protocol"),
            }
        )
    return out


@dataclass
class SummaryRow:
    """Seeds of one (dataset, protocol, partition, metric) averaged, with the paper's number.

    ``value``, ``ci_low``, ``ci_high`` are means over seeds; ``std`` is the spread over seeds
    (0 for one seed); ``paper_value`` is DEO's number in the paper (same scale) or ``None``.
    """

    dataset: str
    task: str
    protocol: str
    partition: str
    metric: str
    value: float
    ci_low: float | None
    ci_high: float | None
    std: float
    seeds: int
    n_test: int | None
    image_size: int | None
    paper_value: float | None
    limit: int | None


def _mean(values: list) -> float | None:
    vals = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(vals) / len(vals) if vals else None


def summarize(rows: Iterable[dict]) -> list[SummaryRow]:
    """Rows grouped by (suite, model, dataset, protocol, partition, metric, ...), seeds averaged,
    in the order they first appear."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        key = tuple(_fmt(r.get(c)) for c in KEY_COLUMNS if c != "seed") + (_fmt(r.get("metric")),)
        groups.setdefault(key, []).append(r)
    out = []
    for members in groups.values():
        first = members[0]
        values = [float(m["value"]) for m in members if m.get("value") is not None]
        mean = sum(values) / len(values) if values else float("nan")
        std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0
        out.append(
            SummaryRow(
                dataset=str(first.get("dataset")),
                task=str(first.get("task")),
                protocol=str(first.get("protocol")),
                partition=str(first.get("partition")),
                metric=str(first.get("metric")),
                value=mean,
                ci_low=_mean([m.get("ci_low") for m in members]),
                ci_high=_mean([m.get("ci_high") for m in members]),
                std=std,
                seeds=len({m.get("seed") for m in members}),
                n_test=first.get("n_test"),
                image_size=first.get("image_size"),
                paper_value=first.get("paper_value"),
                limit=first.get("limit"),
            )
        )
    return out
