"""``deo bench --suite oscd``: zero-shot change detection F1 on an OSCD-format folder.

The paper fine-tunes the encoder for change detection and its head is not public (method.md
§3.1), so the paper's 60.4 F1 is not reproducible here; this suite measures what the frozen
features give **without training** (deo's own protocol, [INFERRED], protocol name
``zero-shot``):

1. both dates on the first date's 10 m grid (:func:`deo_cli.data.oscd.open_pair`), the model's
   bands by name, normalised by the model's band manifest (RGB max-scaled by each date's scene
   RGB scale, :func:`deo_cli.data.normalize.scene_rgb_max`), nodata filled with 0;
2. the frozen encoder on aligned chips of ``chip_size`` pixels (or the whole city) of both
   dates; per feature level in ``layers``, the cosine distance ``1 - cos`` of the two dates'
   vectors, upsampled bilinearly from the level's grid (pixel ``r`` covers input rows
   ``[r * stride, (r + 1) * stride)``) to the label grid, averaged over the levels;
3. Otsu's threshold on the city's valid distances gives the change mask;
4. F1 and IoU of the change class over all cities' pixels (TP/FP/FN summed,
   :func:`deo_cli.metrics.binary_scores` per city), with a bootstrap interval over cities.

Cities: those named in ``--tasks``, else the official test cities that have labels, else every
labelled city (the zero-shot protocol trains nothing, so no split is needed).

The shared ``detect-change`` machinery (issue 7) is meant to replace
:func:`change_distance` and :func:`otsu_threshold` once it exists; the interface is
``distance = change_distance(encoder, before, after, ...)`` on normalised ``(C, H, W)`` arrays.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from deo_cli.bench.context import BenchContext
from deo_cli.bench.paper import paper_result
from deo_cli.bench.scoring import score_change
from deo_cli.data.normalize import Normalizer, scene_rgb_max
from deo_cli.data.oscd import (
    OscdCity,
    list_cities,
    official_split,
    open_pair,
    read_change_label,
    select_cities,
)
from deo_cli.errors import DataError, UsageError
from deo_cli.metrics import binary_scores
from deo_cli.models import get_model_spec
from deo_cli.recipes import BenchRecipe
from deo_cli.runtime import autocast

__all__ = ["OscdPlan", "change_distance", "otsu_threshold", "plan_oscd", "run_oscd"]

log = logging.getLogger(__name__)


@dataclass
class OscdPlan:
    cities: list[OscdCity]
    partition: str


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
    n = get_model_spec(recipe.model.name).num_levels
    bad = [lv for lv in recipe.oscd.layers if not -n <= lv < n]
    if bad or not recipe.oscd.layers:
        raise UsageError(
            f"oscd.layers {list(recipe.oscd.layers)} outside the model's {n} levels", f"use 0..{n - 1}"
        )
    return OscdPlan(chosen, partition)


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold: the cut of a 256-bin histogram maximising the between-class variance."""
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    if v.size == 0:
        return float("nan")
    lo, hi = float(v.min()), float(v.max())
    if hi <= lo:
        return hi
    hist, edges = np.histogram(v, bins=bins, range=(lo, hi))
    centers = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centers)
    mean0 = np.divide(m0, w0, out=np.zeros_like(m0), where=w0 > 0)
    mean1 = np.divide(m0[-1] - m0, w1, out=np.zeros_like(m0), where=w1 > 0)
    between = (w0 * w1 * (mean0 - mean1) ** 2)[:-1]
    if between.size == 0:
        return float(edges[1])
    # cuts inside an empty gap between the modes tie: take the middle of the tied run
    best = np.flatnonzero(between >= between.max() * (1 - 1e-9))
    run = best[: int(np.argmax(np.diff(np.append(best, best[-1] + 2)) > 1)) + 1]
    return float((edges[1:][run[0]] + edges[1:][run[-1]]) / 2)


def _level_distance(fa: torch.Tensor, fb: torch.Tensor, stride: int, height: int, width: int) -> torch.Tensor:
    """``1 - cos`` of two ``(C, h, w)`` maps, upsampled to ``(h * stride, w * stride)``, cropped."""
    d = 1.0 - F.cosine_similarity(fa.float(), fb.float(), dim=0, eps=1e-6)
    h, w = d.shape
    up = F.interpolate(d[None, None], size=(h * stride, w * stride), mode="bilinear", align_corners=False)[
        0, 0
    ]
    return up[:height, :width]


