"""``deo bench --suite oscd``: zero-shot change detection F1 on an OSCD-format folder.

The paper fine-tunes the encoder for change detection and its head is not public (docs/method.md
§3.1), so the paper's 60.4 F1 is not reproducible here; this suite measures what the frozen
features give **without training** (deo's own protocol, [INFERRED], protocol name
``zero-shot``), with exactly the scorer of ``deo detect-change`` (:mod:`deo_cli.infer.change`):

1. both dates on the first date's 10 m grid (:func:`deo_cli.data.oscd.open_pair`);
2. :func:`~deo_cli.infer.change.change_score_array` with a
   :class:`~deo_cli.infer.change.CosineChange` on the input grid: the model's bands by name,
   each date normalised by the model's manifest (unit inferred, RGB scaled per scene), chips of
   the model's input size with blended overlaps, ``1 - cos`` of the two dates' features at
   ``deo detect-change``'s default level (or the mean over ``oscd.layers``), NaN where nodata;
3. Otsu's threshold (:func:`deo_cli.infer.threshold.otsu_threshold`) on the city's valid scores
   gives the change mask (``score > threshold``);
4. F1 and IoU of the change class over all cities' pixels (TP/FP/FN summed), with a bootstrap
   interval over cities.

Cities: those named in ``--tasks``, else the official test cities that have labels, else every
labelled city (the zero-shot protocol trains nothing, so no split is needed).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

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
from deo_cli.infer.change import CosineChange, change_score_array, parse_layers
from deo_cli.infer.threshold import otsu_threshold
from deo_cli.models import get_model_spec
from deo_cli.recipes import BenchRecipe

__all__ = ["OscdPlan", "change_counts", "plan_oscd", "run_oscd"]

log = logging.getLogger(__name__)


@dataclass
class OscdPlan:
    cities: list[OscdCity]
    partition: str
    layers: list[int]


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
    return OscdPlan(chosen, partition, layers)


def change_counts(score: np.ndarray, label: np.ndarray) -> tuple[list[int], float]:
    """``[TP, FP, FN]`` of ``score > Otsu threshold`` against the 0/1 ``label`` over the finite
    scores (NaN = nodata), and the threshold."""
    valid = np.isfinite(score)
    thr = otsu_threshold(score[valid])
    pred = score[valid] > thr
    truth = np.asarray(label)[valid].astype(bool)
    return [int(np.sum(pred & truth)), int(np.sum(pred & ~truth)), int(np.sum(~pred & truth))], thr


def run_oscd(ctx: BenchContext, plan: OscdPlan) -> None:
    """Score every city of ``plan`` and write the F1 and IoU rows (one unit of work)."""
    r = ctx.recipe
    manifest = ctx.encoder.manifest
    model = CosineChange(ctx.encoder, plan.layers, out_stride=1)  # scores on the input (label) grid
    chip = r.oscd.chip_size or model.input_size
    seed = r.seeds[0]  # zero-shot: nothing random
    unit = {
        "dataset": "oscd",
        "protocol": "zero-shot",
        "partition": plan.partition,
        "seed": seed,
        "bands": ",".join(manifest.bands),
        "image_size": chip,
        "normalization": f"manifest:{manifest.name}",
    }
    if ctx.is_done(**unit):
        return
    start = time.perf_counter()
    counts = []
    ctx.progress.start(len(plan.cities), "oscd cities")
    for city in plan.cities:
        before, after = open_pair(city)
        score, _ = change_score_array(
            before,
            after,
            model,
            chip_size=chip,
            overlap=r.oscd.overlap,
            batch_size=ctx.rt.batch_size,
            num_workers=ctx.rt.num_workers,
            device=ctx.device,
            precision=ctx.dtype,
        )
        label = read_change_label(city, score.shape)
        tp_fp_fn, thr = change_counts(score, label)
        counts.append(tp_fp_fn)
        city_scores = score_change(np.asarray([tp_fp_fn]), 0)
        valid = np.isfinite(score)
        log.info(
            "oscd %s: %dx%d px, %.2f%% change, Otsu threshold %.4f, F1 %.4f, IoU %.4f",
            city.name,
            label.shape[1],
            label.shape[0],
            100.0 * float(label[valid].mean()) if valid.any() else float("nan"),
            thr,
            city_scores["f1"].value,
            city_scores["iou"].value,
        )
        ctx.progress.advance(1, f1=city_scores["f1"].value)
    ctx.progress.finish()
    scores = score_change(np.asarray(counts), r.bootstrap, seed)
    paper = paper_result("oscd")
    channels = list(ctx.encoder.feature_channels)
    levels = set(plan.layers)
    seconds = round(time.perf_counter() - start, 3)
    rows = []
    for name in ("f1", "iou"):
        sc = scores[name]
        rows.append(
            {
                **unit,
                "task": "change_detection",
                "metric": name,
                "value": sc.value,
                "ci_low": sc.ci_low,
                "ci_high": sc.ci_high,
                "n_train": 0,
                "n_val": 0,
                "n_test": sc.n,
                "feature_dim": int(sum(channels[lv] for lv in levels)),
                "seconds": seconds,
                "paper_value": paper.value / 100.0 if paper is not None and paper.metric == name else None,
            }
        )
    log.info(
        "oscd: F1 %.4f [%.4f, %.4f] over %d cities",
        scores["f1"].value,
        scores["f1"].ci_low,
        scores["f1"].ci_high,
        len(counts),
    )
    ctx.emit(rows)
