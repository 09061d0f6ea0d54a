"""DEO's second teacher: a frozen optical vision foundation model (docs/method.md §2.7).

The default is DINOv3 ViT-B/16 with the web LVD-1689M weights (timm
``vit_base_patch16_dinov3.lvd1689m``); DINOv2 ViT-S/B/L (with or without registers) and DINOv3
ViT-L/16 are selectable (:func:`list_teachers`). The teacher is in eval mode, has
``requires_grad=False`` and runs under ``no_grad``; ``train()`` cannot switch it back.

``forward(rgb) -> (cls, maps)``: the final LayerNorm is applied to the outputs of the chosen
blocks (0-based 8 and 11 for small/base models, 15 and 23 for large ones: the 9th/12th resp.
16th/24th blocks, docs/method.md §2.7); ``maps`` are their patch tokens as ``(B, D, h, w)`` maps with
the CLS and register tokens removed, and ``cls`` is the final-normed CLS token ``(B, D)``
(DINOv3's standard CLS). The input is the dataset-standardised RGB of the global crops, as the
student's (docs/method.md §2.3); it is zero-padded right/bottom to a multiple of the patch size.
At 224 px DINOv3 gives a 14x14 grid and DINOv2 (patch 14) 16x16.

Weights (:func:`build_teacher`): ``"default"`` takes timm's pretrained weights from the local
Hugging Face cache or the hub; a local file may be in timm's layout or Meta's original
(``dinov3_vitb16_pretrain_lvd1689m-73cec8be.pth``; timm's checkpoint filter converts it; its
``qkv.bias``, which timm's model has no place for, must be zero in q and v or the file is refused);
``hf://`` and https URIs are fetched as for encoders. Offline without a cached copy raises one
:class:`~deo_cli.errors.WeightsError`. DINOv2 position embeddings are resampled by timm at run time
(bicubic, antialiased), which can differ slightly from Meta's hub code at sizes other than 518.
"""

from __future__ import annotations

