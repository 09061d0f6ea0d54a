"""Benchmark ``deo pretrain``'s training step, against the official DEO-FM step when it is at hand.

Default (no ``--recipes``): **the official work shape** on this machine's CPU cores: Swin-T student
with both stems, random DINOv3 ViT-B/16 teacher, 2 x 224 + 10 x 96 crops, fp32, one process with
as many threads as cores, batch 2 and 8. Every measurement is a fresh process:

1. builds the student, EMA teacher, optical teacher, loss and optimiser exactly as ``deo pretrain``
   does (:func:`deo_cli.train.loop.build_models`), with weights from one file written once per run
   (so both sides below start from the same numbers), and identical random crops (seed 0);
2. times :func:`deo_cli.train.loop.train_step` (forward of all crops, backward, per-parameter
   clipping, AdamW, EMA update): ``--warmup`` steps (3; at least 2 with ``compile``) excluded,
   then ``--steps``
   timed steps; the median step, images/s (one image = one sample with all its crops), CPU time;
3. peak memory: the resident set's high-water mark over the steps (reset by
   ``/proc/self/clear_refs`` before the warm-up steps; ``step_peak_rss_gib``), the whole process's
   (``peak_rss_gib``), and ``max_memory_allocated`` on CUDA.

With ``DEO_FM_ROOT`` set to a checkout of https://github.com/wolfilip/DEO-FM (its ``DEO/`` folder is
imported from there; nothing of it is in this repository, :mod:`official_step`), the official
``train_one_epoch`` runs the same work in its own fresh processes, alternating with deo's
(deo, official, deo, official, ... ``--rounds`` pairs per batch size) so that other load on the
machine hits both alike; the ratio deo / official of the fastest process's median step on each side
(and of the pooled medians), both step peaks, each process's CPU share (CPU time / wall time /
threads: near 1 when it had its cores to itself) and the load average before the run and around
every process (which counts the measured process's own threads) are written to ``comparison`` in
``benchmarks/results/pretrain_step.json``.

``--lockstep``: instead of whole processes in turn, each pair is two live processes, deo's and the
official one, that build and warm up side by side and then take the timed steps in turn, one step
each (deo first in even pairs, the official step first in odd ones), the other process idle while
one runs. The speed of a shared machine drifts by 10-15 % over an hour; steps seconds apart see
the same machine, so the ratio of the two medians (and the median of the per-pair ratios,
``ratio_paired_median``) are measured on like terms. Both processes' memory is resident at once
(about 21 GiB at batch 8).

``--profile``: after the timed steps, one step with the time split by phase (student
multispectral pass, RGB pass, EMA teacher, optical teacher, heads, loss, backward, clipping,
optimiser, EMA update) for deo and, in the comparison, the official step, and the operators that
took the most time with their call counts (``torch.profiler``).

With ``--recipes`` (as ``benchmarks/gpu_check.py`` runs it): each recipe at its own model size,
also times the data pipeline (read + multi-crop + augmentations, one thread, as one DataLoader
worker), and with ``--flops`` counts the model FLOPs of one step (:mod:`flops`) and reports
achieved TFLOP/s and the model FLOP utilisation against the GPU's dense 16-bit peak.

    python benchmarks/pretrain_step.py                                  # batch 2 and 8 on the CPU
    DEO_FM_ROOT=/path/to/DEO-FM python benchmarks/pretrain_step.py      # ... and the official step
    DEO_FM_ROOT=/path/to/DEO-FM python benchmarks/pretrain_step.py --lockstep --rounds 1 --steps 15
    python benchmarks/pretrain_step.py --recipes deo_swin_b --device cuda  # on a GPU node
    python benchmarks/pretrain_step.py --recipes deo_swin_b --device cuda --steps 50 --flops \
        --set precision=bf16 --set compile=true          # bf16, batch 64, compile, MFU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "pretrain_step.json"
DATA = ROOT.parent / "shared" / "data" / "oscd_subset"
#: Per-process batch on the CPU in ``--recipes`` mode (a full batch of 64 takes minutes per step there).
CPU_BATCH = {"tiny_cpu": None, "deo_swin_t_ablation": 4, "deo_swin_b": 2}
#: The official work shape (issue 17): the recipe and the batch sizes compared.
WORK_RECIPE, WORK_BATCHES = "deo_swin_t_ablation", (2, 8)
PHASES = (
    "student_ms",
    "student_rgb",
    "ema_teacher",
    "optical_teacher",
    "heads",
    "loss",
    "backward",
    "clip",
    "optimizer",
    "ema_update",
    "other",
)


# ---------------------------------------------------------------------------------------------
# Memory and phases
# ---------------------------------------------------------------------------------------------


def reset_peak_rss() -> bool:
    """Reset the resident set's high-water mark to the current size (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_gib(since_reset: bool) -> float:
    """``VmHWM`` (the high-water mark since the last reset) or the process's ``ru_maxrss``."""
    if since_reset:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 2**20, 3)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)


