"""Dense patch distillation (docs/method.md §2.7)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from deo_cli.losses import PatchDistillLoss, build_loss


def test_identical_features_give_minus_one():
    torch.manual_seed(0)
    t = torch.randn(2, 24, 14, 14)
    assert PatchDistillLoss()([t.clone(), t.clone()], [t, t]).item() == pytest.approx(-1.0, abs=1e-6)


def test_unchanged_when_either_side_is_scaled():
    torch.manual_seed(1)
    s, t = torch.randn(2, 24, 7, 7), torch.randn(2, 24, 14, 14)
    loss = PatchDistillLoss()
    base = loss([s], [t])
    torch.testing.assert_close(loss([s * 5.0], [t]), base)
    torch.testing.assert_close(loss([s], [t * 0.01]), base)
    assert -1.0 < base.item() < 1.0


def test_student_resized_bilinearly_to_the_teacher_grid():
    torch.manual_seed(2)
    s, t = torch.randn(3, 16, 7, 7), torch.randn(3, 16, 14, 14)
    up = F.interpolate(s, size=(14, 14), mode="bilinear", align_corners=False)
    want = F.cosine_similarity(up, t, dim=1).mean()
    torch.testing.assert_close(PatchDistillLoss()(s, t), -want)
    # the upsampled student equal to the teacher -> -1
    assert PatchDistillLoss()(s, up).item() == pytest.approx(-1.0, abs=1e-6)


def test_mean_over_views_and_teacher_gets_no_gradient():
    torch.manual_seed(3)
    s = [torch.randn(2, 8, 4, 4, requires_grad=True) for _ in range(2)]
    t = [torch.randn(2, 8, 4, 4, requires_grad=True) for _ in range(2)]
    loss = build_loss("distill_patch")(s, t)
    want = torch.stack([F.cosine_similarity(a, b, dim=1).mean() for a, b in zip(s, t, strict=True)]).mean()
    torch.testing.assert_close(loss, -want)
    loss.backward()
    assert all(x.grad is not None for x in s) and all(x.grad is None for x in t)
