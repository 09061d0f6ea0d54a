"""OSCD change detection on held-out cities: every method of ``deo detect-change``, same columns.

Protocol (deo's own; the paper fine-tunes the encoder with a head that is not public,
docs/method.md §3.1, so its 60.4 F1 is not the target here), per held-out city:

1. **supervised**: ``deo detect-change train`` (:func:`deo_cli.tasks.change.train.run_change_train`)
   on every labelled city but the held-out one, **with the command's defaults** unless
   ``--set KEY=VALUE`` (ChangeTrainRecipe keys) changes them; the training time is recorded;
2. **zero-shot**: no training; ``deo detect-change``'s default score and threshold rule
   (``--zero-shot`` lists other settings as LEVELS:GRID, LEVELS ``default``, ``last``, an index
   or indices joined by ``+``, GRID ``embedding`` or ``input``);
3. **cva**: ``deo detect-change --method cva``, the spectral baseline;
4. each is run on the held-out city **through the command's own code path**
   (:func:`deo_cli.tasks.change.predict.run_detect_change`, which writes the score and mask
   COGs); the mask is compared with the city's label on its 10 m grid (a mask on the embedding grid is
   repeated onto the pixels it covers) and so is the score, threshold-free
   (:mod:`deo_cli.tasks.change.evaluate`);
5. **everything**: the trivial mask that flags every pixel (F1 = 2p / (1 + p)).

Columns of every row: F1, precision, recall, IoU, AUC, best-threshold F1 (an oracle), the
flagged and the true change fraction, the threshold and its rule; rows are pooled over the
held-out cities (TP/FP/FN and the score histograms summed).

Prints the table; writes JSON only where ``--out`` says (never into benchmarks/results/ unless
asked).

    python benchmarks/oscd_change.py                                # the command's defaults, 4 folds
    python benchmarks/oscd_change.py --test-city paris --set epochs=5
    python benchmarks/oscd_change.py --weights runs/tiny/encoder.pt --out results.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parent.parent / "shared" / "data" / "oscd_subset"
MODES = ("supervised", "zero-shot", "cva", "everything")

log = logging.getLogger("oscd_change")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(DEFAULT_DATA), help="OSCD-format folder")
    p.add_argument("--test-city", default="all", help="a city, a comma-separated list, or all")
    p.add_argument("--train-cities", default=None, help="comma-separated (default: all others)")
    p.add_argument("--model", default="deo_swin_test")
    p.add_argument("--weights", default="random", help="random, or an encoder file (deo pretrain export)")
    p.add_argument(
        "--set", action="append", default=[], help="ChangeTrainRecipe key=value (default: the command's)"
    )
    p.add_argument(
        "--zero-shot",
        default="default:embedding",
        help="zero-shot settings, LEVELS:GRID pairs, comma-separated (none: skip); LEVELS default, last, "
        "an index or indices joined by + (e.g. 0+1+2:embedding), GRID embedding or input",
    )
    p.add_argument("--skip-supervised", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--work", default=None, help="keep the run folders and rasters here (default: a temp dir)")
    p.add_argument("--out", default=None, help="write the JSON here (default: print only)")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# Scoring one method's outputs
# ---------------------------------------------------------------------------------------------


def score_outputs(res, label: np.ndarray) -> tuple[dict, object]:
    """The row of a ``run_detect_change`` result against ``label`` on its 10 m grid, and the
    score's curve (for pooled AUC)."""
    from deo_cli.tasks.change.evaluate import ScoreCurve, counts_at
    from deo_cli.tasks.change.model import MASK_NODATA
    from deo_cli.tasks.change.score import upsample_to

    with rasterio.open(res.mask) as m, rasterio.open(res.output) as s:
        mask, score = m.read(1), s.read(1)
        stride = int(json.loads(m.tags()["DEO_CHANGE_SCORE"])["stride"])  # the score grid's stride
        hist_range = json.loads(m.tags()["DEO_CHANGE_SCORE"]).get("range") or (
            [0.0, 1.0] if res.mode == "supervised" else [0.0, 2.0]
        )
    h, w = label.shape
    mask = upsample_to(mask, stride, h, w).astype(np.float32)
    mask[mask == MASK_NODATA] = np.nan
    counts = counts_at(mask, label, 0.5)
    curve = ScoreCurve(*hist_range).add(upsample_to(score, stride, h, w), label)
    row = {
        **counts.as_dict(),
        "auc": curve.auc(),
        "best_f1": curve.best_f1()[0],
        "valid_pixels": counts.valid,
        "trivial_f1": 2 * counts.change_fraction / (1 + counts.change_fraction),
        "mask_stride": stride,
        "threshold": res.threshold.value,
        "threshold_method": res.threshold.method,
        "threshold_rule": res.threshold.rule,
    }
    return row, curve


