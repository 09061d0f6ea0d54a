"""Pretraining on a CUDA GPU: the loop in bf16 and in fp16 with a gradient scaler, and one process
on NCCL as ``torchrun`` and ``--gpus N`` start it (the DDP wrapper included).

Each test body is a function of the device, so the same code runs on the CPU (gloo, bf16) when
it is changed; the tests call it with ``cuda``.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.distributed as dist

from deo_cli.recipes import PretrainRecipe, build_recipe
from deo_cli.runtime import seed_everything
from deo_cli.train import distributed as ddp
from deo_cli.train.checkpoint import load_checkpoint
from deo_cli.train.loop import build_models, plan_pretrain, run_pretrain, train_step
from deo_cli.train.meta_arch import DeoMetaArch
from deo_cli.train.optim import build_optimizer
from tests.conftest import write_raster
from tests.infer.helpers import S2_BANDS, smooth_scene
from tests.train.test_distributed import Recorder

pytestmark = pytest.mark.gpu

CUDA = torch.device("cuda", 0)


@pytest.fixture(scope="module")
def chips(tmp_path_factory):
    """Four 80 x 80 px 10-band DN scenes: 8 windows of 64 px each, 32 samples (tiny_cpu)."""
    folder = tmp_path_factory.mktemp("chips")
    for i in range(4):
        write_raster(folder / f"chip_{i}.tif", smooth_scene(80, 80, seed=10 + i), descriptions=S2_BANDS)
    return folder


def tiny_recipe(data, device: str, precision: str, steps: int) -> PretrainRecipe:
    sets = [
        f"data.path={data}",
        f"device={device}",
        f"precision={precision}",
        f"max_steps={steps}",
        "checkpoint_every=1000",
        "log_every=1",
        "data.num_workers=1",
    ]
    return build_recipe(PretrainRecipe, "tiny_cpu", sets=sets, command="pretrain")


def initial_student(recipe: PretrainRecipe, tmp_path) -> dict:
    """The student's weights at step 0, as ``train`` builds them (same seed, on the CPU)."""
    plan = plan_pretrain(recipe, tmp_path / "plan-only")
    seed_everything(recipe.seed)
    student, ema, _, _ = build_models(plan, 1)
    return {k: v.detach().clone() for k, v in student.encoder.state_dict().items()}


def metrics(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def check_pretrain_run(chips, tmp_path, device: str, precision: str, steps: int) -> dict:
    """``run_pretrain`` for ``steps`` steps: finite losses, every step logged with the device's
    memory, weights updated and finite, and the gradient scaler's state (fp16) sane."""
    recipe = tiny_recipe(chips, device, precision, steps)
    before = initial_student(recipe, tmp_path)
    res = run_pretrain(recipe, tmp_path / "run")
    assert res.steps == steps
    rows = metrics(tmp_path / "run")
    start = next(r for r in rows if r.get("event") == "start")
    assert start["precision"] == precision and start["device"].startswith(device)
    steps_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps_rows] == list(range(1, steps + 1))
    terms = ("loss", "compression", "coding_rate", "distill_cls", "distill_patch_mid", "distill_patch_late")
    for r in steps_rows:
        assert all(math.isfinite(r[t]) for t in terms), r
        if device == "cuda":
            assert r["max_mem_gb"] > 0
    ckpt = load_checkpoint(res.checkpoint)
    after = ckpt["student_encoder"]
    floats = [k for k, v in before.items() if v.is_floating_point()]
    changed = [k for k in floats if not torch.equal(before[k], after[k])]
    assert all(torch.isfinite(after[k]).all() for k in floats)
    assert len(changed) >= 0.9 * len(floats), f"{len(changed)} of {len(floats)} tensors changed"
    assert any(not torch.equal(before[k], ckpt["teacher_encoder"][k]) for k in ckpt["teacher_encoder"])
    if precision == "fp16":
        scaler = ckpt["scaler"]
        assert scaler is not None and math.isfinite(scaler["scale"]) and 0 < scaler["scale"] <= 2.0**16
        # every halving is a skipped step; at least one step must have been taken
        assert math.log2(2.0**16 / scaler["scale"]) < steps
    else:
        assert ckpt["scaler"] is None
    return {"losses": [r["loss"] for r in steps_rows], "scaler": ckpt["scaler"]}


@pytest.mark.parametrize("precision,steps", [("bf16", 3), ("fp16", 10)])
def test_pretrain_steps_on_cuda(chips, tmp_path, precision, steps):
    """fp16 runs longer: the scaler starts at 2^16 and halves at every overflow, skipping that
    step (the same loop on the CPU with fp16 autocast skipped the first 4 of 8 steps)."""
    check_pretrain_run(chips, tmp_path, "cuda", precision, steps)


def _torchrun_env(monkeypatch) -> None:
    env = {
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "LOCAL_WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(ddp.free_port()),
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)


