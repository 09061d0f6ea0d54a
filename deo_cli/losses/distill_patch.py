"""Dense patch-token distillation from the optical teacher, same view (docs/method.md §2.7).

For each global view ``g``, the student's patch-head output ``h(F_g)`` (B, D, h, w) is
bilinearly resized to the teacher's token grid (H', W') (14x14 for DINOv3 at 224 px) and
compared token by token with the teacher's final-normed patch tokens ``T_g``::

    S = 1/G * sum_g mean_{b, tokens} cos(resize(h(F_g))_{b,i,j}, T_{g,b,i,j})

DEO uses it twice: ``S_mid`` (student stage 3 vs teacher block 9) and ``S_late`` (stage 4,
7x7 -> 14x14, vs block 12). The loss is ``-S``: -1 when the features agree, and unchanged when
either side is scaled by a positive factor. The teacher side is a constant.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from deo_cli.losses.registry import register_loss


def _as_list(maps: Sequence[Tensor] | Tensor) -> list[Tensor]:
    if isinstance(maps, Tensor):
        return [maps] if maps.ndim == 4 else list(maps.unbind(0))
    return list(maps)


@register_loss("distill_patch")
class PatchDistillLoss(nn.Module):
    """``forward(student_maps, teacher_maps) -> -S``.

    Both are G maps (one per global view; a single ``(B, D, h, w)`` tensor counts as one view):
    student ``(B, D, h, w)``, teacher ``(B, D, H', W')``.
    """

    def forward(
        self, student_maps: Sequence[Tensor] | Tensor, teacher_maps: Sequence[Tensor] | Tensor
    ) -> Tensor:
        students, teachers = _as_list(student_maps), _as_list(teacher_maps)
        if len(students) != len(teachers) or not students:
            raise ValueError(
                f"patch distillation needs one teacher map per student map ({len(students)} vs {len(teachers)})"
            )
        total = 0.0
        for s, t in zip(students, teachers, strict=True):
            t = t.detach().float()
            s = s.float()
            if s.shape[0] != t.shape[0] or s.shape[1] != t.shape[1]:
                raise ValueError(
                    f"student map {tuple(s.shape)} and teacher map {tuple(t.shape)} differ in batch or width"
                )
            if s.shape[-2:] != t.shape[-2:]:
                s = F.interpolate(s, size=t.shape[-2:], mode="bilinear", align_corners=False)
            cos = (F.normalize(s, dim=1) * F.normalize(t, dim=1)).sum(dim=1)  # (B, H', W')
            total = total + cos.mean()
        return -total / len(students)
