"""OSCD change detection, both modes, on a held-out city: F1 and IoU of the change class.

Protocol (deo's own; the paper fine-tunes the encoder with a head that is not public,
docs/method.md §3.1, so its 60.4 F1 is not the target here):

1. **supervised**: ``deo detect-change train`` (:func:`deo_cli.infer.change.run_change_train`)
   on every labelled city but the test city (siamese encoder, ``|f1 - f2|`` per level into
   UPerNet, refined at full resolution by the ``[|x1 - x2|, (x1 + x2) / 2]`` branch
   (``--pixel-channels``, 0: off), class weights ``(1, sqrt(no-change / change))``, best
   validation F1 on 20 % of the training chips, the command's P(change) threshold (the
   validation optimum pulled toward 0.5 by ``threshold_shrink``, fully by default; the
   optimum is recorded as ``val_best_threshold``);
2. **zero-shot**: no training; cosine distance of the two dates' DEO features, Otsu threshold;
   ``--zero-shot`` lists the settings as LEVELS:GRID, where LEVELS is ``default`` (the
   command's default levels, recorded as ``levels``), ``last``, an index or indices joined by
   ``+`` (distances averaged), and GRID ``embedding`` or ``input``;
3. both are run on the test city **through the command's own code path**
   (:func:`deo_cli.infer.change.run_detect_change`, which writes the score and mask COGs), and
   the mask is compared with the city's label on its 10 m grid (a zero-shot mask on the
   embedding grid is repeated onto the 10 m pixels it covers);
4. the trivial baseline predicts "everything changed": precision = change fraction p, recall 1,
   F1 = 2p / (1 + p).

Writes one JSON file (``--out``, default ``benchmarks/results/oscd_change.json``) with the rows
of both modes and the trivial F1, the weights used and the run time.

    python benchmarks/oscd_change.py --model deo_swin_test --weights random --epochs 10
    python benchmarks/oscd_change.py --test-city all --epochs 20 --head-channels 16 --augment flips
    python benchmarks/oscd_change.py --weights runs/tiny/encoder.pt --test-city bordeaux
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

log = logging.getLogger("oscd_change")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(DEFAULT_DATA), help="OSCD-format folder")
    p.add_argument("--test-city", default="bordeaux", help="a city, a comma-separated list, or all")
    p.add_argument("--train-cities", default=None, help="comma-separated (default: all others)")
    p.add_argument("--model", default="deo_swin_test")
    p.add_argument("--weights", default="random", help="random, or an encoder file (deo pretrain export)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--chip-size", type=int, default=64)
    p.add_argument("--head", default="upernet", choices=["upernet", "linear"])
    p.add_argument("--head-channels", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup-epochs", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument(
        "--augment", default="none", choices=["none", "flips"], help="none: head inputs cached once"
    )
    p.add_argument("--fusion", default="diff", choices=["diff", "concat"])
    p.add_argument("--pixel-channels", type=int, default=32, help="full-resolution |x1 - x2| branch; 0: off")
    p.add_argument("--finetune", action="store_true", help="train the encoder too (siamese network)")
    p.add_argument("--class-weights", default=None, help="no change,change (default: the command's)")
    p.add_argument("--set", action="append", default=[], help="more ChangeTrainRecipe key=value")
    p.add_argument(
        "--zero-shot",
        default="default:embedding,2:embedding,0:input",
        help="zero-shot settings to score, LEVELS:GRID pairs, comma-separated; LEVELS default, last, "
        "an index or indices joined by + (e.g. 0+1+2:embedding), GRID embedding or input",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--work", default=None, help="keep the run folder and rasters here (default: a temp dir)")
    p.add_argument("--out", default=str(HERE / "results" / "oscd_change.json"))
    p.add_argument("--skip-zero-shot", action="store_true")
    return p.parse_args(argv)


def score_mask(mask_path: Path, label: np.ndarray) -> dict:
    """F1/IoU of a mask COG against a label on the first date's grid (see the module docstring)."""
    from deo_cli.infer.change import MASK_NODATA, upsample_to
    from deo_cli.metrics import binary_scores

    with rasterio.open(mask_path) as ds:
        mask = ds.read(1)
        stride = int(json.loads(ds.tags()["DEO_CHANGE_SCORE"])["stride"])  # the score grid's stride
    h, w = label.shape
    mask = upsample_to(mask, stride, h, w)
    valid = mask != MASK_NODATA
    pred = mask == 1
    s = binary_scores(pred, label, valid)
    p = float(label[valid].mean()) if valid.any() else float("nan")
    t = label.astype(bool)
    return {
        **s,
        "tp": int((pred & t & valid).sum()),
        "fp": int((pred & ~t & valid).sum()),
        "fn": int((~pred & t & valid).sum()),
        "valid_pixels": int(valid.sum()),
        "change_fraction": p,
        "trivial_f1": 2 * p / (1 + p),
        "mask_stride": stride,
    }


