"""GPU readiness check: one command, under 8 minutes on one GPU, one JSON of what held.

    bash benchmarks/gpu_check.sh                  # on a GPU machine: the whole check
    bash benchmarks/gpu_check.sh --tiny           # the same stages at the CPU sizes (a minute)
    bash benchmarks/gpu_check.sh --only embed     # one stage again (gpu_tests, embed, pretrain)

Stages, each a subprocess with a time limit out of ``--budget-s`` (default 470 s), in order:

1. ``gpu_tests``: ``python -m pytest -m gpu tests/gpu`` (embed, segment predict and
   detect-change on CUDA in fp32, bf16 and fp16 against the CPU in fp32; pretraining steps in
   bf16 and in fp16 with a gradient scaler; one rank on NCCL as torchrun and ``--gpus N``
   start it, the DDP wrapper included; ``deo embed --gpus N`` with every visible GPU).
2. ``embed``: ``benchmarks/embed.py`` on a synthetic full-size Sentinel-2 tile (10980 x 10980
   px, 10 uint16 bands named B04, B03, ..., a COG, made once in ``--workdir`` while the tests
   run) with ``deo_swin_b --weights random``, batch 64: chips/s end to end against the pure
   forward measured during the run, host peak memory and the GPU's peak allocation.
3. ``pretrain``: ``benchmarks/pretrain_step.py`` on ``deo_swin_b`` at the paper's per-GPU batch
   of 64 in bf16 with ``torch.compile``: 50 timed steps, images/s, model FLOPs per step (counted)
   and the model FLOP utilisation against the GPU's dense bf16 peak.

Without a CUDA GPU it says so in one line, runs the same stages at tiny sizes (the tests are
then skipped by their own marker; embed: ``deo_swin_test`` on a 256 px COG; pretrain: the
``tiny_cpu`` recipe) and exits 0 when they pass, so this script is tested on CPU-only CI
(``tests/test_gpu_check.py``). On a GPU it exits 1 unless every stage passed.

Results: ``--out`` (default ``benchmarks/results/gpu_check.json`` on a GPU,
``benchmarks/results/gpu_check_cpu.json`` without one); written after every stage, so a run
stopped half-way still leaves what it measured. The schema is in the README ("GPU check").
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
RESULTS = BENCH / "results"
SCHEMA = "deo-gpu-check/1"
STAGES = ("gpu_tests", "embed", "pretrain")
NO_GPU_LINE = (
    "gpu_check: no CUDA GPU visible; this check needs one, so it runs only its CPU-runnable parts,"
    " at tiny sizes"
)
#: What deo imports (a GPU machine's stock Python may lack the geospatial ones).
REQUIRED = ("torch", "torchvision", "timm", "numpy", "rasterio", "pyproj", "shapely", "geopandas", "pyarrow")
REQUIRED += ("yaml", "typer", "rich", "pytest")

#: Seconds each stage may take at most (less when the budget left is smaller).
STAGE_CAPS = {"gpu_tests": 150, "embed": 240, "pretrain": 240}
#: Full-size Sentinel-2 tile: 10980 x 10980 px at 10 m.
TILE = 10980
#: Synthetic pretraining scenes: enough 256 px windows for a batch of 64 (16 windows per scene).
PRETRAIN_SCENES, PRETRAIN_SCENE_SIZE = 6, 320

sys.path.insert(0, str(BENCH))


# ---------------------------------------------------------------------------------------------
# What each stage runs: the GPU sizes, and the tiny sizes of the same code path
# ---------------------------------------------------------------------------------------------


def plan(gpu: bool, tiny: bool) -> dict:
    """The arguments of every stage for this machine."""
    device = "cuda" if gpu else "cpu"
    if tiny:
        embed = {
            "model": "deo_swin_test",
            "size": 256,
            "args": ["--chip-size", "64", "--batch-size", "4", "--forward-chips", "8"],
            "args2": ["--forward-rounds", "2", "--probe-every", "1"],
        }
        pretrain = {"recipe": "tiny_cpu", "steps": 2, "sets": [], "data_samples": 2}
    else:
        embed = {
            "model": "deo_swin_b",
            "size": TILE,
            "args": ["--chip-size", "224", "--batch-size", "64", "--forward-chips", "256"],
            "args2": ["--forward-rounds", "3", "--probe-every", "10"],
        }
        # issue 17: the paper's per-GPU batch (the recipe's 64), bf16, compile on
        pretrain = {
            "recipe": "deo_swin_b",
            "steps": 50,
            "sets": ["precision=bf16", "compile=true", "batch_size=64"],
            "data_samples": 8,
        }
    return {"device": device, "embed": embed, "pretrain": pretrain}


# ---------------------------------------------------------------------------------------------
# Subprocesses with a time limit (the whole process group is stopped at the limit)
# ---------------------------------------------------------------------------------------------


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env["PYTHONUNBUFFERED"] = "1"
    return env


#: Subprocesses started and not yet waited for (stopped if this script is stopped).
RUNNING: list[subprocess.Popen] = []


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    """Run ``cmd`` from the checkout in a process group of its own, output into ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=_env(), stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )
    RUNNING.append(proc)
    return proc


