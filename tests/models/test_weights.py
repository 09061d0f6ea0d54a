"""Weights: URIs, downloads without a network, deo's formats, and clear rejection of bad files."""

from __future__ import annotations

import argparse
import hashlib
import logging
import urllib.error

import huggingface_hub
import pytest
import torch

from deo_cli.errors import WeightsError
from deo_cli.models import (
    build_encoder,
    file_sha256,
    load_encoder,
    read_encoder_weights,
    resolve_weights,
    save_encoder,
)
from deo_cli.models.weights import PRETRAIN_FORMAT, encoder_meta, parse_hf_uri, split_selector
from deo_cli.sensors import BandManifest


def _tiny(seed: int = 0, name: str = "deo_swin_test", **kw):
    torch.manual_seed(seed)
    return build_encoder(name, weights=None, **kw)


def _same_outputs(a, b, bands: int = 10) -> bool:
    x = torch.randn(1, bands, 64, 64)
    with torch.no_grad():
        return all(torch.equal(m, n) for m, n in zip(a(x), b(x), strict=True))


# -- URIs and downloads ------------------------------------------------------------------------


def test_hf_uri_parsing():
    ref = parse_hf_uri("hf://SolaireTheSun/DEO/DEO_swin_b.pth@f973d29f6324fb12fca734778cf9d2ae539524bb")
    assert (ref.repo_id, ref.filename, ref.revision) == (
        "SolaireTheSun/DEO",
        "DEO_swin_b.pth",
        "f973d29f6324fb12fca734778cf9d2ae539524bb",
    )
    assert (
        ref.url
        == "https://huggingface.co/SolaireTheSun/DEO/resolve/f973d29f6324fb12fca734778cf9d2ae539524bb/DEO_swin_b.pth"
    )
    ref = parse_hf_uri("hf://org/repo/sub/dir/w.safetensors")
    assert (ref.repo_id, ref.filename, ref.revision) == ("org/repo", "sub/dir/w.safetensors", None)
    with pytest.raises(WeightsError, match="hf://OWNER/REPO/FILE"):
        parse_hf_uri("hf://org/only-repo")
    assert split_selector("run/ckpt.pt?student") == ("run/ckpt.pt", "student")
    assert split_selector("hf://a/b/c.pt@v1") == ("hf://a/b/c.pt@v1", None)


def test_hf_download_goes_through_huggingface_hub(monkeypatch, tmp_path):
    calls = []
    fake = tmp_path / "DEO_swin_b.pth"
    fake.write_bytes(b"x")

    def download(repo_id, filename, revision=None, **kw):
        calls.append((repo_id, filename, revision))
        return str(fake)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    assert resolve_weights("hf://SolaireTheSun/DEO/DEO_swin_b.pth@abc123") == fake
    assert calls == [("SolaireTheSun/DEO", "DEO_swin_b.pth", "abc123")]


@pytest.mark.parametrize(
    "error",
    [huggingface_hub.errors.LocalEntryNotFoundError("no cache"), ConnectionError("Network is unreachable")],
)
def test_default_weights_offline_give_one_clear_line(monkeypatch, error):
    def offline(*args, **kwargs):
        raise error

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(WeightsError) as info:
        build_encoder("deo_swin_b")  # the default: the official release
    msg = str(info.value)
    assert "\n" not in msg
    assert "DEO_swin_b.pth" in msg and "SolaireTheSun/DEO" in msg and "--weights" in msg
    assert (
        "https://huggingface.co/SolaireTheSun/DEO/resolve/f973d29f6324fb12fca734778cf9d2ae539524bb/DEO_swin_b.pth"
        in msg
    )


def test_https_offline_and_cached(monkeypatch, tmp_path):
    from deo_cli.models import weights as weights_mod

    monkeypatch.setattr(weights_mod, "hub_reachable", lambda host="", timeout=3.0: True)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    calls = []

    def offline(url, dst, hash_prefix=None, progress=True):
        calls.append(progress)
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(
        WeightsError, match=r"cannot download w\.pth from https://example\.org/m/w\.pth .*--weights"
    ):
        resolve_weights("https://example.org/m/w.pth")
    assert calls == [False]  # no progress bar
    cached = tmp_path / "hub" / "checkpoints" / "w.pth"
    assert not cached.exists()  # a failed download leaves nothing behind
    cached.write_bytes(b"x")
    assert resolve_weights("https://example.org/m/w.pth") == cached  # no download once cached