def everything_row(label: np.ndarray) -> dict:
    from deo_cli.tasks.change.evaluate import everything_changed

    c = everything_changed(label)
    return {
        **c.as_dict(),
        "auc": 0.5,
        "best_f1": c.f1,
        "valid_pixels": c.valid,
        "trivial_f1": c.f1,
        "mask_stride": 1,
        "threshold": None,
        "threshold_method": None,
        "threshold_rule": "every pixel",
    }


# ---------------------------------------------------------------------------------------------
# One held-out city
# ---------------------------------------------------------------------------------------------


def _common(args) -> list[str]:
    return [
        f"model.name={args.model}",
        f"model.weights={args.weights}",
        "runtime.device=cpu",
        "runtime.num_workers=0",
        f"runtime.seed={args.seed}",
    ]


def _supervised(args, test, train, work: Path, label) -> tuple[dict, object, dict]:
    from deo_cli.recipes import ChangeRecipe, ChangeTrainRecipe, build_recipe
    from deo_cli.tasks.change.predict import run_detect_change
    from deo_cli.tasks.change.train import run_change_train

    recipe = build_recipe(
        ChangeTrainRecipe,
        sets=[
            *_common(args),
            f"data={args.data}",
            "train_cities=" + ",".join(c.name for c in train),
            *args.set,
        ],
    )
    t0 = time.perf_counter()
    trained = run_change_train(recipe, work / "change_head", overwrite=True)
    train_seconds = time.perf_counter() - t0
    t1 = time.perf_counter()
    predict = build_recipe(ChangeRecipe, sets=_common(args))
    res = run_detect_change(
        str(test.before), str(test.after), work / "supervised.tif", predict, head=trained.head, overwrite=True
    )
    row, curve = score_outputs(res, label)
    m = trained.metrics
    row.update(
        {
            "best_epoch": m["best_epoch"],
            "val_f1": m["val_f1_at_threshold"],
            "val_best_threshold": m["val_best_threshold"],
            "train_seconds": round(train_seconds, 1),
            "predict_seconds": round(time.perf_counter() - t1, 1),
        }
    )
    settings = {
        k: getattr(recipe, k)
        for k in (
            "epochs",
            "chip_size",
            "head",
            "head_channels",
            "lr",
            "warmup_epochs",
            "fusion",
            "pixel_channels",
        )
    }
    settings.update(
        {
            "batch_size": recipe.runtime.batch_size,
            "augment": recipe.augment,
            "class_weights": m["class_weights"],
            "threshold_shrink": m["threshold_shrink"],
            "encoder": m["encoder"],
            "extra": list(args.set),
        }
    )
    return row, curve, settings


