"""CLS distillation from the optical teacher, cross-view (docs/method.md §2.7).

With ``t_g`` the optical teacher's final-normed CLS token for global view ``g`` (its RGB
channels) and ``h_cls(f^rgb_v)`` the student's ``cls_head`` output on the pooled RGB-stem
feature of view ``v`` (all V views, global first), the pairs are those of the compression
term::

    S_cls = 1 / (G V - G) * sum_g sum_{v != g} mean_b cos(h_cls(f^rgb_{v,b}), t_{g,b})

(1/22 for DEO). The loss is ``-S_cls``; the teacher side is a constant.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from deo_cli.losses._views import cross_view_cosine
from deo_cli.losses.registry import register_loss


@register_loss("distill_cls")
class ClsDistillLoss(nn.Module):
    """``forward(student_views, teacher_cls) -> -S_cls``.

    ``student_views``: V tensors ``(B, D)`` from ``cls_head`` (global views first);
    ``teacher_cls``: G tensors ``(B, D)`` (the optical teacher's CLS on the global views).
    """

    def forward(
        self, student_views: Sequence[Tensor] | Tensor, teacher_cls: Sequence[Tensor] | Tensor
    ) -> Tensor:
        return -cross_view_cosine(student_views, teacher_cls)