class Phases:
    """Wall time between marks, by phase name; each phase also a ``torch.profiler`` range."""

    def __init__(self):
        self.totals: dict[str, float] = defaultdict(float)
        self.current: str | None = None
        self.t0 = 0.0
        self.range = None

    def mark(self, name: str | None) -> None:
        import torch

        now = time.perf_counter()
        if self.current is not None:
            self.totals[self.current] += now - self.t0
        if self.range is not None:
            self.range.__exit__(None, None, None)
            self.range = None
        self.current, self.t0 = name, now
        if name is not None:
            self.range = torch.autograd.profiler.record_function(f"phase::{name}")
            self.range.__enter__()

    def hook(self, module, name: str, post: str | None = None) -> None:
        module.register_forward_pre_hook(lambda *_: self.mark(name))
        if post is not None:
            module.register_forward_hook(lambda *_: self.mark(post))

    def wrap(self, owner, attr: str, name: str, after: str | None = None) -> None:
        """``owner.attr`` (a function or method) marks ``name`` when called (``after`` on return)."""
        original = getattr(owner, attr)

        def wrapped(*args, **kwargs):
            self.mark(name)
            try:
                return original(*args, **kwargs)
            finally:
                if after is not None:
                    self.mark(after)

        setattr(owner, attr, wrapped)

    def rounded(self, steps: int) -> dict[str, float]:
        return {k: round(self.totals.get(k, 0.0) / steps, 3) for k in PHASES if k in self.totals}


class Gate:
    """A child's side of ``--lockstep``: before the first timed step it says ``READY`` (its warm-up
    done), before every timed step it waits for ``go`` on stdin, after it reports ``DONE <s>``
    (on the real stdout: the official loop's prints are captured), and after the last one it
    waits for ``end``, so that it winds down (frees its memory, exits) while nothing is timed.
    Off: does nothing."""

    def __init__(self, on: bool, steps: int = 0):
        self.on, self.steps = on, steps

    def before_step(self, k: int) -> None:
        """Timed step ``k`` (negative: a warm-up step) is about to start."""
        if not self.on or k < 0:
            return
        if k == 0:
            self._say("READY")
        self._expect("go")

    def after_step(self, k: int, seconds: float) -> None:
        if self.on and k >= 0:
            self._say(f"DONE {seconds:.6f}")
            if k == self.steps - 1:
                self._expect("end")

    @staticmethod
    def _expect(word: str) -> None:
        line = sys.stdin.readline().strip()
        if line != word:
            raise SystemExit(f"lockstep: expected {word!r} from the parent, got {line!r}")

    @staticmethod
    def _say(text: str) -> None:
        sys.__stdout__.write(text + "\n")
        sys.__stdout__.flush()


def top_ops(prof, n: int = 25) -> list[dict]:
    """The operators with the most self CPU time (with call counts), and every phase range."""
    rows = []
    for e in prof.key_averages():
        rows.append(
            {
                "name": e.key,
                "calls": int(e.count),
                "self_s": round(e.self_cpu_time_total / 1e6, 3),
                "total_s": round(e.cpu_time_total / 1e6, 3),
            }
        )
    ops = sorted((r for r in rows if not r["name"].startswith("phase::")), key=lambda r: -r["self_s"])
    return ops[:n]


def backward_ops(prof, n: int = 15) -> list[dict]:
    """The operators with the most self CPU time inside the backward phase (autograd's nodes
    included), to compare the two backward passes operator by operator."""
    events = list(prof.events())
    ranges = [e.time_range for e in events if e.name == "phase::backward"]
    totals: dict[str, list] = defaultdict(lambda: [0, 0.0])
    for e in events:
        if e.name.startswith("phase::") or not any(r.start <= e.time_range.start < r.end for r in ranges):
            continue
        totals[e.name][0] += 1
        totals[e.name][1] += e.self_cpu_time_total / 1e6
    rows = [{"name": k, "calls": c, "self_s": round(t, 3)} for k, (c, t) in totals.items()]
    return sorted(rows, key=lambda r: -r["self_s"])[:n]


def op_counts(
    prof, names=("aten::copy_", "aten::fill_", "aten::cat", "aten::contiguous", "aten::clone")
) -> dict:
    counts = {e.key: int(e.count) for e in prof.key_averages()}
    return {k: counts.get(k, 0) for k in names}


def _profiled(step, phases: Phases, steps: int = 1) -> dict:
    """Run ``step`` once under the phase marks and once more under ``torch.profiler``."""
    import torch

    for _ in range(steps):
        step()
    phases.mark(None)
    split = phases.rounded(steps)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
        phases.mark(None)
    return {
        "phases_s": split,
        "top_ops": top_ops(prof),
        "backward_ops": backward_ops(prof),
        "op_counts": op_counts(prof),
    }


def _kernel_counts() -> dict[str, int]:
    """How many input-gradient shapes took each CPU kernel (:mod:`deo_cli.models.matmul`)."""
    from deo_cli.models import matmul

    chosen = list(matmul.choices().values())
    return {k: chosen.count(k) for k in ("onednn", "mkl")}


