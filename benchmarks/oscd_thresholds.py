"""Which threshold rule holds when change is rare: leave-one-city-out on the OSCD cities.

For each score setting (``--settings``; each computed once per city and cached in ``--work``):

- ``random``: ``deo detect-change``'s zero-shot score (cosine distance, levels 0-2 on the
  stride-4 grid) of ``--model`` with random weights;
- ``pretrained``: the same with the tiny encoder ``benchmarks/oscd_pretrain_tiny.py`` pretrained
  **without** the scored city (``<pretrained>/heldout_<city>/encoder.pt``; skipped when absent);
- ``cva``: the spectral baseline of ``deo detect-change --method cva`` (input grid);
- ``swin_t``: the zero-shot score of deo_swin_t with random weights (as the new user tried);

every rule of :mod:`deo_cli.tasks.change.threshold` is computed from the city's streamed histogram
(exactly as the command does), the mask is compared with the label on the 10 m grid (an
embedding-grid mask repeated onto the pixels it covers), and reported per city and pooled
over the cities (TP/FP/FN summed): F1, precision, recall, the flagged fraction against the
true change fraction (their ratio; the worst city's factor ``max(r, 1/r)``).

Rules with a parameter (``mad``'s k, the percentile) never see the scored city: in each fold
the parameter with the best pooled F1 on the **other** cities (of the same setting) is chosen
from a grid and applied to the held-out city; the fold-wise choices are reported. The
threshold-free AUC and best-threshold F1 of each score (an oracle) are reported beside them.

Speckle: for each setting's masks under ``--speckle-rule``, the share of 8-connected regions
that are one mask pixel, the share of those that touch any changed pixel against the share of
larger regions that do, and the pixel F1 with the one-pixel regions removed.

    python benchmarks/oscd_thresholds.py --settings random,cva            # print the table
    python benchmarks/oscd_thresholds.py --out benchmarks/results/oscd_thresholds.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parent.parent / "shared" / "data" / "oscd_subset"
MAD_KS = (1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 10.0, 12.0, 15.0, 20.0, 25.0, 30.0)
PERCENTILES = (90.0, 95.0, 97.0, 98.0, 98.5, 98.75, 99.0, 99.25, 99.5, 99.75, 99.9)
#: How a fold chooses a rule's parameter on its training cities: the best pooled F1, or the best
#: pooled F1 among parameters whose flagged fraction is within 3x of the true one in every
#: training city (the least bad worst factor when none is).
CRITERIA = ("f1", "f1-within-3x")
RULES = ("otsu", "otsu-log", "kittler", "triangle", "mad", "percentile")

log = logging.getLogger("oscd_thresholds")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(DEFAULT_DATA), help="OSCD-format folder")
    p.add_argument("--settings", default="random,pretrained,cva,swin_t", help="comma-separated")
    p.add_argument("--model", default="deo_swin_test", help="model of the random and cva settings")
    p.add_argument("--pretrained", default="runs/oscd_pretrain_tiny", help="oscd_pretrain_tiny.py --work")
    p.add_argument("--work", default="runs/oscd_thresholds", help="cached scores")
    p.add_argument("--speckle-rule", default=None, help="rule of the speckle count (default: deo's default)")
    p.add_argument("--out", default=None, help="write the JSON here (default: print only)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# Scores, once per setting and city
# ---------------------------------------------------------------------------------------------


def _score_model(setting: str, city: str, args):
    """The score model of ``setting`` for ``city`` (None when its encoder is missing)."""
    from deo_cli.models import get_model_spec
    from deo_cli.recipes import ChangeRecipe, build_recipe
    from deo_cli.tasks.change.cva import CvaChange
    from deo_cli.tasks.change.model import build_zero_shot_model

    if setting == "cva":
        return CvaChange(get_model_spec(args.model))
    name, weights = args.model, "random"
    if setting == "swin_t":
        name = "deo_swin_t"
    elif setting == "pretrained":
        enc = Path(args.pretrained) / f"heldout_{city}" / "encoder.pt"
        if not enc.is_file():
            return None
        name, weights = "deo_swin_test", str(enc)
    sets = [f"model.name={name}", f"model.weights={weights}", f"runtime.seed={args.seed}"]
    return build_zero_shot_model(build_recipe(ChangeRecipe, sets=sets))


def city_score(setting: str, city, args) -> dict | None:
    """``{"score", "stride", "seconds", "range"}`` of ``setting`` on ``city`` (cached)."""
    from deo_cli.data.oscd import open_pair
    from deo_cli.tasks.change.score import change_score_array

    cache = Path(args.work) / f"{setting}_{city.name}.npz"
    if cache.is_file():
        z = np.load(cache)
        return {k: z[k].item() if z[k].ndim == 0 else z[k] for k in z.files}
    model = _score_model(setting, city.name, args)
    if model is None:
        return None
    t0 = time.perf_counter()
    before, after = open_pair(city)
    score, _ = change_score_array(before, after, model, batch_size=8)
    lo, hi = getattr(model, "score_range", (0.0, 2.0))
    out = {"score": score, "stride": model.stride, "seconds": time.perf_counter() - t0, "lo": lo, "hi": hi}
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(cache, **out)
    return out


# ---------------------------------------------------------------------------------------------
# Rules
# ---------------------------------------------------------------------------------------------


def thresholds(hist, rule: str) -> dict:
    """``{parameter: threshold}`` of ``rule`` (parameter None for rules without one)."""
    if rule == "mad":
        return {k: hist.mad(k) for k in MAD_KS}
    if rule == "percentile":
        return {p: hist.percentile(p) for p in PERCENTILES}
    return {None: getattr(hist, rule.replace("-", "_"))()}


def city_table(score: dict, label: np.ndarray) -> dict:
    """Per rule and parameter: the threshold and the counts on the 10 m label grid; the same
    for deo's default rule (``"default"``, parameter None)."""
    from deo_cli.tasks.change.evaluate import ScoreCurve, counts_at
    from deo_cli.tasks.change.score import upsample_to
    from deo_cli.tasks.change.threshold import DEFAULT_METHOD, ScoreHistogram, choose_threshold

    s = score["score"]
    hist = ScoreHistogram.of(s, score["lo"], score["hi"])  # what the command sees
    up = upsample_to(s, int(score["stride"]), *label.shape)
    out = {}
    for rule in RULES:
        out[rule] = {p: (t, counts_at(up, label, t)) for p, t in thresholds(hist, rule).items()}
    t = choose_threshold(hist, DEFAULT_METHOD).value
    out["default"] = {None: (t, counts_at(up, label, t))}
    curve = ScoreCurve(score["lo"], score["hi"]).add(up, label)
    return {"rules": out, "auc": curve.auc(), "best_f1": curve.best_f1()[0]}


