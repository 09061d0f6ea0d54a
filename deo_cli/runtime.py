"""Where and how to compute: device, precision, seeds. Shared by train/, infer/, tasks/ and bench/.

``--device auto`` takes a CUDA GPU when there is one (then Apple's MPS), else the CPU.
``--precision auto`` is bf16 autocast on GPUs that support it, fp16 autocast (with a gradient
scaler when training) on older GPUs, and fp32 on the CPU (docs/method.md §2.9 trains in fp16 AMP).
``compile: auto`` (training) is ``torch.compile`` on CUDA and eager elsewhere: on the CPU, inductor
takes minutes before the first step and gains little.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import random
import sys
from dataclasses import dataclass

import numpy as np
import torch

from deo_cli.errors import UsageError

log = logging.getLogger(__name__)

#: Up to this many CPU cores, inference reads rasters in the main process by default: DataLoader
#: workers would take cores from torch's threads, which wait for each other at every operation.
#: Measured on 2 cores (deo_swin_t, 2k x 2k scene, benchmarks/embed.py): the forward pass ran
#: ~15 % slower beside two reading workers, and end-to-end throughput was 8.4-8.7 chips/s with
#: them against 10.2-10.3 without.
FEW_CPUS = 4

_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(spec: str = "auto") -> torch.device:
    """A torch device for ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``; clear errors otherwise."""
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError as e:
        raise UsageError(f"unknown device {spec!r}", "use auto, cpu, cuda, cuda:N or mps") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(
                "--device cuda was asked for but no CUDA GPU is visible", "use --device auto or cpu"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(
                f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) visible",
                "pick an index below that, or set CUDA_VISIBLE_DEVICES",
            )
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UsageError("--device mps was asked for but MPS is not available", "use --device auto or cpu")
    return dev


def check_gpus(gpus: int, spec: str, device: torch.device) -> None:
    """``--gpus N`` (N processes) against the device: enough CUDA devices; on a machine without
    a GPU, N CPU processes only when ``--device cpu`` says so (``auto`` falling back to the CPU
    would otherwise start N processes where the user expected N GPUs)."""
    if gpus < 1:
        raise UsageError(f"--gpus {gpus} is not a process count", "pass --gpus 1 or more")
    if gpus == 1:
        return
    if device.type == "cuda" and gpus > torch.cuda.device_count():
        raise UsageError(
            f"--gpus {gpus} but only {torch.cuda.device_count()} CUDA device(s) are visible",
            "lower --gpus, or check CUDA_VISIBLE_DEVICES",
        )
    if device.type == "mps":
        raise UsageError("several processes on Apple MPS are not supported", "use --gpus 1")
    if device.type == "cpu" and (spec or "auto").strip().lower() == "auto":
        raise UsageError(
            f"--gpus {gpus} but no GPU is visible",
            f"pass --device cpu to run {gpus} CPU processes (gloo) on purpose, or leave out --gpus",
        )


def resolve_precision(spec: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``spec`` on ``device`` (``None`` = fp32, no autocast)."""
    spec = (spec or "auto").strip().lower()
    if spec not in ("auto", *_DTYPES):
        raise UsageError(f"unknown precision {spec!r}", "use auto, fp32, bf16 or fp16")
    if spec == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return None
    dtype = _DTYPES[spec]
    if dtype is torch.float16 and device.type == "cpu":
        raise UsageError(
            "fp16 autocast is not supported on the CPU", "use --precision bf16 or fp32 on the CPU"
        )
    return dtype


def resolve_compile(spec: bool | str, device: torch.device) -> bool:
    """Whether to ``torch.compile`` for ``spec`` (``auto``: on CUDA only; ``True``/``False`` as given)."""
    if isinstance(spec, str):
        if spec.strip().lower() != "auto":
            raise UsageError(f"unknown compile setting {spec!r}", "use auto, true or false")
        return device.type == "cuda"
    return bool(spec)


def keep_freed_memory() -> bool:
    """Let glibc's malloc keep memory that torch frees for the next allocation instead of giving it
    back to the kernel (``mallopt``: no ``mmap`` for large blocks, no trimming of the heap).

    A CPU training step allocates and frees the same few GiB of activations every step; by default
    each block above glibc's mmap threshold (at most 32 MiB) is unmapped when freed and faulted in
    and zeroed by the kernel again on the next step. Measured on 2 cores (Swin-T, batch 8,
    benchmarks/pretrain_step.py): 0.5-1.6 s of system time a step without, 0.1 s with, 11 % less
    step time; peak memory the same. The setting holds for the rest of the process (its resident
    size no longer shrinks). Returns whether it was applied (glibc on Linux only)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    # -1: never trim (man mallopt); 0 mmap'ed blocks at a time: everything from the reused heap
    return mallopt(m_mmap_max, 0) == 1 and mallopt(m_trim_threshold, -1) == 1


def precision_name(dtype: torch.dtype | None) -> str:
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def autocast(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` for ``dtype`` on ``device``, or a no-op context for fp32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    os.environ.setdefault("PYTHONHASHSEED", str(seed))


def resolve_num_workers(value, device: torch.device) -> int:
    """Reading processes for ``runtime.num_workers``: an int as given; ``auto`` is 0 on a
    CPU ``device`` with at most :data:`FEW_CPUS` cores, else 2."""
    if value != "auto":
        return int(value)
    if device.type == "cpu" and (os.cpu_count() or 1) <= FEW_CPUS:
        return 0
    return 2


@dataclass(frozen=True)
class Runtime:
    """A recipe's ``runtime`` section with every ``auto`` resolved: the values torch is given.

    Every command resolves its section once, with :func:`resolve_runtime`, and hands this on;
    no raw recipe value (``"auto"``) reaches torch."""

    device: torch.device
    #: The autocast dtype (``None``: fp32, no autocast).
    precision: torch.dtype | None
    batch_size: int
    num_workers: int
    #: Chips per forward call; 0 sizes it per model (:func:`deo_cli.infer.runner.default_micro_batch`).
    micro_batch: int = 0
    seed: int = 0
    #: What was asked for (``auto``, ``cpu``, ``cuda:1``...), for checks that depend on it.
    device_spec: str = "auto"

    @property
    def precision_name(self) -> str:
        return precision_name(self.precision)


def resolve_runtime(section) -> Runtime:
    """:class:`Runtime` for a recipe's ``runtime`` section (``device``, ``precision``,
    ``batch_size``, ``num_workers``, ``micro_batch``, ``seed``): the one place ``auto`` is resolved."""
    device = resolve_device(section.device)
    return Runtime(
        device=device,
        precision=resolve_precision(section.precision, device),
        batch_size=int(section.batch_size),
        num_workers=resolve_num_workers(section.num_workers, device),
        micro_batch=int(getattr(section, "micro_batch", 0)),
        seed=int(section.seed),
        device_spec=str(section.device),
    )


def cpu_runtime(batch_size: int = 16, num_workers: int = 0) -> Runtime:
    """fp32 on the CPU (tests and callers that build their own models)."""
    return Runtime(torch.device("cpu"), None, batch_size, num_workers)
