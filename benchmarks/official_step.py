"""The official DEO-FM training step, imported from a checkout named by ``DEO_FM_ROOT``, on the CPU.

Only ``benchmarks/pretrain_step.py`` uses this: none of the official code is in this repository.
``DEO_FM_ROOT`` is a checkout of https://github.com/wolfilip/DEO-FM (its root or its ``DEO/``
folder). The step is the official ``train_one_epoch`` unchanged; around it, and nothing more:

- imports the step never runs (``wandb``, ``kornia`` for the augmentations) are empty stand-in
  modules when they are not installed;
- ``Tensor.cuda`` and ``torch.cuda.synchronize`` do nothing (the step moves its batch with
  ``.cuda()`` and synchronises before logging), so the step runs on the CPU as written;
- the networks are built as ``train_dino`` builds them for ``--arch swin_t --ms_arch
  --dist_arch dinov3 --dist_arch_size base``: torchvision ``swin_t()`` with its patch embedding
  deleted, ``MultiCropWrapper`` with ``DINOHead`` heads (student, teacher), fused AdamW over
  ``get_params_groups``; the student sits in a one-process stand-in for DDP (``.module``, no
  communication: deo's one-process step has none either);
- the optical teacher is ``DINOvX`` (wrapped in ``MultiCropWrapper`` as ``distiller``) whose
  ``feat_extr`` is deo's timm DINOv3 ViT-B/16 behind Meta's ``get_intermediate_layers`` API (the
  official code loads Meta's network from a local ``dinov3`` hub checkout with its weights; the
  same network on both sides makes the work identical).

Weights: :func:`load_deo_weights` copies a deo student (``encoder.*`` -> ``backbone.*`` and the
stems' names), so both steps start from the same numbers.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import types
from pathlib import Path

import torch
from torch import nn


def official_dir(root: str | os.PathLike | None = None) -> Path:
    """The ``DEO/`` folder of the checkout ``root`` (default ``$DEO_FM_ROOT``)."""
    root = Path(root or os.environ.get("DEO_FM_ROOT", ""))
    for d in (root / "DEO", root):
        if (d / "main_dino.py").is_file() and (d / "utils" / "misc.py").is_file():
            return d
    raise SystemExit(f"DEO_FM_ROOT={root}: no DEO/main_dino.py there (a checkout of wolfilip/DEO-FM)")


def _stub(name: str) -> None:
    """An empty module for an import the step never uses (only when it is not installed)."""
    try:
        importlib.import_module(name)
    except ImportError:
        module = types.ModuleType(name)
        sys.modules[name] = module
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(sys.modules[parent], child, module)


def import_official(root: str | os.PathLike | None = None):
    """``main_dino`` of the official code (with ``utils.misc``, ``utils.losses``, ``vision_transformer``)."""
    folder = official_dir(root)
    for name in ("wandb", "kornia", "kornia.augmentation"):
        _stub(name)
    sys.path.insert(0, str(folder))
    main_dino = importlib.import_module("main_dino")
    # the step's only device calls: moving the batch and synchronising before logging
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.cuda.synchronize = lambda *a, **k: None
    return main_dino


class OneProcess(nn.Module):
    """What ``DistributedDataParallel`` is to the step with one process: ``.module`` and a forward."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