def pooled(counts):
    total = counts[0]
    for c in counts[1:]:
        total = total + c
    return total


def worst_factor(counts) -> float:
    """The largest ``max(r, 1/r)`` of flagged over true fraction among ``counts``."""
    r = [c.flagged_fraction / c.change_fraction for c in counts]
    return max(max(x, 1 / x) if x > 0 else float("inf") for x in r)


def choose_parameter(tables: dict, rule: str, cities: list[str], criterion: str = "f1"):
    """The parameter of ``rule`` chosen on ``cities`` by ``criterion`` (see :data:`CRITERIA`)."""
    params = list(tables[cities[0]]["rules"][rule])
    counts = [[tables[c]["rules"][rule][p][1] for c in cities] for p in params]
    f1 = np.array([pooled(c).f1 for c in counts])
    if criterion == "f1-within-3x":
        worst = np.array([worst_factor(c) for c in counts])
        if not (worst <= 3.0).any():
            return params[int(np.argmin(worst))]
        f1 = np.where(worst <= 3.0, f1, -np.inf)
    return params[int(np.nanargmax(f1))]


def loco(tables: dict, rule: str, criterion: str = "f1") -> dict:
    """Leave-one-city-out rows of ``rule``: per held-out city, the parameter chosen on the
    others, the threshold and the counts; pooled F1 and the worst flagged/true factor."""
    names = list(tables)
    rows = {}
    for city in names:
        others = [c for c in names if c != city]
        param = choose_parameter(tables, rule, others, criterion) if len(names) > 1 else None
        t, counts = tables[city]["rules"][rule][param]
        ratio = counts.flagged_fraction / counts.change_fraction
        rows[city] = {"parameter": param, "threshold": t, **counts.as_dict(), "flagged_over_true": ratio}
    ratios = [r["flagged_over_true"] for r in rows.values()]
    total = pooled([tables[c]["rules"][rule][rows[c]["parameter"]][1] for c in names])
    factor = worst_factor([tables[c]["rules"][rule][rows[c]["parameter"]][1] for c in names])
    return {
        "cities": rows,
        "pooled": total.as_dict(),
        "worst_factor": factor,
        "within_3x_everywhere": bool(factor <= 3.0),
        "mean_abs_log10_ratio": float(np.mean([abs(np.log10(r)) if r > 0 else np.inf for r in ratios])),
        "criterion": criterion,
        "chosen_on_all": choose_parameter(tables, rule, names, criterion)
        if rule in ("mad", "percentile")
        else None,
    }


# ---------------------------------------------------------------------------------------------
# Speckle
# ---------------------------------------------------------------------------------------------


