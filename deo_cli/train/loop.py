"""``deo pretrain``: DEO's dual-teacher pretraining loop (docs/method.md §2.6-2.9), top to bottom.

:func:`run_pretrain` is the one entry point (the command line and notebooks call it):

1. :func:`plan_pretrain` checks everything that can be wrong *before* anything is written: the
   model, teacher, bands, device, the data (paths readable, bands present, unit) and the run
   folder (an existing run needs ``--resume`` or ``--overwrite``).
2. One process (:func:`train` in this process), ``--gpus N`` processes on this machine
   (:func:`deo_cli.train.distributed.spawn`), or one rank of a ``torchrun`` launch.
3. :func:`train` builds the student (encoder + four heads), the EMA teacher, the frozen optical
   teacher and the loss (:mod:`deo_cli.train.meta_arch`), the optimiser and schedules
   (:mod:`deo_cli.train.optim`), the data loader (:mod:`deo_cli.data.pretrain`), restores a
   checkpoint when resuming, and runs the loop below.

Each step: set lr / weight decay from the schedules; forward all crops (autocast: bf16 where the
GPU supports it, else fp16 with a gradient scaler; fp32 on the CPU); backward; clip every
gradient to norm 3.0 on its own; AdamW step; EMA update of the teacher with this step's momentum.
Rank 0 writes metrics (``metrics.jsonl``), checkpoints (every ``checkpoint_every`` steps and at the
end, atomically, the newest ``keep_checkpoints`` kept) and the resolved recipe (``recipe.yaml``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from deo_cli.data.multicrop import build_multicrop
from deo_cli.data.pretrain import PretrainData, PretrainDataset, build_pretrain_loader, scan_pretrain_data
from deo_cli.errors import BandError, DeoError, OutputExistsError, RecipeError, UsageError, WeightsError
from deo_cli.io.atomic import ensure_folder
from deo_cli.losses import DeoLoss
from deo_cli.models import OpticalTeacher, build_encoder, build_teacher, ema_update, get_model_spec
from deo_cli.models.teachers import get_teacher_spec, list_teachers
from deo_cli.models.weights import resolve_weights
from deo_cli.progress import NullProgress
from deo_cli.recipes import PretrainRecipe, recipe_hash, recipe_to_dict, save_recipe
from deo_cli.runtime import (
    autocast,
    check_gpus,
    keep_freed_memory,
    precision_name,
    resolve_compile,
    resolve_device,
    resolve_precision,
    seed_everything,
)
from deo_cli.sensors import resolve_bands
from deo_cli.train import distributed as ddp
from deo_cli.train.checkpoint import (
    checkpoint_path,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    restore_training_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from deo_cli.train.meta_arch import DeoMetaArch, build_student, build_teacher_from_student, distill_active
from deo_cli.train.metrics import MetricsLog, read_metrics
from deo_cli.train.optim import apply_schedules, build_optimizer, build_schedules, clip_gradients

log = logging.getLogger(__name__)

#: Short names of the loss terms on the progress bar.
SHORT = {
    "compression": "comp",
    "coding_rate": "rate",
    "distill_cls": "cls",
    "distill_patch_mid": "mid",
    "distill_patch_late": "late",
}
#: Files of a run folder that ``--overwrite`` removes (nothing else in the folder is touched).
RUN_FILES = ("metrics.jsonl", "recipe.yaml")


class TrainingError(DeoError):
    """Training cannot go on (the loss became NaN or infinite)."""


# ---------------------------------------------------------------------------------------------
# Planning: every check before anything is written
# ---------------------------------------------------------------------------------------------


@dataclass
class RunPlan:
    """A validated run; pickled to every spawned process."""

    recipe: PretrainRecipe
    out: Path
    resume_from: Path | None
    overwrite: bool
    data: PretrainData
    bands: tuple[str, ...]
    teacher_name: str
    device: torch.device
    precision: torch.dtype | None
    world_size: int


@dataclass
class PretrainResult:
    """What a finished (or stopped) run left in its folder."""

    out: Path
    steps: int
    total_steps: int
    checkpoint: Path | None
    metrics: Path
    first_loss: float | None
    last_loss: float | None
    images_per_s: float | None
    seconds: float
    rank: int = 0


def resolve_teacher_name(name: str) -> str:
    """A registered teacher (``dinov3_vitb16``) from its name or its timm architecture
    (``vit_base_patch16_dinov3``, the recipe default)."""
    if name in list_teachers():
        return name
    for registered in list_teachers(include_test=False):
        spec = get_teacher_spec(registered)
        if name in (spec.arch, spec.timm_name):
            return spec.name
    return get_teacher_spec(name).name  # raises UsageError with a did-you-mean


def _run_has_outputs(out: Path) -> bool:
    return out.is_dir() and (bool(list_checkpoints(out)) or any((out / f).exists() for f in RUN_FILES))


def plan_pretrain(
    recipe: PretrainRecipe, out: str | os.PathLike | None, *, resume: bool = False, overwrite: bool = False
) -> RunPlan:
    """Validate a run without writing anything (module docstring, step 1)."""
    if recipe.data.path is None:
        raise UsageError("no training data given", "pass --data FOLDER|GLOB|MANIFEST.csv")
    if out is None:
        raise UsageError("no run folder given", "pass --out RUN (checkpoints and logs go there)")
    out = Path(out)
    # The saved recipe names the data absolutely, so `--resume` works from any folder.
    recipe = dataclasses.replace(
        recipe,
        data=dataclasses.replace(recipe.data, path=os.path.abspath(os.path.expanduser(recipe.data.path))),
    )
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"run folder {out} is a file", "choose another --out")
    spec = get_model_spec(recipe.model.name)
    bands = resolve_bands(recipe.data.bands)
    if tuple(bands) != tuple(spec.manifest.bands):
        raise BandError(
            f"--bands {recipe.data.bands} gives {','.join(bands)} but {spec.name}'s multispectral stem takes "
            f"{','.join(spec.manifest.bands)} (DEO's 10 Sentinel-2 bands)",
            "pass --bands S2",
        )
    teacher_name = resolve_teacher_name(recipe.teacher.name)
    if recipe.teacher.layers and len(recipe.teacher.layers) != 2:
        raise RecipeError(
            f"teacher.layers must name two blocks (mid, late), got {recipe.teacher.layers}",
            "e.g. --set teacher.layers=[8,11], or [] for the teacher's default",
        )
    if recipe.teacher.weights == "default" and get_teacher_spec(teacher_name).pretrained_tag is None:
        raise WeightsError(
            f"teacher {teacher_name} has no released weights",
            "pass --teacher-weights random (tests only) or a local file",
        )
    if recipe.teacher.weights not in ("default", "random"):
        try:
            resolve_weights(recipe.teacher.weights)  # a missing file fails here; hf:// is fetched once
        except WeightsError as e:
            raise WeightsError(
                f"optical teacher: {e.problem}", "pass an existing file to --teacher-weights"
            ) from e
    chunk = recipe.loss.expansion_chunk
    if chunk and recipe.batch_size > chunk and recipe.batch_size % chunk:
        raise RecipeError(
            f"loss.expansion_chunk {chunk} does not divide batch_size {recipe.batch_size}",
            "pick a chunk that divides the per-process batch",
        )
    device = resolve_device(recipe.device)
    precision = resolve_precision(recipe.precision, device)
    world = int(os.environ["WORLD_SIZE"]) if ddp.launched_by_torchrun() else recipe.gpus
    if not ddp.launched_by_torchrun():
        check_gpus(recipe.gpus, recipe.device, device)
    data = scan_pretrain_data(
        recipe.data.path,
        bands,
        band_names=recipe.data.band_names,
        nodata=recipe.data.nodata,
        ms_column=recipe.data.ms_column,
        rgb_column=recipe.data.rgb_column,
        limit=recipe.data.limit,
        seed=recipe.seed,
        unit=recipe.data.unit,
        window_size=recipe.data.window_size,
        max_nodata_fraction=recipe.data.max_nodata_fraction,
    )
    n = sum(s.items(recipe.data.window_size, recipe.data.windows_per_scene) for s in data.sources)
    if n // world < recipe.batch_size:
        raise UsageError(
            f"the data gives {n} samples per epoch, {n // world} per process: fewer than one batch of {recipe.batch_size}",
            "add data, raise data.windows_per_scene, or lower --batch-size",
        )
    resume_from = None
    if _run_has_outputs(out):
        if resume:
            resume_from = latest_checkpoint(out)
        elif not overwrite:
            raise OutputExistsError(
                f"run folder {out} already holds a run",
                "pass --resume to continue it, --overwrite to start over, or choose another --out",
            )
    if resume and resume_from is None:
        log.info("nothing to resume in %s: starting a new run", out)
    return RunPlan(
        recipe,
        out,
        resume_from,
        overwrite and not resume,
        data,
        bands,
        teacher_name,
        device,
        precision,
        world,
    )


# ---------------------------------------------------------------------------------------------
# The entry point
# ---------------------------------------------------------------------------------------------


def run_pretrain(
    recipe: PretrainRecipe,
    out: str | os.PathLike | None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress=None,
) -> PretrainResult:
    """Train (or continue) a DEO run in ``out``; returns what the run folder holds afterwards
    (``result.rank`` is this process's rank: under torchrun every rank returns)."""
    rank = int(os.environ["RANK"]) if ddp.launched_by_torchrun() else 0
    if rank != 0:
        logging.getLogger("deo_cli").setLevel(logging.WARNING)  # only rank 0 reports
    plan = plan_pretrain(recipe, out, resume=resume, overwrite=overwrite)
    t0 = time.time()
    local_procs = (
        int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if ddp.launched_by_torchrun() else plan.world_size
    )
    threads = ddp.cpu_threads(local_procs, recipe.data.num_workers) if plan.device.type == "cpu" else None
    if ddp.launched_by_torchrun():
        env = ddp.torchrun_env(plan.device)
        if env.is_main and recipe.gpus != 1:
            log.info("started by torchrun (%d processes): --gpus is ignored", env.world_size)
        ddp.init_process_group(env, "env://")
        try:
            with ddp.torch_threads(threads):
                train(env, progress if env.is_main else None, plan)
        finally:
            ddp.cleanup()
    elif plan.world_size > 1:
        ddp.spawn(train, (plan,), plan.world_size, plan.device, progress, threads=threads)
    else:
        with ddp.torch_threads(threads):
            train(ddp.DistEnv(0, 1, 0, plan.device), progress, plan)
    return dataclasses.replace(summarize_run(plan.out, time.time() - t0), rank=rank)


def summarize_run(out: str | os.PathLike, seconds: float = 0.0) -> PretrainResult:
    """A :class:`PretrainResult` from a run folder's metrics log and checkpoints."""
    out = Path(out)
    rows = read_metrics(out / "metrics.jsonl") if (out / "metrics.jsonl").exists() else []
    steps = [r for r in rows if "loss" in r]
    end = [r for r in rows if r.get("event") == "end"]
    speeds = [r["img_per_s"] for r in steps if r.get("img_per_s")]
    return PretrainResult(
        out=out,
        steps=int(end[-1]["step"]) if end else (int(steps[-1]["step"]) if steps else 0),
        total_steps=int(end[-1]["total_steps"]) if end else 0,
        checkpoint=latest_checkpoint(out),
        metrics=out / "metrics.jsonl",
        first_loss=steps[0]["loss"] if steps else None,
        last_loss=steps[-1]["loss"] if steps else None,
        images_per_s=sum(speeds) / len(speeds) if speeds else None,
        seconds=seconds,
    )


# ---------------------------------------------------------------------------------------------
# Building the pieces
# ---------------------------------------------------------------------------------------------


def build_loss(recipe: PretrainRecipe, world_size: int) -> DeoLoss:
    """DEO's loss from the recipe: all weights 1 (docs/method.md §2.8); the coding rate uses each
    process's covariance with N = processes x chunks (docs/method.md §2.6)."""
    c = recipe.loss
    # Chunks of `expansion_chunk` samples; a smaller per-process batch is one chunk.
    chunks = max(1, recipe.batch_size // c.expansion_chunk) if c.expansion_chunk else 1
    return DeoLoss(
        compression=c.compression,
        coding_rate=c.expansion,
        distill_cls=c.distill_cls,
        distill_patch_mid=c.distill_patch,
        distill_patch_late=c.distill_patch,
        eps=c.eps,
        world_size=world_size * chunks,
        chunks=chunks,
    )


def build_optical_teacher(plan: RunPlan) -> OpticalTeacher:
    """The frozen optical teacher with the recipe's weights (``random`` for tests) and blocks."""
    t = plan.recipe.teacher
    teacher = build_teacher(plan.teacher_name, weights=t.weights)
    if t.layers:
        uri, sha = teacher.weights_uri, teacher.weights_sha256
        teacher = OpticalTeacher(teacher.model, tuple(t.layers), plan.teacher_name)
        teacher.weights_uri, teacher.weights_sha256 = uri, sha
    return teacher


def build_models(plan: RunPlan, world_size: int):
    """Student (encoder + heads), EMA teacher, optical teacher (or None) and loss, on the CPU."""
    r = plan.recipe
    overrides = {} if r.model.drop_path is None else {"drop_path_rate": r.model.drop_path}
    init = None if r.model.init == "random" else r.model.init
    encoder = build_encoder(r.model.name, weights=init, **overrides)
    loss = build_loss(r, world_size)
    optical = build_optical_teacher(plan) if distill_active(loss) else None
    teacher_dim = optical.embed_dim if optical is not None else 768
    student = build_student(
        encoder,
        teacher_dim,
        ms_dim=r.model.ms_dim,
        hidden_dim=r.model.head_hidden_dim,
        distill=optical is not None,
    )
    ema = build_teacher_from_student(student)
    return student, ema, optical, loss


def build_data(plan: RunPlan, env: ddp.DistEnv):
    """The dataset and this process's loader over its shard."""
    r = plan.recipe
    dataset = PretrainDataset(
        plan.data.sources,
        plan.bands,
        build_multicrop(r.crops, get_model_spec(r.model.name).manifest),
        band_names=r.data.band_names,
        nodata=r.data.nodata,
        unit_factor=plan.data.unit_factor,
        window_size=r.data.window_size,
        windows_per_scene=r.data.windows_per_scene,
        max_nodata_fraction=r.data.max_nodata_fraction,
        seed=r.seed,
    )
    loader, sampler = build_pretrain_loader(
        dataset,
        r.batch_size,
        num_workers=r.data.num_workers,
        rank=env.rank,
        world_size=env.world_size,
        seed=r.seed,
        pin_memory=env.device.type == "cuda",
    )
    return dataset, loader, sampler


def _to_device(batch: dict, device: torch.device) -> dict:
    nb = device.type == "cuda"
    return {
        k: (v.to(device, non_blocking=nb) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()
    }


def _param_digest(module: nn.Module) -> str:
    """SHA-256 of every parameter's bytes (ranks must end with identical weights)."""
    h = hashlib.sha256()
    for name, p in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


#: Recipe keys a resumed run may change without changing what it computes.
RESUMABLE_CHANGES = (
    "max_steps",
    "checkpoint_every",
    "keep_checkpoints",
    "log_every",
    "log_samples",
    "data.num_workers",
)


def _recipe_changes(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ (other than :data:`RESUMABLE_CHANGES`)."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b, dotted = old.get(key), new.get(key), prefix + str(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _recipe_changes(a, b, dotted + ".")
        elif a != b and dotted not in RESUMABLE_CHANGES:
            out.append(dotted)
    return out


def _prepare_run_folder(plan: RunPlan) -> None:
    ensure_folder(plan.out)
    if plan.overwrite:
        for p in list_checkpoints(plan.out):
            p.unlink()
        for f in RUN_FILES:
            (plan.out / f).unlink(missing_ok=True)


def prepare_device(device: torch.device) -> None:
    """Process settings for training on ``device``: on CUDA, cuDNN picks kernels for the fixed crop
    shapes and fp32 matmuls may use TF32; on the CPU, freed activations are kept for the next step
    (:func:`deo_cli.runtime.keep_freed_memory`)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.set_float32_matmul_precision("high")
    elif device.type == "cpu" and keep_freed_memory():
        log.debug("CPU training: freed memory is kept for the next step (glibc mallopt)")


def train_step(
    meta: DeoMetaArch,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    batch: dict,
    *,
    clip_grad: float,
    momentum: float,
    precision: torch.dtype | None = None,
    step: int = 0,
) -> dict[str, torch.Tensor]:
    """One optimisation step (docs/method.md §2.6-2.9): forward all crops under autocast, backward (through
    the gradient scaler for fp16), clip every gradient to ``clip_grad`` on its own, AdamW step, EMA
    update of the teacher with ``momentum``. ``precision``: the autocast dtype (None: fp32). Returns the
    loss terms."""
    device = batch["global"].device
    # the last step's gradients go before the forward pass, not after it: their memory is free for
    # its activations
    optimizer.zero_grad(set_to_none=True)
    with autocast(device, precision):
        terms = meta(batch)
    loss = terms["total"]
    if not torch.isfinite(loss.detach()).item():
        raise TrainingError(
            f"the loss is {loss.item()} at step {step + 1}",
            "lower optim.lr or use --precision fp32; resume from the last checkpoint with --resume",
        )
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        clip_gradients(meta.student_module, clip_grad)
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        clip_gradients(meta.student_module, clip_grad)
        optimizer.step()
    ema_update(meta.ema_teacher, meta.student_module, momentum)
    return terms


# ---------------------------------------------------------------------------------------------
# The loop (one process / rank)
# ---------------------------------------------------------------------------------------------


def train(env: ddp.DistEnv, progress, plan: RunPlan) -> None:
    """Train as rank ``env.rank`` of ``env.world_size`` (module docstring)."""
    r = plan.recipe
    device = env.device
    progress = progress if (progress is not None and env.is_main) else NullProgress()

    prepare_device(device)

    # -- models: identical on every rank (same seed), then moved to the device -----------------
    seed_everything(r.seed)
    student, ema, optical, loss_fn = build_models(plan, env.world_size)
    student.to(device)
    ema.to(device)
    if optical is not None:
        optical.to(device)
    optimizer = build_optimizer(student, betas=r.optim.betas, fused=r.optim.fused, device=device)
    scaler = torch.amp.GradScaler(device.type) if plan.precision is torch.float16 else None

    # -- data and schedules --------------------------------------------------------------------
    dataset, loader, sampler = build_data(plan, env)
    steps_per_epoch = sampler.num_samples // r.batch_size
    global_batch = r.batch_size * env.world_size
    schedules = build_schedules(
        lr=r.optim.lr,
        min_lr=r.optim.min_lr,
        warmup_epochs=r.optim.warmup_epochs,
        weight_decay=r.optim.weight_decay,
        weight_decay_end=r.optim.weight_decay_end,
        momentum=r.optim.momentum,
        momentum_end=r.optim.momentum_end,
        epochs=r.epochs,
        steps_per_epoch=steps_per_epoch,
        global_batch=global_batch,
    )
    total_steps = schedules.total_steps
    stop_step = min(total_steps, r.max_steps) if r.max_steps else total_steps

    # -- resume: weights, optimiser, scaler, step, RNG states -----------------------------------
    step = 0
    if plan.resume_from is not None:
        ckpt = load_checkpoint(plan.resume_from)
        restore_training_state(ckpt, student=student, teacher=ema, optimizer=optimizer, scaler=scaler)
        step = int(ckpt["step"])
        changed = _recipe_changes(ckpt.get("recipe") or {}, recipe_to_dict(r))
        if changed:
            log.warning("resuming with a recipe that differs from the run's in %s", ", ".join(changed))
        if ckpt.get("data", {}).get("fingerprint") != plan.data.fingerprint:
            log.warning(
                "the data differs from the checkpoint's: the resumed run will not repeat the original"
            )
        if int(ckpt.get("steps_per_epoch", steps_per_epoch)) != steps_per_epoch:
            log.warning(
                "steps per epoch changed (%s -> %d): schedules differ",
                ckpt.get("steps_per_epoch"),
                steps_per_epoch,
            )
        rngs = ckpt.get("rng") or []
        if len(rngs) == env.world_size:
            set_rng_state(rngs[env.rank])
        else:
            log.warning(
                "the checkpoint was written by %d processes, this run has %d: RNG reseeded",
                len(rngs),
                env.world_size,
            )
            seed_everything(r.seed + env.rank + step)
        del ckpt
    else:
        seed_everything(r.seed + env.rank)  # stochastic depth differs between ranks

    # -- wrap the student: DDP across processes, optionally torch.compile ------------------------
    model: nn.Module = student
    if env.world_size > 1:
        model = nn.parallel.DistributedDataParallel(
            student,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=not all(loss_fn.active(t) for t in loss_fn.weights),
            broadcast_buffers=False,
        )
    compiled = resolve_compile(r.compile, device)  # auto: CUDA only (inductor takes minutes on a CPU)
    if compiled:
        model = torch.compile(model, dynamic=False)
    meta = DeoMetaArch(model, student, ema, optical, loss_fn, ema_drop_path=r.model.ema_drop_path).train()

    # -- the first batch, read before anything is written: data that cannot give one (every window
    # mostly nodata, found only by reading) stops the run without leaving a run folder behind ---
    epoch, in_epoch = divmod(step, steps_per_epoch)
    sampler.set_epoch(epoch, start=in_epoch * r.batch_size)
    batches = iter(loader)
    first = next(batches) if step < stop_step else None  # a fresh epoch slice holds >= 1 batch

    # -- the run folder (rank 0 only, once every rank has validated it) ---------------------------
    ddp.barrier()
    if env.is_main:
        _prepare_run_folder(plan)
        save_recipe(r, plan.out / "recipe.yaml", "pretrain")
    ddp.barrier()
    metrics = MetricsLog(
        plan.out / "metrics.jsonl", enabled=env.is_main, resume_step=step if plan.resume_from else None
    )
    metrics.write(
        {
            "event": "resume" if plan.resume_from else "start",
            "step": step,
            "total_steps": total_steps,
            "stop_step": stop_step,
            "steps_per_epoch": steps_per_epoch,
            "world_size": env.world_size,
            "global_batch": global_batch,
            "samples": len(dataset),
            "device": str(device),
            "precision": precision_name(plan.precision),
            "compile": compiled,
            "recipe_hash": recipe_hash(r),
            "time": time.time(),
        }
    )
    log.info(
        "%s %s: %d samples, %d steps/epoch x %d epochs, global batch %d, %s %s%s, %d process(es)",
        f"resuming at step {step}:" if step else "training",
        r.model.name,
        len(dataset),
        steps_per_epoch,
        r.epochs,
        global_batch,
        device,
        precision_name(plan.precision),
        ", compiled" if compiled else "",
        env.world_size,
    )

    def checkpoint() -> None:
        rngs = ddp.all_gather_object(rng_state())  # every rank takes part
        if not env.is_main:
            return
        path = save_checkpoint(
            checkpoint_path(plan.out, step),
            student=student,
            teacher=ema,
            optimizer=optimizer,
            scaler=scaler,
            step=step,
            epoch=step // steps_per_epoch,
            step_in_epoch=step % steps_per_epoch,
            steps_per_epoch=steps_per_epoch,
            total_steps=total_steps,
            rng=rngs,
            data={"samples": len(dataset), "fingerprint": plan.data.fingerprint, "unit": plan.data.unit},
            recipe=recipe_to_dict(r),
            world_size=env.world_size,
            optical_teacher={
                "name": plan.teacher_name,
                "weights": getattr(optical, "weights_uri", None),
                "sha256": getattr(optical, "weights_sha256", None),
            },
        )
        prune_checkpoints(plan.out, r.keep_checkpoints)
        metrics.write({"event": "checkpoint", "step": step, "path": path.name, "time": time.time()})
        log.info("step %d: checkpoint %s", step, path.name)

    # -- the loop ---------------------------------------------------------------------------------
    progress.start(stop_step - step, f"pretrain {r.model.name}")
    window_start, window_steps = time.perf_counter(), 0
    while step < stop_step:
        try:
            batch, first = (first, None) if first is not None else (next(batches), None)
        except StopIteration:  # next epoch
            epoch += 1
            sampler.set_epoch(epoch)
            batches = iter(loader)
            continue

        lr, wd = apply_schedules(optimizer, schedules, step)
        momentum = float(schedules.momentum[step])
        batch = _to_device(batch, device)
        terms = train_step(
            meta,
            optimizer,
            scaler,
            batch,
            clip_grad=r.optim.clip_grad,
            momentum=momentum,
            precision=plan.precision,
            step=step,
        )
        step += 1
        window_steps += 1

        if r.log_samples:
            indices = ddp.all_gather_object(batch["index"].tolist())
            metrics.write({"event": "samples", "step": step, "epoch": epoch, "indices": indices})
        if step % r.log_every == 0 or step == stop_step:
            values = ddp.all_reduce_mean({k: v for k, v in terms.items()})
            elapsed = time.perf_counter() - window_start
            img_s = window_steps * global_batch / elapsed if elapsed > 0 else None
            row = {
                "step": step,
                "epoch": round(step / steps_per_epoch, 4),
                "loss": values.pop("total"),
                **values,
                "lr": lr,
                "wd": wd,
                "momentum": momentum,
                "img_per_s": img_s,
                "time": time.time(),
            }
            if device.type == "cuda":
                row["max_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
            metrics.write(row)
            shown = {SHORT[k]: v for k, v in values.items() if k in SHORT}
            progress.advance(window_steps, loss=row["loss"], **shown, lr=lr, img_s=img_s or 0.0)
            window_steps = 0
        if step % r.checkpoint_every == 0 or step == stop_step:
            checkpoint()
        if window_steps == 0:  # a new timing window starts after logging (and checkpointing)
            window_start = time.perf_counter()
    progress.finish()

    digests = ddp.all_gather_object(_param_digest(student))
    if len(set(digests)) > 1:
        log.warning("processes ended with different weights: %s", digests)
    metrics.write(
        {
            "event": "end",
            "step": step,
            "total_steps": total_steps,
            "rank_param_digests": digests,
            "time": time.time(),
        }
    )
    log.info("finished at step %d of %d; run folder %s", step, total_steps, plan.out)


__all__ = [
    "PretrainResult",
    "RunPlan",
    "TrainingError",
    "build_loss",
    "build_models",
    "plan_pretrain",
    "prepare_device",
    "resolve_teacher_name",
    "run_pretrain",
    "summarize_run",
    "train",
    "train_step",
]
