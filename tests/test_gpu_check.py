"""``benchmarks/gpu_check.sh`` on a machine without a GPU: one line saying a GPU is needed, its
CPU-runnable parts at tiny sizes, exit 0, and the JSON report's schema (README "GPU check").

Also the FLOP counting and the peak table the check's MFU rests on.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import rasterio
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
S2 = ["B04", "B03", "B02", "B05", "B06", "B07", "B08", "B8A", "B11", "B12"]


def _flops():
    spec = importlib.util.spec_from_file_location("deo_bench_flops", ROOT / "benchmarks" / "flops.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_cpu_mode_says_it_needs_a_gpu_runs_the_tiny_stages_and_writes_the_report(tmp_path):
    out, work = tmp_path / "report.json", tmp_path / "work"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # a CPU machine, even where a GPU is visible
    env.pop("PYTHON", None)
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--out", str(out), "--workdir", str(work)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("gpu_check: no CUDA GPU visible; this check needs one")
    assert sum("GPU" in ln and "needs" in ln for ln in lines) == 1
    assert [ln.split(":")[0] for ln in lines[1:4]] == ["gpu_tests", "embed", "pretrain"]
    assert lines[-1].startswith("gpu_check: ok") and str(out) in lines[-1]
    assert not (ROOT / "benchmarks" / "results" / "gpu_check.json.tmp").exists()

    r = json.loads(out.read_text())
    assert r["schema"] == "deo-gpu-check/1" and r["mode"] == "cpu-tiny" and r["ok"] is True
    assert 0 < r["seconds"] <= r["budget_s"] and r["command"][0] == "gpu_check.py"
    assert {"deo", "commit", "python", "torch", "cuda", "cudnn", "nccl", "driver", "gdal"} <= set(
        r["versions"]
    )
    assert r["versions"]["torch"] == torch.__version__
    dev = r["device"]
    assert dev["type"] == "cpu" and dev["count"] == 0 and dev["peak_bf16_tflops"] is None and dev["cpus"] >= 1
    assert list(r["stages"]) == ["gpu_tests", "embed", "pretrain"]
    for st in r["stages"].values():
        assert st["seconds"] > 0 and Path(st["log"]).is_file()

    tests = r["stages"]["gpu_tests"]
    assert tests["status"] == "skipped"  # every GPU test skipped by its marker, none failed
    n = tests["numbers"]
    assert n["tests"] >= 10 and n["skipped"] == n["tests"] and n["passed"] == n["failed"] == n["errors"] == 0

    emb = r["stages"]["embed"]
    assert emb["status"] == "passed"
    e = emb["numbers"]
    assert e["model"] == "deo_swin_test" and e["device"] == "cpu" and e["precision"] == "fp32"
    assert e["scene"] == {**e["scene"], "width": 256, "height": 256, "bands": 10, "format": "COG"}
    assert e["chips"] > 1 and e["end_to_end_chips_per_s"] > 0 and e["forward_chips_per_s"] > 0
    assert e["end_to_end_over_forward"] == pytest.approx(
        e["end_to_end_chips_per_s"] / e["forward_chips_per_s"], rel=0.01
    )
    assert e["host_peak_rss_mb"] > 100 and e["gpu_peak_allocated_mb"] is None
    assert emb["row"]["chips"] == e["chips"]  # the benchmark's whole row is kept
    tile = work / "cpu-tiny" / "embed" / "scene_256_deflate_cog.tif"
    with rasterio.open(tile) as ds:  # a Sentinel-2-like COG: bands by name, DN, nodata 0
        assert ds.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"  # (no overviews below one 512 px block)
        assert list(ds.descriptions) == S2 and ds.dtypes == ("uint16",) * 10 and ds.nodata == 0
        assert ds.crs.to_epsg() == 32631 and ds.res == (10.0, 10.0)
        values = ds.read(1)
        assert 100 < values.min() and values.max() < 10000

    pre = r["stages"]["pretrain"]
    assert pre["status"] == "passed"
    p = pre["numbers"]
    assert p["recipe"] == "tiny_cpu" and p["device"] == "cpu" and p["compile"] is False
    assert p["images_per_s"] == pytest.approx(p["batch_size"] / p["step_s"], rel=0.01)
    assert p["flops_per_step"] == p["flops_per_image"] * p["batch_size"] and p["flops_per_image"] > 1e8
    assert p["mfu"] is None and p["peak_tflops_16bit"] is None  # no GPU peak to divide by


def test_flops_are_counted_and_the_peak_table_matches_device_names():
    flops = _flops()
    lin = torch.nn.Linear(64, 32)
    x = torch.randn(8, 64)
    assert flops.count_flops(lambda: lin(x)) == 2 * 8 * 64 * 32
    assert flops.count_flops(lambda: lin(x).sum().backward()) == 2 * (2 * 8 * 64 * 32)  # no input grad
    assert flops.peak_flops("NVIDIA H100 80GB HBM3") == (989.4e12, "H100")
    assert flops.peak_flops("NVIDIA H100 PCIe") == (756.5e12, "H100 PCIe")
    assert flops.peak_flops("NVIDIA H200") == (989.4e12, "H200")
    assert flops.peak_flops("NVIDIA A100-SXM4-80GB") == (312e12, "A100")
    assert flops.peak_flops("NVIDIA A10") == (125e12, "A10")
    assert flops.peak_flops("NVIDIA L4") == (121e12, "L4") and flops.peak_flops("NVIDIA L40S")[1] == "L40S"
    assert flops.peak_flops("NVIDIA GeForce GTX 1080") == (None, None)
    assert flops.mfu(989.4e12, 2.0, 989.4e12) == 0.5 and flops.mfu(1.0, 1.0, None) is None


def test_the_check_runs_without_an_installed_deo():
    """Stages run with the checkout on PYTHONPATH (a lent GPU machine has no ``pip install -e``)."""
    spec = importlib.util.spec_from_file_location("deo_gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    env = mod._env()
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(ROOT) and env["PYTHONUNBUFFERED"] == "1"
    plan = mod.plan(gpu=True, tiny=False)
    assert plan["embed"]["model"] == "deo_swin_b" and plan["embed"]["size"] == 10980
    assert "--batch-size" in plan["embed"]["args"] and "64" in plan["embed"]["args"]
    assert plan["pretrain"]["recipe"] == "deo_swin_b" and plan["pretrain"]["steps"] == 50
    assert {"precision=bf16", "compile=true", "batch_size=64"} <= set(plan["pretrain"]["sets"])
    assert sys.executable  # the stages run with this interpreter
