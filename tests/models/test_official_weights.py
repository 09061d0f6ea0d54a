"""The official DEO_swin_b.pth layout loads into deo's Swin and gives the reference features.

The oracle is the reference network as the official release builds it (docs/design.md §2,
docs/method.md §2.5/§2.13): torchvision's Swin-B (``swin_b``'s configuration) with window 12, the
first ``features`` block (patch embedding) deleted, ``conv_ms`` / ``conv_rgb`` stems added,
wrapped so its state-dict keys are ``feat_extr.*``. It is built here, independently of deo.
"""

from __future__ import annotations

import argparse
import logging

import pytest
import torch
from torch import nn
from torchvision.models import swin_b
from torchvision.models.swin_transformer import SwinTransformer
from torchvision.ops.misc import Permute

from deo_cli.errors import WeightsError
from deo_cli.models import build_encoder, load_encoder, num_parameters
from deo_cli.models.build import fit_swin_to_checkpoint, get_model_builder
from deo_cli.models.swin import SwinShape, swin_shape
from deo_cli.models.weights import _strip_official

SWIN_B = dict(embed_dim=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32], window=12)
SWIN_TEST = dict(embed_dim=16, depths=[2, 2, 2, 2], num_heads=[1, 2, 2, 4], window=6)
#: A Swin no deo model has (for reading the shape only).
SWIN_32 = dict(embed_dim=32, depths=[2, 2, 2, 2], num_heads=[2, 4, 8, 16])


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


def _training_checkpoint(ref: ReferenceDeo, epoch: int = 5) -> dict:
    """What the official training script (main_dino.py) saves: ``{"student", "teacher",
    "optimizer", "epoch", "args", "dino_loss"}``. The student is DDP around the multi-crop
    wrapper, so the Swin sits under ``module.backbone.`` (its ``head`` replaced by an identity)
    and the stems and DINO heads beside it under ``module.``; the EMA teacher is not wrapped in
    DDP and has no RGB stem."""

    def wrapper(prefix: str, rgb: bool) -> dict:
        out = {}
        for k, v in ref.feat_extr.state_dict().items():
            if k.startswith("head."):
                continue
            if k.startswith(("conv_ms.", "conv_rgb.")):
                if rgb or k.startswith("conv_ms."):
                    out[prefix + k] = v.clone()
            else:
                out[f"{prefix}backbone.{k}"] = v.clone()
        out[prefix + "head_ms.last_layer.weight_v"] = torch.ones(8, 4)
        return out

    return {
        "student": wrapper("module.", rgb=True),
        "teacher": wrapper("", rgb=False),
        "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "weight_decay": 0.04, "params": [0, 1]}]},
        "epoch": epoch,
        "args": argparse.Namespace(arch="swin_b", ms_arch=True, dist_arch="dinov3", out_dim=65536),
        "dino_loss": {"center": torch.zeros(1, 8)},
    }


@pytest.mark.parametrize("window", [7, 12])
@pytest.mark.parametrize("depths", [[2, 2, 2, 2], [1, 2, 3, 1]])
def test_swin_shape_is_read_from_the_tensors(window, depths):
    with torch.device("meta"):
        ref = ReferenceDeo(**{**SWIN_32, "depths": depths}, window=window)
    sd = {k[len("feat_extr.") :]: v for k, v in ref.state_dict().items()}
    shape = swin_shape(sd)
    assert shape == SwinShape(32, tuple(depths), (2, 4, 8, 16), window, 4.0, in_chans=10)
    assert (
        shape.describe()
        == f"Swin embed 32, depths {','.join(map(str, depths))}, heads 2,4,8,16, window {window}"
    )
    # not a Swin, or a table that fits no square window
    assert swin_shape({"blocks.0.attn.qkv.weight": torch.zeros(96, 32)}) is None
    sd["features.2.1.attn.relative_position_bias_table"] = torch.zeros(100, 4)
    with pytest.raises(ValueError, match="fits no square window"):
        swin_shape(sd)


