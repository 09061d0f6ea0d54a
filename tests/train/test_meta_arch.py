"""The DEO meta-architecture: who sees which crops, which parameters learn (docs/method.md §2.6-2.8)."""

import pytest
import torch

from deo_cli.losses import DeoLoss
from deo_cli.models import build_encoder, build_teacher, ema_update
from deo_cli.train.meta_arch import DeoMetaArch, build_student, build_teacher_from_student


def tiny(distill=True, seed=0):
    torch.manual_seed(seed)
    encoder = build_encoder("deo_swin_test", weights=None)
    optical = build_teacher("test_dinov3_tiny", weights=None)
    student = build_student(encoder, optical.embed_dim, ms_dim=32, hidden_dim=64, distill=distill)
    ema = build_teacher_from_student(student)
    weights = {} if distill else dict(distill_cls=0, distill_patch_mid=0, distill_patch_late=0)
    loss = DeoLoss(**weights)
    return student, ema, optical if distill else None, loss


def batch(b=4, g=2, n_local=3):
    torch.manual_seed(1)
    return {"global": torch.randn(g, b, 10, 32, 32), "local": torch.randn(n_local, b, 10, 16, 16)}


def test_student_outputs_every_view():
    student, _, optical, _ = tiny()
    out = student(batch()["global"], batch()["local"])
    assert len(out["ms"]) == 5 and all(z.shape == (4, 32) for z in out["ms"])
    assert all(torch.allclose(z.norm(dim=-1), torch.ones(4)) for z in out["ms"])  # L2-normalised heads
    assert len(out["cls"]) == 5 and out["cls"][0].shape == (4, optical.embed_dim)
    # Patch heads on stages 3 and 4 of the globals only (32 px: 2x2 and 1x1 grids).
    assert [m.shape for m in out["patch_mid"]] == [(4, 32, 2, 2)] * 2
    assert [m.shape for m in out["patch_late"]] == [(4, 32, 1, 1)] * 2


def test_ema_teacher_starts_equal_without_rgb_stem():
    student, ema, _, _ = tiny()
    assert ema.encoder.rgb_stem is None and student.encoder.rgb_stem is not None
    s = dict(student.named_parameters())
    for name, p in ema.named_parameters():
        assert torch.equal(p, s[name]) and not p.requires_grad


def test_loss_terms_and_gradients_reach_only_the_student():
    student, ema, optical, loss = tiny()
    meta = DeoMetaArch(student, student, ema, optical, loss).train()
    assert ema.training  # the official teacher is never put in eval mode (docs/method.md §2.6)
    terms = meta(batch())
    assert set(terms) == {
        "compression",
        "coding_rate",
        "distill_cls",
        "distill_patch_mid",
        "distill_patch_late",
        "total",
    }
    expected = (
        terms["compression"]
        + terms["coding_rate"]
        + 0.5 * (0.5 * (terms["distill_patch_mid"] + terms["distill_patch_late"]) + terms["distill_cls"])
    )
    torch.testing.assert_close(terms["total"], expected)  # docs/method.md §2.8
    terms["total"].backward()
    no_grad = [n for n, p in student.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []
    assert all(p.grad is None for p in list(ema.parameters()) + list(optical.parameters()))
    assert (
        not DeoMetaArch(student, student, ema, optical, loss, ema_drop_path=False)
        .train()
        .ema_teacher.training
    )


def test_without_distillation_the_rgb_pass_is_skipped():
    student, ema, _, loss = tiny(distill=False)
    terms = DeoMetaArch(student, student, ema, None, loss).train()(batch())
    assert set(terms) == {"compression", "coding_rate", "total"}
    terms["total"].backward()
    assert student.encoder.conv_rgb[0].weight.grad is None and student.cls_head.mlp[0].weight.grad is None


def test_ema_update_moves_the_teacher_toward_the_student():
    student, ema, _, _ = tiny()
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    before = ema.head_ms.mlp[0].weight.clone()
    ema_update(ema, student, 0.9)
    torch.testing.assert_close(ema.head_ms.mlp[0].weight, before + 0.1)
    assert student.heads_state_dict().keys() >= {"head_ms.mlp.0.weight", "patch_head_late.mlp.4.bias"}


@pytest.mark.parametrize("n_local", [0, 2])
def test_local_crops_are_optional(n_local):
    student, ema, optical, loss = tiny()
    b = batch(n_local=max(n_local, 1))
    if n_local == 0:
        b["local"] = None
    terms = DeoMetaArch(student, student, ema, optical, loss)(b)
    assert torch.isfinite(terms["total"])
