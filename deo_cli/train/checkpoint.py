"""Pretraining checkpoints: written atomically, resumed exactly, exported as encoders.

A checkpoint is ``RUN/checkpoint-00001000.pt`` (the number is the count of finished steps), a
``torch.save`` dictionary that ``torch.load(weights_only=True)`` reads (tensors and plain values
only)::

    deo_format        "pretrain-v1"
    model, model_kwargs, manifest, rgb_manifest, deo_version     (models.weights.encoder_meta)
    student_encoder   state dict of the student encoder (both stems + trunk)
    teacher_encoder   state dict of the EMA teacher's encoder (MS stem + trunk; no RGB stem)
    student_heads     flat state dict of head_ms, cls_head, patch_head_mid, patch_head_late
    teacher_head_ms   flat state dict of the EMA teacher's head_ms
    optimizer         AdamW state dict;  scaler: GradScaler state dict or None
    step, epoch, step_in_epoch, steps_per_epoch
    rng               one dict per rank: python, numpy, torch, cuda generator states
    data              number of samples, scene-list fingerprint, unit
    recipe            the resolved recipe (plain dict); optical_teacher: name, weights, sha256

``student_encoder`` / ``teacher_encoder`` are what :func:`deo_cli.models.weights.read_encoder_weights`
reads (the EMA teacher by default; it borrows the student's RGB stem), so ``--weights RUN/checkpoint-…pt``
works in ``embed``/``segment``/``bench`` as it is, and :func:`export_encoder` writes the smaller
``encoder-v1`` file. Only the newest ``keep_checkpoints`` files are kept.
"""

from __future__ import annotations

import logging
import os
import random
import re
from pathlib import Path

import numpy as np
import torch

from deo_cli.errors import UsageError, WeightsError
from deo_cli.models import load_encoder
from deo_cli.models.weights import (
    PRETRAIN_FORMAT,
    atomic_torch_save,
    encoder_meta,
    read_checkpoint,
    save_encoder,
)

log = logging.getLogger(__name__)

_NAME = re.compile(r"^checkpoint-(\d+)\.pt$")


def checkpoint_path(out: str | os.PathLike, step: int) -> Path:
    return Path(out) / f"checkpoint-{step:08d}.pt"


def list_checkpoints(out: str | os.PathLike) -> list[Path]:
    """The run's checkpoints, oldest first."""
    out = Path(out)
    if not out.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out.iterdir() if (m := _NAME.match(p.name)) and p.is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(out: str | os.PathLike) -> Path | None:
    found = list_checkpoints(out)
    return found[-1] if found else None


def prune_checkpoints(out: str | os.PathLike, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` checkpoints (``keep <= 0`` keeps all); returns the deleted."""
    found = list_checkpoints(out)
    if keep <= 0 or len(found) <= keep:
        return []
    old = found[:-keep]
    for p in old:
        p.unlink(missing_ok=True)
    return old


# ---------------------------------------------------------------------------------------------
# Random number generator states (plain values, so weights_only loading works)
# ---------------------------------------------------------------------------------------------


def rng_state() -> dict:
    """This process's Python, NumPy, torch and CUDA generator states."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": {"version": version, "state": list(internal), "gauss": gauss},
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` captured."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state(
        (npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["cached"])
    )
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------
# Writing and reading
# ---------------------------------------------------------------------------------------------


def _cpu(sd: dict) -> dict:
    return {k: v.detach().cpu().clone() for k, v in sd.items()}


def save_checkpoint(path: str | os.PathLike, *, student, teacher, optimizer, scaler, **fields) -> Path:
    """Write a ``pretrain-v1`` checkpoint atomically (module docstring); ``fields`` adds step, rng, ..."""
    body = {
        "deo_format": PRETRAIN_FORMAT,
        **encoder_meta(student.encoder),
        "student_encoder": _cpu(student.encoder.state_dict()),
        "teacher_encoder": _cpu(teacher.encoder.state_dict()),
        "student_heads": _cpu(student.heads_state_dict()),
        "teacher_head_ms": _cpu(teacher.head_ms.state_dict()),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
    }
    body.update(fields)
    return atomic_torch_save(body, path)


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read a ``pretrain-v1`` checkpoint (safely: ``weights_only``); other files raise ``WeightsError``."""
    ckpt = read_checkpoint(path)
    if ckpt.get("deo_format") != PRETRAIN_FORMAT:
        raise WeightsError(
            f"{Path(path).name} is not a deo pretraining checkpoint (deo_format {ckpt.get('deo_format')!r})",
            "pass a checkpoint-*.pt file written by deo pretrain",
        )
    return ckpt


def restore_training_state(ckpt: dict, *, student, teacher, optimizer, scaler) -> None:
    """Load weights, optimiser and scaler states from ``ckpt`` into the (unwrapped) modules."""
    student_sd = {f"encoder.{k}": v for k, v in ckpt["student_encoder"].items()}
    student_sd.update(ckpt["student_heads"])
    try:
        student.load_state_dict(student_sd)
        teacher.encoder.load_state_dict(ckpt["teacher_encoder"])
        teacher.head_ms.load_state_dict(ckpt["teacher_head_ms"])
        optimizer.load_state_dict(ckpt["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise WeightsError(
            f"the checkpoint does not fit this run's model ({str(e).splitlines()[0]})",
            "resume with the recipe the run was started with (RUN/recipe.yaml)",
        ) from e
    if scaler is not None and ckpt.get("scaler") is not None:
        scaler.load_state_dict(ckpt["scaler"])


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------


def export_encoder(
    checkpoint: str | os.PathLike,
    output: str | os.PathLike,
    *,
    student: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write the EMA teacher's (or the student's) encoder of a pretraining checkpoint as ``encoder-v1``.

    The file holds the backbone, both stems (the teacher borrows the student's RGB stem) and the
    band manifests; ``--weights FILE`` loads it in ``embed``, ``segment`` and ``bench``.
    """
    from deo_cli.io.atomic import check_output

    checkpoint, output = Path(checkpoint), Path(output)
    if output.resolve() == checkpoint.resolve():
        raise UsageError("the export would overwrite its checkpoint", "choose another -o")
    check_output(output, overwrite)
    ckpt = load_checkpoint(checkpoint)
    which = "student" if student else "teacher"
    encoder = load_encoder(checkpoint, which=which)
    meta = {"source_checkpoint": checkpoint.name, "which": which, "step": int(ckpt.get("step", 0))}
    if isinstance(ckpt.get("recipe"), dict):
        meta["recipe"] = ckpt["recipe"]
    path = save_encoder(encoder, output, **meta)
    log.info("exported the %s encoder of %s (step %d) to %s", which, checkpoint.name, meta["step"], path)
    return path