def test_missing_local_file(tmp_path):
    with pytest.raises(WeightsError, match="weights file .*nope.pth not found"):
        resolve_weights(tmp_path / "nope.pth")
    with pytest.raises(WeightsError, match="is a folder"):
        resolve_weights(tmp_path)


def test_sha256(tmp_path):
    p = tmp_path / "f.bin"
    p.write_bytes(b"deo" * 1000)
    assert file_sha256(p) == hashlib.sha256(b"deo" * 1000).hexdigest()


# -- random and default ------------------------------------------------------------------------


def test_random_weights_warn_and_none_does_not(caplog):
    with caplog.at_level(logging.WARNING, logger="deo_cli"):
        build_encoder("deo_vit_test", weights="random")
    assert any("random weights" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="deo_cli"):
        build_encoder("deo_vit_test", weights=None)
    assert not caplog.records


def test_models_without_release_need_explicit_weights():
    with pytest.raises(WeightsError, match="deo_swin_t has no released weights.*--weights"):
        build_encoder("deo_swin_t")


# -- deo's own formats -------------------------------------------------------------------------


def test_encoder_export_round_trip(tmp_path):
    enc = _tiny(3, drop_path_rate=0.0)
    enc.manifest = BandManifest.from_dict({**enc.manifest.to_dict(), "name": "custom", "std": [2.0] * 10})
    path = save_encoder(enc, tmp_path / "enc.pt", recipe={"lr": 0.1})
    assert not list(tmp_path.glob(".*tmp*"))  # written atomically
    back = build_encoder("deo_swin_test", weights=str(path))
    assert _same_outputs(enc, back) and _same_outputs(enc, back, bands=3)
    assert back.manifest.name == "custom" and back.manifest.std == (2.0,) * 10
    assert back.model_kwargs == {"drop_path_rate": 0.0}
    assert back.weights_uri == str(path) and back.weights_sha256 == file_sha256(path)
    loaded = read_encoder_weights(path)
    assert loaded.format == "encoder-v1" and loaded.meta["recipe"] == {"lr": 0.1}
    same = load_encoder(path)  # the file names its model
    assert same.spec.name == "deo_swin_test" and _same_outputs(enc, same)


def test_export_keeps_model_kwargs_so_shapes_fit(tmp_path):
    enc = _tiny(1, embed_dim=8, num_heads=(1, 1, 2, 2))
    path = save_encoder(enc, tmp_path / "small.pt")
    back = build_encoder("deo_swin_test", weights=path)
    assert back.feature_channels == (8, 16, 32, 64) and _same_outputs(enc, back)


def test_pretrain_checkpoint_teacher_by_default_student_on_request(tmp_path):
    student, teacher = _tiny(0), _tiny(1)
    teacher_sd = {
        k: v for k, v in teacher.state_dict().items() if not k.startswith("conv_rgb")
    }  # EMA teacher: no RGB stem
    ckpt = {
        "deo_format": PRETRAIN_FORMAT,
        **encoder_meta(student),
        "student_encoder": student.state_dict(),
        "teacher_encoder": teacher_sd,
        "epoch": 7,
    }
    path = tmp_path / "checkpoint.pt"
    torch.save(ckpt, path)
    got_teacher = build_encoder("deo_swin_test", weights=str(path))
    assert _same_outputs(got_teacher, teacher)
    assert torch.equal(
        got_teacher.conv_rgb[0].weight, student.conv_rgb[0].weight
    )  # borrowed from the student
    assert _same_outputs(build_encoder("deo_swin_test", weights=f"{path}?student"), student)
    assert _same_outputs(build_encoder("deo_swin_test", weights=str(path), which="student"), student)
    assert read_encoder_weights(path).meta["epoch"] == 7