import contextlib
import difflib
import io
import logging
import os
import sys
from dataclasses import dataclass, field

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deo_cli.errors import UsageError, WeightsError
from deo_cli.models.weights import (
    _first_line,
    _network_errors,
    file_sha256,
    load_encoder_state,
    read_checkpoint,
    resolve_weights,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TeacherSpec:
    """A named optical teacher: the timm architecture, its pretrained tag and the blocks used."""

    name: str
    arch: str
    blocks: tuple[int, ...]
    pretrained_tag: str | None = None
    description: str = ""
    test_only: bool = False
    kwargs: dict = field(default_factory=dict, hash=False)

    @property
    def timm_name(self) -> str:
        return f"{self.arch}.{self.pretrained_tag}" if self.pretrained_tag else self.arch


_TEACHERS: dict[str, TeacherSpec] = {}


def register_teacher(spec: TeacherSpec) -> TeacherSpec:
    if spec.name in _TEACHERS:
        raise ValueError(f"teacher {spec.name!r} registered twice")
    _TEACHERS[spec.name] = spec
    return spec


_BASE, _LARGE = (8, 11), (15, 23)  # docs/method.md §2.7
_TINY = dict(embed_dim=32, depth=2, num_heads=2)

register_teacher(
    TeacherSpec(
        "dinov3_vitb16",
        "vit_base_patch16_dinov3",
        _BASE,
        "lvd1689m",
        "DINOv3 ViT-B/16, web LVD-1689M (DEO's teacher)",
    )
)
register_teacher(
    TeacherSpec(
        "dinov3_vitl16", "vit_large_patch16_dinov3", _LARGE, "lvd1689m", "DINOv3 ViT-L/16, web LVD-1689M"
    )
)
for _size, _blocks in (("s", _BASE), ("b", _BASE), ("l", _LARGE)):
    _full = {"s": "small", "b": "base", "l": "large"}[_size]
    register_teacher(
        TeacherSpec(
            f"dinov2_vit{_size}14",
            f"vit_{_full}_patch14_dinov2",
            _blocks,
            "lvd142m",
            f"DINOv2 ViT-{_size.upper()}/14",
        )
    )
    register_teacher(
        TeacherSpec(
            f"dinov2_vit{_size}14_reg",
            f"vit_{_full}_patch14_reg4_dinov2",
            _blocks,
            "lvd142m",
            f"DINOv2 ViT-{_size.upper()}/14 with 4 registers",
        )
    )
register_teacher(
    TeacherSpec(
        "test_dinov3_tiny",
        "vit_base_patch16_dinov3",
        (0, 1),
        None,
        "tiny DINOv3 architecture for tests",
        True,
        _TINY,
    )
)
register_teacher(
    TeacherSpec(
        "test_dinov2_tiny",
        "vit_base_patch14_reg4_dinov2",
        (0, 1),
        None,
        "tiny DINOv2 (registers) for tests",
        True,
        _TINY,
    )
)

DEFAULT_TEACHER = "dinov3_vitb16"


def list_teachers(include_test: bool = True) -> list[str]:
    return sorted(n for n, s in _TEACHERS.items() if include_test or not s.test_only)


def get_teacher_spec(name: str) -> TeacherSpec:
    try:
        return _TEACHERS[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(_TEACHERS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UsageError(
            f"unknown teacher {name!r}{hint}", f"choose one of {', '.join(list_teachers())}"
        ) from None


class OpticalTeacher(nn.Module):
    """A frozen timm ViT returning the normed CLS and normed patch maps of chosen blocks."""

    def __init__(self, model: nn.Module, blocks: tuple[int, ...], name: str = "teacher"):
        super().__init__()
        depth = len(model.blocks)
        if not all(0 <= b < depth for b in blocks):
            raise ValueError(f"teacher {name}: blocks {blocks} outside 0..{depth - 1}")
        self.model = model
        self.blocks = tuple(blocks)
        self.name = name
        self.embed_dim = int(model.embed_dim)
        self.patch_size = int(model.patch_embed.patch_size[0])
        self.weights_uri: str | None = None
        self.weights_sha256: str | None = None
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> OpticalTeacher:
        """Always eval: the optical teacher is frozen (docs/method.md §2.7)."""
        return super().train(False)

    def grid(self, height: int, width: int) -> tuple[int, int]:
        p = self.patch_size
        return (-(-height // p), -(-width // p))

    @torch.no_grad()
    def forward(self, rgb: Tensor) -> tuple[Tensor, list[Tensor]]:
        """``rgb (B, 3, H, W)`` -> ``(cls (B, D), [maps (B, D, h, w) per chosen block])``."""
        if rgb.ndim != 4 or rgb.shape[1] != 3:
            raise UsageError(
                f"the optical teacher takes 3-band RGB batches, got shape {tuple(rgb.shape)}",
                "pass the RGB channels",
            )
        p = self.patch_size
        ph, pw = (-rgb.shape[-2]) % p, (-rgb.shape[-1]) % p
        if ph or pw:
            rgb = F.pad(rgb, (0, pw, 0, ph))
        final, maps = self.model.forward_intermediates(
            rgb, indices=list(self.blocks), norm=True, output_fmt="NCHW"
        )
        return final[:, 0], list(maps)


def _create(spec: TeacherSpec, pretrained: bool) -> nn.Module:
    name = spec.timm_name if pretrained else spec.arch
    return timm.create_model(name, pretrained=pretrained, num_classes=0, dynamic_img_size=True, **spec.kwargs)


def _drop_zero_qkv_biases(sd: dict, model: nn.Module, source: str) -> dict:
    """Meta's DINOv3 files hold ``blocks.N.attn.qkv.bias``; timm's ViT-S/B/L DINOv3 has no
    q/v bias (Meta's distilled models ended up with zero biases; the k part is masked to zero
    by DINOv3 itself). Drop them when their q and v parts are zero (logged at DEBUG); a non-zero
    bias the model cannot hold is one :class:`WeightsError` line naming the keys."""
    if "storage_tokens" not in sd:
        return sd
    params = {k for k, _ in model.named_parameters()}
    dropped = [
        k
        for k, v in sd.items()
        if k.endswith("attn.qkv.bias")
        and isinstance(v, torch.Tensor)
        and k not in params
        and k.replace("qkv.bias", "q_bias") not in params
    ]
    if not dropped:
        return sd
    nonzero = {}
    for k in dropped:
        q, _, v = sd[k].chunk(3, dim=-1)
        peak = max(q.abs().max().item(), v.abs().max().item())
        if peak != 0.0:
            nonzero[k] = peak
    if nonzero:
        worst = max(nonzero, key=nonzero.get)
        raise WeightsError(
            f"{source}: non-zero attention q/v biases in {len(nonzero)} of {len(dropped)} blocks "
            f"({', '.join(list(nonzero)[:3])}{', ...' if len(nonzero) > 3 else ''}; max |bias| "
            f"{nonzero[worst]:.3g} in {worst}), which the "
            f"teacher's timm model has no place for",
            "pass teacher weights of the same architecture in timm's layout, or Meta's checkpoint of "
            "this teacher (its q/v biases are zero)",
        )
    log.debug(
        "%s: dropping %d zero q/v attention biases that timm's model has no place for", source, len(dropped)
    )
    drop = set(dropped)
    return {k: v for k, v in sd.items() if k not in drop}


def _load_file(model: nn.Module, path, name: str) -> None:
    sd = read_checkpoint(path)
    for key in ("teacher", "model", "state_dict"):
        if isinstance(sd.get(key), dict):
            sd = sd[key]
            break
    sd = _drop_zero_qkv_biases(dict(sd), model, os.path.basename(str(path)))
    filter_fn = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    if filter_fn is not None:
        # timm converts Meta's original DINOv2/DINOv3 layouts; its filter may print, so capture.
        captured = io.StringIO()
        with contextlib.redirect_stdout(captured):
            sd = filter_fn(sd, model)
        if captured.getvalue().strip():
            log.debug("timm checkpoint filter: %s", captured.getvalue().strip())
    load_encoder_state(
        model, sd, source=os.path.basename(str(path)), model_name=f"teacher {name}", option="the teacher"
    )


def build_teacher(
    name: str = DEFAULT_TEACHER, weights: str | os.PathLike | None = "default"
) -> OpticalTeacher:
    """The frozen optical teacher ``name`` with its weights.

    ``weights``: ``"default"`` (timm's pretrained weights: local Hugging Face cache, else the hub),
    ``"random"`` (warns) / ``None`` (silent), a local file (timm or Meta layout),
    ``hf://OWNER/REPO/FILE[@REV]`` or an https URL.
    """
    spec = get_teacher_spec(name)
    uri = None if weights is None else str(weights)
    if uri == "default":
        if spec.pretrained_tag is None:
            raise WeightsError(
                f"teacher {name} has no released weights",
                "pass random teacher weights (tests only) or a local file",
            )
        try:
            # through deo's resolver: the cache first, then a fast reachability check (no long
            # retries offline), then the hub; timm then loads that file
            path = resolve_weights(f"hf://timm/{spec.timm_name}/model.safetensors")
            model = timm.create_model(
                spec.timm_name,
                pretrained=True,
                pretrained_cfg_overlay={"file": str(path)},
                num_classes=0,
                dynamic_img_size=True,
                **spec.kwargs,
            )
        except WeightsError as exc:
            raise WeightsError(
                f"cannot get the {name} teacher weights ({spec.timm_name}) from the Hugging Face cache or hub "
                f"({exc.problem})",
                f"on a machine with internet download timm/{spec.timm_name} (model.safetensors) or Meta's "
                "original checkpoint and pass the file as the teacher weights (gated repositories need their "
                "licence accepted on huggingface.co and a login)",
            ) from exc
        except _network_errors() as exc:
            raise WeightsError(
                f"cannot get the {name} teacher weights ({spec.timm_name}) from the Hugging Face cache or hub "
                f"(offline? {_first_line(exc)})",
                f"on a machine with internet download timm/{spec.timm_name} (model.safetensors) or Meta's "
                "original checkpoint and pass the file as the teacher weights (gated repositories need their "
                "licence accepted on huggingface.co and a login)",
            ) from exc
        teacher = OpticalTeacher(model, spec.blocks, name)
        teacher.weights_uri = f"timm:{spec.timm_name}"
        return teacher
    model = _create(spec, pretrained=False)
    teacher_uri, sha = None, None
    if uri is None or uri == "random":
        if uri == "random":
            log.warning("optical teacher %s has random weights: distillation targets are meaningless", name)
    else:
        path = resolve_weights(uri)
        _load_file(model, path, name)
        teacher_uri, sha = uri, file_sha256(path)
    teacher = OpticalTeacher(model, spec.blocks, name)
    teacher.weights_uri, teacher.weights_sha256 = teacher_uri, sha
    return teacher
