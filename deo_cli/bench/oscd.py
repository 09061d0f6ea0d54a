"""``deo bench --suite oscd``: change detection per city and method on an OSCD-format folder.

The paper fine-tunes the encoder for change detection and its head is not public (docs/method.md
§3.1), so the paper's 60.4 F1 is not reproducible here. This suite shows, city by city, what
the DEO features add over a spectral baseline and what the threshold costs, with exactly the
scorers of ``deo detect-change`` (:mod:`deo_cli.tasks.change`). Methods (``protocol`` column):

- ``zero-shot``: the cosine distance of the two dates' DEO features at ``deo detect-change``'s
  default levels (or ``oscd.layers``), on the input grid;
- ``supervised`` (only with ``oscd.head``, a head from ``deo detect-change train``):
  P(change) of the siamese head, thresholded at the head's threshold; a city the head was
  trained on is named in a warning (its row is no test);
- ``cva``: change vector analysis, the spectral-difference baseline
  (:mod:`deo_cli.tasks.change.cva`);
- ``everything``: the trivial mask that flags every valid pixel (precision = change fraction,
  recall 1, AUC 0.5).

For each: both dates on the first date's 10 m grid (:func:`deo_cli.data.oscd.open_pair`),
:func:`~deo_cli.tasks.change.score.change_score_array` (bands by name, each date normalised by the
model's manifest, chips with blended overlaps, NaN where nodata), the threshold by
``deo detect-change``'s rule (``oscd.threshold_method``; default
:data:`~deo_cli.tasks.change.threshold.DEFAULT_METHOD`) from the city's score histogram, and against
the label (:mod:`deo_cli.tasks.change.evaluate`): F1, precision, recall, IoU, the flagged and the
true change fraction, and two threshold-free measures of the score itself: ROC AUC and the
best F1 over all thresholds (an oracle; its gap to F1 is what the threshold costs).

Rows (``dataset`` oscd, ``task`` change_detection): one per city (``partition`` = the city)
and method and metric, then the pooled rows of each method over all cities' pixels
(``partition`` = ``labelled``, ``official-test`` or ``selected``; F1 and IoU with a bootstrap
interval over cities). The run is one unit of work for ``--resume``.

Cities: those named in ``--tasks``, else the official test cities that have labels, else every
labelled city (nothing here trains, so no split is needed).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

from deo_cli.bench.context import BenchContext
from deo_cli.bench.paper import paper_result
from deo_cli.bench.scoring import score_change
from deo_cli.data.oscd import (
    OscdCity,
    list_cities,
    official_split,
    open_pair,
    read_change_label,
    select_cities,
)
from deo_cli.errors import DataError, UsageError
from deo_cli.models import get_model_spec
from deo_cli.recipes import BenchRecipe
from deo_cli.tasks.change.evaluate import ChangeCounts, ScoreCurve, counts_at, everything_changed
from deo_cli.tasks.change.model import CosineChange, parse_layers
from deo_cli.tasks.change.score import change_score_array
from deo_cli.tasks.change.threshold import DEFAULT_METHOD, ScoreHistogram, Threshold, choose_threshold

__all__ = ["METRICS", "CityResult", "OscdPlan", "plan_oscd", "run_oscd", "score_city"]

log = logging.getLogger(__name__)

#: Metrics of every (city, method) row, in the printed table's order.
METRICS = ("f1", "precision", "recall", "iou", "auc", "best_f1", "flagged_fraction", "change_fraction")


@dataclass
class OscdPlan:
    cities: list[OscdCity]
    partition: str
    layers: list[int]
    head: str | None = None


@dataclass
class CityResult:
    """One method on one city: the threshold, the counts and the score's curve."""

    threshold: Threshold | None
    counts: ChangeCounts
    curve: ScoreCurve | None

    def metrics(self) -> dict[str, float]:
        c = self.counts
        auc = self.curve.auc() if self.curve is not None else 0.5
        best = self.curve.best_f1()[0] if self.curve is not None else c.f1
        return {
            "f1": c.f1,
            "precision": c.precision,
            "recall": c.recall,
            "iou": c.iou,
            "auc": auc,
            "best_f1": best,
            "flagged_fraction": c.flagged_fraction,
            "change_fraction": c.change_fraction,
        }