def _unsupervised(args, test, work: Path, label, method: str, layer="default", grid="embedding"):
    from deo_cli.recipes import ChangeRecipe, build_recipe
    from deo_cli.tasks.change.predict import run_detect_change

    t0 = time.perf_counter()
    sets = [*_common(args), f"method={method}", f"layer={layer}", f"output_grid={grid}"]
    name = "cva" if method == "cva" else f"zero_shot_{layer.replace(',', '+')}_{grid}"
    res = run_detect_change(
        str(test.before),
        str(test.after),
        work / f"{name}.tif",
        build_recipe(ChangeRecipe, sets=sets),
        overwrite=True,
    )
    row, curve = score_outputs(res, label)
    row["predict_seconds"] = round(time.perf_counter() - t0, 1)
    if method != "cva":
        with rasterio.open(res.output) as ds:
            row["levels"] = json.loads(ds.tags()["DEO_CHANGE_SCORE"])["layers"]
        row.update({"layer": layer, "output_grid": grid})
    return row, curve


def run(args: argparse.Namespace) -> tuple[dict, dict]:
    """One held-out city: ``(result, {row key: ScoreCurve})``."""
    import torch

    from deo_cli import __version__
    from deo_cli.data.oscd import list_cities, read_change_label, select_cities

    if args.threads:
        torch.set_num_threads(args.threads)
    cities = list_cities(args.data)
    (test,) = select_cities(cities, [args.test_city])
    train = (
        select_cities(cities, args.train_cities.split(","))
        if args.train_cities
        else [c for c in cities if c.label is not None and c.name != test.name]
    )
    work_ctx = tempfile.TemporaryDirectory() if args.work is None else None
    work = Path(args.work or work_ctx.name) / test.name
    work.mkdir(parents=True, exist_ok=True)
    label = read_change_label(test)
    rows, curves, settings = [], {}, None
    t_all = time.perf_counter()
    if not args.skip_supervised:
        row, curves["supervised"], settings = _supervised(args, test, train, work, label)
        rows.append({"mode": "supervised", **row})
    configs = [c.split(":") for c in args.zero_shot.split(",") if c.strip() and c.strip() != "none"]
    for layer, grid in configs:
        row, curve = _unsupervised(args, test, work, label, "zero-shot", layer.replace("+", ","), grid)
        rows.append({"mode": "zero-shot", **row})
        curves[key_of(rows[-1])] = curve
    row, curves["cva"] = _unsupervised(args, test, work, label, "cva")
    rows.append({"mode": "cva", **row})
    rows.append({"mode": "everything", **everything_row(label)})
    for r in rows:
        log.info("%s %s: F1 %.4f AUC %.3f flagged %.2f%%", test.name, key_of(r), r["f1"], r["auc"],
                 100 * r["flagged_fraction"])  # fmt: skip
    weights_sha = None
    if args.weights not in ("random", "default") and Path(args.weights).is_file():
        from deo_cli.models import file_sha256

        weights_sha = file_sha256(args.weights)
    out = {
        "benchmark": "oscd_change",
        "dataset": str(args.data),
        "test_city": test.name,
        "train_cities": [c.name for c in train],
        "model": args.model,
        "weights": args.weights,
        "weights_sha256": weights_sha,
        "settings": settings,
        "trivial_f1": rows[-1]["f1"],
        "rows": rows,
        "seconds": round(time.perf_counter() - t_all, 1),
        "deo_version": __version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}",
    }
    if work_ctx is not None:
        work_ctx.cleanup()
    return out, curves


def key_of(row: dict) -> str:
    if row["mode"] == "zero-shot":
        return f"zero-shot layer {row['layer']} {row['output_grid']}"
    return row["mode"]


# ---------------------------------------------------------------------------------------------
# Several held-out cities
# ---------------------------------------------------------------------------------------------


