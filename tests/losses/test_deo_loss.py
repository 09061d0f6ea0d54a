"""DEO's total objective (docs/method.md §2.8) and where its gradients go."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from deo_cli.losses import TERMS, DeoLoss, build_loss
from deo_cli.models import build_deo_heads, build_ema_teacher, build_encoder, build_teacher


def _random_inputs(seed=0, g=2, v=4, b=3):
    torch.manual_seed(seed)
    n = lambda *s: F.normalize(torch.randn(*s), dim=-1)  # noqa: E731
    return dict(
        student_ms=[n(b, 16) for _ in range(v)],
        teacher_ms=[n(b, 16) for _ in range(g)],
        student_cls=[n(b, 8) for _ in range(v)],
        teacher_cls=[torch.randn(b, 8) for _ in range(g)],
        student_patch_mid=[torch.randn(b, 8, 4, 4) for _ in range(g)],
        teacher_patch_mid=[torch.randn(b, 8, 4, 4) for _ in range(g)],
        student_patch_late=[torch.randn(b, 8, 2, 2) for _ in range(g)],
        teacher_patch_late=[torch.randn(b, 8, 4, 4) for _ in range(g)],
    )


def test_total_is_the_paper_formula():
    out = DeoLoss(world_size=1)(**_random_inputs())
    assert set(out) == {*TERMS, "total"}
    c, r, s_cls = -out["compression"], -out["coding_rate"], -out["distill_cls"]
    s_mid, s_late = -out["distill_patch_mid"], -out["distill_patch_late"]
    torch.testing.assert_close(out["total"], -c - r - 0.5 * (0.5 * (s_mid + s_late) + s_cls))


def test_weights_scale_terms_and_zero_skips_them():
    inputs = _random_inputs(1)
    full = DeoLoss(world_size=1)(**inputs)
    doubled = DeoLoss(world_size=1, compression=2.0)(**inputs)
    torch.testing.assert_close(doubled["total"] - full["total"], full["compression"])
    no_dist = build_loss("deo", world_size=1, distill_cls=0, distill_patch_mid=0, distill_patch_late=0)
    out = no_dist(
        student_ms=inputs["student_ms"], teacher_ms=inputs["teacher_ms"]
    )  # optical inputs not needed
    assert set(out) == {"compression", "coding_rate", "total"}
    torch.testing.assert_close(out["total"], full["compression"] + full["coding_rate"])
    with pytest.raises(ValueError, match="needs student_cls"):
        DeoLoss()(student_ms=inputs["student_ms"], teacher_ms=inputs["teacher_ms"])


def test_gradients_reach_both_stems_and_the_trunk_never_the_teachers():
    """One DEO step at tiny size: 2 global (64 px) + 2 local (32 px) views."""
    torch.manual_seed(0)
    student = build_encoder("deo_swin_test", weights=None).train()
    optical = build_teacher("test_dinov3_tiny", weights=None)
    heads = build_deo_heads(student, teacher_dim=optical.embed_dim, hidden_dim=64)
    ema = build_ema_teacher(student, heads["head_ms"])
    views = [torch.randn(2, 10, 64, 64) for _ in range(2)] + [torch.randn(2, 10, 32, 32) for _ in range(2)]
    glob = views[:2]

    student_ms = [heads["head_ms"](student.forward_pooled(x)) for x in views]
    with torch.no_grad():
        teacher_ms = [ema(x) for x in glob]
    student_cls, mid, late = [], [], []
    for i, x in enumerate(views):
        maps, pooled = student.forward_with_pooled(x[:, :3])
        student_cls.append(heads["cls_head"](pooled))
        if i < 2:
            mid.append(heads["patch_head_mid"].forward_map(maps[2]))
            late.append(heads["patch_head_late"].forward_map(maps[3]))
    t_cls, t_mid, t_late = [], [], []
    for x in glob:
        cls, (m, lt) = optical(x[:, :3])
        t_cls.append(cls), t_mid.append(m), t_late.append(lt)
    assert t_mid[0].shape[-2:] == (4, 4) and late[0].shape[-2:] == (2, 2)  # resized inside the loss

    out = DeoLoss(world_size=1)(
        student_ms=student_ms,
        teacher_ms=teacher_ms,
        student_cls=student_cls,
        teacher_cls=t_cls,
        student_patch_mid=mid,
        teacher_patch_mid=t_mid,
        student_patch_late=late,
        teacher_patch_late=t_late,
    )
    out["total"].backward()

    def has_grad(module):
        return all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())

    assert has_grad(student.conv_ms) and has_grad(student.conv_rgb)
    for stage in (0, 2, 4, 6):
        assert has_grad(student.features[stage][0].mlp)
    assert has_grad(student.norm) and all(has_grad(h) for h in heads.values())
    assert all(p.grad is None for p in optical.parameters())
    assert all(p.grad is None for p in ema.parameters())