class MetaApi(nn.Module):
    """A timm DINOv3 with Meta's ``get_intermediate_layers(x, n, return_class_token=True)``:
    per block ``(normed patch tokens (B, N, D), normed CLS (B, D))``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def get_intermediate_layers(self, x, n=1, reshape=False, return_class_token=False, norm=True):
        if reshape or not return_class_token or isinstance(n, int):
            raise NotImplementedError("only what DINOvX calls")
        out = self.model.forward_intermediates(
            x,
            indices=list(n),
            norm=norm,
            output_fmt="NLC",
            return_prefix_tokens=True,
            intermediates_only=True,
        )
        return tuple((patch, prefix[:, 0]) for patch, prefix in out)


def build_official(
    main_dino,
    optical_model: nn.Module,
    crops_local: int,
    clip_grad: float,
    backbone=None,
    hidden_dim: int = 2048,
    z_dim: int = 256,
    bottleneck: int | None = None,
):
    """Student (in :class:`OneProcess`), teacher, distiller, both losses, optimiser and the args of
    ``train_one_epoch``, as ``train_dino`` builds them (module docstring). ``backbone``: a function
    returning a torchvision Swin (default ``swin_t``); ``bottleneck``: the distillation heads'
    width (default the official one for a base teacher, 768)."""
    from torchvision import models as tvm

    misc = sys.modules["utils.misc"]
    losses = sys.modules["utils.losses"]
    dist_feats = sys.modules["distillation_features"]
    DINOHead = main_dino.DINOHead

    backbone = backbone or tvm.swin_t
    student_bb, teacher_bb = backbone(), backbone()
    embed_dim = student_bb.norm.normalized_shape[0]
    del student_bb.features[0]
    del teacher_bb.features[0]
    late = main_dino.get_swin_stage_embed_dim(student_bb, main_dino.SWIN_STAGE_LATE)
    mid = main_dino.get_swin_stage_embed_dim(student_bb, main_dino.SWIN_STAGE_MID)
    bottleneck = bottleneck or main_dino.get_distill_bottleneck_dim("base")
    student = misc.MultiCropWrapper(
        backbone=student_bb,
        head_ms=DINOHead(in_dim=embed_dim, hidden_dim=hidden_dim, bottleneck_dim=z_dim),
        cls_head=DINOHead(in_dim=late, hidden_dim=hidden_dim, bottleneck_dim=bottleneck),
        patch_head_late=DINOHead(in_dim=late, hidden_dim=hidden_dim, bottleneck_dim=bottleneck),
        patch_head_mid=DINOHead(in_dim=mid, hidden_dim=hidden_dim, bottleneck_dim=bottleneck),
        to_distill="student",
    )
    teacher = misc.MultiCropWrapper(
        backbone=teacher_bb,
        head_ms=DINOHead(in_dim=embed_dim, hidden_dim=hidden_dim, bottleneck_dim=z_dim),
        to_distill="teacher",
    )
    dinovx = dist_feats.DINOvX.__new__(dist_feats.DINOvX)
    nn.Module.__init__(dinovx)
    dinovx.dist_arch, dinovx.dist_arch_size = "dinov3", "base"
    dinovx.feat_extr = MetaApi(optical_model)
    dinovx.feat_extr.eval()
    distiller = misc.MultiCropWrapper(backbone=dinovx, to_distill="distiller")
    for p in list(teacher.parameters()) + list(distiller.parameters()):
        p.requires_grad = False
    ncrops = crops_local + 2
    dino_loss = losses.MCRLoss(ncrops, reduce_cov=0, expa_type=1, eps=0.05, coeff=1.0)
    dist_loss = losses.DistLoss(ncrops, "dinov3")
    ddp_student = OneProcess(student)
    optimizer = torch.optim.AdamW(misc.get_params_groups(ddp_student), fused=True)
    args = argparse.Namespace(
        epochs=1,
        clip_grad=clip_grad,
        freeze_last_layer=1,
        dist_arch="dinov3",
        ms_arch=True,
        nowandb=False,  # store_false in the official parser: False = no wandb logging
    )
    return ddp_student, teacher, distiller, dino_loss, dist_loss, optimizer, args


def deo_to_official(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A deo student's state dict in the official student's names."""
    out = {}
    for k, v in state.items():
        if k.startswith("encoder.conv_"):
            k = k[len("encoder.") :]
        elif k.startswith("encoder."):
            k = "backbone." + k[len("encoder.") :]
        out[k] = v
    return out


def load_deo_weights(student: OneProcess, teacher: nn.Module, deo_student_state: dict) -> None:
    """The deo student's weights in the official student; the teacher starts equal to it (as
    ``train_dino``: ``teacher.load_state_dict(student.state_dict(), strict=False)``)."""
    missing, unexpected = student.module.load_state_dict(deo_to_official(deo_student_state), strict=False)
    if unexpected or [k for k in missing if not k.endswith("relative_position_index")]:
        raise RuntimeError(f"weights do not map: missing {missing[:5]}, unexpected {unexpected[:5]}")
    teacher.load_state_dict(student.module.state_dict(), strict=False)