def pool(runs: list[dict], curves: list[dict] | None = None) -> dict:
    """Every row's counts over all held-out cities' pixels, keyed by :func:`key_of`."""
    from deo_cli.tasks.change.evaluate import ChangeCounts

    pooled = {}
    for k, row in enumerate(runs[0]["rows"]):
        key = key_of(row)
        c = ChangeCounts(*(sum(r["rows"][k][f] for r in runs) for f in ("tp", "fp", "fn", "tn")))
        entry = {**c.as_dict(), "mean_f1": float(np.mean([r["rows"][k]["f1"] for r in runs]))}
        entry["beats_trivial_in_every_city"] = all(r["rows"][k]["f1"] > r["trivial_f1"] for r in runs)
        if curves and key in curves[0]:
            merged = _merge([cv[key] for cv in curves])
            entry["auc"], entry["best_f1"] = merged.auc(), merged.best_f1()[0]
        elif row["mode"] == "everything":
            entry["auc"], entry["best_f1"] = 0.5, c.f1
        if row["mode"] == "supervised":
            entry["train_seconds"] = round(sum(r["rows"][k]["train_seconds"] for r in runs), 1)
        pooled[key] = entry
    return pooled


def _merge(curves):
    from deo_cli.tasks.change.evaluate import ScoreCurve

    out = ScoreCurve(curves[0].pos.lo, curves[0].pos.hi, curves[0].pos.bins)
    for c in curves:
        out.pos.counts += c.pos.counts
        out.neg.counts += c.neg.counts
    return out


def run_many(args: argparse.Namespace) -> dict:
    """One held-out city (``--test-city NAME``), or each of several in turn (``a,b`` or ``all``:
    leave-one-city-out), pooled over the held-out cities' pixels."""
    from deo_cli.data.oscd import list_cities

    names = args.test_city.split(",")
    if names == ["all"]:
        names = [c.name for c in list_cities(args.data) if c.label is not None]
    runs, curves = [], []
    for n in names:
        r, c = run(argparse.Namespace(**{**vars(args), "test_city": n}))
        runs.append(r)
        curves.append(c)
    if len(runs) == 1:
        return {**runs[0], "pooled": pool(runs, curves)}
    everything = pool(runs)["everything"]
    return {
        "benchmark": "oscd_change",
        "protocol": "leave-one-city-out",
        "model": args.model,
        "weights": args.weights,
        "settings": runs[0]["settings"],
        "trivial_f1_pooled": everything["f1"],
        "runs": runs,
        "pooled": pool(runs, curves),
        "seconds": round(sum(r["seconds"] for r in runs), 1),
    }


COLUMNS = (("F1", "f1"), ("prec.", "precision"), ("recall", "recall"), ("AUC", "auc"), ("best F1", "best_f1"),
           ("flag %", "flagged_fraction"), ("true %", "change_fraction"))  # fmt: skip


def print_table(result: dict) -> None:
    print(f"{'city':>12} {'method':>34} " + " ".join(f"{h:>7}" for h, _ in COLUMNS) + "  threshold")
    for run_ in result.get("runs", [result]):
        for r in run_["rows"]:
            cells = " ".join(
                f"{(r[m] if m == 'auc' else 100 * r[m]):7.3f}" if r.get(m) is not None else f"{'-':>7}"
                for _, m in COLUMNS
            )
            thr = f"{r['threshold']:.4g} ({r['threshold_rule']})" if r["threshold"] is not None else "-"
            print(f"{run_['test_city']:>12} {key_of(r):>34} {cells}  {thr}")
    for key, v in result.get("pooled", {}).items():
        cells = " ".join(
            f"{(v[m] if m == 'auc' else 100 * v[m]):7.3f}" if v.get(m) is not None else f"{'-':>7}"
            for _, m in COLUMNS
        )
        extra = f"  training {v['train_seconds']:.0f} s" if "train_seconds" in v else ""
        print(f"{'pooled':>12} {key:>34} {cells}{extra}")
    print("(F1, precision, recall, best F1, flagged and true change in %; AUC as a fraction)")


def main(argv=None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    result = run_many(args)
    print_table(result)
    if args.out:
        path = Path(args.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(result, indent=1))
        os.replace(tmp, path)
        print(f"{result['seconds']:.0f} s; written to {path}")
    return result


if __name__ == "__main__":
    main()
