"""The Swin trunk's input-gradient products on the faster of the CPU's two fp32 kernels, per shape.

PyTorch's CPU build carries two fp32 matrix-product libraries: MKL (what ``torch.mm`` calls) and
oneDNN (``torch.ops.mkldnn._linear_pointwise``). Which is faster depends on the CPU and the
shape. A linear layer's input gradient ``grad @ weight`` (rows x out times out x in) is one
product where oneDNN was faster on every Swin-T shape on a 2-core AMD EPYC (Zen 4, AVX-512):
1.1-1.6x in isolation; inside training steps (in-process, alternating with MKL) those products
took 9-15 % less time (batch 2: 4.77 against 5.23 s over eight steps; batch 8: 6.36 against
7.46 s over four). So :func:`input_grad` times both kernels on the first product
of each shape (best of three after one warm-up call each) and keeps the faster, as cuDNN's
``benchmark`` mode does; the two agree to rounding (fp32 both; only the order of the sums
differs). Gradients are all that changes: the forward pass, and so the loss, never runs here.

Measured and left out: the products on the kept samples' row slices (stochastic depth; they stay
``torch.mm`` writing into one output of fixed size): oneDNN was 19 % faster there inside the step,
but its op returns a new tensor per slice, sized by the random draw, and the heap fragmented (a
benchmark step at batch 8 peaked at 10.5 GiB against 8.75 GiB, and was slower); the weight
gradients (``grad.T @ input``; MKL was faster on most shapes and, on the others, the choice made
in isolation was slower inside the step) and the forward products (oneDNN gives MKL's bits
only up to an inner dimension of about 192 and was slower inside the step there too;
every forward product on oneDNN, which moves the loss off the official one in its last bits, took
3 % off a batch-2 step in an in-process A/B on the Zen 4 host).

Everything else (CUDA, other dtypes, ``torch.compile``, a build without oneDNN, an fp32 matmul
precision other than ``highest``, products under 2^20 multiply-adds) calls ``torch.mm``.
``DEO_MATMUL=torch`` turns the choice off for the process, :func:`pinned` for a block (tests that
compare gradients bit for bit with torchvision's blocks, which take MKL's products).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

#: Products smaller than this (multiply-adds) call ``torch.mm``: timing them costs more than
#: either kernel could save.
MIN_MACS = 1 << 20

_choices: dict[tuple, bool] = {}  # (threads, shapes, strides) -> use oneDNN
_pinned = os.environ.get("DEO_MATMUL", "").strip().lower() == "torch"


def _onednn_op() -> Callable | None:
    try:
        if not torch.backends.mkldnn.is_available():
            return None
        return torch.ops.mkldnn._linear_pointwise
    except (AttributeError, RuntimeError):
        return None


_LP = _onednn_op()


@contextlib.contextmanager
def pinned() -> Iterator[None]:
    """``torch.mm`` (MKL on the CPU) for every product inside the block."""
    global _pinned
    before, _pinned = _pinned, True
    try:
        yield
    finally:
        _pinned = before


def choices() -> dict[tuple, str]:
    """The kernel chosen per key so far (``"onednn"`` or ``"mkl"``), for logs and benchmarks."""
    return {k: ("onednn" if v else "mkl") for k, v in _choices.items()}


def active(*tensors: Tensor) -> bool:
    """Whether products of these tensors get a choice of kernel (CPU, fp32, eager, not pinned)."""
    if _pinned or _LP is None or torch.compiler.is_compiling():
        return False
    if torch.get_float32_matmul_precision() != "highest":
        return False
    return all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)


def _best_seconds(fn: Callable[[], Tensor], repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _choose(key: tuple, mkl: Callable[[], Tensor], onednn: Callable[[], Tensor]) -> bool:
    """Time both kernels and keep the faster for ``key`` (MKL when oneDNN fails or disagrees in shape)."""
    try:
        a, b = mkl(), onednn()
        ok = a.shape == b.shape
    except RuntimeError:  # a layout the oneDNN op does not take
        ok = False
    use = ok and _best_seconds(onednn) < _best_seconds(mkl)
    _choices[key] = use
    return use


def input_grad(grad: Tensor, weight: Tensor) -> Tensor:
    """``grad @ weight`` (``grad``: ``(rows, out)``, ``weight``: ``(out, in)``, both 2-D): a linear
    layer's input gradient, on the faster kernel for its shape (equal to rounding)."""
    if (
        not active(grad, weight)
        or grad.dim() != 2
        or not weight.is_contiguous()
        or grad.shape[0] * weight.numel() < MIN_MACS
    ):
        return grad.mm(weight)
    key = (torch.get_num_threads(), tuple(grad.shape), grad.stride(), tuple(weight.shape))
    use = _choices.get(key)
    if use is None:
        use = _choose(key, lambda: grad.mm(weight), lambda: _onednn_mm(grad, weight))
    return _onednn_mm(grad, weight) if use else grad.mm(weight)


def _onednn_mm(grad: Tensor, weight: Tensor) -> Tensor:
    """``grad @ weight`` on oneDNN: ``linear(grad, weight.T)``."""
    return _LP(grad, weight.t(), None, "none", [], "")
