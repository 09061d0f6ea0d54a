import pytest
import torch

from deo_cli.errors import UsageError
from deo_cli.models.upernet import LinearSegHead, UPerNetHead, build_seg_head


def _swin_like(b=2, size=64):
    chans, strides = (16, 32, 64, 128), (4, 8, 16, 32)
    return [torch.randn(b, c, -(-size // s), -(-size // s)) for c, s in zip(chans, strides)], chans, strides


def test_upernet_shapes_and_ppm_scales():
    torch.manual_seed(0)
    feats, chans, strides = _swin_like()
    head = UPerNetHead(chans, strides, num_classes=5, channels=32)
    assert [p[0].output_size for p in head.ppm] == [1, 2, 3, 6]  # docs/method.md §3.1
    out = head(feats, out_size=(64, 64))
    assert out.shape == (2, 5, 64, 64)
    assert UPerNetHead(chans, strides, 3).bottleneck[0].out_channels == 512  # paper width by default


def test_upernet_for_vit_levels_builds_a_pyramid():
    feats = [torch.randn(2, 24, 8, 8) for _ in range(4)]  # ViT: 4 blocks, one stride
    head = UPerNetHead([24] * 4, [16] * 4, num_classes=3, channels=16)
    assert head.neck is not None
    assert head(feats, out_size=(128, 128)).shape == (2, 3, 128, 128)


def test_gradients_reach_every_level_and_not_a_frozen_encoder():
    feats, chans, strides = _swin_like(b=2, size=32)
    feats = [f.requires_grad_() for f in feats]
    head = LinearSegHead(chans, strides, 4)
    head(feats, out_size=(32, 32)).sum().backward()
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in feats)


def test_build_seg_head_by_name():
    assert isinstance(build_seg_head("upernet", [8, 8, 8, 8], [4, 8, 16, 32], 2), UPerNetHead)
    with pytest.raises(UsageError, match="unknown segmentation head"):
        build_seg_head("deeplab", [8], [4], 2)
