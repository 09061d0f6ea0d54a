import pytest
import torch

from deo_cli.errors import UsageError
from deo_cli.runtime import (
    autocast,
    precision_name,
    resolve_compile,
    resolve_device,
    resolve_precision,
    seed_everything,
)


def test_auto_device_and_precision_on_this_machine():
    dev = resolve_device("auto")
    assert dev.type in ("cpu", "cuda", "mps")
    if dev.type == "cpu":
        assert resolve_precision("auto", dev) is None  # fp32 on the CPU
    assert resolve_precision("bf16", torch.device("cpu")) is torch.bfloat16
    assert precision_name(None) == "fp32"


def test_bad_device_and_precision():
    with pytest.raises(UsageError, match="unknown device"):
        resolve_device("tpu9")
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="no CUDA GPU"):
            resolve_device("cuda")
    with pytest.raises(UsageError, match="fp16 autocast is not supported on the CPU"):
        resolve_precision("fp16", torch.device("cpu"))
    with pytest.raises(UsageError, match="unknown precision"):
        resolve_precision("fp8", torch.device("cpu"))


def test_autocast_and_seed():
    seed_everything(3)
    a = torch.rand(3)
    seed_everything(3)
    assert torch.equal(a, torch.rand(3))
    with autocast(torch.device("cpu"), torch.bfloat16):
        y = torch.nn.functional.linear(torch.ones(2, 4), torch.ones(3, 4))
    assert y.dtype == torch.bfloat16
    with autocast(torch.device("cpu"), None):
        assert torch.nn.functional.linear(torch.ones(2, 4), torch.ones(3, 4)).dtype == torch.float32


def test_auto_workers_read_in_the_main_process_on_a_small_cpu(monkeypatch):
    import deo_cli.runtime as rt
    from deo_cli.recipes import EmbedRecipe, build_recipe

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert build_recipe(EmbedRecipe).runtime.num_workers == "auto"
    assert build_recipe(EmbedRecipe, sets=["runtime.num_workers=3"]).runtime.num_workers == 3
    monkeypatch.setattr(rt.os, "cpu_count", lambda: 2)
    assert rt.resolve_num_workers("auto", cpu) == 0
    assert rt.resolve_num_workers("auto", gpu) == 2
    assert rt.resolve_num_workers(3, cpu) == 3 and rt.resolve_num_workers(0, gpu) == 0
    monkeypatch.setattr(rt.os, "cpu_count", lambda: 32)
    assert rt.resolve_num_workers("auto", cpu) == 2


def test_every_commands_runtime_resolves_to_what_torch_takes(monkeypatch):
    """One resolver for every command's ``runtime`` section: no ``auto`` is left for torch."""
    import dataclasses

    import deo_cli.recipes as recipes
    import deo_cli.runtime as rt

    monkeypatch.setattr(rt.os, "cpu_count", lambda: 2)
    kinds = [
        c
        for c in vars(recipes).values()
        if dataclasses.is_dataclass(c) and "runtime" in {f.name for f in dataclasses.fields(c)}
    ]
    assert len(kinds) >= 5  # embed, segment train/predict, detect-change (+ train), bench
    for kind in kinds:
        r = rt.resolve_runtime(recipes.build_recipe(kind, sets=["runtime.device=cpu"]).runtime)
        assert r.device == torch.device("cpu") and r.precision is None, kind
        assert type(r.num_workers) is int and r.num_workers == 0, kind
        assert type(r.batch_size) is int and type(r.micro_batch) is int and type(r.seed) is int
        assert r.precision_name == "fp32"


def test_no_raw_runtime_value_reaches_the_core():
    """``recipe.runtime.device/precision/num_workers`` are read by :func:`resolve_runtime` only."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "deo_cli"
    # ``self.runtime`` is a resolved :class:`Runtime` (the API's model holds one), not a recipe section
    raw = re.compile(r"(?<!self)\.runtime\.(device|precision|num_workers)\b")
    hits = [
        f"{p.relative_to(root)}:{i}"
        for p in root.rglob("*.py")
        if p.name not in ("recipes.py",) and p.parent.name != "cli"
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if raw.search(line)
    ]
    assert not hits, hits


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
@pytest.mark.parametrize("command", ["embed", "pretrain"])
def test_gpus_without_a_gpu_needs_device_cpu(command, make_raster, tmp_path):
    """``--gpus N`` on a machine without a GPU: one line instead of N CPU processes by surprise."""
    from deo_cli.runtime import check_gpus
    from tests.cli.helpers import assert_one_line_error, run
    from tests.infer.helpers import S2_BANDS, smooth_scene

    scene = make_raster("s.tif", smooth_scene(64, 64), descriptions=S2_BANDS)
    out = tmp_path / ("e.tif" if command == "embed" else "run")
    args = (
        [command, str(scene), "-o", str(out)]
        if command == "embed"
        else [command, "--data", str(scene), "--out", str(out)]
    )
    result, lines = run([*args, "--gpus", "2", "--model", "deo_swin_test"])
    assert_one_line_error(result, lines, 2, "--gpus 2 but no GPU is visible", "--device cpu")
    assert not out.exists()
    check_gpus(2, "cpu", torch.device("cpu"))  # asked for on purpose: fine
    with pytest.raises(UsageError, match="not a process count"):
        check_gpus(0, "cpu", torch.device("cpu"))


def test_compile_auto_is_cuda_only_and_an_explicit_value_is_kept():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert resolve_compile("auto", cpu) is False and resolve_compile("auto", cuda) is True
    assert resolve_compile(True, cpu) is True and resolve_compile(False, cuda) is False
    with pytest.raises(UsageError, match="compile"):
        resolve_compile("sometimes", cpu)


def test_keep_freed_memory_keeps_a_freed_block_resident():
    # in a child process: the setting holds for the rest of the process
    import subprocess
    import sys

    code = (
        "import torch\n"
        "from deo_cli.runtime import keep_freed_memory\n"
        "def rss():\n"
        "    return int(open('/proc/self/statm').read().split()[1]) * 4096\n"
        "def churn():\n"
        "    x = torch.ones(64 * 2**20 // 4); before = rss(); del x; return before - rss()\n"
        "given_back = churn()\n"
        "ok = keep_freed_memory()\n"
        "churn()\n"
        "print(ok, given_back, churn())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    if out[0] != "True":
        pytest.skip("not glibc")
    assert int(out[1]) > 32 * 2**20  # by default a freed 64 MiB block goes back to the kernel
    assert int(out[2]) < 4 * 2**20  # kept: reused by the next allocation, not faulted in again
