"""DEO's EMA teacher (docs/method.md §2.6): backbone + MS stem + head_ms, theta_t <- m theta_t + (1-m) theta_s."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from deo_cli.errors import UsageError
from deo_cli.models import ProjectionHead, build_ema_teacher, build_encoder, ema_update


@pytest.fixture
def student():
    torch.manual_seed(0)
    enc = build_encoder("deo_swin_test", weights=None)
    return nn.ModuleDict({"encoder": enc, "head_ms": ProjectionHead(enc.pooled_dim, 256, hidden_dim=64)})


def test_teacher_is_a_frozen_copy_without_rgb_stem(student):
    teacher = build_ema_teacher(student["encoder"], student["head_ms"])
    assert teacher.encoder.conv_rgb is None and not any("conv_rgb" in k for k in teacher.state_dict())
    assert student["encoder"].conv_rgb is not None  # the student keeps its stem
    assert all(not p.requires_grad for p in teacher.parameters())
    x = torch.randn(2, 10, 64, 64)
    with torch.no_grad():
        z_t = teacher(x)
        z_s = student["head_ms"](student["encoder"].forward_pooled(x))
    torch.testing.assert_close(z_t, z_s)
    torch.testing.assert_close(z_t.norm(dim=-1), torch.ones(2))
    with pytest.raises(UsageError, match="no RGB stem"):
        teacher(torch.randn(1, 3, 64, 64))


@pytest.mark.parametrize("m", [0.996, 0.5, 0.0, 1.0])
def test_update_moves_exactly_one_minus_m_of_the_way(student, m):
    teacher = build_ema_teacher(student["encoder"], student["head_ms"])
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    target = dict(student.named_parameters())
    ema_update(teacher, student, m)
    for name, p in teacher.named_parameters():
        want = before[name] + (1 - m) * (target[name] - before[name])
        torch.testing.assert_close(p, want, rtol=0, atol=1e-6)
    if m == 0.0:
        assert all(torch.equal(p, target[n]) for n, p in teacher.named_parameters())


def test_update_ignores_wrappers_and_copies_buffers(student):
    teacher = build_ema_teacher(student["encoder"], student["head_ms"])

    class Wrapped(nn.Module):  # what DDP looks like: everything under "module."
        def __init__(self, inner):
            super().__init__()
            self.module = inner

    before = {k: v.clone() for k, v in teacher.named_parameters()}
    with torch.no_grad():
        for p in student.parameters():
            p.fill_(1.0)
        student["encoder"].features[0][0].attn.relative_position_index.fill_(0)
    ema_update(teacher, Wrapped(student), 0.75)
    for name, p in teacher.named_parameters():
        torch.testing.assert_close(p, 0.75 * before[name] + 0.25, rtol=0, atol=1e-6)
    assert torch.all(teacher.encoder.features[0][0].attn.relative_position_index == 0)
    with pytest.raises(KeyError, match="no counterpart"):
        ema_update(teacher, nn.ModuleDict({"encoder": student["encoder"]}), 0.9)