def plan_oscd(recipe: BenchRecipe) -> OscdPlan:
    """The cities to score (errors before any work)."""
    if recipe.data is None:
        raise UsageError(
            "--suite oscd needs --data, the OSCD folder (holding images/ and train_labels/)",
            "download OSCD from rcdaudt.github.io/oscd and pass --data PATH",
        )
    cities = list_cities(recipe.data)
    if recipe.tasks:
        chosen, partition = select_cities(cities, list(recipe.tasks)), "selected"
    else:
        test = set(official_split(recipe.data)["test"])
        labelled = [c for c in cities if c.label is not None]
        chosen = [c for c in labelled if c.name in test]
        partition = "official-test"
        if not chosen:
            chosen, partition = labelled, "labelled"
            log.info(
                "no labelled test city under %s: scoring every labelled city (%d)", recipe.data, len(chosen)
            )
    unlabelled = [c.name for c in chosen if c.label is None]
    if unlabelled:
        raise DataError(
            f"OSCD city {', '.join(unlabelled)} has no change label", "choose cities from train_labels/"
        )
    if not chosen:
        raise DataError(f"no labelled OSCD city under {recipe.data}", "add train_labels/ or test_labels/")
    if recipe.limit:
        chosen = chosen[: recipe.limit]
    spec = get_model_spec(recipe.model.name)
    layers = parse_layers(spec, ",".join(str(v) for v in recipe.oscd.layers) or None)  # bad levels: one line
    head = recipe.oscd.head
    if head is not None:
        from deo_cli.infer.headfile import load_head

        load_head(head, "change")  # a missing or wrong head file: one line, before any work
    return OscdPlan(chosen, partition, layers, head)


@dataclass
class _Scorer:
    """A method's score model, its chip size and overlap, and how its threshold is chosen."""

    model: object
    chip: int
    overlap: int | None
    score_range: tuple[float, float]
    head: object = None
    fixed: float | None = None
    extra: dict = field(default_factory=dict)


def _scorers(ctx: BenchContext, plan: OscdPlan) -> dict[str, _Scorer]:
    from deo_cli.tasks.change.cva import CVA_CHIP, CvaChange

    r = ctx.recipe
    zs = CosineChange(ctx.encoder, plan.layers, out_stride=1)  # scores on the input (label) grid
    out = {"zero-shot": _Scorer(zs, r.oscd.chip_size or zs.input_size, r.oscd.overlap, (0.0, 2.0))}
    if plan.head is not None:
        from deo_cli.infer.headfile import load_head
        from deo_cli.tasks.change.model import build_change_model

        hf = load_head(plan.head, "change")
        model, _ = build_change_model(hf)
        thr = float(hf.threshold if hf.threshold is not None else 0.5)
        out["supervised"] = _Scorer(model, hf.chip_size, None, (0.0, 1.0), head=hf, fixed=thr)
        trained = sorted({c.name for c in plan.cities} & set(hf.metrics.get("train_cities") or []))
        if trained:
            log.warning(
                "the head %s was trained on %s: its rows there are no test", plan.head, ", ".join(trained)
            )
    cva = CvaChange(ctx.encoder.spec, r.oscd.chip_size or CVA_CHIP)
    out["cva"] = _Scorer(cva, cva.input_size, 0, cva.score_range)
    return out


def _threshold(hist: ScoreHistogram, s: _Scorer, recipe: BenchRecipe) -> Threshold:
    if s.fixed is not None:
        return Threshold(s.fixed, "head")
    o = recipe.oscd
    method = DEFAULT_METHOD if o.threshold_method == "auto" else o.threshold_method
    return choose_threshold(hist, method, percentile=o.percentile, mad_k=o.mad_k)


def score_city(ctx: BenchContext, city: OscdCity, scorers: dict[str, _Scorer]) -> dict[str, CityResult]:
    """Every method on ``city`` (see the module docstring)."""
    out, valid, label = {}, None, None
    for name, s in scorers.items():
        before, after = open_pair(city)
        score, _ = change_score_array(
            before,
            after,
            s.model,
            chip_size=s.chip,
            overlap=s.overlap,
            batch_size=ctx.rt.batch_size,
            num_workers=ctx.rt.num_workers,
            device=ctx.device,
            precision=ctx.dtype,
            head=s.head,
        )
        if label is None:
            label, valid = read_change_label(city, score.shape), np.isfinite(score)
        thr = _threshold(ScoreHistogram.of(score, *s.score_range), s, ctx.recipe)
        curve = ScoreCurve(*s.score_range).add(score, label)
        out[name] = CityResult(thr, counts_at(score, label, thr.value), curve)
    out["everything"] = CityResult(None, everything_changed(label, valid), None)
    return out