def speckle(score: dict, label: np.ndarray, threshold: float) -> dict:
    """One-pixel regions of the mask ``score > threshold`` (on the score's grid) and the F1
    without them."""
    from rasterio import features

    from deo_cli.tasks.change.evaluate import counts_at
    from deo_cli.tasks.change.score import upsample_to

    s, stride = score["score"], int(score["stride"])
    mask = (np.nan_to_num(s, nan=-np.inf) > threshold).astype(np.uint8)
    # change pixels under each mask pixel: the label summed over the stride x stride block
    h, w = s.shape
    lab = np.zeros((h * stride, w * stride), np.int32)
    lab[: label.shape[0], : label.shape[1]] = label
    touched = lab.reshape(h, stride, w, stride).sum(axis=(1, 3)) > 0
    sizes, hits = [], []
    for geom, _ in features.shapes(mask, mask=mask.astype(bool), connectivity=8):
        region = features.rasterize([(geom, 1)], out_shape=mask.shape, dtype="uint8").astype(bool)
        sizes.append(int(region.sum()))
        hits.append(bool(touched[region].any()))
    sizes, hits = np.array(sizes), np.array(hits)
    clean = features.sieve(mask, size=2, connectivity=8)
    s2 = np.where(np.isfinite(s), clean.astype(np.float32), np.nan)
    single = sizes == 1
    return {
        "regions": int(len(sizes)),
        "one_pixel_share": float(single.mean()) if len(sizes) else float("nan"),
        "one_pixel_touch_change": float(hits[single].mean()) if single.any() else float("nan"),
        "larger_touch_change": float(hits[~single].mean()) if (~single).any() else float("nan"),
        "f1": counts_at(
            upsample_to(np.where(np.isfinite(s), mask, np.nan), stride, *label.shape), label, 0.5
        ).f1,
        "f1_without_one_pixel_regions": counts_at(upsample_to(s2, stride, *label.shape), label, 0.5).f1,
    }


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------


def evaluate_setting(setting: str, cities, args) -> dict | None:
    from deo_cli.data.oscd import read_change_label
    from deo_cli.tasks.change.threshold import DEFAULT_METHOD, ScoreHistogram, choose_threshold

    scores, labels = {}, {}
    for city in cities:
        sc = city_score(setting, city, args)
        if sc is None:
            log.warning("%s: no score for %s (encoder missing); setting skipped", setting, city.name)
            return None
        scores[city.name], labels[city.name] = sc, read_change_label(city)
    tables = {c: city_table(scores[c], labels[c]) for c in scores}
    rule = args.speckle_rule or DEFAULT_METHOD
    spk = {}
    for c in scores:
        hist = ScoreHistogram.of(scores[c]["score"], scores[c]["lo"], scores[c]["hi"])
        thr = choose_threshold(hist, rule)
        spk[c] = speckle(scores[c], labels[c], thr.value)
    return {
        "rules": {rule_: loco(tables, rule_) for rule_ in RULES},
        # deo's default as it is (its parameter was chosen on these cities: no held-out estimate)
        "default": loco(tables, "default"),
        "rules_fraction_constrained": {r: loco(tables, r, "f1-within-3x") for r in ("mad", "percentile")},
        "auc": {c: t["auc"] for c, t in tables.items()},
        "best_f1": {c: t["best_f1"] for c, t in tables.items()},
        "score_seconds": {c: round(float(scores[c]["seconds"]), 1) for c in scores},
        "speckle": {"rule": rule, "cities": spk},
    }


def print_table(result: dict) -> None:
    for setting, res in result["settings"].items():
        print(f"\n== {setting}: AUC " + ", ".join(f"{c} {v:.3f}" for c, v in res["auc"].items()))
        print(f"{'rule':>15} {'pooled F1':>9} {'worst x':>8}  per city: F1 flagged%/true% (param)")
        constrained = {f"{k} (3x)": v for k, v in res["rules_fraction_constrained"].items()}
        for rule, r in {**res["rules"], **constrained, "deo default": res["default"]}.items():
            cells = "  ".join(
                f"{c[:5]} {v['f1']:.3f} {100 * v['flagged_fraction']:.2f}/{100 * v['change_fraction']:.2f}"
                + (f" ({v['parameter']:g})" if v["parameter"] is not None else "")
                for c, v in r["cities"].items()
            )
            print(f"{rule:>15} {r['pooled']['f1']:9.4f} {r['worst_factor']:8.2f}  {cells}")
        best = "  ".join(f"{c[:5]} {v:.3f}" for c, v in res["best_f1"].items())
        print(f"{'best-F1':>15} (oracle threshold per city)  {best}")


def main(argv=None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    from deo_cli import __version__
    from deo_cli.data.oscd import list_cities
    from deo_cli.tasks.change.threshold import DEFAULT_MAD_K, DEFAULT_METHOD, DEFAULT_PERCENTILE

    t0 = time.perf_counter()
    cities = [c for c in list_cities(args.data) if c.label is not None]
    settings = {}
    for s in [x.strip() for x in args.settings.split(",") if x.strip()]:
        res = evaluate_setting(s, cities, args)
        if res is not None:
            settings[s] = res
    result = {
        "benchmark": "oscd_thresholds",
        "protocol": "leave-one-city-out; parameters (mad k, percentile) chosen by pooled F1 on the other cities",
        "dataset": str(args.data),
        "cities": [c.name for c in cities],
        "model": args.model,
        "grids": {"mad_k": list(MAD_KS), "percentile": list(PERCENTILES)},
        "default": {"method": DEFAULT_METHOD, "percentile": DEFAULT_PERCENTILE, "mad_k": DEFAULT_MAD_K},
        "settings": settings,
        "seconds": round(time.perf_counter() - t0, 1),
        "deo_version": __version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
    }
    print_table(result)
    if args.out:
        path = Path(args.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(result, indent=1, default=float))
        os.replace(tmp, path)
        print(f"written to {path}")
    return result


if __name__ == "__main__":
    main()