def check_torchrun_single_process(chips, tmp_path, monkeypatch, device: str) -> str:
    """``run_pretrain`` as one torchrun rank: joins a process group of the device's backend,
    trains, logs one rank, leaves no process group behind. Returns the backend."""
    backends = []
    real = dist.init_process_group

    def recording(backend=None, *args, **kwargs):
        backends.append(backend)
        return real(backend, *args, **kwargs)

    monkeypatch.setattr(dist, "init_process_group", recording)
    _torchrun_env(monkeypatch)
    assert ddp.launched_by_torchrun()
    res = run_pretrain(tiny_recipe(chips, device, "auto", 2), tmp_path / "run")
    assert res.steps == 2 and res.rank == 0
    rows = metrics(tmp_path / "run")
    assert next(r for r in rows if r.get("event") == "start")["world_size"] == 1
    assert len(next(r for r in rows if r.get("event") == "end")["rank_param_digests"]) == 1
    assert not ddp.is_distributed()
    assert len(backends) == 1
    return backends[0]


def test_torchrun_one_rank_trains_on_nccl(chips, tmp_path, monkeypatch):
    assert check_torchrun_single_process(chips, tmp_path, monkeypatch, "cuda") == "nccl"


def check_ddp_step(device: torch.device, chips, tmp_path) -> None:
    """The student wrapped in DistributedDataParallel as ``train`` wraps it for several
    processes, in a process group of one on the device's backend: two bf16 steps update it, the
    collectives the loop uses work on the device."""
    env = ddp.DistEnv(0, 1, 0, device)
    ddp.init_process_group(env, f"tcp://127.0.0.1:{ddp.free_port()}")
    try:
        assert dist.get_backend() == ("nccl" if device.type == "cuda" else "gloo")
        recipe = tiny_recipe(chips, device.type, "bf16", 2)
        plan = plan_pretrain(recipe, tmp_path / "plan-only")
        seed_everything(0)
        student, ema, optical, loss = build_models(plan, 1)
        for m in (student, ema, optical):
            m.to(device)
        model = torch.nn.parallel.DistributedDataParallel(
            student,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=not all(loss.active(t) for t in loss.weights),
            broadcast_buffers=False,
        )
        meta = DeoMetaArch(model, student, ema, optical, loss).train()
        optimizer = build_optimizer(student, betas=(0.9, 0.999), fused=False, device=device)
        for group in optimizer.param_groups:  # the loop's schedules set it; 0 until then
            group["lr"] = 1e-4
        before = [p.detach().clone() for p in student.parameters()]
        c, b = recipe.crops, recipe.batch_size
        g = torch.Generator().manual_seed(0)
        batch = {
            "global": torch.randn(c.global_number, b, 10, c.global_size, c.global_size, generator=g).to(
                device
            ),
            "local": torch.randn(c.local_number, b, 10, c.local_size, c.local_size, generator=g).to(device),
        }
        for step in range(2):
            terms = train_step(
                meta,
                optimizer,
                None,
                batch,
                clip_grad=3.0,
                momentum=0.996,
                precision=torch.bfloat16,
                step=step,
            )
            assert torch.isfinite(terms["total"]).item()
        moved = sum(not torch.equal(p0, p) for p0, p in zip(before, student.parameters()))
        assert moved >= 0.9 * len(before)
        mean = ddp.all_reduce_mean({k: v.detach() for k, v in terms.items()})
        assert set(mean) == set(terms) and all(np.isfinite(list(mean.values())))
        assert ddp.all_gather_object({"rank": 0}) == [{"rank": 0}]
    finally:
        ddp.cleanup()
    assert not ddp.is_distributed()


def test_ddp_wrapped_student_steps_on_nccl(chips, tmp_path):
    check_ddp_step(CUDA, chips, tmp_path)


def _rank(env, progress, expected_backend):
    """One spawned rank (module level: spawned processes import it)."""
    assert dist.get_backend() == expected_backend, dist.get_backend()
    if env.device.type == "cuda":
        assert (
            env.device
            == torch.device("cuda", env.local_rank)
            == torch.device("cuda", torch.cuda.current_device())
        )
    x = torch.tensor(float(env.rank + 1), device=env.device)
    assert ddp.all_reduce_mean({"x": x}) == {"x": 1.0}
    progress.start(1, "nccl")
    progress.advance(1, backend_ok=1.0)
    progress.finish()


def check_spawned_rank(device: torch.device) -> None:
    """``--gpus N``'s launcher (:func:`ddp.spawn`) with one process on the device's backend."""
    progress = Recorder()
    expected = "nccl" if device.type == "cuda" else "gloo"
    ddp.spawn(_rank, (expected,), 1, device, progress)
    assert progress.calls == [("start", 1, "nccl"), ("advance", 1, {"backend_ok": 1.0}), ("finish",)]


def test_spawned_rank_joins_nccl():
    check_spawned_rank(torch.device("cuda"))
