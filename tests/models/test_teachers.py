"""The frozen optical teacher (docs/method.md §2.7), at tiny size with random weights."""

from __future__ import annotations

import logging

import huggingface_hub
import pytest
import timm
import torch

from deo_cli.errors import UsageError, WeightsError
from deo_cli.models import build_teacher, get_teacher_spec, list_teachers


def _teacher(name="test_dinov3_tiny", seed=0):
    torch.manual_seed(seed)
    return build_teacher(name, weights=None)


def test_registry():
    assert {
        "dinov3_vitb16",
        "dinov3_vitl16",
        "dinov2_vitb14",
        "dinov2_vitb14_reg",
        "dinov2_vitl14_reg",
    } <= set(list_teachers())
    base, large = get_teacher_spec("dinov3_vitb16"), get_teacher_spec("dinov3_vitl16")
    assert base.timm_name == "vit_base_patch16_dinov3.lvd1689m" and base.blocks == (8, 11)
    assert large.blocks == (15, 23) and get_teacher_spec("dinov2_vitl14").blocks == (15, 23)
    assert get_teacher_spec("dinov2_vitb14_reg").arch == "vit_base_patch14_reg4_dinov2"
    with pytest.raises(UsageError, match="did you mean 'dinov3_vitb16'"):
        get_teacher_spec("dinov3_vit_b16")


@pytest.mark.parametrize(("name", "size", "grid"), [("test_dinov3_tiny", 64, 4), ("test_dinov2_tiny", 56, 4)])
def test_outputs_are_normed_cls_and_normed_patch_maps(name, size, grid):
    teacher = _teacher(name)
    x = torch.randn(2, 3, size, size)
    cls, maps = teacher(x)
    assert cls.shape == (2, 32) and [tuple(m.shape) for m in maps] == [(2, 32, grid, grid)] * 2
    model = teacher.model
    with torch.no_grad():
        tokens = model.forward_features(x)  # final norm applied; CLS + 4 registers first
    assert model.num_prefix_tokens == 5
    torch.testing.assert_close(cls, tokens[:, 0])
    want_last = tokens[:, 5:].reshape(2, grid, grid, 32).permute(0, 3, 1, 2)  # registers removed
    torch.testing.assert_close(maps[1], want_last)
    # the earlier block went through the same final LayerNorm (weight 1, bias 0 at init):
    # every token has zero mean and unit variance over the channels
    tok = maps[0].permute(0, 2, 3, 1)
    torch.testing.assert_close(tok.mean(-1), torch.zeros(tok.shape[:-1]), atol=1e-4, rtol=0)
    torch.testing.assert_close(tok.var(-1, unbiased=False), torch.ones(tok.shape[:-1]), atol=1e-3, rtol=0)


