"""The models behind ``deo detect-change``'s scores (prediction and ``detect-change train``),
and the classes of a change mask.

**Zero-shot score (default)** (:class:`CosineChange`): ``1 - cos(f_before, f_after)`` per
location of the DEO features, in [0, 2], averaged over the chosen levels (coarser levels'
distances bilinearly resized to the finest level's grid). ``--layer`` picks one level or a
comma-separated list. **Default levels** (:func:`default_change_layers`): for hierarchical
encoders (Swin) every level from the first up to ``deo embed``'s level
(:func:`~deo_cli.infer.model.default_embed_layer`, stage 3), i.e. stages 1-3 at strides 4, 8
and 16, scored on the stride-4 grid; for single-stride encoders (ViT) ``deo embed``'s level.
Why: OSCD's changes are often a few 10 m pixels, and a stride-16 (160 m) grid is too coarse
for them. Measured on the OSCD subset (``benchmarks/results/oscd_change*.json``,
leave-one-city-out, deo_swin_test, Otsu threshold): stage 3 alone fell below the trivial
"everything changed" F1 on paris (0.0041 against 0.0057) and matched it on bordeaux, while
stages 1-3 beat it in all four cities with random and with pretrained weights (pooled F1 0.0375
pretrained, against 0.0298 for stage 3 alone). The score is written on the finest level's grid
(``output_grid: embedding``: transform = input transform scaled by its stride, 4 for the Swin
default, so each score pixel sits over the input pixels it describes), or bilinearly upsampled
inside each chip to the input grid (``output_grid: input``). Scores of overlapping chips are
blended with the runner's weights.

**Supervised score** (``--head`` from :func:`~deo_cli.tasks.change.train.run_change_train`,
:class:`SiameseChange`): one encoder on both dates, per level ``|f1 - f2|`` (or ``[f1, f2]``)
into a UPerNet head whose logits are upsampled to the chip and, by default, refined at full
resolution by a small convolutional branch on the normalised input's
``[|x1 - x2|, (x1 + x2) / 2]`` (:class:`PixelDiffHead`, ``pixel_channels``; changes are often a
few pixels, finer than any encoder level); blended logits -> softmax -> ``P(change)`` on the
input grid.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from deo_cli.data.segdata import ClassInfo, ClassTable
from deo_cli.errors import UsageError, WeightsError
from deo_cli.infer.dense import DenseHeadModel
from deo_cli.infer.headfile import HeadFile, build_head_module, load_head_encoder, make_head
from deo_cli.infer.model import (
    copy_encoder_facts,
    default_embed_layer,
    forward_level,
    forward_levels,
    resolve_layer,
)
from deo_cli.recipes import ChangeRecipe
from deo_cli.runtime import seed_everything
from deo_cli.train.supervised import FrozenEncoderSegmenter

MASK_NODATA = 255
MASK_COLORMAP = {0: (0, 0, 0, 255), 1: (255, 0, 0, 255), MASK_NODATA: (0, 0, 0, 0)}
CHANGE_CLASSES = ClassTable(
    (ClassInfo(0, "no change", (0, 0, 0)), ClassInfo(1, "change", (255, 0, 0))), (), MASK_NODATA
)


def default_change_layers(spec) -> list[int]:
    """The zero-shot levels used when ``--layer`` is ``default`` (see the module docstring).

    Hierarchical encoders (several feature strides, Swin): every level from the first up to and
    including :func:`~deo_cli.infer.model.default_embed_layer` (Swin: 0, 1, 2 at strides 4, 8,
    16, scored on the stride-4 grid). Single-stride encoders (ViT): that level alone (every
    level has the patch stride, so averaging would not make the grid finer).
    """
    top = default_embed_layer(spec)
    if len(set(spec.feature_strides)) == 1:
        return [top]
    return [lv for lv in range(top + 1) if spec.feature_strides[lv] <= spec.feature_strides[top]]


def parse_layers(spec, text: str | int | None) -> list[int]:
    """``default`` (:func:`default_change_layers`), ``last``, an index or a comma-separated list
    of indices -> levels."""
    if text is None or str(text).strip().lower() in ("", "default"):
        return default_change_layers(spec)
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    return sorted({resolve_layer(spec, p) for p in parts})


def _split_dates(x: torch.Tensor) -> torch.Tensor:
    """``(B, 2C, H, W)`` -> ``(2B, C, H, W)``: the first dates, then the second dates."""
    c = x.shape[1] // 2
    return torch.cat([x[:, :c], x[:, c:]], dim=0)


class CosineChange(nn.Module):
    """Zero-shot change score: ``1 - cos`` of the two dates' features, averaged over ``layers``.

    Input ``(B, 2C, H, W)`` (both dates stacked); output ``(B, 1, H / stride, W / stride)``.
    ``stride`` is the finest chosen level's (``embedding`` grid) or 1 (``input`` grid).
    """

    def __init__(self, encoder, layers: Sequence[int], out_stride: int | None = None):
        super().__init__()
        self.encoder = encoder.eval()
        self.layers = [int(lv) for lv in layers]
        strides = [int(encoder.feature_strides[lv]) for lv in self.layers]
        self.stride = int(out_stride or min(strides))
        self.channels = 1
        self.name = encoder.name
        self.align = int(max(encoder.feature_strides))
        copy_encoder_facts(self, encoder, dates=2)  # both dates go through the encoder in one batch
        self.layer = self.layers[0] if len(self.layers) == 1 else ",".join(map(str, self.layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        both = _split_dates(x)
        if len(self.layers) == 1:
            maps = [forward_level(self.encoder, both, self.layers[0])]
        else:
            maps = forward_levels(self.encoder, both, self.layers)
        size = (x.shape[-2] // self.stride, x.shape[-1] // self.stride)
        acc = None
        for f in maps:
            a, b = f.float().chunk(2, dim=0)
            d = (1.0 - F.cosine_similarity(a, b, dim=1, eps=1e-6))[:, None]
            if tuple(d.shape[-2:]) != size:
                d = F.interpolate(d, size=size, mode="bilinear", align_corners=False)
            acc = d if acc is None else acc + d
        return acc / len(maps)

    def describe(self) -> dict:
        strides = [int(self.encoder.feature_strides[lv]) for lv in self.layers]
        return {
            "score": "1 - cosine similarity of the two dates' features"
            + (", averaged over the levels" if len(self.layers) > 1 else ""),
            "layers": self.layers,
            "level_strides": strides,
            "stride": self.stride,
            "resized": "bilinear" if any(s != self.stride for s in strides) else None,
        }


class PixelDiffHead(nn.Module):
    """A head's logits refined at full resolution with the two dates' per-pixel difference.

    ``forward([d, *levels], out_size)``: ``d`` is ``[|x1 - x2|, (x1 + x2) / 2]`` of the
    normalised input ``(B, 2 * bands, H, W)`` (symmetric in the dates: the difference, and what
    the surface is); ``head(levels)`` gives logits that are bilinearly upsampled to ``d``'s
    grid, concatenated with a small convolutional branch on ``d`` (two 3x3 conv-BN-ReLU of
    ``channels``) and mapped to the classes by a 1x1 convolution.

    Why: OSCD's changes are often a few 10 m pixels, finer than any encoder level (stride 4 at
    best), and the pixel-level spectral difference is the strongest single cue (measured on the
    OSCD subset: a per-pixel classifier on ``|x1 - x2|`` alone beats the trivial F1 in every
    held-out city, the stride-4 head alone does not).
    """

    def __init__(self, head: nn.Module, bands: int, num_classes: int, channels: int = 32):
        super().__init__()
        from deo_cli.models.upernet import conv_bn_relu

        self.head = head
        self.bands = int(bands)
        self.pixel = nn.Sequential(
            conv_bn_relu(2 * self.bands, channels, 3), conv_bn_relu(channels, channels, 3)
        )
        self.classifier = nn.Conv2d(channels + num_classes, num_classes, 1)

    def forward(self, feats: Sequence[torch.Tensor], out_size: tuple[int, int] | None = None) -> torch.Tensor:
        d, levels = feats[0], list(feats[1:])
        size = tuple(d.shape[-2:])
        logits = self.head(levels, out_size=size)
        out = self.classifier(torch.cat([logits, self.pixel(d)], dim=1))
        if out_size is not None and tuple(out_size) != size:
            out = F.interpolate(out, size=out_size, mode="bilinear", align_corners=False)
        return out


class SiameseChange(FrozenEncoderSegmenter):
    """One encoder on both dates, fused per level, into a segmentation head (2 classes).

    ``fusion``: ``diff`` = ``|f1 - f2|`` (symmetric in the dates) or ``concat`` = ``[f1, f2]``.
    A :class:`PixelDiffHead` head also takes ``|x1 - x2|`` of the input (first in the list).
    Input ``(B, 2C, H, W)``; output logits ``(B, 2, H, W)``.
    """

    def __init__(self, encoder: nn.Module, head: nn.Module, freeze: bool = True, fusion: str = "diff"):
        super().__init__(encoder, head, freeze)
        if fusion not in ("diff", "concat"):
            raise UsageError(f"unknown fusion {fusion!r}", "use diff or concat")
        self.fusion = fusion

    @staticmethod
    def head_channels(channels: Sequence[int], fusion: str) -> list[int]:
        return [int(c) * (2 if fusion == "concat" else 1) for c in channels]

    def head_inputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The fused per-level maps the head takes (cacheable when the encoder is frozen)."""
        feats = self.features(_split_dates(x))
        fused = []
        for f in feats:
            a, b = f.chunk(2, dim=0)
            fused.append((a - b).abs() if self.fusion == "diff" else torch.cat([a, b], dim=1))
        if isinstance(self.head, PixelDiffHead):
            c = x.shape[1] // 2
            if c != self.head.bands:
                raise UsageError(
                    f"the change head was trained on {self.head.bands} bands per date, the input has {c}",
                    "give both dates the bands the head was trained on",
                )
            a, b = x[:, :c].float(), x[:, c:].float()
            fused.insert(0, torch.cat([(a - b).abs(), (a + b) / 2], dim=1))
        return fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_inputs(x), out_size=tuple(x.shape[-2:]))