def check_one_step(local_crops: int = 2, batch: int = 2) -> dict:
    """deo's ``train_step`` and the official ``train_one_epoch`` on one batch, same weights and
    crops, at a tiny size (Swin embed 16, depths 2,2,2,2, window 6; a 12-block DINOv3 of width 32;
    heads 64 wide), stochastic depth off (the two codes draw its masks in another order): every
    loss term, the total, and the student after the step. Run as ``python
    benchmarks/official_step.py`` (prints JSON); tests/train/test_official_step.py reads it."""
    import timm
    from torchvision.models.swin_transformer import SwinTransformer

    from deo_cli.losses import DeoLoss
    from deo_cli.models import OpticalTeacher, build_encoder
    from deo_cli.train.loop import train_step
    from deo_cli.train.meta_arch import DeoMetaArch, build_student, build_teacher_from_student
    from deo_cli.train.optim import build_optimizer

    main_dino = import_official()
    torch.manual_seed(0)
    encoder = build_encoder("deo_swin_test", weights=None, drop_path_rate=0.0)
    vit = timm.create_model(
        "vit_base_patch16_dinov3", pretrained=False, num_classes=0, dynamic_img_size=True,
        embed_dim=32, depth=12, num_heads=2,
    )  # fmt: skip
    optical = OpticalTeacher(vit, (8, 11), "tiny12")
    student = build_student(encoder, optical.embed_dim, ms_dim=64, hidden_dim=64)
    ema = build_teacher_from_student(student)
    loss = DeoLoss(eps=0.05, world_size=1)
    meta = DeoMetaArch(student, student, ema, optical, loss).train()
    opt = build_optimizer(student, device=torch.device("cpu"))
    lr, wd, m = 1e-3, 0.04, 0.996
    opt.param_groups[0].update(lr=lr, weight_decay=wd)
    opt.param_groups[1].update(lr=lr)

    def swin():
        return SwinTransformer(
            patch_size=[4, 4], embed_dim=16, depths=[2, 2, 2, 2], num_heads=[1, 2, 2, 4], window_size=[6, 6],
            stochastic_depth_prob=0.0,
        )  # fmt: skip

    o_student, o_teacher, distiller, dino_loss, dist_loss, o_opt, args = build_official(
        main_dino, vit, local_crops, 3.0, backbone=swin, hidden_dim=64, z_dim=64, bottleneck=optical.embed_dim
    )
    load_deo_weights(o_student, o_teacher, student.state_dict())
    o_student.train(), o_teacher.train()
    g = torch.Generator().manual_seed(0)
    glob = torch.randn(2, batch, 10, 224, 224, generator=g)
    loc = torch.randn(local_crops, batch, 10, 96, 96, generator=g)
    terms = train_step(meta, opt, None, {"global": glob, "local": loc}, clip_grad=3.0, momentum=m)

    logged: dict[str, float] = {}

    class Logger(main_dino.MetricLogger):
        def update(self, **kwargs):
            logged.update({k: float(v.detach() if torch.is_tensor(v) else v) for k, v in kwargs.items()})
            return super().update(**kwargs)

    main_dino.MetricLogger = Logger
    images = list(glob.unbind(0)) + list(loc.unbind(0))
    import contextlib
    import io

    import numpy as np

    with contextlib.redirect_stdout(io.StringIO()):
        main_dino.train_one_epoch(
            o_student, o_teacher, o_teacher, dino_loss, [(images, None)], o_opt, np.array([lr]), np.array([wd]),
            np.array([m]), 0, None, args, distiller=distiller, distiller_loss_cos=dist_loss,
        )  # fmt: skip
    after = deo_to_official(student.state_dict())
    o_after = o_student.module.state_dict()
    diffs = [(after[k].float() - o_after[k].float()).abs().max().item() for k in after if k in o_after]
    teacher_diffs = [
        (v.float() - o_teacher.state_dict()[k].float()).abs().max().item()
        for k, v in deo_to_official({"encoder." + k[len("encoder."):] if k.startswith("encoder.") else k: v
                                     for k, v in ema.state_dict().items()}).items()
        if k in o_teacher.state_dict()
    ]  # fmt: skip
    deo = {k: float(v) for k, v in terms.items()}
    return {
        "deo": deo,
        "official": {
            "total": logged["total_loss"],
            "compression": -logged["comp_loss"],
            "coding_rate": -logged["expa_loss"],
            "distill_cls": -logged["distillation_loss_cls_cos"],
            "distill_patch_mean": -logged["distillation_loss_patch_cos"],
        },
        "total_bit_equal": deo["total"] == logged["total_loss"],
        "lr": lr,
        "student_max_abs_diff_after_step": max(diffs),
        "student_tensors_bit_equal": sum(d == 0 for d in diffs),
        "student_tensors": len(diffs),
        "ema_max_abs_diff_after_step": max(teacher_diffs),
    }


if __name__ == "__main__":
    import json

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    print("RESULT " + json.dumps(check_one_step()))
