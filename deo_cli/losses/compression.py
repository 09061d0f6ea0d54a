"""SimDINO compression (alignment) term, cross-view (docs/method.md §2.6).

With ``z^t_g`` the EMA teacher's L2-normalised ``head_ms`` output for global view ``g`` (G = 2)
and ``z^s_v`` the student's for view ``v`` (V = 12: the 2 global views first, then the local
ones)::

    C = 1 / (G V - G) * sum_{g=1..G} sum_{v=1..V, v != g} mean_b cos(z^t_{g,b}, z^s_{v,b})

Same-view pairs are excluded and the sum is divided by the pair count (22 for DEO). The loss is
``-C`` (coefficient 1, docs/method.md §2.6); the teacher side is a constant.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from deo_cli.losses._views import cross_view_cosine
from deo_cli.losses.registry import register_loss


@register_loss("compression")
class CompressionLoss(nn.Module):
    """``forward(student_views, teacher_views) -> -C`` (a scalar; -1 when all views agree).

    ``student_views``: V tensors ``(B, p)`` (or one ``(V, B, p)``), global views first;
    ``teacher_views``: G tensors ``(B, p)`` for the global views.
    """

    def forward(
        self, student_views: Sequence[Tensor] | Tensor, teacher_views: Sequence[Tensor] | Tensor
    ) -> Tensor:
        return -cross_view_cosine(student_views, teacher_views)
