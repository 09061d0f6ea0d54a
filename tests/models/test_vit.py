"""DEO's dual-stem ViT: shared CLS/position embeddings, chosen blocks as maps, any size."""

from __future__ import annotations

import pytest
import torch

from deo_cli.errors import UsageError
from deo_cli.models import build_encoder, get_model_spec


@pytest.fixture
def vit():
    torch.manual_seed(0)
    return build_encoder("deo_vit_test", weights=None)


def _manual(vit, x, stem):
    """The ViT computed by hand from its parts (pos-embed at the native grid)."""
    tok = stem(x)  # (B, h, w, D)
    b, h, w, d = tok.shape
    z = torch.cat([vit.cls_token.expand(b, -1, -1), tok.reshape(b, h * w, d)], 1) + vit.pos_embed
    outs = []
    for blk in vit.blocks:
        z = blk(z)
        outs.append(z)
    return outs, h, w


def test_maps_are_chosen_blocks_and_pooled_is_normed_cls(vit):
    x = torch.randn(2, 10, 64, 64)
    with torch.no_grad():
        maps, pooled = vit.forward_with_pooled(x)
        outs, h, w = _manual(vit, x, vit.patch_embed_ms)
    assert (h, w) == (8, 8)
    for level, block in enumerate(vit.out_indices):
        want = outs[block][:, 1:].reshape(2, h, w, -1).permute(0, 3, 1, 2)
        torch.testing.assert_close(maps[level], want)
    torch.testing.assert_close(pooled, vit.norm(outs[-1])[:, 0])


def test_two_stems_share_cls_and_position_embeddings(vit):
    names = [n for n, _ in vit.named_parameters()]
    assert names.count("cls_token") == 1 and names.count("pos_embed") == 1
    assert vit.patch_embed_ms.proj.in_channels == 10 and vit.patch_embed_rgb.proj.in_channels == 3
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        outs, h, w = _manual(vit, x, vit.patch_embed_rgb)
        torch.testing.assert_close(vit.forward_pooled(x), vit.norm(outs[-1])[:, 0])
    with pytest.raises(UsageError, match="takes 10"):
        vit(torch.randn(1, 4, 64, 64))


def test_any_size_pads_to_the_patch_and_interpolates_positions(vit):
    assert torch.equal(vit.interpolate_pos_embed(8, 8), vit.pos_embed)
    pe = vit.interpolate_pos_embed(5, 12)
    assert pe.shape == (1, 1 + 60, 32)
    assert torch.equal(pe[:, 0], vit.pos_embed[:, 0])
    x = torch.randn(1, 10, 37, 95)
    with torch.no_grad():
        maps = vit(x)  # -> 5 x 12 tokens of 8 px
        padded = vit(torch.nn.functional.pad(x, (0, 1, 0, 3)))  # zero-padded by hand to 40 x 96
    assert [tuple(m.shape) for m in maps] == [(1, 32, 5, 12)] * 4
    assert vit.feature_grid(37, 95) == [(5, 12)] * 4
    assert all(torch.equal(a, b) for a, b in zip(maps, padded, strict=True))


def test_released_vit_configurations():
    with torch.device("meta"):
        b8 = build_encoder("deo_vit_b8", weights=None)
        s16 = build_encoder("deo_vit_s16", weights=None)
    assert b8.patch_size == 8 and b8.pos_grid == (32, 32) and get_model_spec("deo_vit_b8").input_size == 256
    assert b8.out_indices == (3, 5, 8, 11) and b8.feature_strides == (8, 8, 8, 8)
    assert len(b8.blocks) == 12 and b8.embed_dim == 768
    assert s16.embed_dim == 384 and s16.feature_strides == (16,) * 4 and s16.pos_grid == (14, 14)
    # patch distillation uses blocks 6 and 12 (0-based 5 and 11): levels 1 and 3
    spec = get_model_spec("deo_vit_b16")
    assert [b8.out_indices[i] for i in spec.distill_levels] == [5, 11]
