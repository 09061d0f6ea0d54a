"""OSCD change detection with a tiny encoder pretrained by ``deo pretrain`` on the training cities.

The random-weights run (``benchmarks/results/oscd_change.json``) shows that zero-shot change from
random deep features is noise. Here, for each held-out city:

1. a CSV manifest lists both dates (``imgs_1``, ``imgs_2``) of the **other** cities only, as
   unlabeled imagery (the test city's pixels are never seen, not even unlabeled);
2. ``deo pretrain --recipe tiny_cpu`` (deo_swin_test, random DINOv3-tiny optical teacher, 64 px
   windows) trains on it for ``--epochs`` epochs of ``--windows-per-scene`` windows per scene, and
   ``deo pretrain export`` writes the EMA teacher's encoder;
3. :mod:`oscd_change` runs both modes on the held-out city with ``--weights`` = that encoder, with
   ``deo detect-change train``'s defaults (as the random-weights run; one thread)
   and the zero-shot settings of ``--zero-shot`` (``default`` is the command's default levels,
   0+1+2 for Swin; levels joined by ``+`` are averaged).

Rows are pooled over the test cities as in ``oscd_change.py --test-city all`` and written with
each city's pretraining summary (steps, first/last loss, seconds, encoder SHA-256) to ``--out``.

``--pretrain-without CITY`` pretrains once (without CITY) for every test city instead (faster; then
the other test cities' images were seen, unlabeled). ``--reuse`` keeps encoders and per-city
results already in ``--work``, so cities can be run in several calls and pooled by a last one;
``--reuse-encoders`` keeps only the encoders and scores every city again (after a change to
``detect-change``).

    python benchmarks/oscd_pretrain_tiny.py --epochs 12 --windows-per-scene 32   # 288 steps a city
    python benchmarks/oscd_pretrain_tiny.py --test-city all --reuse               # pool earlier calls
    python benchmarks/oscd_pretrain_tiny.py --reuse-encoders                      # score again
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import oscd_change  # noqa: E402  (the benchmark beside this file)

log = logging.getLogger("oscd_pretrain_tiny")

#: ``deo detect-change train``'s defaults, as in the random-weights run
#: (benchmarks/results/oscd_change.json), on one thread.
BENCH_ARGS = ["--seed", "0", "--threads", "1"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(oscd_change.DEFAULT_DATA), help="OSCD-format folder")
    p.add_argument("--test-city", default="all", help="a city, a comma-separated list, or all")
    p.add_argument("--recipe", default="tiny_cpu", help="deo pretrain recipe")
    p.add_argument("--epochs", type=int, default=12, help="pretraining epochs")
    p.add_argument("--windows-per-scene", type=int, default=32, help="64 px windows per scene per epoch")
    p.add_argument("--pretrain-seed", type=int, default=0)
    p.add_argument(
        "--pretrain-without",
        default=None,
        help="one pretraining, without this city's images, for every test city (default: one per test city)",
    )
    p.add_argument("--set", action="append", default=[], help="more deo pretrain --set key=value")
    p.add_argument(
        "--zero-shot",
        default="default:embedding,default:input,2:embedding,2:input,0:input,1:embedding,1:input,"
        "last:embedding,1+2:embedding",
        help="zero-shot settings for oscd_change.py (LEVELS:GRID, comma-separated; levels joined by +)",
    )
    p.add_argument("--work", default="runs/oscd_pretrain_tiny", help="run folders and encoders")
    p.add_argument(
        "--reuse", action="store_true", help="reuse encoders and per-city results already in --work"
    )
    p.add_argument(
        "--reuse-encoders", action="store_true", help="reuse encoders already in --work, score again"
    )
    p.add_argument("--out", default=str(HERE / "results" / "oscd_change_pretrained.json"))
    return p.parse_args(argv)


def pretrain(args, test: str, train_cities, work: Path, reuse: bool) -> dict:
    """Pretrain on ``train_cities``' images (both dates) and export; the run's summary."""
    enc = work / "encoder.pt"
    run_dir = work / "run"
    if not (reuse and enc.is_file()):
        work.mkdir(parents=True, exist_ok=True)
        manifest = work / "manifest.csv"
        with manifest.open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["ms_path"])
            for c in train_cities:
                w.writerow([str(Path(c.before).resolve())])
                w.writerow([str(Path(c.after).resolve())])
        cmd = [
            "deo", "pretrain", "--recipe", args.recipe, "--data", str(manifest), "--out", str(run_dir),
            "--epochs", str(args.epochs), "--seed", str(args.pretrain_seed), "--overwrite",
            "--set", f"data.windows_per_scene={args.windows_per_scene}",
            *[x for s in args.set for x in ("--set", s)],
        ]  # fmt: skip
        t0 = time.perf_counter()
        with (work / "pretrain.log").open("w") as fh:
            subprocess.run(cmd, check=True, stdout=fh, stderr=subprocess.STDOUT)
        seconds = time.perf_counter() - t0
        subprocess.run(["deo", "pretrain", "export", str(run_dir), "-o", str(enc), "--overwrite"], check=True)
        (work / "pretrain_seconds.txt").write_text(f"{seconds:.1f}\n")
    seconds = float((work / "pretrain_seconds.txt").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    steps = [r for r in rows if "loss" in r]
    losses = np.array([float(r["loss"]) for r in steps])
    k = max(1, len(losses) // 10)
    from deo_cli.models import file_sha256

    return {
        "held_out_city": test,
        "pretrain_cities": [c.name for c in train_cities],
        "recipe": args.recipe,
        "epochs": args.epochs,
        "windows_per_scene": args.windows_per_scene,
        "seed": args.pretrain_seed,
        "extra": list(args.set),
        "steps": int(steps[-1]["step"]) if steps else 0,
        "loss_first": float(losses[0]),
        "loss_last": float(losses[-1]),
        "loss_first_10pct_mean": float(losses[:k].mean()),
        "loss_last_10pct_mean": float(losses[-k:].mean()),
        "seconds": round(seconds, 1),
        "encoder_sha256": file_sha256(enc),
    }


def main(argv=None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    from deo_cli.data.oscd import list_cities

    cities = [c for c in list_cities(args.data) if c.label is not None]
    names = [c.name for c in cities] if args.test_city == "all" else args.test_city.split(",")
    runs, curves, done = [], [], set()
    for name in names:
        (test,) = [c for c in cities if c.name == name]
        work = Path(args.work) / f"heldout_{name}"
        if args.pretrain_without:  # one encoder for all: the test city may be in its pretraining data
            out_city = args.pretrain_without
            work = Path(args.work) / f"without_{out_city}" / f"test_{name}"
            enc_dir = Path(args.work) / f"without_{out_city}"
        else:
            out_city, enc_dir = name, work
        cached = work / "result.json"
        if args.reuse and cached.is_file():
            runs.append(json.loads(cached.read_text()))
            continue
        train = [c for c in cities if c.name != out_city]
        info = pretrain(args, out_city, train, enc_dir, args.reuse or args.reuse_encoders or enc_dir in done)
        done.add(enc_dir)
        info["test_city_in_pretraining_data"] = out_city != name
        log.info(
            "%s: pretrained %d steps in %.0f s, loss %.4f -> %.4f",
            name,
            info["steps"],
            info["seconds"],
            info["loss_first_10pct_mean"],
            info["loss_last_10pct_mean"],
        )
        enc = enc_dir / "encoder.pt"
        bench = oscd_change.parse_args(
            [
                *BENCH_ARGS,
                "--data",
                args.data,
                "--test-city",
                name,
                "--weights",
                str(enc),
                "--zero-shot",
                args.zero_shot,
                "--work",
                str(work / "bench"),
            ]  # fmt: skip
        )
        result, curve = oscd_change.run(bench)
        curves.append(curve)
        result["pretraining"] = info
        cached.write_text(json.dumps(result, indent=1))
        runs.append(result)
    first = [r["rows"][0] for r in runs]
    p = sum(x["tp"] + x["fn"] for x in first) / sum(x["valid_pixels"] for x in first)
    out = {
        "benchmark": "oscd_change",
        "protocol": "leave-one-city-out; encoder pretrained by deo pretrain "
        + (
            f"once, on every city but {args.pretrain_without}"
            if args.pretrain_without
            else "on the training cities only"
        ),
        "trivial_f1_pooled": 2 * p / (1 + p),
        "runs": runs,
        # threshold-free columns only when every city was scored in this call (curves are not cached)
        "pooled": oscd_change.pool(runs, curves if len(curves) == len(runs) else None),
        "trivial_f1_mean": float(np.mean([r["trivial_f1"] for r in runs])),
        "seconds": round(sum(r["seconds"] for r in runs), 1),
        "pretrain_seconds": round(sum(r["pretraining"]["seconds"] for r in runs), 1),
    }
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(out, indent=1))
    os.replace(tmp, path)
    for r in runs:
        for row in r["rows"]:
            what = f"{r['test_city']} {row['mode']}"
            what += f" ({row['layer']}, {row['output_grid']})" if row["mode"] == "zero-shot" else ""
            print(f"{what:>44}: F1 {row['f1']:.4f} IoU {row['iou']:.4f} (trivial {r['trivial_f1']:.4f})")
    for k, v in out["pooled"].items():
        print(
            f"{'pooled ' + k:>44}: F1 {v['f1']:.4f} IoU {v['iou']:.4f} every city > trivial: {v['beats_trivial_in_every_city']}"
        )
    print(f"pooled trivial F1 {out['trivial_f1_pooled']:.4f}; written to {path}")
    return out


if __name__ == "__main__":
    main()