# ---------------------------------------------------------------------------------------------
# deo's step (a child process)
# ---------------------------------------------------------------------------------------------


def _recipe(args, name: str):
    import torch

    from deo_cli.recipes import PretrainRecipe, build_recipe

    sets = [f"data.path={args.data}", "teacher.weights=random", f"device={args.device}", "gpus=1"]
    batch = args.batch_size[0] if args.batch_size else None
    if batch is None and args.device in ("cpu", "auto") and not torch.cuda.is_available():
        batch = CPU_BATCH.get(name)
    if batch is not None:
        sets.append(f"batch_size={batch}")
    sets += ["data.windows_per_scene=16", "data.window_size=256"]  # enough OSCD samples for any batch
    sets += args.sets or []
    return build_recipe(PretrainRecipe, name, sets=sets, command="pretrain")


def _plan(recipe):
    from deo_cli.train.loop import plan_pretrain

    with tempfile.TemporaryDirectory() as tmp:
        return plan_pretrain(recipe, Path(tmp) / "run")


def _crops(recipe, device, b: int):
    """Identical random crops for both sides: ``(global (G, B, 10, S, S), local (L, B, 10, s, s))``."""
    import torch

    c = recipe.crops
    g = torch.Generator().manual_seed(0)
    glob = torch.randn(c.global_number, b, 10, c.global_size, c.global_size, generator=g).to(device)
    loc = (
        torch.randn(c.local_number, b, 10, c.local_size, c.local_size, generator=g).to(device)
        if c.local_number
        else None
    )
    return glob, loc


def make_weights(args) -> dict:
    """Write the student's and the optical teacher's initial weights (``--child-weights PATH``)."""
    import torch

    from deo_cli.train.loop import build_models

    recipe = _recipe(args, args.child)
    plan = _plan(recipe)
    torch.manual_seed(0)
    student, _, optical, _ = build_models(plan, 1)
    torch.save({"student": student.state_dict(), "optical": optical.state_dict()}, args.child_weights)
    return {"weights": args.child_weights}


def _set_threads(args, recipe, device) -> None:
    import torch

    from deo_cli.train import distributed as ddp

    if device.type == "cpu":  # as deo pretrain: the cores its DataLoader workers leave
        threads = args.threads or ddp.cpu_threads(1, recipe.data.num_workers)
        if threads:
            torch.set_num_threads(threads)


def child(args) -> dict:
    import torch

    from deo_cli.runtime import precision_name, resolve_compile
    from deo_cli.train import distributed as ddp
    from deo_cli.train import loop
    from deo_cli.train.meta_arch import DeoMetaArch, build_teacher_from_student
    from deo_cli.train.optim import build_optimizer

    recipe = _recipe(args, args.child)
    plan = _plan(recipe)
    device = plan.device
    _set_threads(args, recipe, device)
    loop.prepare_device(device)  # as deo pretrain's train()
    torch.manual_seed(0)
    student, ema, optical, loss = loop.build_models(plan, 1)
    if args.weights:
        state = torch.load(args.weights, mmap=True, weights_only=True)
        student.load_state_dict(state["student"])
        optical.load_state_dict(state["optical"])
        ema = build_teacher_from_student(student)
        del state
    student.to(device), ema.to(device)
    if optical is not None:
        optical.to(device)
    compiled = resolve_compile(recipe.compile, device)
    model = torch.compile(student, dynamic=False) if compiled else student
    meta = DeoMetaArch(model, student, ema, optical, loss, ema_drop_path=recipe.model.ema_drop_path).train()
    optimizer = build_optimizer(student, betas=recipe.optim.betas, fused=recipe.optim.fused, device=device)
    for group in optimizer.param_groups:
        group["lr"] = 1e-5
    scaler = torch.amp.GradScaler(device.type) if plan.precision is torch.float16 else None

    b = recipe.batch_size
    glob, loc = _crops(recipe, device, b)
    crops = {"global": glob, "local": loc}

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def step():
        return loop.train_step(
            meta,
            optimizer,
            scaler,
            crops,
            clip_grad=recipe.optim.clip_grad,
            momentum=0.996,
            precision=plan.precision,
        )

    torch.manual_seed(0)
    reset = reset_peak_rss()
    first_loss = None
    for _ in range(max(args.warmup, 2 if compiled else 1)):
        terms = step()
        first_loss = float(terms["total"]) if first_loss is None else first_loss
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, cpu_times = [], []
    gate = Gate(args.gated, args.steps)
    for k in range(args.steps):
        gate.before_step(k)
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        sync()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
        gate.after_step(k, times[-1])
    step_peak = peak_rss_gib(reset) if reset else None
    step_s = statistics.median(times)
    step_threads = torch.get_num_threads()
    peak_cuda = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None

    profile = None
    if args.profile:
        phases = Phases()
        phases.hook(student, "student_ms")
        phases.hook(student.encoder.conv_ms, "student_ms")
        if student.encoder.conv_rgb is not None:
            phases.hook(student.encoder.conv_rgb, "student_rgb")
        for head in (student.head_ms, student.cls_head, student.patch_head_mid, student.patch_head_late):
            phases.hook(head, "heads")
        phases.hook(ema, "ema_teacher")
        if optical is not None:
            phases.hook(optical, "optical_teacher")
        phases.hook(loss, "loss")
        phases.wrap(torch.Tensor, "backward", "backward")
        phases.wrap(loop, "clip_gradients", "clip")
        phases.wrap(optimizer, "step", "optimizer")
        phases.wrap(loop, "ema_update", "ema_update", after="other")
        profile = _profiled(lambda: (phases.mark("other"), step()), phases)

    flops = count_step_flops(args, student, ema, optical, loss, recipe, plan, crops) if args.flops else None

    data = {}
    if args.data_samples:  # the data pipeline alone, one thread (what one DataLoader worker does)
        torch.set_num_threads(1)
        dataset, _, _ = loop.build_data(plan, ddp.DistEnv(device=torch.device("cpu")))
        dataset[(0, 0)]
        n = args.data_samples
        t0, c0 = time.perf_counter(), time.process_time()
        for i in range(1, n + 1):
            dataset[(0, i % len(dataset))]
        data = {
            "data_samples_per_s_per_worker": round(n / (time.perf_counter() - t0), 2),
            "data_cpu_s_per_sample": round((time.process_time() - c0) / n, 4),
        }

    c = recipe.crops
    return {
        "side": "deo",
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
        "compile": compiled,
        **_timing(b, c, student, args.steps, step_s, times, cpu_times),
        "first_loss": first_loss,
        "matmul_kernels": _kernel_counts(),
        "step_peak_rss_gib": step_peak,
        "peak_rss_gib": peak_rss_gib(False),
        "peak_cuda_gib": round(peak_cuda / 2**30, 3) if peak_cuda is not None else None,
        **data,
        "torch": torch.__version__,
        **({"profile": profile} if profile else {}),
        **(flops_fields(flops, step_s, b, device, plan.precision) if flops is not None else {}),
    }


