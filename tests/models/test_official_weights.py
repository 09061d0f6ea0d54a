"""The official DEO_swin_b.pth layout loads into deo's Swin and gives the reference features.

The oracle is the reference network as the official release builds it (docs/design.md §2,
docs/method.md §2.5/§2.13): torchvision's Swin-B (``swin_b``'s configuration) with window 12, the
first ``features`` block (patch embedding) deleted, ``conv_ms`` / ``conv_rgb`` stems added,
wrapped so its state-dict keys are ``feat_extr.*``. It is built here, independently of deo.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.models import swin_b
from torchvision.models.swin_transformer import SwinTransformer
from torchvision.ops.misc import Permute

from deo_cli.models import build_encoder, load_encoder, num_parameters

SWIN_B = dict(embed_dim=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32], window=12)
SWIN_TEST = dict(embed_dim=16, depths=[2, 2, 2, 2], num_heads=[1, 2, 2, 4], window=6)


class ReferenceDeo(nn.Module):
    """The official feature extractor: ``feat_extr`` = torchvision Swin minus its patch
    embedding plus two stems; returns the four stage outputs (NHWC, no final norm)."""

    def __init__(self, embed_dim, depths, num_heads, window, ms_bands=10):
        super().__init__()
        tv = SwinTransformer(
            patch_size=[4, 4],
            embed_dim=embed_dim,
            depths=depths,
            num_heads=num_heads,
            window_size=[window, window],
            stochastic_depth_prob=0.5,
        )
        del tv.features[0]
        tv.conv_ms = nn.Sequential(
            nn.Conv2d(ms_bands, embed_dim, 4, 4), Permute([0, 2, 3, 1]), nn.LayerNorm(embed_dim)
        )
        tv.conv_rgb = nn.Sequential(
            nn.Conv2d(3, embed_dim, 4, 4), Permute([0, 2, 3, 1]), nn.LayerNorm(embed_dim)
        )
        self.feat_extr = tv

    def forward(self, x):
        f = self.feat_extr
        x = f.conv_rgb(x) if x.shape[1] == 3 else f.conv_ms(x)
        outs = []
        for i, layer in enumerate(f.features):
            x = layer(x)
            if i in (0, 2, 4, 6):
                outs.append(x)
        return outs


def _randomise(module: nn.Module, seed: int) -> None:
    """Random values everywhere (norm weights near 1), so a wrong key mapping shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.05
            p.copy_(1.0 + noise if name.endswith("weight") and p.ndim == 1 else noise)


def _reference(config: dict, seed: int = 0) -> ReferenceDeo:
    ref = ReferenceDeo(**config)
    _randomise(ref, seed)
    return ref.eval()


def _compare(ref: nn.Module, ours: nn.Module, bands: int, size: int, tol: float = 1e-5) -> list[tuple]:
    torch.manual_seed(bands * 1000 + size)
    x = torch.randn(1, bands, size, size)
    with torch.no_grad():
        want = [o.permute(0, 3, 1, 2) for o in ref(x)]
        got = ours(x)
    assert len(got) == 4
    for w, g in zip(want, got, strict=True):
        assert g.shape == w.shape
        assert (g - w).abs().max().item() < tol
    return [tuple(g.shape) for g in got]


def test_reference_is_torchvision_swin_b_with_window_12():
    # The oracle differs from torchvision's swin_b only in the window (and so the bias tables).
    with torch.device("meta"):
        tv = swin_b()
        ref = ReferenceDeo(**SWIN_B)
    tv_keys = {k: v.shape for k, v in tv.features.state_dict().items() if not k.startswith("0.")}
    ref_keys = {
        f"{int(k.split('.')[0]) + 1}.{k.split('.', 1)[1]}": v.shape
        for k, v in ref.feat_extr.features.state_dict().items()
    }
    assert tv_keys.keys() == ref_keys.keys()
    differ = {k for k in tv_keys if tv_keys[k] != ref_keys[k]}
    assert differ and all("relative_position" in k for k in differ)
    assert ref.feat_extr.features[0][0].attn.window_size == [12, 12]


@pytest.mark.parametrize("layout", ["plain", "student_prefixed"])
def test_tiny_official_layout_matches_reference(tmp_path, layout):
    ref = _reference(SWIN_TEST, seed=1)
    sd = ref.state_dict()
    if layout == "student_prefixed":
        sd = {"student": {f"module.backbone.{k}": v for k, v in sd.items()}, "epoch": 3}
    path = tmp_path / "official.pth"
    torch.save(sd, path)
    ours = build_encoder("deo_swin_test", weights=str(path))
    for bands in (10, 3):
        for size in (64, 72):
            _compare(ref, ours, bands, size)


@pytest.mark.slow
def test_official_swin_b_equivalence_param_count_and_shapes(tmp_path):
    """The acceptance test of issue 4: random reference Swin-B in the official layout, loaded
    through deo, gives the same four stage maps (max abs diff < 1e-5) for 10- and 3-band input
    at 224 px and at 200 px (not a multiple of 32); backbone plus stems has 87 M parameters."""
    ref = _reference(SWIN_B, seed=0)
    path = tmp_path / "DEO_swin_b.pth"
    torch.save(ref.state_dict(), path)
    ours = load_encoder(str(path))  # an official-layout file is deo_swin_b
    assert ours.spec.name == "deo_swin_b"
    assert abs(num_parameters(ours) - 87e6) / 87e6 < 0.01

    shapes_224_ms = _compare(ref, ours, 10, 224)
    shapes_224_rgb = _compare(ref, ours, 3, 224)
    assert (
        shapes_224_ms
        == shapes_224_rgb
        == [(1, 128, 56, 56), (1, 256, 28, 28), (1, 512, 14, 14), (1, 1024, 7, 7)]
    )
    shapes_200 = _compare(ref, ours, 10, 200)
    _compare(ref, ours, 3, 200)
    assert shapes_200 == [(1, 128, 50, 50), (1, 256, 25, 25), (1, 512, 13, 13), (1, 1024, 7, 7)]

    # 250 px (not a multiple of the stem stride): padded inside forward, ceil grids.
    with torch.no_grad():
        for bands in (10, 3):
            got = [tuple(m.shape) for m in ours(torch.randn(1, bands, 250, 250))]
            assert got == [(1, 128, 63, 63), (1, 256, 32, 32), (1, 512, 16, 16), (1, 1024, 8, 8)]
    assert ours.feature_grid(250, 250) == [(63, 63), (32, 32), (16, 16), (8, 8)]
