"""Benchmark ``deo pretrain``: step time, images/s and peak memory per recipe, and data throughput.

For each recipe a fresh subprocess (so peak memory is its own):

1. resolves the recipe on the OSCD subset (``../shared/data/oscd_subset``) with a random optical
   teacher (the architecture is the recipe's, so the cost is real; no download), builds the student,
   EMA teacher, optical teacher, loss and AdamW exactly as ``deo pretrain`` does;
2. times :func:`deo_cli.train.loop.train_step` (forward of all crops, backward, per-parameter
   clipping, AdamW, EMA update) on in-memory batches of the recipe's crop shapes: 1 warm-up step
   (2 with ``compile``), then ``--steps`` timed steps; reports seconds per step and images/s (one
   image = one sample with all its crops);
3. times the data pipeline alone (read + multi-crop + augmentations, one thread, as one DataLoader
   worker) on the same data: samples/s per worker, i.e. how many workers one process needs;
4. reports peak memory: resident set size of the process (CPU) or ``max_memory_allocated`` (CUDA);
5. with ``--flops``: counts the model FLOPs of one step (forward of the student, the EMA teacher
   and the optical teacher, backward of the student; :mod:`flops`) on a slice of the batch in
   eager mode, scaled to the whole batch (every counted operation is per sample), and reports
   achieved TFLOP/s and the model FLOP utilisation against the GPU's dense 16-bit peak.

Results are printed and written to ``benchmarks/results/pretrain_step.json`` (other entries kept).

    python benchmarks/pretrain_step.py                                   # tiny_cpu and deo_swin_t_ablation
    python benchmarks/pretrain_step.py --recipes deo_swin_b --device cuda  # on a GPU node
    python benchmarks/pretrain_step.py --recipes deo_swin_b --device cuda --steps 50 --flops \
        --set precision=bf16 --set compile=true          # issue 17: bf16, batch 64, compile, MFU
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "pretrain_step.json"
DATA = ROOT.parent / "shared" / "data" / "oscd_subset"
#: Per-process batch on the CPU (a full-size batch of 64 would take minutes per step there).
CPU_BATCH = {"tiny_cpu": None, "deo_swin_t_ablation": 4, "deo_swin_b": 2}


def child(args) -> dict:
    import torch

    from deo_cli.recipes import PretrainRecipe, build_recipe
    from deo_cli.runtime import precision_name
    from deo_cli.train import distributed as ddp
    from deo_cli.train.loop import build_data, build_models, plan_pretrain, train_step
    from deo_cli.train.meta_arch import DeoMetaArch
    from deo_cli.train.optim import build_optimizer

    sets = [f"data.path={args.data}", "teacher.weights=random", f"device={args.device}", "gpus=1"]
    batch = args.batch_size
    if batch is None and args.device in ("cpu", "auto") and not torch.cuda.is_available():
        batch = CPU_BATCH.get(args.child)
    if batch is not None:
        sets.append(f"batch_size={batch}")
    sets += ["data.windows_per_scene=16", "data.window_size=256"]  # enough OSCD samples for any batch
    sets += args.sets or []
    recipe = build_recipe(PretrainRecipe, args.child, sets=sets, command="pretrain")
    with tempfile.TemporaryDirectory() as tmp:
        plan = plan_pretrain(recipe, Path(tmp) / "run")
    device = plan.device
    if device.type == "cpu":  # as deo pretrain: the cores its DataLoader workers leave
        threads = args.threads or ddp.cpu_threads(1, recipe.data.num_workers)
        if threads:
            torch.set_num_threads(threads)
    torch.manual_seed(0)
    student, ema, optical, loss = build_models(plan, 1)
    student.to(device), ema.to(device)
    if optical is not None:
        optical.to(device)
    model = torch.compile(student, dynamic=False) if recipe.compile and device.type == "cuda" else student
    meta = DeoMetaArch(model, student, ema, optical, loss, ema_drop_path=recipe.model.ema_drop_path).train()
    optimizer = build_optimizer(student, betas=recipe.optim.betas, fused=recipe.optim.fused, device=device)
    for group in optimizer.param_groups:
        group["lr"] = 1e-5
    scaler = torch.amp.GradScaler(device.type) if plan.precision is torch.float16 else None

    c, b = recipe.crops, recipe.batch_size
    g = torch.Generator().manual_seed(0)
    crops = {
        "global": torch.randn(c.global_number, b, 10, c.global_size, c.global_size, generator=g).to(device),
        "local": torch.randn(c.local_number, b, 10, c.local_size, c.local_size, generator=g).to(device)
        if c.local_number
        else None,
    }

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def step():
        train_step(
            meta,
            optimizer,
            scaler,
            crops,
            clip_grad=recipe.optim.clip_grad,
            momentum=0.996,
            precision=plan.precision,
        )

    for _ in range(2 if model is not student else 1):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, cpu_times = [], []
    for _ in range(args.steps):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        sync()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    step_s = sorted(times)[len(times) // 2]
    step_threads = torch.get_num_threads()
    peak_cuda = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    flops = count_step_flops(args, student, ema, optical, loss, recipe, plan, crops) if args.flops else None

    # The data pipeline alone, one thread (what one DataLoader worker does).
    torch.set_num_threads(1)
    dataset, _, _ = build_data(plan, ddp.DistEnv(device=torch.device("cpu")))
    dataset[(0, 0)]
    n = args.data_samples
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(1, n + 1):
        dataset[(0, i % len(dataset))]
    data_s = (time.perf_counter() - t0) / n
    data_cpu_s = (time.process_time() - c0) / n

    return {
        "recipe": args.child,
        "model": recipe.model.name,
        "teacher": plan.teacher_name,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "threads": step_threads if device.type != "cuda" else None,
        "data_workers": recipe.data.num_workers,
        "precision": precision_name(plan.precision),
        "compile": model is not student,
        "batch_size": b,
        "crops": f"{c.global_number}x{c.global_size} + {c.local_number}x{c.local_size}",
        "student_params_m": round(sum(p.numel() for p in student.parameters()) / 1e6, 2),
        "steps_timed": args.steps,
        "step_s": round(step_s, 4),
        "step_s_all": [round(t, 4) for t in times],
        "step_cpu_s": round(sorted(cpu_times)[len(cpu_times) // 2], 4),  # CPU time of this process
        "images_per_s": round(b / step_s, 3),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
        "peak_cuda_gib": round(peak_cuda / 2**30, 3) if peak_cuda is not None else None,
        "data_samples_per_s_per_worker": round(1.0 / data_s, 2),
        "data_cpu_s_per_sample": round(data_cpu_s, 4),
        "torch": torch.__version__,
        **(flops_fields(flops, step_s, b, device, plan.precision) if flops is not None else {}),
    }


def count_step_flops(args, student, ema, optical, loss, recipe, plan, crops) -> tuple[int, int]:
    """``(FLOPs of one step at the full batch, samples counted)``: forward and backward in eager
    mode (DeoMetaArch on the unwrapped student) on the first ``--flops-batch`` samples, scaled."""
    from flops import count_flops

    from deo_cli.runtime import autocast
    from deo_cli.train.meta_arch import DeoMetaArch

    b = recipe.batch_size
    n = min(b, args.flops_batch) if args.flops_batch > 0 else b
    part = {k: (v[:, :n] if v is not None else None) for k, v in crops.items()}
    eager = DeoMetaArch(
        student, student, ema, optical, loss, ema_drop_path=recipe.model.ema_drop_path
    ).train()

    def step():
        with autocast(plan.device, plan.precision):
            terms = eager(part)
        terms["total"].backward()

    counted = count_flops(step)
    student.zero_grad(set_to_none=True)
    return counted * b // n, n


def flops_fields(flops: tuple[int, int], step_s: float, batch: int, device, precision) -> dict:
    """The FLOP and MFU fields of a result (MFU only for a 16-bit run on a GPU in the table)."""
    import torch
    from flops import mfu, peak_flops

    per_step, counted = flops
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    peak, matched = peak_flops(name) if precision is not None else (None, None)
    util = mfu(per_step, step_s, peak)
    return {
        "flops_per_step": per_step,
        "flops_per_image": per_step // batch,
        "flops_counted_on": counted,
        "achieved_tflops": round(per_step / step_s / 1e12, 3),
        "peak_tflops_16bit": round(peak / 1e12, 2) if peak else None,
        "peak_table_entry": matched,
        "mfu": round(util, 4) if util is not None else None,
    }


def cpu_pressure() -> float | None:
    """Linux PSI: % of the last 60 s some task waited for a CPU (other jobs on a shared machine)."""
    try:
        line = Path("/proc/pressure/cpu").read_text().splitlines()[0]
    except (OSError, IndexError):
        return None
    fields = dict(f.split("=") for f in line.split()[1:])
    return float(fields["avg60"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipes", nargs="+", default=["tiny_cpu", "deo_swin_t_ablation"])
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--batch-size", type=int, default=None, help="per process (default: the recipe's; small on CPU)"
    )
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: as deo pretrain)")
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--data-samples", type=int, default=8)
    parser.add_argument(
        "--set", dest="sets", action="append", default=[], help="recipe override KEY=VALUE (repeatable)"
    )
    parser.add_argument(
        "--flops", action="store_true", help="count the model FLOPs of a step and report MFU (GPU)"
    )
    parser.add_argument(
        "--flops-batch", type=int, default=8, help="samples the FLOPs are counted on (0: the whole batch)"
    )
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args)))
        return

    results = []
    for name in args.recipes:
        cmd = [sys.executable, __file__, "--child", name, "--device", args.device, "--steps", str(args.steps)]
        cmd += ["--data", args.data, "--data-samples", str(args.data_samples)]
        if args.batch_size:
            cmd += ["--batch-size", str(args.batch_size)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        for kv in args.sets:
            cmd += ["--set", kv]
        if args.flops:
            cmd += ["--flops", "--flops-batch", str(args.flops_batch)]
        t0, pressure = time.time(), cpu_pressure()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode or line is None:
            print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
            raise SystemExit(f"benchmark of {name} failed")
        r = json.loads(line[len("RESULT ") :])
        r["wall_s"] = round(time.time() - t0, 1)
        r["cpu_pressure_avg60"] = [pressure, cpu_pressure()]  # before, after (0 = machine to itself)
        results.append(r)
        print(
            f"{r['recipe']:<22} {r['model']:<14} {r['device']:<6} {r['precision']:<5} batch {r['batch_size']:>3}  "
            f"{r['crops']:<16} step {r['step_s']:.3f} s ({r['step_cpu_s']:.2f} CPU s)  {r['images_per_s']:.2f} img/s  "
            f"peak {r['peak_cuda_gib'] or r['peak_rss_gib']:.2f} GiB ({'CUDA' if r['peak_cuda_gib'] else 'RSS'})  "
            f"data {r['data_samples_per_s_per_worker']:.1f} samples/s/worker  "
            f"(CPU pressure {r['cpu_pressure_avg60']})"
            + (
                f"  {r['flops_per_image'] / 1e9:.1f} GFLOP/image, {r['achieved_tflops']:.1f} TFLOP/s, MFU {r['mfu']}"
                if "flops_per_step" in r
                else ""
            )
        )

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(out.read_text()).get("results", []) if out.exists() else []
    keys = {(r["recipe"], r["device"]) for r in results}
    merged = [r for r in previous if (r.get("recipe"), r.get("device")) not in keys] + results
    body = {
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": _cpus()},
        "note": "synthetic in-memory crops for the step; data throughput on the OSCD subset; random optical teacher",
        "results": merged,
    }
    out.write_text(json.dumps(body, indent=2) + "\n")
    print(f"wrote {out}")


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


if __name__ == "__main__":
    main()
