"""DEO's meta-architecture: the student, its two teachers and the forward pass to the loss terms.

This is the *what* of one training step (docs/method.md §2.6-2.8); the *how* (backward, clipping,
optimiser, EMA, schedules) is :mod:`deo_cli.train.loop`, as dinov3 splits ``ssl_meta_arch`` from
its train loop. A batch holds ``G`` global crops ``(G, B, C, S, S)`` and ``L`` local crops
``(L, B, C, s, s)`` of the multispectral input, channels 0-2 being R, G, B (docs/method.md §2.2):

- **student, multispectral pass**: all ``V = G + L`` crops through the MS stem and the trunk,
  pooled, ``head_ms`` -> ``z^s_v`` (B, 256);
- **EMA teacher** (backbone + MS stem + ``head_ms``): the ``G`` global crops -> ``z^t_g``;
- **student, RGB pass**: channels 0-2 of all crops through the RGB stem and the same trunk;
  ``cls_head`` on every crop's pooled vector; for the global crops also ``patch_head_mid`` /
  ``patch_head_late`` on the stage maps at ``spec.distill_levels`` (Swin stages 3 and 4);
- **optical teacher** (frozen DINOv3): channels 0-2 of the global crops -> its normed CLS and the
  normed patch tokens of its two chosen blocks;
- :class:`~deo_cli.losses.DeoLoss` -> ``{compression, coding_rate, distill_cls,
  distill_patch_mid, distill_patch_late, total}``.

Everything the optimiser updates lives in :class:`DeoStudent`, whose ``forward`` does the whole
student computation, so it can be wrapped once in DDP / ``torch.compile``. Its attributes
``encoder`` and ``head_ms`` are named as the EMA teacher's, so
:func:`~deo_cli.models.ema_update` pairs them by name.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from deo_cli.losses import DeoLoss
from deo_cli.models import DeoEncoder, EmaTeacher, OpticalTeacher, build_deo_heads, build_ema_teacher

DISTILL_TERMS = ("distill_cls", "distill_patch_mid", "distill_patch_late")


def _views(x: Tensor, n: int) -> list[Tensor]:
    """``(n * B, ...)`` -> ``n`` tensors ``(B, ...)`` (view-major, as the crops were flattened)."""
    return list(x.chunk(n, dim=0))


class DeoStudent(nn.Module):
    """The trainable part: encoder (two stems, shared trunk) and DEO's four heads.

    ``forward(global_crops, local_crops)`` returns the student's side of every loss term:
    ``ms`` (V x (B, p)), and when ``distill`` is on ``cls`` (V x (B, D)), ``patch_mid`` and
    ``patch_late`` (G x (B, D, h, w)).
    """

    def __init__(self, encoder: DeoEncoder, heads: nn.ModuleDict, distill: bool = True):
        super().__init__()
        self.encoder = encoder
        self.head_ms = heads["head_ms"]
        self.cls_head = heads["cls_head"]
        self.patch_head_mid = heads["patch_head_mid"]
        self.patch_head_late = heads["patch_head_late"]
        self.distill = distill
        self.mid_level, self.late_level = encoder.spec.distill_levels

    def heads_state_dict(self) -> dict[str, Tensor]:
        """The four heads' parameters as one flat state dict (``head_ms.mlp.0.weight``, ...)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("encoder.")}

    def forward(self, global_crops: Tensor, local_crops: Tensor | None = None) -> dict[str, list[Tensor]]:
        g_views = global_crops.shape[0]
        globals_ = global_crops.flatten(0, 1)
        locals_ = local_crops.flatten(0, 1) if local_crops is not None else None
        l_views = local_crops.shape[0] if local_crops is not None else 0

        # Multispectral pass: every crop -> pooled -> head_ms (docs/method.md §2.6); RGB pass:
        # channels 0-2 through the RGB stem, stage maps of the globals (§2.7). One call, so that
        # the encoder may draw every pass's stochastic depth first and run crops of one size
        # through its trunk together (forward_many; off by default, MAX_MERGED_TOKENS).
        inputs, need_maps = [globals_], [False]
        if locals_ is not None:
            inputs.append(locals_), need_maps.append(False)
        if self.distill:
            inputs.append(globals_[:, :3]), need_maps.append(True)
            if locals_ is not None:
                inputs.append(locals_[:, :3]), need_maps.append(False)
        passes = iter(self.encoder.forward_many(inputs, need_maps))
        ms = _views(self.head_ms(next(passes)[1]), g_views)
        if locals_ is not None:
            ms += _views(self.head_ms(next(passes)[1]), l_views)
        out: dict[str, list[Tensor]] = {"ms": ms}
        if not self.distill:
            return out
        maps, pooled = next(passes)
        cls = _views(self.cls_head(pooled), g_views)
        if locals_ is not None:
            cls += _views(self.cls_head(next(passes)[1]), l_views)
        out["cls"] = cls
        out["patch_mid"] = _views(self.patch_head_mid.forward_map(maps[self.mid_level]), g_views)
        out["patch_late"] = _views(self.patch_head_late.forward_map(maps[self.late_level]), g_views)
        return out