# ---------------------------------------------------------------------------------------------
# The official step (a child process; DEO_FM_ROOT)
# ---------------------------------------------------------------------------------------------


class TimedBatches:
    """The step's data loader: the same batch ``n`` times, each step timed from the batch's hand-over
    to the request for the next (the loop's own work between steps included); the first
    ``warmup`` steps are not timed and the others pass through ``gate`` (``--lockstep``)."""

    def __init__(self, batch, n: int, warmup: int = 0, gate: Gate | None = None):
        self.batch, self.n, self.warmup = batch, n, warmup
        self.gate = gate or Gate(False)
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        for i in range(self.n):
            self.gate.before_step(i - self.warmup)
            t0, c0 = time.perf_counter(), time.process_time()
            yield self.batch  # resumed when the loop asks for the next batch: the step is done
            self.wall.append(time.perf_counter() - t0)
            self.cpu.append(time.process_time() - c0)
            self.gate.after_step(i - self.warmup, self.wall[-1])

    def times(self) -> tuple[list[float], list[float]]:
        """Wall and CPU seconds of the timed steps."""
        return self.wall[self.warmup :], self.cpu[self.warmup :]


def official_child(args) -> dict:
    import contextlib
    import io

    import numpy as np
    import official_step
    import torch

    from deo_cli.models.teachers import build_teacher

    recipe = _recipe(args, args.child)
    plan = _plan(recipe)
    device = plan.device
    if device.type != "cpu" or plan.precision is not None:
        raise SystemExit("the official step is compared on the CPU in fp32 only")
    _set_threads(args, recipe, device)
    main_dino = official_step.import_official()
    torch.manual_seed(0)
    optical = build_teacher(plan.teacher_name, weights=None)
    c, b = recipe.crops, recipe.batch_size
    student, teacher, distiller, dino_loss, dist_loss, optimizer, oargs = official_step.build_official(
        main_dino, optical.model, c.local_number, recipe.optim.clip_grad
    )
    state = torch.load(args.weights, mmap=True, weights_only=True)
    official_step.load_deo_weights(student, teacher, state["student"])
    optical.load_state_dict(state["optical"])
    del state
    student.train(), teacher.train()  # the official teacher is never put in eval mode

    glob, loc = _crops(recipe, device, b)
    images = list(glob.unbind(0)) + (list(loc.unbind(0)) if loc is not None else [])
    batch = (images, None)
    n = args.warmup + args.steps + (2 if args.profile else 0)
    lr = np.full(n, 1e-5)
    wd = np.full(n, 0.04)
    momentum = np.full(n, 0.996)
    losses = []
    main_dino.MetricLogger = _logger(main_dino.MetricLogger, losses)

    def run(loader):
        with contextlib.redirect_stdout(io.StringIO()):  # its per-epoch log lines
            main_dino.train_one_epoch(
                student,
                teacher,
                teacher,
                dino_loss,
                loader,
                optimizer,
                lr,
                wd,
                momentum,
                0,
                None,
                oargs,
                distiller=distiller,
                distiller_loss_cos=dist_loss,
            )

    torch.manual_seed(0)
    reset = reset_peak_rss()
    loader = TimedBatches(batch, args.warmup + args.steps, args.warmup, Gate(args.gated, args.steps))
    run(loader)
    times, cpu_times = loader.times()
    step_peak = peak_rss_gib(reset) if reset else None
    step_s = statistics.median(times)

    profile = None
    if args.profile:
        phases = Phases()
        m = student.module
        phases.hook(m, "student_ms")
        phases.hook(m.conv_ms, "student_ms")
        phases.hook(m.conv_rgb, "student_rgb")
        for head in (m.head_ms, m.cls_head, m.patch_head_mid, m.patch_head_late):
            phases.hook(head, "heads")
        phases.hook(teacher, "ema_teacher")
        phases.hook(distiller, "optical_teacher")
        phases.hook(dino_loss, "loss")
        phases.hook(dist_loss, "loss")
        phases.wrap(main_dino, "cosine_patch_loss", "loss")
        phases.wrap(torch.Tensor, "backward", "backward")
        phases.wrap(main_dino, "clip_gradients", "clip")
        phases.wrap(optimizer, "step", "optimizer", after="ema_update")  # the EMA loop follows the step

        class Marked(TimedBatches):
            def __iter__(self):
                for item in super().__iter__():
                    phases.mark("other")
                    yield item

        profile = _profiled(lambda: run(Marked(batch, 1)), phases)

    return {
        "side": "official",
        "recipe": args.child,
        "model": "torchvision swin_t (official MultiCropWrapper)",
        "teacher": plan.teacher_name,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "precision": "fp32",
        "compile": False,
        **_timing(b, c, student, args.steps, step_s, times, cpu_times),
        "first_loss": losses[0] if losses else None,
        "step_peak_rss_gib": step_peak,
        "peak_rss_gib": peak_rss_gib(False),
        "official_root": str(official_step.official_dir()),
        "torch": torch.__version__,
        **({"profile": profile} if profile else {}),
    }


