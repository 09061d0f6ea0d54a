"""Pretraining checkpoints: the pretrain-v1 layout, RNG states, pruning, export to encoder-v1."""

import random

import numpy as np
import pytest
import torch

from deo_cli.errors import OutputExistsError, WeightsError
from deo_cli.models import build_encoder, load_encoder
from deo_cli.models.weights import read_encoder_weights
from deo_cli.train.checkpoint import (
    checkpoint_path,
    export_encoder,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    restore_training_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from deo_cli.train.meta_arch import build_student, build_teacher_from_student
from deo_cli.train.optim import build_optimizer


def tiny(seed):
    torch.manual_seed(seed)
    student = build_student(build_encoder("deo_swin_test", weights=None), 32, ms_dim=16, hidden_dim=32)
    return student, build_teacher_from_student(student), build_optimizer(student)


def trained(seed=0):
    student, teacher, opt = tiny(seed)
    x = torch.randn(2, 10, 32, 32)
    loss = student.head_ms(student.encoder.forward_pooled(x)).sum()
    loss.backward()
    opt.step()
    with torch.no_grad():
        for p in teacher.parameters():
            p.mul_(0.5)  # teacher != student
    return student, teacher, opt


def same_outputs(a, b):
    x = torch.randn(2, 10, 32, 32, generator=torch.Generator().manual_seed(3))
    a.eval(), b.eval()
    with torch.no_grad():
        return all(torch.allclose(u, v) for u, v in zip(a(x), b(x)))


def test_rng_state_round_trip():
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    state = rng_state()
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first


def test_checkpoint_layout_loads_safely_and_restores(tmp_path):
    student, teacher, opt = trained()
    path = save_checkpoint(
        checkpoint_path(tmp_path, 7),
        student=student,
        teacher=teacher,
        optimizer=opt,
        scaler=None,
        step=7,
        rng=[rng_state()],
    )
    assert path.name == "checkpoint-00000007.pt"
    ckpt = torch.load(path, weights_only=True)  # nothing but tensors and plain values
    assert ckpt["deo_format"] == "pretrain-v1" and ckpt["model"] == "deo_swin_test" and ckpt["step"] == 7
    assert ckpt["manifest"]["bands"][:3] == ["B04", "B03", "B02"] and "deo_version" in ckpt
    assert not any(
        k.startswith("conv_rgb") for k in ckpt["teacher_encoder"]
    )  # the EMA teacher has no RGB stem
    assert set(ckpt["student_heads"]) >= {"head_ms.mlp.0.weight", "cls_head.mlp.0.weight"}

    s2, t2, o2 = tiny(5)
    restore_training_state(load_checkpoint(path), student=s2, teacher=t2, optimizer=o2, scaler=None)
    for (n, a), b in zip(student.state_dict().items(), s2.state_dict().values()):
        assert torch.equal(a, b), n
    assert all(torch.equal(a, b) for a, b in zip(teacher.state_dict().values(), t2.state_dict().values()))
    assert o2.state_dict()["state"][0]["step"] == opt.state_dict()["state"][0]["step"]

    # embed/segment/bench read it directly: the EMA teacher by default, ?student on request.
    assert same_outputs(build_encoder("deo_swin_test", weights=str(path)), _teacher_encoder(teacher, student))
    assert same_outputs(build_encoder("deo_swin_test", weights=f"{path}?student"), student.encoder)
    assert read_encoder_weights(path).which == "teacher"


def _teacher_encoder(teacher, student):
    enc = build_encoder("deo_swin_test", weights=None)
    sd = dict(teacher.encoder.state_dict())
    sd.update({k: v for k, v in student.encoder.state_dict().items() if k.startswith("conv_rgb")})
    enc.load_state_dict(sd)
    return enc


def test_keep_only_the_newest_checkpoints(tmp_path):
    for step in (5, 10, 15, 20):
        checkpoint_path(tmp_path, step).write_bytes(b"x")
    (tmp_path / "checkpoint-notes.pt").write_bytes(b"x")  # not ours: left alone
    assert [p.name for p in prune_checkpoints(tmp_path, 2)] == [
        "checkpoint-00000005.pt",
        "checkpoint-00000010.pt",
    ]
    assert [p.name for p in list_checkpoints(tmp_path)] == [
        "checkpoint-00000015.pt",
        "checkpoint-00000020.pt",
    ]
    assert latest_checkpoint(tmp_path).name == "checkpoint-00000020.pt"
    assert prune_checkpoints(tmp_path, 0) == [] and (tmp_path / "checkpoint-notes.pt").exists()


def test_export_writes_an_encoder_file(tmp_path):
    student, teacher, opt = trained()
    ckpt = save_checkpoint(
        tmp_path / "checkpoint-00000001.pt",
        student=student,
        teacher=teacher,
        optimizer=opt,
        scaler=None,
        step=1,
        recipe={"seed": 0},
    )
    out = export_encoder(ckpt, tmp_path / "model.pt")
    body = torch.load(out, weights_only=True)
    assert body["deo_format"] == "encoder-v1" and body["which"] == "teacher" and body["recipe"] == {"seed": 0}
    assert "optimizer" not in body and any(k.startswith("conv_rgb") for k in body["state_dict"])
    assert same_outputs(load_encoder(out), _teacher_encoder(teacher, student))
    student_file = export_encoder(ckpt, tmp_path / "student.pt", student=True)
    assert same_outputs(load_encoder(student_file), student.encoder)
    with pytest.raises(OutputExistsError):
        export_encoder(ckpt, tmp_path / "model.pt")
    with pytest.raises(WeightsError, match="not a deo pretraining checkpoint"):
        export_encoder(out, tmp_path / "again.pt")