def _city_rows(city: str, results: dict[str, CityResult]) -> list[dict]:
    """Per method: :data:`METRICS`, and the threshold used (metric ``threshold``; the rule is
    the recipe's ``oscd.threshold_method``, or the head's)."""
    rows = []
    for method, res in results.items():
        values = res.metrics()
        if res.threshold is not None:
            values["threshold"] = res.threshold.value
        for metric, value in values.items():
            rows.append(
                {
                    "protocol": method,
                    "partition": city,
                    "metric": metric,
                    "value": value,
                    "n_test": res.counts.valid,
                }
            )
    return rows


def _pooled_rows(per_city: dict[str, dict[str, CityResult]], partition: str, r: BenchRecipe) -> list[dict]:
    paper = paper_result("oscd")
    rows = []
    for method in next(iter(per_city.values())):
        results = [per_city[c][method] for c in per_city]
        counts = [x.counts for x in results]
        total = sum(counts[1:], counts[0])
        curves = [x.curve for x in results if x.curve is not None]
        pooled = CityResult(None, total, _merge(curves) if curves else None).metrics()
        boot = score_change(np.asarray([[c.tp, c.fp, c.fn] for c in counts]), r.bootstrap, r.seeds[0])
        for metric, value in pooled.items():
            sc = boot.get(metric)
            rows.append(
                {
                    "protocol": method,
                    "partition": partition,
                    "metric": metric,
                    "value": value,
                    "ci_low": sc.ci_low if sc else None,
                    "ci_high": sc.ci_high if sc else None,
                    "n_test": len(counts),
                    "paper_value": paper.value / 100.0
                    if paper is not None and paper.metric == metric and method in ("zero-shot", "supervised")
                    else None,
                }
            )
    return rows


def _merge(curves: list[ScoreCurve]) -> ScoreCurve:
    out = ScoreCurve(curves[0].pos.lo, curves[0].pos.hi, curves[0].pos.bins)
    for c in curves:
        out.pos.counts += c.pos.counts
        out.neg.counts += c.neg.counts
    return out


def _log_city(city: str, results: dict[str, CityResult]) -> None:
    parts = []
    for method, res in results.items():
        m = res.metrics()
        thr = f", {res.threshold.method} {res.threshold.value:.4g}" if res.threshold is not None else ""
        parts.append(
            f"{method} F1 {m['f1']:.4f} AUC {m['auc']:.3f} best F1 {m['best_f1']:.4f} "
            f"flagged {100 * m['flagged_fraction']:.2f}%{thr}"
        )
    change = 100 * next(iter(results.values())).counts.change_fraction
    log.info("oscd %s: %.2f%% change; %s", city, change, "; ".join(parts))


def run_oscd(ctx: BenchContext, plan: OscdPlan) -> None:
    """Score every city of ``plan`` with every method and write the rows (one unit of work)."""
    r = ctx.recipe
    manifest = ctx.encoder.manifest
    scorers = _scorers(ctx, plan)
    unit = {
        "dataset": "oscd",
        "protocol": "zero-shot",
        "partition": plan.partition,
        "seed": r.seeds[0],  # nothing random
        "bands": ",".join(manifest.bands),
        "image_size": scorers["zero-shot"].chip,
        "normalization": f"manifest:{manifest.name}",
    }
    if ctx.is_done(**unit):
        return
    start = time.perf_counter()
    per_city = {}
    ctx.progress.start(len(plan.cities), "oscd cities")
    for city in plan.cities:
        per_city[city.name] = score_city(ctx, city, scorers)
        _log_city(city.name, per_city[city.name])
        ctx.progress.advance(1, f1=per_city[city.name]["zero-shot"].counts.f1)
    ctx.progress.finish()
    channels = list(ctx.encoder.feature_channels)
    base = {
        **unit,
        "task": "change_detection",
        "n_train": 0,
        "n_val": 0,
        "feature_dim": int(sum(channels[lv] for lv in set(plan.layers))),
        "seconds": round(time.perf_counter() - start, 3),
    }
    rows = [row for c, res in per_city.items() for row in _city_rows(c, res)]
    rows += _pooled_rows(per_city, plan.partition, r)
    rows = [{**base, **row} for row in rows]
    pooled = {
        x["protocol"]: x["value"] for x in rows if x["partition"] == plan.partition and x["metric"] == "f1"
    }
    log.info("oscd pooled F1: %s", ", ".join(f"{k} {v:.4f}" for k, v in pooled.items()))
    ctx.emit(rows)