def _timing(b: int, c, student, steps: int, step_s: float, times: list, cpu_times: list) -> dict:
    """The fields both sides report about the timed steps (``cpu_times``: this process's CPU time)."""
    return {
        "batch_size": b,
        "crops": f"{c.global_number}x{c.global_size} + {c.local_number}x{c.local_size}",
        "student_params_m": round(sum(p.numel() for p in student.parameters()) / 1e6, 2),
        "steps_timed": steps,
        "step_s": round(step_s, 4),
        "step_s_all": [round(t, 4) for t in times],
        "step_cpu_s": round(statistics.median(cpu_times), 4),
        "images_per_s": round(b / step_s, 3),
    }


def _logger(cls, losses: list):
    """The official MetricLogger, also keeping every ``total_loss`` it is given (for the record)."""

    class Logger(cls):
        def update(self, **kwargs):
            if "total_loss" in kwargs:
                losses.append(float(kwargs["total_loss"]))
            return super().update(**kwargs)

    return Logger


# ---------------------------------------------------------------------------------------------
# FLOPs (--flops, as gpu_check.py runs it)
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# The parent: fresh processes, alternating sides
# ---------------------------------------------------------------------------------------------


def cpu_pressure() -> float | None:
    """Linux PSI: % of the last 60 s some task waited for a CPU (other jobs on a shared machine)."""
    try:
        line = Path("/proc/pressure/cpu").read_text().splitlines()[0]
    except (OSError, IndexError):
        return None
    fields = dict(f.split("=") for f in line.split()[1:])
    return float(fields["avg60"])


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _child_cmd(args, recipe: str, batch: int | None, side: str, weights: str | None) -> list[str]:
    flag = {"deo": "--child", "official": "--child-official", "weights": "--child"}[side]
    cmd = [sys.executable, __file__, flag, recipe, "--device", args.device, "--steps", str(args.steps)]
    cmd += ["--warmup", str(args.warmup)]
    cmd += ["--data", args.data, "--data-samples", str(args.data_samples if side == "deo" else 0)]
    if batch:
        cmd += ["--batch-size", str(batch)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    for kv in args.sets:
        cmd += ["--set", kv]
    if args.flops and side == "deo":
        cmd += ["--flops", "--flops-batch", str(args.flops_batch)]
    if args.profile and side != "weights":
        cmd += ["--profile"]
    if side == "weights":
        cmd += ["--child-weights", weights]
    elif weights:
        cmd += ["--weights", weights]
    return cmd


def _child_env() -> dict:
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }


def _result(stdout: str, stderr: str, returncode: int, what: str) -> dict:
    line = next((ln for ln in stdout.splitlines() if ln.startswith("RESULT ")), None)
    if returncode or line is None:
        print(stdout[-2000:], stderr[-4000:], file=sys.stderr)
        raise SystemExit(f"benchmark of {what} failed")
    return json.loads(line[len("RESULT ") :])