def test_pretrain_checkpoint_with_wrapped_modules(tmp_path):
    # A trainer that saved whole modules (DDP-wrapped student, EMA teacher with its head_ms).
    student, teacher = _tiny(0), _tiny(1)
    ckpt = {
        "deo_format": PRETRAIN_FORMAT,
        **encoder_meta(student),
        "student_encoder": {f"module.{k}": v for k, v in student.state_dict().items()},
        "teacher_encoder": {
            **{f"encoder.{k}": v for k, v in teacher.state_dict().items() if not k.startswith("conv_rgb")},
            "head_ms.mlp.0.weight": torch.zeros(2, 2),
        },
        "optimizer": {"state": {0: {"exp_avg": torch.zeros(3)}}},
    }
    path = tmp_path / "wrapped.pt"
    torch.save(ckpt, path)
    got = build_encoder("deo_swin_test", weights=path)
    assert _same_outputs(got, teacher) and torch.equal(got.conv_rgb[0].weight, student.conv_rgb[0].weight)
    assert "optimizer" not in read_encoder_weights(path).meta


def test_checkpoint_of_another_model_is_rejected(tmp_path):
    path = save_encoder(_tiny(), tmp_path / "swin.pt")
    with pytest.raises(
        WeightsError,
        match="swin.pt holds a deo_swin_test encoder, not deo_vit_test. Use --model deo_swin_test",
    ):
        build_encoder("deo_vit_test", weights=path)


def test_official_checkpoint_with_training_args_loads(tmp_path):
    enc = _tiny(2)
    sd = {f"_orig_mod.module.backbone.feat_extr.{k}": v for k, v in enc.state_dict().items()}
    sd["module.head_ms.mlp.0.weight"] = torch.zeros(3, 3)  # heads are ignored
    path = tmp_path / "dino_style.pth"
    torch.save({"student": sd, "teacher": {}, "args": argparse.Namespace(arch="swin_b"), "epoch": 99}, path)
    assert _same_outputs(build_encoder("deo_swin_test", weights=path), enc)


def test_safetensors_file(tmp_path):
    from safetensors.torch import save_file

    enc = _tiny(4)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in enc.state_dict().items()}, path)
    assert _same_outputs(build_encoder("deo_swin_test", weights=path), enc)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage")
    assert "cannot read weights file bad.safetensors" in _one_line_error(bad)


# -- bad files: one clear line each --------------------------------------------------------------


def _one_line_error(weights, name: str = "deo_swin_test") -> str:
    with pytest.raises(WeightsError) as info:
        build_encoder(name, weights=weights)
    msg = str(info.value)
    assert "\n" not in msg and msg.endswith(".")
    return msg


def test_truncated_file(tmp_path):
    good = save_encoder(_tiny(), tmp_path / "good.pt")
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    msg = _one_line_error(cut)
    assert "cannot read weights file cut.pt: truncated or not a PyTorch checkpoint" in msg
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    assert "empty.pt" in _one_line_error(empty)
    text = tmp_path / "notes.pth"
    text.write_text("these are not weights")
    assert "notes.pth" in _one_line_error(text)


def test_foreign_checkpoints(tmp_path):
    foreign = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(10, 512)}, foreign)
    msg = _one_line_error(foreign)
    assert "resnet.pth holds no deo_swin_test weights" in msg and "'conv1.weight'" in msg
    tensor = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), tensor)
    assert "holds a Tensor, not a checkpoint dictionary" in _one_line_error(tensor)
    meta_only = tmp_path / "meta.pth"
    torch.save({"epoch": 3, "note": "x"}, meta_only)
    assert "holds no encoder weights (top-level keys: 'epoch', 'note')" in _one_line_error(meta_only)
    newer = tmp_path / "newer.pt"
    torch.save({"deo_format": "encoder-v9"}, newer)
    assert "deo format 'encoder-v9'" in _one_line_error(newer)