def run(args: argparse.Namespace) -> dict:
    import torch

    from deo_cli import __version__
    from deo_cli.data.oscd import list_cities, read_change_label, select_cities
    from deo_cli.infer.change import run_change_train, run_detect_change
    from deo_cli.recipes import ChangeRecipe, ChangeTrainRecipe, build_recipe

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
    work = Path(args.work or work_ctx.name)
    work.mkdir(parents=True, exist_ok=True)
    common = [
        f"model.name={args.model}",
        f"model.weights={args.weights}",
        "runtime.device=cpu",
        "runtime.num_workers=0",
        f"runtime.batch_size={args.batch_size}",
        f"runtime.seed={args.seed}",
    ]
    label = read_change_label(test)
    rows = []
    t_all = time.perf_counter()
    # -- supervised ----------------------------------------------------------------------------
    t0 = time.perf_counter()
    train_recipe = build_recipe(
        ChangeTrainRecipe,
        sets=[
            *common,
            f"data={args.data}",
            "train_cities=" + ",".join(c.name for c in train),
            f"chip_size={args.chip_size}",
            f"epochs={args.epochs}",
            f"head={args.head}",
            f"head_channels={args.head_channels}",
            f"lr={args.lr}",
            f"warmup_epochs={args.warmup_epochs}",
            f"augment={args.augment}",
            f"fusion={args.fusion}",
            f"pixel_channels={args.pixel_channels}",
            f"finetune={args.finetune}",
            *([f"class_weights={args.class_weights}"] if args.class_weights else []),
            *args.set,
        ],
    )
    trained = run_change_train(train_recipe, work / "change_head", overwrite=True)
    train_seconds = time.perf_counter() - t0
    t1 = time.perf_counter()
    predict = build_recipe(ChangeRecipe, sets=[*common])
    res = run_detect_change(
        str(test.before), str(test.after), work / "supervised.tif", predict, head=trained.head, overwrite=True
    )
    sup = score_mask(res.mask, label)
    with rasterio.open(res.output) as ds:  # the same scores at other thresholds (diagnostic)
        score = ds.read(1)
    ok, t = np.isfinite(score), label.astype(bool)
    sup["f1_at"] = {}
    for thr in (0.3, 0.4, 0.5, 0.6, 0.7):
        pred = (score > thr) & ok
        sup["f1_at"][str(thr)] = float(2 * (pred & t).sum() / (pred.sum() + (t & ok).sum()))
    rows.append(
        {
            "mode": "supervised",
            **sup,
            "threshold": res.threshold.value,
            "threshold_method": res.threshold.method,
            "best_epoch": trained.metrics["best_epoch"],
            "val_f1": trained.metrics["val_f1_at_threshold"],
            "val_best_threshold": trained.metrics["val_best_threshold"],
            "val_best_f1": trained.metrics["val_best_f1"],
            "train_seconds": round(train_seconds, 1),
            "predict_seconds": round(time.perf_counter() - t1, 1),
        }
    )
    log.info("supervised: F1 %.4f IoU %.4f (trivial F1 %.4f)", sup["f1"], sup["iou"], sup["trivial_f1"])
    # -- zero-shot -----------------------------------------------------------------------------
    configs = [] if args.skip_zero_shot else [c.split(":") for c in args.zero_shot.split(",") if c.strip()]
    for k, (layer, grid) in enumerate(configs):
        t2 = time.perf_counter()
        layer = layer.replace("+", ",")
        zs = build_recipe(ChangeRecipe, sets=[*common, f"layer={layer}", f"output_grid={grid}"])
        res = run_detect_change(
            str(test.before), str(test.after), work / f"zero_shot_{k}.tif", zs, overwrite=True
        )
        z = score_mask(res.mask, label)
        with rasterio.open(res.output) as ds:
            levels = json.loads(ds.tags()["DEO_CHANGE_SCORE"])["layers"]
        rows.append(
            {
                "mode": "zero-shot",
                **z,
                "threshold": res.threshold.value,
                "threshold_method": res.threshold.method,
                "layer": layer,
                "levels": levels,
                "output_grid": grid,
                "predict_seconds": round(time.perf_counter() - t2, 1),
            }
        )
        log.info(
            "zero-shot (layer %s, %s grid): F1 %.4f IoU %.4f (trivial %.4f)",
            layer,
            grid,
            z["f1"],
            z["iou"],
            z["trivial_f1"],
        )
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
        "settings": {
            "epochs": args.epochs,
            "chip_size": args.chip_size,
            "head": args.head,
            "head_channels": args.head_channels,
            "lr": args.lr,
            "warmup_epochs": args.warmup_epochs,
            "batch_size": args.batch_size,
            "seed": args.seed,
            "fusion": args.fusion,
            "pixel_channels": args.pixel_channels,
            "class_weights": trained.metrics["class_weights"],
            "threshold_shrink": trained.metrics["threshold_shrink"],
            "extra": list(args.set),
            "encoder": "fine-tuned" if args.finetune else "frozen",
            "augment": args.augment,
        },
        "trivial_f1": rows[0]["trivial_f1"],
        "rows": rows,
        "seconds": round(time.perf_counter() - t_all, 1),
        "deo_version": __version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}",
    }
    if work_ctx is not None:
        work_ctx.cleanup()
    return out