@torch.no_grad()
def change_distance(
    encoder: nn.Module,
    before: np.ndarray,
    after: np.ndarray,
    layers: list[int],
    device: torch.device,
    dtype: torch.dtype | None = None,
    chip_size: int | None = None,
) -> np.ndarray:
    """Per-pixel change score ``(H, W)`` in [0, 2]: the mean over ``layers`` of the cosine distance
    between the two dates' features (normalised ``(C, H, W)`` inputs on one grid)."""
    if before.shape != after.shape:
        raise ValueError(f"dates differ in shape: {before.shape} vs {after.shape}")
    strides = list(encoder.feature_strides)
    n = len(strides)
    levels = sorted({lv % n for lv in layers})
    if not levels or any(not -n <= lv < n for lv in layers):
        raise UsageError(f"oscd.layers {layers} outside the model's {n} levels", f"use 0..{n - 1}")
    _, height, width = before.shape
    size = chip_size or max(height, width)
    step = max(strides)
    size = -(-size // step) * step
    out = np.zeros((height, width), dtype=np.float32)
    encoder.eval()
    for r0 in range(0, height, size):
        for c0 in range(0, width, size):
            h, w = min(size, height - r0), min(size, width - c0)
            pair = np.zeros((2, before.shape[0], size, size), dtype=np.float32)
            pair[0, :, :h, :w] = before[:, r0 : r0 + h, c0 : c0 + w]
            pair[1, :, :h, :w] = after[:, r0 : r0 + h, c0 : c0 + w]
            x = torch.from_numpy(pair).to(device)
            with autocast(device, dtype):
                maps = encoder(x)
            acc = torch.zeros((h, w), device=device)
            for lv in levels:
                acc += _level_distance(maps[lv][0], maps[lv][1], strides[lv], h, w)
            out[r0 : r0 + h, c0 : c0 + w] = (acc / len(levels)).cpu().numpy()
    return out


def _read_date(scene, manifest) -> tuple[np.ndarray, np.ndarray]:
    sample = scene.read(bands=list(manifest.bands))
    rgb = [i for i, b in enumerate(manifest.bands) if b in manifest.max_scaled]
    rgb_max = scene_rgb_max(sample.data[rgb], sample.valid) if rgb else None
    x = Normalizer.from_manifest(manifest, unit_factor=1.0, rgb_max=rgb_max)(sample.data)
    x[:, ~sample.valid] = 0.0
    return x, sample.valid


def run_oscd(ctx: BenchContext, plan: OscdPlan) -> None:
    """Score every city of ``plan`` and write the F1 and IoU rows (one unit of work)."""
    r = ctx.recipe
    manifest = ctx.encoder.manifest
    seed = r.seeds[0]  # zero-shot: nothing random
    unit = {
        "dataset": "oscd",
        "protocol": "zero-shot",
        "partition": plan.partition,
        "seed": seed,
        "bands": ",".join(manifest.bands),
        "image_size": r.oscd.chip_size,
        "normalization": f"manifest:{manifest.name}",
    }
    if ctx.is_done(**unit):
        return
    start = time.perf_counter()
    counts = []
    ctx.progress.start(len(plan.cities), "oscd cities")
    for city in plan.cities:
        before, after = open_pair(city)
        with before, after:
            xa, va = _read_date(before, manifest)
            xb, vb = _read_date(after, manifest)
        label = read_change_label(city, xa.shape[-2:])
        valid = va & vb
        dist = change_distance(
            ctx.encoder, xa, xb, list(r.oscd.layers), ctx.device, ctx.dtype, r.oscd.chip_size
        )
        thr = otsu_threshold(dist[valid])
        pred = dist > thr
        s = binary_scores(pred, label, valid)
        p, t = pred[valid], label[valid].astype(bool)
        counts.append([int(np.sum(p & t)), int(np.sum(p & ~t)), int(np.sum(~p & t))])
        log.info(
            "oscd %s: %dx%d px, %.2f%% change, Otsu threshold %.4f, F1 %.4f, IoU %.4f",
            city.name,
            label.shape[1],
            label.shape[0],
            100.0 * float(label[valid].mean()) if valid.any() else float("nan"),
            thr,
            s["f1"],
            s["iou"],
        )
        ctx.progress.advance(1, f1=s["f1"])
    ctx.progress.finish()
    scores = score_change(np.asarray(counts), r.bootstrap, seed)
    paper = paper_result("oscd")
    channels = list(ctx.encoder.feature_channels)
    levels = {lv % len(channels) for lv in r.oscd.layers}
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