def test_frozen_eval_no_grad():
    teacher = _teacher()
    assert not teacher.training and all(not p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not teacher.training and not teacher.model.training
    x = torch.randn(1, 3, 64, 64, requires_grad=True)
    cls, maps = teacher(x)
    assert not cls.requires_grad and not any(m.requires_grad for m in maps)
    with pytest.raises(UsageError, match="3-band RGB"):
        teacher(torch.randn(1, 10, 64, 64))


def test_any_size_is_padded_to_the_patch():
    teacher = _teacher()
    x = torch.randn(1, 3, 60, 50)
    cls, maps = teacher(x)
    cls_p, maps_p = teacher(torch.nn.functional.pad(x, (0, 14, 0, 4)))
    assert maps[0].shape[-2:] == (4, 4) == teacher.grid(60, 50)
    torch.testing.assert_close(cls, cls_p)


def test_local_file_in_timm_layout(tmp_path):
    src = _teacher(seed=1)
    path = tmp_path / "teacher.pth"
    torch.save(src.model.state_dict(), path)
    got = build_teacher("test_dinov3_tiny", weights=str(path))
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(got(x)[0], src(x)[0])
    assert got.weights_sha256 is not None and got.weights_uri == str(path)


def _meta_dinov3(src) -> dict:
    """``src``'s weights under Meta's original DINOv3 names, with Meta's zero qkv biases."""
    meta = {}
    for k, v in src.model.state_dict().items():
        k = (
            k.replace("reg_token", "storage_tokens")
            .replace("gamma_1", "ls1.gamma")
            .replace("gamma_2", "ls2.gamma")
        )
        meta[k] = v
    for i in range(2):
        meta[f"blocks.{i}.attn.qkv.bias"] = torch.zeros(96)  # Meta stores a zero qkv bias
    meta["mask_token"] = torch.zeros(1, 32)
    meta["rope_embed.periods"] = torch.ones(4)
    return meta


def test_local_file_in_meta_dinov3_layout(tmp_path, capsys, caplog):
    """Meta's original DINOv3 names (storage_tokens, ls1.gamma, qkv.bias...) convert through timm."""
    src = _teacher(seed=2)
    path = tmp_path / "dinov3_meta.pth"
    torch.save(_meta_dinov3(src), path)
    with caplog.at_level(logging.DEBUG, logger="deo_cli"):
        got = build_teacher("test_dinov3_tiny", weights=path)
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(got(x)[1][0], src(x)[1][0])
    assert capsys.readouterr().out == ""  # timm's filter prints; deo does not let it through
    # timm's model has no q/v bias: the zero biases are dropped, at DEBUG
    (rec,) = [r for r in caplog.records if "q/v attention biases" in r.getMessage()]
    assert rec.levelno == logging.DEBUG and "dropping 2 zero q/v attention biases" in rec.getMessage()


@pytest.mark.parametrize("part,refused", [("q", True), ("v", True), ("k", False)])
def test_meta_dinov3_biases_the_model_cannot_hold_must_be_zero(tmp_path, part, refused):
    """A non-zero q or v bias would be dropped (timm's ViT-B DINOv3 has none): one line naming
    the key and the largest value. DINOv3 masks the k bias to zero itself, so k may be anything."""
    src = _teacher(seed=4)
    meta = _meta_dinov3(src)
    start = {"q": 0, "k": 32, "v": 64}[part]
    meta["blocks.1.attn.qkv.bias"][start : start + 32] = torch.linspace(-0.25, 0.125, 32)
    path = tmp_path / "dinov3_meta.pth"
    torch.save(meta, path)
    if not refused:
        got = build_teacher("test_dinov3_tiny", weights=path)
        x = torch.randn(1, 3, 64, 64)
        torch.testing.assert_close(got(x)[1][0], src(x)[1][0])
        return
    with pytest.raises(WeightsError) as info:
        build_teacher("test_dinov3_tiny", weights=path)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(
        "dinov3_meta.pth: non-zero attention q/v biases in 1 of 2 blocks (blocks.1.attn.qkv.bias; "
        "max |bias| 0.25 in blocks.1.attn.qkv.bias)"
    )


def test_wrong_teacher_file_is_one_clear_line(tmp_path):
    path = tmp_path / "dinov2.pth"
    torch.save(_teacher("test_dinov2_tiny").model.state_dict(), path)
    with pytest.raises(WeightsError) as info:
        build_teacher("test_dinov3_tiny", weights=path)
    assert "\n" not in str(info.value) and "teacher test_dinov3_tiny" in str(info.value)


def test_default_weights_offline(monkeypatch):
    def offline(*args, **kwargs):
        raise huggingface_hub.errors.LocalEntryNotFoundError(
            "Cannot find the requested files in the local cache"
        )

    monkeypatch.setattr(timm.models._hub, "hf_hub_download", offline)
    with pytest.raises(WeightsError) as info:
        build_teacher("dinov3_vitb16")
    msg = str(info.value)
    assert "\n" not in msg and "vit_base_patch16_dinov3.lvd1689m" in msg and "teacher weights" in msg


def test_random_weights_warn(caplog):
    with caplog.at_level(logging.WARNING, logger="deo_cli"):
        build_teacher("test_dinov3_tiny", weights="random")
    assert any("random weights" in r.getMessage() for r in caplog.records)
    with pytest.raises(WeightsError, match="no released weights"):
        build_teacher("test_dinov3_tiny")
