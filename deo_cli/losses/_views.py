"""Shared helpers: stacking views and DINO-style cross-view cosine pairs (docs/method.md §2.6-2.7)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def stack_views(views: Sequence[Tensor] | Tensor, what: str) -> Tensor:
    """``V`` tensors of shape ``(B, D)`` (or one ``(V, B, D)`` tensor) -> ``(V, B, D)`` float32."""
    if isinstance(views, Tensor):
        if views.ndim != 3:
            raise ValueError(f"{what}: expected (views, batch, dim), got shape {tuple(views.shape)}")
        return views.float()
    if len(views) == 0:
        raise ValueError(f"{what}: no views")
    return torch.stack([v.float() for v in views])


def cross_view_cosine(student: Sequence[Tensor] | Tensor, teacher: Sequence[Tensor] | Tensor) -> Tensor:
    """Mean cosine over DINO's cross-view pairs, same-view pairs excluded.

    ``teacher`` holds the ``G`` global views, ``student`` all ``V`` views with the same ``G``
    global views first. Returns

        1 / (G V - G) * sum_{g < G} sum_{v != g} mean_b cos(teacher[g, b], student[v, b])

    The teacher side is treated as a constant (detached).
    """
    s = F.normalize(stack_views(student, "student views"), dim=-1)
    t = F.normalize(stack_views(teacher, "teacher views").detach(), dim=-1)
    g, b = t.shape[0], t.shape[1]
    v = s.shape[0]
    if s.shape[1:] != t.shape[1:]:
        raise ValueError(
            f"student views {tuple(s.shape)} and teacher views {tuple(t.shape)} differ in batch or width"
        )
    if g > v or v < 2:
        raise ValueError(f"need at least as many student views ({v}) as teacher views ({g}), and two views")
    sims = torch.einsum("gbd,vbd->gv", t, s) / b  # (G, V): mean over the batch of the cosine
    keep = torch.ones_like(sims)
    keep[torch.arange(g), torch.arange(g)] = 0.0
    return (sims * keep).sum() / (g * v - g)
