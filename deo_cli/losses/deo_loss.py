"""DEO's total objective (docs/method.md §2.8)::

    L = L_MS + L_dist = -C - R - 1/2 [ 1/2 (S_mid + S_late) + S_cls ]

``C``: SimDINO compression (:mod:`~deo_cli.losses.compression`), ``R``: coding rate
(:mod:`~deo_cli.losses.coding_rate`), ``S_cls``: CLS distillation
(:mod:`~deo_cli.losses.distill_cls`), ``S_mid`` / ``S_late``: patch distillation at student
stage 3 vs teacher block 9 and stage 4 vs block 12 (:mod:`~deo_cli.losses.distill_patch`).
All weights are 1 in the paper (the official ``--alpha`` is never used, docs/method.md §2.8). Here
each term has a weight; a weight of 0 skips the term (its inputs are then not needed and its
key is absent from the result).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from deo_cli.losses.coding_rate import DEFAULT_EPS, CodingRateLoss
from deo_cli.losses.compression import CompressionLoss
from deo_cli.losses.distill_cls import ClsDistillLoss
from deo_cli.losses.distill_patch import PatchDistillLoss
from deo_cli.losses.registry import register_loss

Views = Sequence[Tensor] | Tensor

TERMS = ("compression", "coding_rate", "distill_cls", "distill_patch_mid", "distill_patch_late")


@register_loss("deo")
class DeoLoss(nn.Module):
    """The weighted DEO objective; ``forward`` returns every term and ``"total"``.

    Args:
        compression, coding_rate, distill_cls, distill_patch_mid, distill_patch_late: weights
            (default 1; 0 skips the term).
        eps, world_size, chunks: passed to :class:`~deo_cli.losses.coding_rate.CodingRateLoss`.

    ``forward`` keyword arguments (G global views, V views in all, global first):

    - ``student_ms``: V x ``(B, 256)`` student ``head_ms`` outputs;
    - ``teacher_ms``: G x ``(B, 256)`` EMA-teacher outputs;
    - ``student_cls``: V x ``(B, D)`` student ``cls_head`` outputs on the RGB pass;
    - ``teacher_cls``: G x ``(B, D)`` optical-teacher CLS tokens;
    - ``student_patch_mid`` / ``student_patch_late``: G x ``(B, D, h, w)`` patch-head outputs;
    - ``teacher_patch_mid`` / ``teacher_patch_late``: G x ``(B, D, H', W')`` teacher tokens.

    Returns ``{"compression": -C, "coding_rate": -R, "distill_cls": -S_cls,
    "distill_patch_mid": -S_mid, "distill_patch_late": -S_late, "total": L}`` (unweighted terms,
    each a scalar tensor; skipped terms are absent).
    """

    def __init__(
        self,
        compression: float = 1.0,
        coding_rate: float = 1.0,
        distill_cls: float = 1.0,
        distill_patch_mid: float = 1.0,
        distill_patch_late: float = 1.0,
        eps: float = DEFAULT_EPS,
        world_size: int | None = None,
        chunks: int = 1,
    ):
        super().__init__()
        self.weights = {
            "compression": float(compression),
            "coding_rate": float(coding_rate),
            "distill_cls": float(distill_cls),
            "distill_patch_mid": float(distill_patch_mid),
            "distill_patch_late": float(distill_patch_late),
        }
        self.compression = CompressionLoss()
        self.coding_rate = CodingRateLoss(eps=eps, world_size=world_size, chunks=chunks)
        self.distill_cls = ClsDistillLoss()
        self.distill_patch = PatchDistillLoss()

    def active(self, term: str) -> bool:
        """Whether ``term`` is computed (its weight is not 0)."""
        return self.weights[term] != 0.0

    def forward(
        self,
        *,
        student_ms: Views | None = None,
        teacher_ms: Views | None = None,
        student_cls: Views | None = None,
        teacher_cls: Views | None = None,
        student_patch_mid: Views | None = None,
        teacher_patch_mid: Views | None = None,
        student_patch_late: Views | None = None,
        teacher_patch_late: Views | None = None,
    ) -> dict[str, Tensor]:
        def need(term: str, **inputs) -> None:
            missing = [k for k, v in inputs.items() if v is None]
            if missing:
                raise ValueError(
                    f"DeoLoss term {term!r} (weight {self.weights[term]}) needs {', '.join(missing)}"
                )

        out: dict[str, Tensor] = {}
        if self.active("compression"):
            need("compression", student_ms=student_ms, teacher_ms=teacher_ms)
            out["compression"] = self.compression(student_ms, teacher_ms)
        if self.active("coding_rate"):
            need("coding_rate", student_ms=student_ms, teacher_ms=teacher_ms)
            out["coding_rate"] = self.coding_rate(student_ms, teacher_ms)
        if self.active("distill_cls"):
            need("distill_cls", student_cls=student_cls, teacher_cls=teacher_cls)
            out["distill_cls"] = self.distill_cls(student_cls, teacher_cls)
        if self.active("distill_patch_mid"):
            need(
                "distill_patch_mid", student_patch_mid=student_patch_mid, teacher_patch_mid=teacher_patch_mid
            )
            out["distill_patch_mid"] = self.distill_patch(student_patch_mid, teacher_patch_mid)
        if self.active("distill_patch_late"):
            need(
                "distill_patch_late",
                student_patch_late=student_patch_late,
                teacher_patch_late=teacher_patch_late,
            )
            out["distill_patch_late"] = self.distill_patch(student_patch_late, teacher_patch_late)
        if not out:
            raise ValueError("DeoLoss: every term has weight 0")
        w = self.weights
        ms = sum(w[k] * out[k] for k in ("compression", "coding_rate") if k in out)
        patch = sum(w[k] * out[k] for k in ("distill_patch_mid", "distill_patch_late") if k in out)
        cls = w["distill_cls"] * out["distill_cls"] if "distill_cls" in out else 0.0
        total = ms + 0.5 * (0.5 * patch + cls)
        out["total"] = total
        return out