def pool(runs: list[dict]) -> dict:
    """Every row's F1/IoU over all test cities' pixels, keyed by mode (and level/grid)."""
    pooled = {}
    for k, row in enumerate(runs[0]["rows"]):
        tp = sum(r["rows"][k]["tp"] for r in runs)
        fp = sum(r["rows"][k]["fp"] for r in runs)
        fn = sum(r["rows"][k]["fn"] for r in runs)
        key = row["mode"] + (
            f" layer {row['layer']} {row['output_grid']}" if row["mode"] == "zero-shot" else ""
        )
        pooled[key] = {
            "f1": 2 * tp / (2 * tp + fp + fn),
            "iou": tp / (tp + fp + fn),
            "mean_f1": float(np.mean([r["rows"][k]["f1"] for r in runs])),
        }
    return pooled


def run_many(args: argparse.Namespace) -> dict:
    """One held-out city (``--test-city NAME``), or each of several in turn (``a,b`` or ``all``:
    leave-one-city-out), with the F1/IoU of every mode pooled over the test cities' pixels."""
    from deo_cli.data.oscd import list_cities

    names = args.test_city.split(",")
    if names == ["all"]:
        names = [c.name for c in list_cities(args.data) if c.label is not None]
    if len(names) == 1:
        return run(args)
    runs = [run(argparse.Namespace(**{**vars(args), "test_city": n})) for n in names]
    pooled = pool(runs)
    first = [r["rows"][0] for r in runs]
    p = sum(x["tp"] + x["fn"] for x in first) / sum(x["valid_pixels"] for x in first)
    return {
        "benchmark": "oscd_change",
        "protocol": "leave-one-city-out",
        "trivial_f1_pooled": 2 * p / (1 + p),
        "runs": runs,
        "pooled": pooled,
        "trivial_f1_mean": float(np.mean([r["trivial_f1"] for r in runs])),
        "seconds": round(sum(r["seconds"] for r in runs), 1),
    }


def main(argv=None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    result = run_many(args)
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, path)
    for r in [row | {"city": x["test_city"]} for x in result.get("runs", [result]) for row in x["rows"]]:
        what = f"{r['city']} {r['mode']}"
        what += f" (layer {r['layer']}, {r['output_grid']} grid)" if r["mode"] == "zero-shot" else ""
        print(
            f"{what:>48}: F1 {r['f1']:.4f}  IoU {r['iou']:.4f}  (trivial F1 {r['trivial_f1']:.4f}; "
            f"threshold {r['threshold']:.4g} {r['threshold_method']})"
        )
    for k, v in result.get("pooled", {}).items():
        print(
            f"{'pooled ' + k:>48}: F1 {v['f1']:.4f}  IoU {v['iou']:.4f}  (mean F1 over cities {v['mean_f1']:.4f})"
        )
    print(f"{result['seconds']:.0f} s; written to {path}")
    return result


if __name__ == "__main__":
    main()
