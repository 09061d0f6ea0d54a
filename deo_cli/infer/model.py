"""The model side of tiled inference: a function from chips to NCHW maps at a known stride.

The runner (:mod:`deo_cli.infer.runner`) needs only a :class:`FeatureModel`: ``__call__(x)``
maps a normalised batch ``(B, bands, C, C)`` to ``(B, channels, C / stride, C / stride)``, plus
the band manifests that say which bands to read and how to normalise them. ``deo embed`` uses
:class:`EncoderFeatures` (one level of a DEO encoder); ``segment predict`` and
``detect-change`` can pass a head on top of an encoder, or any module with these attributes.

**Default embedding level** (:func:`default_embed_layer`): among the levels DEO distils into the
optical teacher's dense patch tokens (``spec.distill_levels``), the finest; at equal stride, the
deepest. For the DEO Swin this is **stage 3** (0-based level 2): stride 16, 512 channels for
Swin-B (384 for Swin-T). Why:

- stage 3 is the level DEO distils token by token, with no resizing, into DINOv3 ViT-B/16's
  patch tokens (docs/method.md §2.7, ``S_mid``: 14x14 stage-3 map against DINOv3 block 9 at 224 px),
  so it is the map trained to carry the optical teacher's dense semantics on DINOv3's own
  stride-16 grid;
- stage 4 is distilled too (``S_late``) but only after bilinear 7x7 -> 14x14 upsampling, and its
  grid is 2x coarser (320 m per pixel for 10 m Sentinel-2, against 160 m);
- it is half the width of stage 4 (512 vs 1024 channels), so half the storage.

The paper's segmentation head (UPerNet) uses all four stages (docs/method.md §3.1); a single raster
must pick one, and ``--layer`` chooses another (``last``, or a 0-based index). For the DEO ViTs
all levels share the patch stride, so the rule picks the deepest distilled block (block 12).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from deo_cli.errors import UsageError


@runtime_checkable
class FeatureModel(Protocol):
    """What the tiled runner needs from a model (duck-typed; tests pass small conv nets)."""

    name: str
    stride: int
    channels: int
    input_size: int
    manifest: object  # BandManifest of the multispectral input
    rgb_manifest: object | None  # BandManifest of the RGB stem, or None

    def __call__(self, x: Tensor) -> Tensor: ...


def default_embed_layer(spec) -> int:
    """The finest of ``spec.distill_levels`` (ties: the deepest); see the module docstring."""
    levels = [lv % spec.num_levels for lv in spec.distill_levels] or [spec.default_layer]
    return min(levels, key=lambda lv: (spec.feature_strides[lv], -lv))


def resolve_layer(spec, layer: str | int | None) -> int:
    """``default``/None, ``last`` or a 0-based (or negative) level index, checked against ``spec``."""
    n = spec.num_levels
    if layer is None or str(layer).strip().lower() in ("default", ""):
        return default_embed_layer(spec)
    text = str(layer).strip().lower()
    if text == "last":
        return n - 1
    try:
        idx = int(text)
    except ValueError:
        raise UsageError(
            f"--layer {layer!r} is not a level", f"use default, last or an index 0..{n - 1}"
        ) from None
    if not -n <= idx < n:
        raise UsageError(
            f"--layer {idx} is out of range for {spec.name} ({n} levels)", f"use an index 0..{n - 1}"
        )
    return idx % n


def forward_level(encoder, x: Tensor, level: int) -> Tensor:
    """``encoder(x)[level]``, stopping after that level where the encoder allows it.

    A thin adapter over the encoder API: for the DEO Swin it runs the stem and the stages up to
    ``level`` only (stage 4 is about a sixth of Swin-T's compute and not needed for stage 3);
    other encoders run whole. The result equals ``encoder(x)[level]`` exactly (tested).
    """
    return forward_levels(encoder, x, [level])[0]


def forward_levels(encoder, x: Tensor, levels: list[int]) -> list[Tensor]:
    """``[encoder(x)[lv] for lv in levels]``, stopping after the deepest of them where the
    encoder allows it (as :func:`forward_level`)."""
    from deo_cli.models.swin import STAGE_INDICES, DeoSwin

    if isinstance(encoder, DeoSwin):
        stem = encoder.stem_for(x)
        h = stem(encoder.pad_input(x))
        wanted = {STAGE_INDICES[lv]: lv for lv in levels}
        maps = {}
        for i, block in enumerate(encoder.features):
            h = block(h)
            if i in wanted:
                maps[wanted[i]] = h.permute(0, 3, 1, 2)
                if len(maps) == len(wanted):
                    break
        return [maps[lv] for lv in levels]
    out = encoder(x)
    return [out[lv] for lv in levels]


def copy_encoder_facts(model, encoder, dates: int = 1) -> None:
    """Give a wrapper ``model`` what the runner and the output tags read from its ``encoder``:
    input size, activation size (times the ``dates`` it runs the encoder on per chip), band
    manifests and weights identity."""
    spec = encoder.spec
    model.input_size = int(spec.input_size)
    model.activation_bytes_per_pixel = dates * spec.activation_bytes_per_pixel
    model.manifest = encoder.manifest
    model.rgb_manifest = encoder.rgb_manifest if encoder.has_rgb_stem else None
    model.weights_uri = encoder.weights_uri
    model.weights_sha256 = encoder.weights_sha256


class EncoderFeatures(torch.nn.Module):
    """One level of a DEO encoder as a :class:`FeatureModel` (plus ``pooled`` for chip vectors)."""

    def __init__(self, encoder, layer: int):
        super().__init__()
        self.encoder = encoder.eval()
        spec = encoder.spec
        self.layer = int(layer)
        self.name = spec.name
        self.stride = int(spec.feature_strides[self.layer])
        self.channels = int(spec.feature_channels[self.layer])
        self.pooled_dim = int(spec.pooled_dim)
        copy_encoder_facts(self, encoder)

    def forward(self, x: Tensor) -> Tensor:
        return forward_level(self.encoder, x, self.layer)

    def pooled(self, x: Tensor) -> Tensor:
        """The encoder's global vector (Swin: final norm + average pool; ViT: normed CLS)."""
        return self.encoder.forward_pooled(x)

    def describe(self) -> dict:
        return {
            "model": self.name,
            "weights": self.weights_uri or "random",
            "weights_sha256": self.weights_sha256,
            "layer": self.layer,
            "stride": self.stride,
            "channels": self.channels,
        }