def make_change_head(
    kind: str,
    in_channels: Sequence[int],
    in_strides: Sequence[int],
    channels: int,
    pixel_bands: int = 0,
    pixel_channels: int = 0,
) -> nn.Module:
    """The change head: ``kind`` on the fused levels, inside a :class:`PixelDiffHead` when
    ``pixel_channels`` > 0."""
    head = make_head(kind, in_channels, in_strides, 2, channels)
    if pixel_channels > 0:
        head = PixelDiffHead(head, pixel_bands, 2, pixel_channels)
    return head


def _change_head_module(hf: HeadFile) -> nn.Module:
    h = hf.head
    if not h.get("pixel_channels"):
        return build_head_module(hf)
    module = make_change_head(
        h["kind"],
        h["in_channels"],
        h["in_strides"],
        int(h.get("channels", 512)),
        int(h["pixel_bands"]),
        int(h["pixel_channels"]),
    )
    try:
        module.load_state_dict(hf.head_state)
    except RuntimeError as e:
        raise WeightsError(
            f"head state in {hf.path.name if hf.path else 'the head file'} does not fit a {h['kind']} change "
            f"head with a pixel-difference branch ({str(e).splitlines()[0]})",
            "the file is damaged or from another deo version; train the head again",
        ) from e
    return module.eval()


def build_change_model(head: HeadFile, weights: str | None = None) -> tuple[DenseHeadModel, object]:
    """The siamese model of a change head file, as a stride-1 model for the runner."""
    encoder = load_head_encoder(head, weights)
    module = SiameseChange(
        encoder, _change_head_module(head), freeze=True, fusion=head.head.get("fusion") or "diff"
    )
    return DenseHeadModel(module.eval(), encoder, 2), encoder


def build_zero_shot_model(recipe: ChangeRecipe, encoder=None) -> CosineChange:
    from deo_cli.models import build_encoder, get_model_spec

    spec = get_model_spec(recipe.model.name) if encoder is None else encoder.spec
    layers = parse_layers(spec, recipe.layer)
    if encoder is None:
        seed_everything(recipe.runtime.seed)
        encoder = build_encoder(recipe.model.name, weights=recipe.model.weights)
    return CosineChange(encoder, layers, 1 if recipe.output_grid == "input" else None)


__all__ = [
    "CosineChange",
    "SiameseChange",
    "build_change_model",
    "build_zero_shot_model",
    "default_change_layers",
    "parse_layers",
]