class DeoMetaArch(nn.Module):
    """Student, EMA teacher, optical teacher and loss; ``forward(batch) -> loss terms``.

    Args:
        student: the :class:`DeoStudent` (possibly wrapped in DDP / ``torch.compile``: pass the
            wrapper; ``student_module`` is the bare module for EMA and checkpoints).
        student_module: the unwrapped student.
        ema_teacher: the multispectral EMA teacher.
        optical_teacher: the frozen optical teacher (``None`` when no distillation term is on).
        loss: the :class:`~deo_cli.losses.DeoLoss`.
        ema_drop_path: keep the EMA teacher in train mode, as the official code does
            (stochastic depth active, docs/method.md §2.6); False puts it in eval mode.
    """

    def __init__(
        self,
        student: nn.Module,
        student_module: DeoStudent,
        ema_teacher: EmaTeacher,
        optical_teacher: OpticalTeacher | None,
        loss: DeoLoss,
        ema_drop_path: bool = True,
    ):
        super().__init__()
        self.student = student
        self.ema_teacher = ema_teacher
        self.optical_teacher = optical_teacher
        self.loss = loss
        self.ema_drop_path = ema_drop_path
        self._student_module = [student_module]  # not a submodule twice

    @property
    def student_module(self) -> DeoStudent:
        return self._student_module[0]

    def train(self, mode: bool = True) -> DeoMetaArch:
        super().train(mode)
        self.ema_teacher.train(mode and self.ema_drop_path)
        return self

    def forward(self, batch: dict) -> dict[str, Tensor]:
        global_crops, local_crops = batch["global"], batch.get("local")
        g_views = global_crops.shape[0]
        globals_ = global_crops.flatten(0, 1)
        with torch.no_grad():
            teacher_ms = _views(self.ema_teacher(globals_), g_views)
            teacher = {}
            if self.optical_teacher is not None:
                cls, (mid, late) = self.optical_teacher(globals_[:, :3])
                teacher = {
                    "teacher_cls": _views(cls, g_views),
                    "teacher_patch_mid": _views(mid, g_views),
                    "teacher_patch_late": _views(late, g_views),
                }
        s = self.student(global_crops, local_crops)
        return self.loss(
            student_ms=s["ms"],
            teacher_ms=teacher_ms,
            student_cls=s.get("cls"),
            student_patch_mid=s.get("patch_mid"),
            student_patch_late=s.get("patch_late"),
            **teacher,
        )


def build_student(
    encoder: DeoEncoder,
    teacher_dim: int,
    ms_dim: int = 256,
    hidden_dim: int = 2048,
    distill: bool = True,
) -> DeoStudent:
    """A :class:`DeoStudent` with DEO's heads for ``encoder`` (docs/method.md §2.5)."""
    heads = build_deo_heads(encoder, teacher_dim=teacher_dim, ms_dim=ms_dim, hidden_dim=hidden_dim)
    return DeoStudent(encoder, heads, distill=distill)


def build_teacher_from_student(student: DeoStudent) -> EmaTeacher:
    """The EMA teacher, equal to the student's encoder (no RGB stem) and ``head_ms`` (docs/method.md §2.6)."""
    return build_ema_teacher(student.encoder, student.head_ms)


def distill_active(loss: DeoLoss) -> bool:
    """Whether any optical-distillation term has a non-zero weight (else the RGB pass is skipped)."""
    return any(loss.active(t) for t in DISTILL_TERMS)
