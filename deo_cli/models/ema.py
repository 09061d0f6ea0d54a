"""DEO's multispectral EMA teacher (docs/method.md §2.6).

The teacher holds a copy of the student's backbone, multispectral stem and ``head_ms`` (no RGB
stem, no distillation heads), starts equal to the student and follows it after every step::

    theta_t <- m * theta_t + (1 - m) * theta_s

with ``m`` following :func:`deo_cli.train.schedules.cosine_schedule` from 0.996 to 1
(docs/method.md §2.6, §2.9). It sees only the two global multispectral crops.

Note (docs/method.md §2.6): the official code never puts its teacher in eval mode, so stochastic depth
stays active in the teacher's forward pass. Whether to copy that is the trainer's choice
(``teacher.train()`` / ``teacher.eval()``); this module does not decide it.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

#: Wrappers whose names do not belong to the parameter (DDP, torch.compile).
_WRAPPER_TOKENS = ("module.", "_orig_mod.")


def _clean(name: str) -> str:
    for token in _WRAPPER_TOKENS:
        name = name.replace(token, "")
    return name


class EmaTeacher(nn.Module):
    """Frozen copy of ``encoder`` (its RGB stem removed) and ``head_ms``.

    ``forward(x_ms) -> (B, ms_dim)``: ``head_ms(encoder.forward_pooled(x_ms))``, L2-normalised.
    Parameter names are ``encoder.*`` and ``head_ms.*``, so :func:`ema_update` pairs them with a
    student module exposing the same two attributes (e.g.
    ``nn.ModuleDict({"encoder": encoder, "head_ms": heads["head_ms"]})``, or the trainer's
    student wrapped in DDP / ``torch.compile``).
    """

    def __init__(self, encoder: nn.Module, head_ms: nn.Module):
        super().__init__()
        self.encoder = copy.deepcopy(encoder)
        self.encoder.remove_rgb_stem()
        self.head_ms = copy.deepcopy(head_ms)
        self.requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        return self.head_ms(self.encoder.forward_pooled(x))


def build_ema_teacher(encoder: nn.Module, head_ms: nn.Module) -> EmaTeacher:
    """The EMA teacher for a student ``encoder`` and its ``head_ms`` (docs/method.md §2.6)."""
    return EmaTeacher(encoder, head_ms)


def _matched(teacher_items, student_items, kind: str) -> tuple[list[Tensor], list[Tensor]]:
    student = {_clean(n): t for n, t in student_items}
    t_list, s_list = [], []
    for name, tensor in teacher_items:
        key = _clean(name)
        if key not in student:
            raise KeyError(f"EMA: teacher {kind} {name!r} has no counterpart in the student")
        src = student[key]
        if src.shape != tensor.shape:
            raise ValueError(
                f"EMA: {kind} {name!r} is {tuple(tensor.shape)} in the teacher, {tuple(src.shape)} in the student"
            )
        t_list.append(tensor)
        s_list.append(src.detach())
    return t_list, s_list


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """``theta_t <- m theta_t + (1 - m) theta_s`` for every teacher parameter (matched by name,
    ignoring ``module.`` / ``_orig_mod.`` wrappers); buffers are copied from the student.

    Student parameters the teacher lacks (RGB stem, distillation heads) are ignored.
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"EMA momentum must lie in [0, 1], got {momentum}")
    t_params, s_params = _matched(teacher.named_parameters(), student.named_parameters(), "parameter")
    if t_params:
        weight = 1.0 - float(momentum)
        s_params = [s.to(t.dtype) for t, s in zip(t_params, s_params, strict=True)]
        if all(t.device == s.device for t, s in zip(t_params, s_params, strict=True)):
            torch._foreach_lerp_(t_params, s_params, weight)
        else:  # pragma: no cover - teacher and student on different devices
            for t, s in zip(t_params, s_params, strict=True):
                t.lerp_(s.to(t.device), weight)
    t_bufs, s_bufs = _matched(teacher.named_buffers(), student.named_buffers(), "buffer")
    for t, s in zip(t_bufs, s_bufs, strict=True):
        t.copy_(s)
