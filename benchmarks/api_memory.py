"""Benchmark the Python API's memory: a lazy (dask) 8k x 8k array against ``deo embed`` on its file.

One synthetic 10-band uint16 scene (``benchmarks/embed.py``'s :func:`make_scene`: tiled 256,
DEFLATE) is embedded twice, each in a fresh process with the same model (random weights), the
same tiling and no reading workers:

- ``cli``: ``deo embed SCENE -o emb.tif`` (the command line, in-process: reads, model, stitching,
  the COG with overviews);
- ``api``: ``model.embed(rioxarray.open_rasterio(SCENE, chunks=...))``: the scene as a lazy
  dask array, read window by window through :mod:`deo_cli.io.arrays`, the embedding returned as
  an ``xr.DataArray`` held in memory.

Each process reports its RSS high-water mark (``VmHWM``) over the whole run, model included, and
the API's must stay within 10 % of the CLI's; also the part above each side's imports (the API
side imports xarray, pandas, rioxarray and dask: about 100 MB the command does not load), which
is what the model and the streaming hold. Both embeddings are compared too (same values). Each
side runs torch on ``--threads`` threads (1: the 2 shared cores of CI give steadier numbers).

    python benchmarks/api_memory.py                         # print the numbers
    python benchmarks/api_memory.py --out                   # also write results/api_memory.json
    python benchmarks/api_memory.py --size 4096 --model deo_swin_t
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "api_memory.json"
TARGET = 0.10  # the API's peak may exceed the CLI's by at most this share


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(mode: str, scene: Path, out: Path, model: str, chunk: int) -> dict:
    """Run one side in this (fresh) process; its numbers as a dict. ``imports_mb``: the RSS
    after the side's imports (torch, rasterio; typer and rich for the command; xarray, pandas,
    rioxarray and dask for the API), before anything is built or read."""
    t0 = time.perf_counter()
    if mode == "cli":
        import rasterio  # noqa: F401
        import rich  # noqa: F401
        import torch  # noqa: F401
        import typer  # noqa: F401
    else:
        import dask.array  # noqa: F401
        import rasterio  # noqa: F401
        import rioxarray  # noqa: F401
        import torch  # noqa: F401
        import xarray  # noqa: F401
    imports_mb = _rss_mb()
    if mode == "cli":
        from deo_cli.cli.app import main

        argv = ["embed", str(scene), "-o", str(out), "--model", model, "--weights", "random"]
        argv += ["--num-workers", "0", "--overwrite"]
        sys.argv = ["deo", *argv]
        try:
            main()
        except SystemExit as e:
            if e.code not in (0, None):
                raise
    else:
        import rioxarray

        import deo_cli as deo

        m = deo.load_model(model, weights="random", num_workers=0)
        lazy = rioxarray.open_rasterio(scene, chunks={"band": -1, "y": chunk, "x": chunk})
        emb = m.embed(lazy)
        import numpy as np

        np.save(out, emb.values)
    peak = _peak_rss_mb()
    return {
        "mode": mode,
        "peak_rss_mb": round(peak, 1),
        "imports_mb": round(imports_mb, 1),
        "run_mb": round(peak - imports_mb, 1),
        "seconds": round(time.perf_counter() - t0, 1),
    }


def _run_child(mode: str, scene: Path, out: Path, args) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--scene", str(scene), "--child-out", str(out)]
    cmd += ["--model", args.model, "--chunk", str(args.chunk)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}  # the same torch threads on both sides
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{mode} run failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=8192, help="scene side in pixels")
    p.add_argument("--model", default="deo_swin_test")
    p.add_argument("--chunk", type=int, default=512, help="dask chunk side of the lazy array")
    p.add_argument("--threads", type=int, default=1, help="torch threads of each side (OMP_NUM_THREADS)")
    p.add_argument("--workdir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "deo-bench")
    p.add_argument("--out", action="store_true", help=f"write {RESULTS.relative_to(ROOT)}")
    p.add_argument("--child", choices=("cli", "api"), help=argparse.SUPPRESS)
    p.add_argument("--scene", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.scene, args.child_out, args.model, args.chunk)))
        return

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from embed import make_scene, scene_path

    args.workdir.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    scene = make_scene(scene_path(args.workdir, args.size), args.size)
    print(f"scene {scene} ({args.size} x {args.size}, 10 bands) ready in {time.perf_counter() - t:.0f} s")
    cog, npy = args.workdir / "api_memory_cli.tif", args.workdir / "api_memory_api.npy"
    cli = _run_child("cli", scene, cog, args)
    print(
        f"deo embed:       peak RSS {cli['peak_rss_mb']:8.1f} MB = imports {cli['imports_mb']:.1f} "
        f"+ run {cli['run_mb']:.1f} MB  ({cli['seconds']} s)"
    )
    api = _run_child("api", scene, npy, args)
    print(
        f"API (dask lazy): peak RSS {api['peak_rss_mb']:8.1f} MB = imports {api['imports_mb']:.1f} "
        f"+ run {api['run_mb']:.1f} MB  ({api['seconds']} s)"
    )

    import numpy as np
    import rasterio

    with rasterio.open(cog) as ds:
        same = bool(np.array_equal(ds.read(), np.load(npy), equal_nan=True))
    ratio = api["peak_rss_mb"] / cli["peak_rss_mb"]
    run_ratio = api["run_mb"] / cli["run_mb"]
    ok = ratio <= 1 + TARGET
    print(
        f"API / CLI peak: {ratio:.3f} (target <= {1 + TARGET:.2f}: {'met' if ok else 'NOT met'}); same values: {same}"
    )
    print(f"API / CLI above their imports (model + streaming): {run_ratio:.3f}")
    for f in (cog, npy):
        f.unlink(missing_ok=True)
    if args.out:
        result = {
            "what": "peak RSS (VmHWM, whole process incl. model) of deo embed on a file vs the Python API "
            "on the same file opened lazily with rioxarray (dask chunks); fresh process each",
            "scene": {"size": args.size, "bands": 10, "dtype": "uint16", "tiles": 256, "compress": "deflate"},
            "model": args.model,
            "weights": "random",
            "num_workers": 0,
            "dask_chunk": args.chunk,
            "cli": cli,
            "api": api,
            "api_over_cli": round(ratio, 4),
            "api_over_cli_above_imports": round(run_ratio, 4),
            "torch_threads": args.threads,
            "target": f"<= {1 + TARGET:.2f}",
            "met": ok,
            "same_values": same,
            "machine": {
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
                "python": platform.python_version(),
            },
        }
        RESULTS.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