def _run_child(
    args, recipe: str, batch: int | None, *, side: str = "deo", weights: str | None = None
) -> dict:
    cmd = _child_cmd(args, recipe, batch, side, weights)
    t0, pressure, load = time.time(), cpu_pressure(), _load()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=_child_env())
    return _with_context(
        _result(proc.stdout, proc.stderr, proc.returncode, f"{recipe} ({side})"), t0, pressure, load
    )


def _with_context(r: dict, t0: float, pressure: float | None, load: list[float]) -> dict:
    """``r`` with the wall time since ``t0``, CPU pressure and load average before and after."""
    r["wall_s"] = round(time.time() - t0, 1)
    r["cpu_pressure_avg60"] = [pressure, cpu_pressure()]  # before, after (0 = machine to itself)
    r["loadavg"] = [load, _load()]  # 1, 5, 15 min before and after
    return r


def _lockstep(args, recipe: str, batch: int, weights: str) -> tuple[dict, dict]:
    """deo and the official step in two live processes, one timed step each in turn (ABBA: deo
    first in even pairs, the official step first in odd ones); each side's result as
    :func:`_run_child` gives it, plus ``pair_order``."""
    sides = ("deo", "official")
    t0, pressure, load = time.time(), cpu_pressure(), _load()
    with tempfile.TemporaryDirectory() as tmp:
        procs, errs = {}, {}
        try:
            for side in sides:
                errs[side] = open(Path(tmp) / f"{side}.err", "w+")  # noqa: SIM115 (closed below)
                procs[side] = subprocess.Popen(
                    _child_cmd(args, recipe, batch, side, weights) + ["--gated"],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=errs[side],
                    text=True,
                    cwd=ROOT,
                    env=_child_env(),
                )

            def expect(side: str, word: str) -> str:
                for ln in procs[side].stdout:
                    if ln.startswith(word):
                        return ln
                errs[side].seek(0)
                _result("", errs[side].read(), 1, f"{recipe} ({side}, lockstep)")

            for side in sides:  # both built and warmed up (they warm up side by side)
                expect(side, "READY")
            for k in range(args.steps):
                for side in sides if k % 2 == 0 else sides[::-1]:
                    procs[side].stdin.write("go\n")
                    procs[side].stdin.flush()
                    expect(side, "DONE")
            for side in sides:  # both wind down only now, while nothing is timed
                procs[side].stdin.write("end\n")
                procs[side].stdin.flush()
            results = {}
            for side in sides:
                out, _ = procs[side].communicate()
                errs[side].seek(0)
                results[side] = _result(out, errs[side].read(), procs[side].returncode, f"{recipe} ({side})")
        finally:
            for side, proc in procs.items():
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
                errs[side].close()
    for r in results.values():
        _with_context(r, t0, pressure, load)
        r["pair_order"] = "ABBA: deo first in even pairs, the official step first in odd ones"
    return results["deo"], results["official"]


def _line(r: dict) -> str:
    peak = r.get("peak_cuda_gib") or r.get("step_peak_rss_gib") or r["peak_rss_gib"]
    text = (
        f"{r.get('side', 'deo'):<8} {r['recipe']:<20} {r['device']:<5} {r['precision']:<4} batch {r['batch_size']:>3}  "
        f"{r['crops']:<14} step {r['step_s']:.3f} s ({r['step_cpu_s']:.2f} CPU s)  {r['images_per_s']:.2f} img/s  "
        f"peak {peak:.2f} GiB  load {r['loadavg'][0][0]}"
    )
    if r.get("data_samples_per_s_per_worker"):
        text += f"  data {r['data_samples_per_s_per_worker']:.1f} samples/s/worker"
    if "flops_per_step" in r:
        text += f"  {r['flops_per_image'] / 1e9:.1f} GFLOP/image, {r['achieved_tflops']:.1f} TFLOP/s, MFU {r['mfu']}"
    return text


def _print_profile(r: dict) -> None:
    p = r.get("profile")
    if not p:
        return
    phases = ", ".join(f"{k} {v:.2f}" for k, v in p["phases_s"].items())
    print(f"  {r['side']} phases (s): {phases}  (sum {sum(p['phases_s'].values()):.2f})")
    print(f"  {r['side']} op calls: {p['op_counts']}")
    ops = ", ".join(f"{o['name']} {o['self_s']:.2f}s/{o['calls']}" for o in p["top_ops"][:8])
    print(f"  {r['side']} top ops: {ops}")
    ops = ", ".join(f"{o['name']} {o['self_s']:.2f}s/{o['calls']}" for o in p.get("backward_ops", [])[:12])
    print(f"  {r['side']} backward ops: {ops}")


