"""Model FLOPs and model FLOP utilisation (MFU) for the benchmarks.

MFU = (FLOPs the model's step needs) / (step time) / (the GPU's peak dense 16-bit tensor FLOP/s).
The FLOPs are counted, not estimated: :func:`count_flops` runs the step once under
``torch.utils.flop_counter.FlopCounterMode``, which adds up every matrix product, convolution and
attention kernel that runs (forward and backward; element-wise work such as the optimiser's
counts nothing), whatever the device or precision. The peak comes from :data:`PEAK_16BIT_FLOPS`
by the name ``torch.cuda.get_device_name`` gives; a GPU not listed gets ``None`` (no MFU), with
its name recorded.
"""

from __future__ import annotations

from collections.abc import Callable

#: Dense (no structured sparsity) bf16/fp16 tensor-core peak, FLOP/s, per GPU, from NVIDIA's data
#: sheets; matched as a substring of the device name, first match first (so ``H100 PCIe`` before
#: ``H100``, ``A100`` before ``A10``). ``None``: known not to be listed reliably.
PEAK_16BIT_FLOPS: tuple[tuple[str, float | None], ...] = (
    ("GH200", 989.4e12),
    ("H200 NVL", 835.5e12),
    ("H200", 989.4e12),
    ("H100 PCIe", 756.5e12),
    ("H100 NVL", 835.5e12),
    ("H100", 989.4e12),  # SXM: "NVIDIA H100 80GB HBM3"
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A10G", None),
    ("A10", 125e12),
    ("L40S", 362.05e12),
    ("L40", 181.05e12),
    ("L4", 121e12),
    ("V100", 125e12),  # fp16 only (no bf16 tensor cores)
    ("T4", 65e12),  # fp16 only
)


def peak_flops(device_name: str | None) -> tuple[float | None, str | None]:
    """``(peak FLOP/s, the table entry matched)`` for a CUDA device name; ``(None, None)`` when
    the name is not in :data:`PEAK_16BIT_FLOPS`."""
    if not device_name:
        return None, None
    for key, peak in PEAK_16BIT_FLOPS:
        if key.lower() in device_name.lower():
            return peak, key
    return None, None


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of everything ``fn()`` runs (forward and, if it calls it, backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def mfu(flops: float, seconds: float, peak: float | None) -> float | None:
    """Model FLOP utilisation: ``flops`` done in ``seconds`` over ``peak`` FLOP/s (None if unknown)."""
    if not peak or not seconds or seconds <= 0:
        return None
    return flops / seconds / peak
