"""Coding-rate expansion (docs/method.md §2.6)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from deo_cli.losses import CodingRateLoss, coding_rate


def _direct(w, eps, n):
    b, p = w.shape
    gamma = (p + n * b) / (p * n * b)
    return (
        gamma
        * 0.5
        * torch.logdet(torch.eye(p, dtype=torch.float64) + p / (b * n * eps) * w.double().T @ w.double())
    )


@pytest.mark.parametrize(("b", "p", "n"), [(8, 16, 1), (64, 256, 4), (32, 8, 2)])
def test_equals_direct_logdet(b, p, n):
    torch.manual_seed(b + p)
    w = F.normalize(torch.randn(b, p), dim=-1)
    got = coding_rate(w, eps=0.05, world_size=n)
    torch.testing.assert_close(got.double(), _direct(w, 0.05, n), rtol=1e-5, atol=1e-6)


def test_loss_averages_views_of_the_student_teacher_mean():
    torch.manual_seed(0)
    zs = [F.normalize(torch.randn(16, 32), dim=-1) for _ in range(4)]  # 2 global + 2 local views
    zt = [F.normalize(torch.randn(16, 32), dim=-1) for _ in range(2)]
    loss = CodingRateLoss(eps=0.05, world_size=1)(zs, zt)
    want = torch.stack([_direct((zs[g] + zt[g]) / 2, 0.05, 1) for g in range(2)]).mean()
    torch.testing.assert_close(loss.double(), -want, rtol=1e-5, atol=1e-6)


def test_paper_constants():
    # B = 64, N = 4, p = 256: scale p/(B N eps) = 20 and gamma = 1/128 (docs/method.md §2.6).
    # With W = c * [I_64 | 0]: W^T W = c^2 diag(1 x64, 0 x192), so R = 1/128 * 1/2 * 64 log(1 + 20 c^2).
    c = 0.5
    w = torch.zeros(64, 256)
    w[:, :64] = torch.eye(64) * c
    got = coding_rate(w, eps=0.05, world_size=4)
    want = torch.tensor(1 / 128 * 0.5 * 64 * torch.log1p(torch.tensor(20 * c * c)).item())
    torch.testing.assert_close(got, want)


def test_grows_when_features_spread_out():
    torch.manual_seed(0)
    base = F.normalize(torch.randn(1, 64), dim=-1)
    collapsed = F.normalize(base + 0.01 * torch.randn(32, 64), dim=-1)
    partly = F.normalize(base + 0.3 * torch.randn(32, 64), dim=-1)
    spread = F.normalize(torch.randn(32, 64), dim=-1)
    loss = CodingRateLoss(world_size=1)
    rates = [loss.rate([z], [z]).item() for z in (collapsed, partly, spread)]
    assert rates[0] < rates[1] < rates[2]


def test_world_size_from_distributed_default_and_chunks():
    torch.manual_seed(0)
    z = [F.normalize(torch.randn(16, 8), dim=-1)]
    assert CodingRateLoss().rate(z, z) == CodingRateLoss(world_size=1).rate(z, z)  # not initialised -> N = 1
    chunked = CodingRateLoss(world_size=4, chunks=4).rate(z, z)
    want = torch.stack([coding_rate(c, 0.05, 4) for c in z[0].chunk(4)]).mean()
    torch.testing.assert_close(chunked, want)
    with pytest.raises(ValueError, match="equal chunks"):
        CodingRateLoss(chunks=3).rate(z, z)


def test_float32_under_autocast_and_gradient_to_student_only():
    torch.manual_seed(0)
    zs = F.normalize(torch.randn(8, 16), dim=-1).requires_grad_(True)
    zt = F.normalize(torch.randn(8, 16), dim=-1).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = CodingRateLoss(world_size=1)([zs.bfloat16()], [zt.bfloat16()])
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert zs.grad is not None and zt.grad is None
