"""Projection heads (docs/method.md §2.5): 3-layer MLP, GELU, no BatchNorm, L2-normalised output."""

from __future__ import annotations

import torch
from torch import nn

from deo_cli.models import ProjectionHead, build_deo_heads, build_encoder


def test_structure_and_init():
    torch.manual_seed(0)
    head = ProjectionHead(512, 256)
    kinds = [type(m) for m in head.mlp]
    assert kinds == [nn.Linear, nn.GELU, nn.Linear, nn.GELU, nn.Linear]
    assert [m.out_features for m in head.mlp if isinstance(m, nn.Linear)] == [2048, 2048, 256]
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in head.modules())
    w = head.mlp[2].weight
    assert abs(w.std().item() - 0.02) < 0.002 and abs(w.mean().item()) < 0.001  # trunc-normal, std 0.02
    assert all(torch.all(m.bias == 0) for m in head.mlp if isinstance(m, nn.Linear))


def test_output_is_unit_norm_and_maps_go_token_by_token():
    torch.manual_seed(0)
    head = ProjectionHead(16, 8, hidden_dim=32)
    out = head(torch.randn(5, 16) * 7)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(5))
    fmap = torch.randn(2, 16, 3, 4)
    got = head.forward_map(fmap)
    assert got.shape == (2, 8, 3, 4)
    torch.testing.assert_close(got[1, :, 2, 3], head(fmap[1, :, 2, 3]))


def test_deo_heads_widths():
    enc = build_encoder("deo_swin_test", weights=None)
    heads = build_deo_heads(enc, teacher_dim=48, hidden_dim=64)
    dims = {k: (h.in_dim, h.out_dim) for k, h in heads.items()}
    assert dims == {
        "head_ms": (128, 256),
        "cls_head": (128, 48),
        "patch_head_mid": (64, 48),
        "patch_head_late": (128, 48),
    }
    with torch.device("meta"):
        swin_b = build_encoder("deo_swin_b", weights=None)
        big = build_deo_heads(swin_b, teacher_dim=768)
    dims = {k: (h.in_dim, h.out_dim) for k, h in big.items()}
    assert dims == {
        "head_ms": (1024, 256),
        "cls_head": (1024, 768),
        "patch_head_mid": (512, 768),
        "patch_head_late": (1024, 768),
    }