def test_wrong_shapes_name_the_first_key_and_the_model(tmp_path):
    # A 12-band stem: the Swin's shape fits deo_swin_test, the stem's input does not.
    sd = _tiny(0).state_dict()
    sd["conv_ms.0.weight"] = torch.zeros(16, 12, 4, 4)
    path = tmp_path / "b12.pth"
    torch.save(sd, path)
    msg = _one_line_error(path)
    assert "b12.pth does not fit deo_swin_test: conv_ms.0.weight has shape (16, 12, 4, 4)" in msg
    assert "(16, 10, 4, 4) in the model" in msg


def test_a_window_other_than_the_models_is_read_from_the_checkpoint(tmp_path):
    # A window-4 checkpoint has smaller relative-position tables than deo_swin_test's window 6:
    # deo builds window 4 (a deo export records it; a plain state dict shows it in its tables).
    other = _tiny(0, window_size=4)
    for path in (tmp_path / "w4.pth", tmp_path / "w4-export.pt"):
        if path.suffix == ".pt":
            save_encoder(other, path)
        else:
            torch.save(other.state_dict(), path)
        back = build_encoder("deo_swin_test", weights=path)
        assert back.model_kwargs["window_size"] == 4 and _same_outputs(other, back)


class _CallerGlobal:
    """A class a caller allowed in weights-only loads before calling deo."""


def test_reading_a_checkpoint_leaves_torchs_allow_list_as_it_was(tmp_path):
    path = tmp_path / "dino_style.pth"
    torch.save({"model": _tiny(3).state_dict(), "args": argparse.Namespace(arch="swin_b")}, path)
    before = torch.serialization.get_safe_globals()
    try:
        # the caller allowed Namespace itself (and another class): both are still allowed after
        torch.serialization.add_safe_globals([_CallerGlobal, argparse.Namespace])
        mine = set(torch.serialization.get_safe_globals())
        read_encoder_weights(path)
        assert set(torch.serialization.get_safe_globals()) == mine
        # a caller without them: deo's own addition (Namespace) is gone again, also after a failure
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(before)
        read_encoder_weights(path)
        with pytest.raises(WeightsError):
            read_encoder_weights(tmp_path / "nothing.pth")
        (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
        with pytest.raises(WeightsError):
            read_encoder_weights(tmp_path / "garbage.pth")
        assert set(torch.serialization.get_safe_globals()) == set(before)
        assert argparse.Namespace not in torch.serialization.get_safe_globals()
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(before)


def test_incomplete_checkpoint(tmp_path):
    sd = {k: v for k, v in _tiny().state_dict().items() if not k.startswith("norm.")}
    path = tmp_path / "partial.pth"
    torch.save(sd, path)
    assert "partial.pth lacks 2 of deo_swin_test's weights (first: norm.weight)" in _one_line_error(path)


def test_unsafe_pickles_are_refused(tmp_path):
    path = tmp_path / "pickled.pth"
    torch.save({"state_dict": _tiny().state_dict(), "obj": logging.getLogger("x")}, path)
    assert "holds Python objects other than tensors" in _one_line_error(path)


def test_offline_fails_fast_without_network_retries(monkeypatch, tmp_path):
    """HF_HUB_OFFLINE (or an unreachable host) skips the hub client's ~25 s of retries; the cache
    is still used."""
    from deo_cli.models import weights as weights_mod

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert not weights_mod.hub_reachable()
    cached = tmp_path / "DEO_swin_b.pth"
    cached.write_bytes(b"x")
    calls = []

    def download(repo_id, filename, revision=None, local_files_only=False, **kw):
        calls.append(local_files_only)
        if local_files_only and filename == "DEO_swin_b.pth":
            return str(cached)
        raise huggingface_hub.errors.LocalEntryNotFoundError("not cached")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    assert resolve_weights("hf://SolaireTheSun/DEO/DEO_swin_b.pth@abc") == cached
    with pytest.raises(WeightsError, match="not reachable from this machine"):
        resolve_weights("hf://SolaireTheSun/DEO/other.pth@abc")
    assert calls == [True, True]  # cache lookups only: no network attempt while offline
