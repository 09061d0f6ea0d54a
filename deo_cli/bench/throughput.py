"""``deo bench --suite throughput``: images/s and peak memory of the encoder's forward.

The model's ``forward`` (all feature maps) on random normalised input of ``batch_size`` x
``bands`` x ``image_size`` x ``image_size``, in eval mode under ``no_grad`` and the run's
precision; ``warmup`` batches are run first and not timed (cuDNN autotuning, allocator
warm-up), then ``iterations`` batches are timed, with a device synchronisation before the clock
stops. Peak memory is ``torch.cuda.max_memory_allocated`` over the timed batches on a GPU
(reset after the warm-up); on the CPU it is the process's peak resident set size (``VmHWM``),
reset after the warm-up where Linux allows (``/proc/self/clear_refs``), else the lifetime peak.
"""

from __future__ import annotations

import contextlib
import logging
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from deo_cli.bench.context import BenchContext
from deo_cli.errors import UsageError
from deo_cli.runtime import autocast

__all__ = ["ThroughputResult", "measure_forward", "run_throughput"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ThroughputResult:
    images_per_s: float
    seconds_per_batch: float
    peak_memory_mib: float
    memory_kind: str  # "cuda_max_allocated", "rss_peak" or "rss_peak_lifetime"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _reset_rss_peak() -> bool:
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")
        return True
    return False


def _rss_peak_mib() -> float:
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return float(line.split()[1]) / 1024.0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024.0  # bytes on macOS, KiB on Linux


@torch.no_grad()
def measure_forward(
    encoder: nn.Module,
    batch_size: int,
    image_size: int,
    channels: int,
    device: torch.device,
    dtype: torch.dtype | None = None,
    warmup: int = 5,
    iterations: int = 20,
    seed: int = 0,
) -> ThroughputResult:
    """Time ``encoder(x)`` on a fixed random batch; see the module docstring."""
    encoder.eval().to(device)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, channels, image_size, image_size, generator=gen).to(device)
    for _ in range(warmup):
        with autocast(device, dtype):
            encoder(x)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        kind = "cuda_max_allocated"
    else:
        kind = "rss_peak" if _reset_rss_peak() else "rss_peak_lifetime"
    start = time.perf_counter()
    for _ in range(iterations):
        with autocast(device, dtype):
            encoder(x)
    _sync(device)
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else _rss_peak_mib()
    return ThroughputResult(batch_size * iterations / elapsed, elapsed / iterations, peak, kind)


def run_throughput(ctx: BenchContext) -> None:
    """Measure the encoder and write an ``images_per_s`` and a ``peak_memory_mib`` row."""
    r = ctx.recipe
    enc = ctx.encoder
    spec = getattr(enc, "spec", None)
    size = r.image_size or (spec.input_size if spec is not None else 224)
    if r.throughput.input == "rgb":
        if not getattr(enc, "has_rgb_stem", False):
            raise UsageError(f"{r.model.name} has no RGB stem", "use --set throughput.input=ms")
        manifest = enc.rgb_manifest
    else:
        manifest = enc.manifest
    seed = r.seeds[0]
    unit = {
        "dataset": "synthetic",
        "protocol": "forward",
        "partition": f"batch{r.runtime.batch_size}",
        "seed": seed,
        "bands": ",".join(manifest.bands),
        "image_size": size,
        "normalization": "none",
    }
    if ctx.is_done(**unit):
        return
    res = measure_forward(
        enc,
        r.runtime.batch_size,
        size,
        len(manifest.bands),
        ctx.device,
        ctx.dtype,
        r.throughput.warmup,
        r.throughput.iterations,
        seed,
    )
    log.info(
        "%s forward at %d px, batch %d on %s: %.1f images/s (%.4f s/batch), peak memory %.0f MiB (%s)",
        r.model.name,
        size,
        r.runtime.batch_size,
        ctx.device,
        res.images_per_s,
        res.seconds_per_batch,
        res.peak_memory_mib,
        res.memory_kind,
    )
    common = {
        **unit,
        "task": "throughput",
        "batch_size": r.runtime.batch_size,
        "n_test": r.runtime.batch_size * r.throughput.iterations,
        "seconds": round(res.seconds_per_batch * r.throughput.iterations, 4),
    }
    ctx.emit(
        [
            {**common, "metric": "images_per_s", "value": res.images_per_s},
            {**common, "metric": f"peak_memory_mib:{res.memory_kind}", "value": res.peak_memory_mib},
        ]
    )
