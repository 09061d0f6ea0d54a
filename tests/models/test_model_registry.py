"""The explicit model registry: names, specs, did-you-mean, and specs that match the modules."""

from __future__ import annotations

import pytest
import torch

from deo_cli.errors import UsageError
from deo_cli.models import build_encoder, get_model_spec, list_models
from deo_cli.models.registry import DEO_SWIN_B_WEIGHTS
from deo_cli.sensors import DEO_RGB_MANIFEST, DEO_S2_MANIFEST

ALL = [
    "deo_swin_b",
    "deo_swin_t",
    "deo_swin_test",
    "deo_vit_b16",
    "deo_vit_b8",
    "deo_vit_s16",
    "deo_vit_test",
]


def test_names():
    assert list_models() == ALL
    assert list_models(include_test=False) == [n for n in ALL if not n.endswith("_test")]


def test_unknown_name_suggests_the_closest():
    with pytest.raises(
        UsageError,
        match=r"unknown model 'deo_swin_bb' \(did you mean 'deo_swin_b'\?\)\. Choose one of deo_swin_b, ",
    ):
        get_model_spec("deo_swin_bb")


def test_deo_swin_b_spec():
    spec = get_model_spec("deo_swin_b")
    assert spec.family == "swin" and spec.input_size == 224 and spec.default_layer == 3
    assert spec.feature_channels == (128, 256, 512, 1024) and spec.feature_strides == (4, 8, 16, 32)
    assert spec.default_weights == DEO_SWIN_B_WEIGHTS
    assert spec.default_weights.endswith("DEO_swin_b.pth@f973d29f6324fb12fca734778cf9d2ae539524bb")
    assert spec.manifest is DEO_S2_MANIFEST and spec.rgb_manifest is DEO_RGB_MANIFEST
    assert spec.distill_levels == (2, 3)


@pytest.mark.parametrize("name", ALL)
def test_spec_matches_the_built_module(name):
    spec = get_model_spec(name)
    with torch.device("meta"):
        enc = build_encoder(name, weights=None)
    assert enc.spec == spec
    assert enc.feature_channels == spec.feature_channels
    assert enc.feature_strides == spec.feature_strides
    assert enc.pooled_dim == spec.pooled_dim
    assert enc.in_chans == len(spec.manifest.bands) == 10
    assert enc.manifest == DEO_S2_MANIFEST and enc.rgb_manifest == DEO_RGB_MANIFEST
    assert enc.weights_uri is None and enc.weights_sha256 is None


@pytest.mark.parametrize("name", ["deo_swin_test", "deo_vit_test"])
def test_test_sizes_are_tiny_and_run_at_their_chip_size(name):
    torch.manual_seed(0)
    enc = build_encoder(name, weights=None)
    n = sum(p.numel() for p in enc.parameters())
    assert 5_000 < n < 1_000_000
    s = enc.spec.input_size
    with torch.no_grad():
        for bands in (10, 3):
            maps = enc(torch.randn(1, bands, s, s))
            assert [tuple(m.shape[-2:]) for m in maps] == enc.feature_grid(s, s)


def test_overrides_reach_the_builder_and_the_spec():
    enc = build_encoder("deo_swin_test", weights=None, embed_dim=8, num_heads=(1, 1, 2, 2))
    assert enc.feature_channels == (8, 16, 32, 64) and enc.spec.feature_channels == (8, 16, 32, 64)
    assert enc.model_kwargs == {"embed_dim": 8, "num_heads": (1, 1, 2, 2)}