def stop(proc: subprocess.Popen) -> None:
    """Stop ``proc`` and everything it started (its own process group)."""
    for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        if proc.poll() is not None:
            break
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            continue
    if proc in RUNNING:
        RUNNING.remove(proc)


def wait(proc: subprocess.Popen, timeout: float) -> int | None:
    """The exit code, or None when ``timeout`` passed (``proc`` is then stopped)."""
    try:
        rc = proc.wait(max(1.0, timeout))
    except subprocess.TimeoutExpired:
        stop(proc)
        return None
    if proc in RUNNING:
        RUNNING.remove(proc)
    return rc


def tail(log: Path, lines: int = 25) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# ---------------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------------


def junit_counts(path: Path) -> dict:
    """Test counts and failures from pytest's JUnit XML."""
    counts = {"tests": 0, "passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failures": []}
    root = ET.parse(path).getroot()
    for case in root.iter("testcase"):
        counts["tests"] += 1
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        if case.find("skipped") is not None:
            counts["skipped"] += 1
        elif bad is not None:
            counts["failed" if bad.tag == "failure" else "errors"] += 1
            counts["failures"].append({"test": name, "message": (bad.get("message") or "")[:300]})
        else:
            counts["passed"] += 1
    return counts


def stage_gpu_tests(ctx: dict, timeout: float) -> dict:
    xml = ctx["workdir"] / "gpu_tests.xml"
    xml.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/gpu", "-p", "no:cacheprovider"]
    cmd += [f"--junitxml={xml}"]
    log = ctx["workdir"] / "gpu_tests.log"
    rc = wait(start(cmd, log), timeout)
    if rc is None:
        return {"status": "timeout", "log": str(log), "error": f"over {timeout:.0f} s"}
    if not xml.exists():
        return {"status": "failed", "log": str(log), "error": f"pytest exited {rc} without results"}
    n = junit_counts(xml)
    if rc == 0 and n["tests"] and n["skipped"] == n["tests"] and not ctx["gpu"]:
        status = "skipped"  # the expected outcome without a GPU: every test skipped by its marker
    elif rc == 0 and n["tests"] and n["passed"] == n["tests"]:
        status = "passed"
    else:
        status = "failed"
    out = {"status": status, "numbers": n, "log": str(log)}
    if status == "failed":
        out["error"] = (
            f"pytest exited {rc}: {n['failed']} failed, {n['errors']} errors, {n['skipped']} skipped"
        )
    return out