def compare(args, official: bool) -> tuple[list[dict], list[dict]]:
    """deo (and the official step) at every batch size, ``--rounds`` alternating pairs each."""
    results, comparison = [], []
    recipe = args.recipes[0]
    load_before = _load()  # each measured process adds its own threads to the load average after this
    with tempfile.TemporaryDirectory() as tmp:
        weights = str(Path(tmp) / "weights.pt")
        _run_child(args, recipe, None, side="weights", weights=weights)
        for batch in args.batch_size:
            runs = {"deo": [], "official": []}
            for _ in range(args.rounds):
                if official and args.lockstep:
                    pair = dict(zip(("deo", "official"), _lockstep(args, recipe, batch, weights)))
                else:
                    pair = {
                        side: _run_child(args, recipe, batch, side=side, weights=weights)
                        for side in (("deo", "official") if official else ("deo",))
                    }
                for side, r in pair.items():
                    runs[side].append(r)
                    print(_line(r), flush=True)
                    _print_profile(r)
            deo = _pooled(runs["deo"])
            results.append(deo)
            if official:
                off = _pooled(runs["official"])
                ratio = deo["step_s"] / off["step_s"]
                row = {
                    "batch_size": batch,
                    "crops": deo["crops"],
                    "threads": deo["threads"],
                    "rounds": args.rounds,
                    "deo_step_s": deo["step_s"],
                    "official_step_s": off["step_s"],
                    "ratio_deo_over_official": round(ratio, 4),
                    "speedup": round(1 / ratio, 3),
                    "deo_step_cpu_s": deo["step_cpu_s"],
                    "official_step_cpu_s": off["step_cpu_s"],
                    "deo_step_peak_rss_gib": deo["step_peak_rss_gib"],
                    "official_step_peak_rss_gib": off["step_peak_rss_gib"],
                    "deo_peak_rss_gib": deo["peak_rss_gib"],
                    "official_peak_rss_gib": off["peak_rss_gib"],
                    "deo_step_s_per_process": deo["step_s_per_process"],
                    "official_step_s_per_process": off["step_s_per_process"],
                    "ratio_pooled_medians": round(
                        deo["step_s_pooled_median"] / off["step_s_pooled_median"], 4
                    ),
                    "deo_cpu_share_per_process": deo["cpu_share_per_process"],
                    "official_cpu_share_per_process": off["cpu_share_per_process"],
                    "deo_step_s_all": deo["step_s_all"],
                    "official_step_s_all": off["step_s_all"],
                    "first_loss": {"deo": deo["first_loss"], "official": off["first_loss"]},
                    "loadavg_before_run": load_before,
                    "loadavg": [x for r in runs["deo"] + runs["official"] for x in r["loadavg"]],
                    "loadavg_max_1min": max(
                        x[0] for r in runs["deo"] + runs["official"] for x in r["loadavg"]
                    ),
                    "order": (
                        f"lockstep: {args.rounds} pair(s) of live processes, one timed step each in turn (ABBA)"
                        if args.lockstep
                        else "alternating fresh processes: " + ", ".join(["deo, official"] * args.rounds)
                    ),
                    **(_paired(runs) if args.lockstep else {}),
                    "official": off,
                }
                comparison.append(row)
                print(
                    f"batch {batch}: deo {deo['step_s']:.3f} s / official {off['step_s']:.3f} s = {ratio:.3f} "
                    f"({1 / ratio:.2f}x faster); step peak RSS deo {deo['step_peak_rss_gib']} GiB, official "
                    f"{off['step_peak_rss_gib']} GiB; load average (1 min) {load_before[0]} before, up to "
                    f"{row['loadavg_max_1min']} with the measured processes; CPU share deo "
                    f"{deo['cpu_share_per_process']}, official {off['cpu_share_per_process']}"
                    + (
                        f"; median of the paired step ratios {row['ratio_paired_median']:.3f} "
                        f"({1 / row['ratio_paired_median']:.2f}x)"
                        if args.lockstep
                        else ""
                    ),
                    flush=True,
                )
    return results, comparison


def _paired(runs: dict[str, list[dict]]) -> dict:
    """Lockstep: each timed deo step over the official step run next to it (same pair, same
    index), so that drift of the machine's speed over minutes cancels out."""
    ratios = [
        d / o
        for rd, ro in zip(runs["deo"], runs["official"])
        for d, o in zip(rd["step_s_all"], ro["step_s_all"])
    ]
    return {
        "ratio_paired_median": round(statistics.median(ratios), 4),
        "ratio_paired_all": [round(x, 4) for x in ratios],
    }


