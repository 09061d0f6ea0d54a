"""SimDINO coding-rate expansion term (docs/method.md §2.6, ``expa_type = 1``).

For each global view ``g`` the student and teacher outputs of that view are averaged,
``W_g = (z^s_g + z^t_g) / 2`` (B x p), and::

    R = gamma * 1/G * sum_g 1/2 logdet(I_p + p / (B N eps) * W_g^T W_g)
    gamma = (p + N B) / (p N B)

with ``eps = 0.05`` (the code's eps plays the role of eps^2 in the SimDINO paper), ``B`` the
per-GPU batch and ``N`` the number of processes: each GPU uses only its own covariance
(``reduce_cov = 0``) but the scalar still divides by N. With B = 64, N = 4, p = 256:
p/(B N eps) = 20 and gamma = 1/128. The log-determinant is twice the sum of the log-diagonal of
a Cholesky factor, computed in float32. ``chunks > 1`` splits the batch into equal chunks and
averages their rates (one GPU reproducing a multi-GPU run, docs/method.md §2.6 [INFERRED]).
The loss is ``-R``; the teacher side is a constant.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from deo_cli.losses._views import stack_views
from deo_cli.losses.registry import register_loss

#: docs/method.md §2.6 (``--eps 0.05``).
DEFAULT_EPS = 0.05


def coding_rate(w: Tensor, eps: float = DEFAULT_EPS, world_size: int = 1) -> Tensor:
    """``gamma * 1/2 logdet(I + p/(B N eps) W^T W)`` for one ``(B, p)`` matrix ``W``."""
    b, p = w.shape
    n = world_size
    scale = p / (b * n * eps)
    gamma = (p + n * b) / (p * n * b)
    with torch.autocast(device_type=w.device.type, enabled=False):
        w = w.float()
        cov = torch.eye(p, device=w.device, dtype=w.dtype) + scale * (w.T @ w)
        chol = torch.linalg.cholesky(cov)
        logdet = 2.0 * torch.log(torch.diagonal(chol)).sum()
    return gamma * 0.5 * logdet


def _world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


@register_loss("coding_rate")
class CodingRateLoss(nn.Module):
    """``forward(student_globals, teacher_globals) -> -R``.

    Args:
        eps: the coding-rate precision (0.05).
        world_size: N; ``None`` reads it from ``torch.distributed`` (1 when not initialised).
        chunks: split each per-process batch into this many equal chunks (see module docstring).

    ``student_globals`` / ``teacher_globals``: the G global views' ``head_ms`` outputs, each
    ``(B, p)`` (a longer student list is cut to its first G views).
    """

    def __init__(self, eps: float = DEFAULT_EPS, world_size: int | None = None, chunks: int = 1):
        super().__init__()
        if eps <= 0:
            raise ValueError("eps must be positive")
        if chunks < 1:
            raise ValueError("chunks must be >= 1")
        self.eps = eps
        self.world_size = world_size
        self.chunks = chunks

    def rate(
        self, student_globals: Sequence[Tensor] | Tensor, teacher_globals: Sequence[Tensor] | Tensor
    ) -> Tensor:
        """R itself (positive; larger when the features spread out)."""
        t = stack_views(teacher_globals, "teacher globals").detach()
        s = stack_views(student_globals, "student globals")[: t.shape[0]]
        if s.shape != t.shape:
            raise ValueError(f"student globals {tuple(s.shape)} and teacher globals {tuple(t.shape)} differ")
        n = self.world_size or _world_size()
        w = (s + t) / 2
        b = w.shape[1]
        if b % self.chunks:
            raise ValueError(f"batch {b} does not split into {self.chunks} equal chunks")
        rates = [coding_rate(chunk, self.eps, n) for view in w for chunk in view.chunk(self.chunks, dim=0)]
        return torch.stack(rates).mean()

    def forward(
        self, student_globals: Sequence[Tensor] | Tensor, teacher_globals: Sequence[Tensor] | Tensor
    ) -> Tensor:
        return -self.rate(student_globals, teacher_globals)
