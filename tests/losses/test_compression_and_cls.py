"""Cross-view cosine terms (docs/method.md §2.6-2.7): SimDINO compression and CLS distillation."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from deo_cli.losses import ClsDistillLoss, CompressionLoss, build_loss


def _brute(student, teacher):
    """Mean over (g, v != g) of mean_b cos, written out pair by pair."""
    values = []
    for g, v in itertools.product(range(len(teacher)), range(len(student))):
        if v == g:
            continue
        values.append(F.cosine_similarity(teacher[g], student[v], dim=-1).mean())
    return torch.stack(values).mean(), len(values)


def test_equals_brute_force_mean_of_pairwise_cosines():
    torch.manual_seed(0)
    student = [torch.randn(5, 16) for _ in range(12)]
    teacher = [torch.randn(5, 16) for _ in range(2)]
    want, pairs = _brute(student, teacher)
    assert pairs == 22  # 2 x 12 - 2 (docs/method.md §2.6)
    torch.testing.assert_close(CompressionLoss()(student, teacher), -want)
    torch.testing.assert_close(ClsDistillLoss()(student, teacher), -want)
    torch.testing.assert_close(CompressionLoss()(torch.stack(student), torch.stack(teacher)), -want)


def test_same_view_pairs_are_excluded():
    # Student view g equals teacher view g; every cross pair is orthogonal. Including the
    # same-view pairs would give -2/24; excluding them gives exactly 0.
    eye = torch.eye(12)
    student = [eye[v : v + 1] for v in range(12)]
    teacher = [eye[0:1], eye[1:2]]
    assert CompressionLoss()(student, teacher).item() == 0.0
    # ...and when all views agree the loss is -1
    same = [eye[0:1]] * 12
    assert CompressionLoss()(same, [eye[0:1]] * 2).item() == pytest.approx(-1.0)


def test_scale_free_and_teacher_gets_no_gradient():
    torch.manual_seed(1)
    student = [torch.randn(4, 8, requires_grad=True) for _ in range(4)]
    teacher = [torch.randn(4, 8, requires_grad=True) for _ in range(2)]
    loss = CompressionLoss()(student, teacher)
    torch.testing.assert_close(CompressionLoss()([3 * s for s in student], [0.5 * t for t in teacher]), loss)
    loss.backward()
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in student)
    assert all(t.grad is None for t in teacher)


def test_registry_names():
    assert isinstance(build_loss("compression"), CompressionLoss)
    assert isinstance(build_loss("distill_cls"), ClsDistillLoss)