def _pooled(runs: list[dict]) -> dict:
    """One row from several processes of one side: ``step_s`` is the fastest process's median step
    (other work on a shared machine only ever slows a process down: the least disturbed process is
    the best estimate, taken alike for both sides); every timed step and the pooled median kept."""
    r = dict(runs[-1])
    times = [t for x in runs for t in x["step_s_all"]]
    r["step_s_all"] = times
    r["step_s_per_process"] = [x["step_s"] for x in runs]
    r["step_s_pooled_median"] = round(statistics.median(times), 4)
    # CPU time / (wall time x threads): near 1 when the process had its cores to itself
    r["cpu_share_per_process"] = [
        round(x["step_cpu_s"] / (x["step_s"] * (x.get("threads") or 1)), 3) for x in runs
    ]
    r["step_s"] = round(min(x["step_s"] for x in runs), 4)
    r["steps_timed"] = len(times)
    r["processes"] = len(runs)
    r["step_cpu_s"] = round(statistics.median(x["step_cpu_s"] for x in runs), 4)
    r["images_per_s"] = round(r["batch_size"] / r["step_s"], 3)
    for key in ("step_peak_rss_gib", "peak_rss_gib"):
        values = [x[key] for x in runs if x.get(key) is not None]
        r[key] = max(values) if values else None
    r["loadavg"] = [x["loadavg"] for x in runs]
    r["loadavg"] = [lv for lvs in r["loadavg"] for lv in lvs]
    r["cpu_pressure_avg60"] = [x["cpu_pressure_avg60"] for x in runs]
    r["first_loss"] = runs[0].get("first_loss")
    return r


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipes", nargs="+", default=None, help="recipes at their own size (gpu_check.py)")
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--batch-size",
        type=int,
        nargs="+",
        default=None,
        help="per process (default: 2 8 for the work shape)",
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="timed steps per process (5; 3 with --recipes)"
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=3,
        help="untimed steps first (3: both steps run slower until the allocator holds the memory a step needs)",
    )
    parser.add_argument(
        "--rounds", type=int, default=2, help="alternating deo/official process pairs per batch"
    )
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: as deo pretrain)")
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--data-samples", type=int, default=None, help="data pipeline samples (0: skip)")
    parser.add_argument(
        "--set", dest="sets", action="append", default=[], help="recipe override KEY=VALUE (repeatable)"
    )
    parser.add_argument(
        "--flops", action="store_true", help="count the model FLOPs of a step and report MFU (GPU)"
    )
    parser.add_argument(
        "--flops-batch", type=int, default=8, help="samples the FLOPs are counted on (0: the whole batch)"
    )
    parser.add_argument(
        "--profile", action="store_true", help="split one step by phase and list the top operators"
    )
    parser.add_argument("--no-official", action="store_true", help="deo only, even with DEO_FM_ROOT set")
    parser.add_argument(
        "--lockstep",
        action="store_true",
        help="both sides in two live processes, one timed step each in turn (needs both peaks in memory)",
    )
    parser.add_argument("--gated", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-official", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-weights", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--weights", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    work_shape = args.recipes is None
    if args.lockstep and args.profile:
        parser.error("--profile runs after the timed steps in each child: use it without --lockstep")
    if args.steps is None:
        args.steps = 5 if work_shape else 3
    if args.data_samples is None:
        args.data_samples = 0 if work_shape else 8
    if args.child_official:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        args.child = args.child_official
        print("RESULT " + json.dumps(official_child(args)))
        return
    if args.child:
        result = make_weights(args) if args.child_weights else child(args)
        print("RESULT " + json.dumps(result))
        return

    comparison = []
    if work_shape:
        args.recipes = [WORK_RECIPE]
        args.batch_size = args.batch_size or list(WORK_BATCHES)
        if args.threads is None and args.device in ("auto", "cpu"):
            args.threads = _cpus()  # one process with every core, as the official step runs
        official = bool(os.environ.get("DEO_FM_ROOT")) and not args.no_official
        if not official:
            print("DEO_FM_ROOT not set: deo only (set it to a checkout of wolfilip/DEO-FM to compare)")
        results, comparison = compare(args, official)
    else:
        results = []
        batches = args.batch_size or [None]
        for name in args.recipes:
            for batch in batches:
                r = _run_child(args, name, batch)
                results.append(r)
                print(_line(r), flush=True)
                _print_profile(r)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(out.read_text()) if out.exists() else {}
    keys = {(r["recipe"], r["device"], r["batch_size"]) for r in results}
    merged = [
        r
        for r in previous.get("results", [])
        if (r.get("recipe"), r.get("device"), r.get("batch_size")) not in keys
    ] + results
    body = {
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpus": _cpus(),
            "cpu_model": _cpu_model(),
        },
        "note": "synthetic in-memory crops (seed 0) for the step; data throughput on the OSCD subset; random "
        "optical teacher; step_peak_rss_gib: resident high-water mark over the steps",
        "results": merged,
    }
    if comparison or previous.get("comparison"):
        batches = {c["batch_size"] for c in comparison}
        body["comparison"] = [
            c for c in previous.get("comparison", []) if c.get("batch_size") not in batches
        ] + comparison
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(body, indent=2) + "\n")
    tmp.replace(out)
    print(f"wrote {out}")


def _cpu_model() -> str:
    """The CPU's model name: the ratio depends on it (a page fault cost 15 us on one 2-core VM,
    2.5 us on another; MKL's kernels differ by vendor)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from gpu_check import cpu_name

    return cpu_name()


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


if __name__ == "__main__":
    main()