def start_tile(ctx: dict) -> None:
    """Start making the embed stage's scene in the background (it takes a minute at full size)."""
    import embed

    cfg = ctx["plan"]["embed"]
    path = embed.scene_path(ctx["workdir"] / "embed", cfg["size"], "deflate", cog=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    ctx["tile"] = {"path": path, "started": time.time(), "made": not path.exists()}
    if path.exists():
        ctx["tile"]["proc"] = None
        return
    cmd = [sys.executable, __file__, "--make-scene", str(path), str(cfg["size"])]
    ctx["tile"]["proc"] = start(cmd, ctx["workdir"] / "tile.log")


def stage_embed(ctx: dict, timeout: float) -> dict:
    cfg = ctx["plan"]["embed"]
    t0 = time.perf_counter()
    tile = ctx["tile"]
    if tile["proc"] is not None:
        rc = wait(tile["proc"], timeout)
        if rc != 0:
            log = ctx["workdir"] / "tile.log"
            what = "timed out" if rc is None else f"exited {rc}"
            return {
                "status": "timeout" if rc is None else "failed",
                "log": str(log),
                "error": f"making the tile {what}",
            }
    out_json = ctx["workdir"] / "embed.json"
    out_json.unlink(missing_ok=True)
    cmd = [sys.executable, str(BENCH / "embed.py"), "--models", cfg["model"], "--sizes", str(cfg["size"])]
    cmd += ["--cog", "--no-memory-run", "--device", ctx["plan"]["device"], "--precision", "auto"]
    cmd += [*cfg["args"], *cfg["args2"], "--workdir", str(ctx["workdir"] / "embed"), "--out", str(out_json)]
    log = ctx["workdir"] / "embed.log"
    rc = wait(start(cmd, log), timeout - (time.perf_counter() - t0))
    if rc is None:
        return {"status": "timeout", "log": str(log), "error": f"over {timeout:.0f} s"}
    if rc != 0 or not out_json.exists():
        return {"status": "failed", "log": str(log), "error": f"benchmarks/embed.py exited {rc}"}
    row = json.loads(out_json.read_text())["runs"][0]
    path = tile["path"]
    numbers = {
        "model": row["model"],
        "weights": "random",
        "scene": {
            "width": row["size"],
            "height": row["size"],
            "bands": 10,
            "dtype": "uint16",
            "format": "COG",
            "compression": row.get("scene_compression"),
            "bytes": path.stat().st_size if path.exists() else None,
            # seconds to make it (in the background, during the tests); None: made by an earlier run
            "made_s": round(path.stat().st_mtime - tile["started"], 1) if tile["made"] else None,
        },
        "device": row.get("device"),
        "precision": row.get("precision"),
        "batch_size": row["batch_size"],
        "chip_size": row["chip_size"],
        "num_workers": row["num_workers_resolved"],
        "chips": row["chips"],
        "end_to_end_s": row["end_to_end_s"],
        "end_to_end_chips_per_s": row["end_to_end_chips_per_s"],
        "forward_chips_per_s": row["forward_chips_per_s"],
        "end_to_end_over_forward": row["ratio"],
        "model_share": row["model_share"],
        "host_peak_rss_mb": row["peak_mb"],
        "gpu_peak_allocated_mb": row.get("peak_cuda_mb"),
        "gpu_peak_reserved_mb": row.get("peak_cuda_reserved_mb"),
    }
    return {"status": "passed", "numbers": numbers, "row": row, "log": str(log)}


def make_pretrain_data(folder: Path) -> Path:
    """Synthetic 10-band DN scenes for the pretraining benchmark's data checks (no shared data)."""
    import embed

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(PRETRAIN_SCENES):
        embed.make_scene(folder / f"scene_{i}.tif", PRETRAIN_SCENE_SIZE, seed=100 + i)
    return folder


def stage_pretrain(ctx: dict, timeout: float) -> dict:
    cfg = ctx["plan"]["pretrain"]
    data = make_pretrain_data(ctx["workdir"] / "pretrain_data")
    out_json = ctx["workdir"] / "pretrain.json"
    out_json.unlink(missing_ok=True)
    cmd = [sys.executable, str(BENCH / "pretrain_step.py"), "--recipes", cfg["recipe"]]
    cmd += ["--device", ctx["plan"]["device"], "--steps", str(cfg["steps"]), "--flops"]
    cmd += ["--data", str(data), "--data-samples", str(cfg["data_samples"]), "--out", str(out_json)]
    for kv in cfg["sets"]:
        cmd += ["--set", kv]
    log = ctx["workdir"] / "pretrain.log"
    rc = wait(start(cmd, log), timeout)
    if rc is None:
        return {"status": "timeout", "log": str(log), "error": f"over {timeout:.0f} s"}
    if rc != 0 or not out_json.exists():
        return {"status": "failed", "log": str(log), "error": f"benchmarks/pretrain_step.py exited {rc}"}
    r = json.loads(out_json.read_text())["results"][0]
    numbers = {
        "recipe": r["recipe"],
        "model": r["model"],
        "teacher": r["teacher"],
        "device": r["device"],
        "precision": r["precision"],
        "compile": r["compile"],
        "batch_size": r["batch_size"],
        "crops": r["crops"],
        "steps_timed": r["steps_timed"],
        "step_s": r["step_s"],
        "images_per_s": r["images_per_s"],
        "flops_per_image": r.get("flops_per_image"),
        "flops_per_step": r.get("flops_per_step"),
        "achieved_tflops": r.get("achieved_tflops"),
        "peak_tflops_16bit": r.get("peak_tflops_16bit"),
        "mfu": r.get("mfu"),
        "gpu_peak_allocated_gib": r.get("peak_cuda_gib"),
        "host_peak_rss_gib": r.get("peak_rss_gib"),
    }
    return {"status": "passed", "numbers": numbers, "row": r, "log": str(log)}


RUNNERS = {"gpu_tests": stage_gpu_tests, "embed": stage_embed, "pretrain": stage_pretrain}


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def _commit() -> str | None:
    try:
        sha = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--", "deo_cli", "benchmarks", "tests/gpu"],
            capture_output=True,
            text=True,
        ).stdout.strip()
        return sha + ("+changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def _driver() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def cpu_name() -> str:
    """The CPU's model name with its family/model numbers and widest vector unit
    (``/proc/cpuinfo``; else ``platform.processor()``): virtual machines often show only the vendor
    ("AMD EPYC"), and one 2-core VM of that name had AVX-512 (Zen 4) where another had AVX2."""
    try:
        info = {}
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if not key.strip() and info:
                break  # the first processor's block only
            info.setdefault(key.strip(), value.strip())
        if "model name" in info:
            flags = set(info.get("flags", "").split())
            isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else None
            extra = ", ".join(
                x
                for x in (
                    f"family {info['cpu family']} model {info['model']}" if "cpu family" in info else None,
                    isa,
                )
                if x
            )
            return f"{info['model name']} ({extra})" if extra else info["model name"]
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _host_memory_gib() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return None


def describe_machine(gpu: bool) -> tuple[dict, dict]:
    """``(versions, device)`` of this machine."""
    import numpy
    import rasterio
    import torch
    from flops import peak_flops

    import deo_cli

    versions = {
        "deo": deo_cli.__version__,
        "commit": _commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "nccl": None,
        "driver": None,
        "numpy": numpy.__version__,
        "rasterio": rasterio.__version__,
        "gdal": rasterio.__gdal_version__,
    }
    device = {
        "type": "cuda" if gpu else "cpu",
        "name": cpu_name(),
        "count": 0,
        "memory_gib": None,
        "capability": None,
        "bf16_supported": None,
        "peak_bf16_tflops": None,
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "platform": platform.platform(),
        "host_memory_gib": _host_memory_gib(),
    }
    if gpu:
        props = torch.cuda.get_device_properties(0)
        peak, _ = peak_flops(props.name)
        try:
            nccl = torch.cuda.nccl.version()
            versions["nccl"] = ".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl)
        except (AttributeError, RuntimeError):
            pass
        versions["driver"] = _driver()
        device.update(
            name=props.name,
            count=torch.cuda.device_count(),
            memory_gib=round(props.total_memory / 2**30, 1),
            capability=f"{props.major}.{props.minor}",
            bf16_supported=bool(torch.cuda.is_bf16_supported()),
            peak_bf16_tflops=round(peak / 1e12, 2) if peak else None,
        )
    return versions, device


def write_json(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    os.replace(tmp, path)


def _fmt(v, spec: str = ".1f", none: str = "n/a") -> str:
    return none if v is None else format(v, spec)


def summary(name: str, st: dict) -> str:
    """One line per stage."""
    head = f"{name}: {st['status']} in {st.get('seconds', 0):.0f} s"
    n = st.get("numbers") or {}
    if name == "gpu_tests" and n:
        return f"{head}: {n['passed']} passed, {n['failed']} failed, {n['errors']} errors, {n['skipped']} skipped"
    if name == "embed" and st["status"] == "passed":
        sc = n["scene"]
        return (
            f"{head}: {n['model']} on a {sc['width']} x {sc['height']} px 10-band COG, {n['chips']} chips "
            f"({n['device']}, {n['precision']}, batch {n['batch_size']}): {n['end_to_end_chips_per_s']:.2f} chips/s "
            f"end to end, {n['forward_chips_per_s']:.2f} pure forward (ratio {n['end_to_end_over_forward']:.3f}); "
            f"host peak {n['host_peak_rss_mb']:.0f} MB, GPU peak "
            + (f"{n['gpu_peak_allocated_mb']:.0f} MB" if n["gpu_peak_allocated_mb"] is not None else "n/a")
        )
    if name == "pretrain" and st["status"] == "passed":
        return (
            f"{head}: {n['recipe']} ({n['model']}, {n['device']}, {n['precision']}, compile "
            f"{'on' if n['compile'] else 'off'}, batch {n['batch_size']}, {n['steps_timed']} steps): "
            f"{n['images_per_s']:.2f} images/s, {_fmt(n['flops_per_image'] and n['flops_per_image'] / 1e9)} "
            f"GFLOP/image, {_fmt(n['achieved_tflops'], '.2f')} TFLOP/s, MFU {_fmt(n['mfu'], '.3f')}"
        )
    return head + (f": {st['error']}" if st.get("error") else "")


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None, help="the JSON report (default: see above)")
    ap.add_argument(
        "--workdir",
        type=Path,
        default=Path(os.environ.get("TMPDIR", "/tmp")) / "deo-gpu-check",
        help="scenes, logs and intermediate results (the full-size tile is kept for the next run)",
    )
    ap.add_argument("--budget-s", type=float, default=470.0, help="seconds for all stages together")
    ap.add_argument("--tiny", action="store_true", help="tiny sizes on a GPU too (a quick try)")
    ap.add_argument("--only", nargs="+", choices=STAGES, help="run only these stages")
    ap.add_argument("--make-scene", nargs=2, metavar=("PATH", "SIZE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the cleanup below when stopped
    if args.make_scene:  # the background tile (see start_tile)
        import embed

        embed.make_scene(Path(args.make_scene[0]), int(args.make_scene[1]), cog=True)
        return 0

    missing = [m for m in REQUIRED if importlib.util.find_spec(m) is None]
    if missing:
        print(
            f"gpu_check: error: this Python ({sys.executable}) lacks {', '.join(missing)}. "
            "Install deo's dependencies (pip install -e '.[dev]') or set PYTHON to a Python that has them",
            file=sys.stderr,
        )
        return 2
    import torch

    gpu = torch.cuda.is_available()
    tiny = args.tiny or not gpu
    mode = ("gpu-tiny" if tiny else "gpu") if gpu else "cpu-tiny"
    out = args.out or RESULTS / ("gpu_check.json" if gpu else "gpu_check_cpu.json")
    if not gpu:
        print(NO_GPU_LINE, flush=True)
    workdir = args.workdir / mode
    workdir.mkdir(parents=True, exist_ok=True)
    ctx = {"gpu": gpu, "workdir": workdir, "plan": plan(gpu, tiny)}
    versions, device = describe_machine(gpu)
    t_start = time.perf_counter()
    deadline = t_start + args.budget_s
    chosen = args.only or list(STAGES)
    report = {
        "schema": SCHEMA,
        "mode": mode,
        "ok": False,
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "seconds": 0.0,
        "budget_s": args.budget_s,
        "command": [Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])],
        "workdir": str(workdir),
        "versions": versions,
        "device": device,
        "stages": {s: {"status": "not_run"} for s in STAGES},
    }
    write_json(out, report)
    if "embed" in chosen:
        start_tile(ctx)
    try:
        for name in chosen:
            left = deadline - time.perf_counter()
            t0 = time.perf_counter()
            if gpu:  # minutes per stage: say what runs
                print(f"gpu_check: {name} (up to {min(STAGE_CAPS[name], left):.0f} s) ...", flush=True)
            if left < 5:
                st = {"status": "timeout", "error": "no time left in --budget-s"}
            else:
                try:
                    st = RUNNERS[name](ctx, min(STAGE_CAPS[name], left))
                except Exception as e:  # noqa: BLE001 - recorded, and the next stage still runs
                    st = {"status": "failed", "error": f"{type(e).__name__}: {e}"}
            st["seconds"] = round(time.perf_counter() - t0, 1)
            report["stages"][name] = st
            report["seconds"] = round(time.perf_counter() - t_start, 1)
            write_json(out, report)
            print(summary(name, st), flush=True)
            if st["status"] in ("failed", "timeout") and st.get("log"):
                print(f"--- {name}: last lines of {st['log']}\n{tail(Path(st['log']))}", file=sys.stderr)
    finally:  # the background tile, or a stage when this script was stopped
        for proc in list(RUNNING):
            stop(proc)
    statuses = [report["stages"][s]["status"] for s in chosen]
    if gpu:
        ok = all(s == "passed" for s in statuses)
    else:
        ok = not any(s in ("failed", "timeout") for s in statuses)
    report["ok"] = ok
    report["seconds"] = round(time.perf_counter() - t_start, 1)
    write_json(out, report)
    print(f"gpu_check: {'ok' if ok else 'FAILED'} in {report['seconds']:.0f} s; wrote {out}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