@pytest.mark.parametrize("window", [7, 12])
@pytest.mark.parametrize("layout", ["training", "release"])
def test_checkpoint_of_either_window_loads_and_matches_its_reference(tmp_path, caplog, window, layout):
    """Window 7 (torchvision's swin_b(), what the official code builds) and window 12 (what its
    README says): deo builds the window the checkpoint's tables show and gives the reference
    network's features, from the training script's checkpoint and from the release layout."""
    ref = _reference({**SWIN_TEST, "window": window}, seed=window)
    path = tmp_path / "DEO_swin.pth"
    torch.save(_training_checkpoint(ref) if layout == "training" else ref.state_dict(), path)
    with caplog.at_level(logging.INFO, logger="deo_cli"):
        ours = build_encoder("deo_swin_test", weights=str(path))  # deo_swin_test's default: window 6
    text = caplog.text
    assert f"checkpoint DEO_swin.pth: Swin embed 16, depths 2,2,2,2, heads 1,2,2,4, window {window}" in text
    assert f"with the checkpoint's window {window} (its default is 6)" in text
    assert ours.model_kwargs == {"window_size": window}
    assert ours.features[0][0].attn.window_size == [window, window]
    for bands, size in ((10, 64), (3, 72)):
        _compare(ref, ours, bands, size)
    # a file without a deo header names no model: the registered Swin its tensors fit is built
    implied = load_encoder(str(path))
    assert implied.spec.name == "deo_swin_test" and implied.model_kwargs == {"window_size": window}
    if layout == "training":  # the EMA teacher (RGB stem borrowed from the student) loads too
        teacher = build_encoder("deo_swin_test", weights=f"{path}?teacher")
        _compare(ref, teacher, 3, 64)


def test_checkpoint_another_model_cannot_hold_is_one_line_naming_both(tmp_path):
    ref = _reference({**SWIN_TEST, "window": 7}, seed=3)
    path = tmp_path / "DEO_swin_b.pth"
    torch.save(_training_checkpoint(ref), path)
    with pytest.raises(WeightsError) as info:
        build_encoder("deo_swin_b", weights=str(path))
    msg = str(info.value)
    assert "\n" not in msg
    assert "Swin embed 16, depths 2,2,2,2, heads 1,2,2,4, window 7" in msg  # the checkpoint
    assert "deo_swin_b (Swin embed 128, depths 2,2,18,2, heads 4,8,16,32, window 12)" in msg  # the model
    assert msg.endswith("Use --model deo_swin_test.")
    # a window asked for explicitly must be the checkpoint's
    with pytest.raises(
        WeightsError, match="holds a Swin with window 7, but deo_swin_test was asked for window 12"
    ):
        build_encoder("deo_swin_test", weights=str(path), window_size=12)
    assert build_encoder("deo_swin_test", weights=str(path), window_size=7).model_kwargs == {"window_size": 7}
    # a file without a deo header whose Swin no deo model has
    with torch.device("meta"):
        odd = ReferenceDeo(**SWIN_32, window=7)
    path32 = tmp_path / "swin32.pth"
    torch.save({k: torch.zeros(v.shape) for k, v in odd.state_dict().items()}, path32)
    with pytest.raises(WeightsError, match="Swin embed 32, .* which no deo model has") as info:
        load_encoder(str(path32))
    assert "deo_swin_b, deo_swin_t" in str(info.value)


@pytest.mark.parametrize("window", [7, 12])
def test_swin_b_of_either_window_fits_deo_swin_b(window):
    """Swin-B size, on the meta device (no memory, no file): torchvision's own swin_b() (window
    7) converted as the official code converts it, and the window-12 reference, each give
    deo_swin_b with that window, whose every tensor then has the checkpoint's shape."""
    with torch.device("meta"):
        if window == 7:
            official = nn.Module()
            official.feat_extr = swin_b()  # exactly what the official DEO code builds
            del official.feat_extr.features[0]
            official.feat_extr.conv_ms = ReferenceDeo(**SWIN_B).feat_extr.conv_ms
            official.feat_extr.conv_rgb = ReferenceDeo(**SWIN_B).feat_extr.conv_rgb
        else:
            official = ReferenceDeo(**SWIN_B)
        sd = official.state_dict()
    sd = _strip_official({f"module.backbone.{k}": v for k, v in sd.items()})
    assert swin_shape(sd) == SwinShape(128, (2, 2, 18, 2), (4, 8, 16, 32), window, 4.0, in_chans=10)
    name, kwargs = fit_swin_to_checkpoint("deo_swin_b", sd, {}, implied=False)
    assert name == "deo_swin_b" and kwargs == ({"window_size": 7} if window == 7 else {})
    with torch.device("meta"):
        ours = get_model_builder(name)(**kwargs).state_dict()
    assert {k: v.shape for k, v in ours.items()} == {
        k: v.shape for k, v in sd.items() if not k.startswith("head.")
    }
