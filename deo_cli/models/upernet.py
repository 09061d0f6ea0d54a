"""UPerNet segmentation head on an encoder's multi-level feature maps (docs/method.md §3.1).

UPerNet (Xiao et al., ECCV 2018) as the paper's frozen-encoder protocol uses it: a pyramid
pooling module (pool scales 1, 2, 3, 6) on the deepest map, a top-down feature pyramid with
lateral 1x1 and output 3x3 convolutions (512 channels, BatchNorm, ReLU), all levels upsampled
to the finest one and fused, then a 1x1 classifier; logits are bilinearly upsampled to the
input size by the caller (:meth:`UPerNetHead.forward` takes ``out_size``).

ViT encoders return every level at one stride (16 or 8); :class:`MultiLevelNeck` first
resamples them to strides x4, x2, x1, x0.5 of that (transposed convolutions / max-pool), the
usual way to give a plain ViT a pyramid.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def conv_bn_relu(cin: int, cout: int, k: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


class MultiLevelNeck(nn.Module):
    """Rescale same-stride maps (ViT) into a 4-level pyramid: x4, x2, x1, x0.5 resolution."""

    def __init__(self, channels: Sequence[int]):
        super().__init__()
        if len(channels) != 4:
            raise ValueError("MultiLevelNeck expects 4 levels")
        c0, c1, _, _ = channels
        self.up4 = nn.Sequential(
            nn.ConvTranspose2d(c0, c0, 2, stride=2),
            nn.BatchNorm2d(c0),
            nn.GELU(),
            nn.ConvTranspose2d(c0, c0, 2, stride=2),
        )
        self.up2 = nn.ConvTranspose2d(c1, c1, 2, stride=2)
        self.down2 = nn.MaxPool2d(2, ceil_mode=True)

    def forward(self, feats: Sequence[Tensor]) -> list[Tensor]:
        return [self.up4(feats[0]), self.up2(feats[1]), feats[2], self.down2(feats[3])]


class UPerNetHead(nn.Module):
    """Pyramid pooling + FPN fusion + 1x1 classifier (docs/method.md §3.1: PPM 1/2/3/6, 512 channels).

    ``in_channels``/``in_strides`` describe the encoder levels; when all strides are equal (a
    ViT) a :class:`MultiLevelNeck` builds the pyramid first. ``forward(feats, out_size)``
    returns logits (B, num_classes, *out_size).
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        in_strides: Sequence[int],
        num_classes: int,
        channels: int = 512,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        dropout: float = 0.1,
    ):
        super().__init__()
        in_channels, in_strides = list(in_channels), list(in_strides)
        self.neck = None
        if len(set(in_strides)) == 1 and len(in_strides) == 4:
            self.neck = MultiLevelNeck(in_channels)
        self.in_channels = in_channels
        self.num_classes = num_classes
        top = in_channels[-1]
        self.ppm = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(s), conv_bn_relu(top, channels, 1)) for s in pool_scales
        )
        self.bottleneck = conv_bn_relu(top + len(pool_scales) * channels, channels, 3)
        self.lateral = nn.ModuleList(conv_bn_relu(c, channels, 1) for c in in_channels[:-1])
        self.fpn = nn.ModuleList(conv_bn_relu(channels, channels, 3) for _ in in_channels[:-1])
        self.fuse = conv_bn_relu(len(in_channels) * channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def _psp(self, x: Tensor) -> Tensor:
        outs = [x] + [
            F.interpolate(p(x), size=x.shape[-2:], mode="bilinear", align_corners=False) for p in self.ppm
        ]
        return self.bottleneck(torch.cat(outs, dim=1))

    def forward(self, feats: Sequence[Tensor], out_size: tuple[int, int] | None = None) -> Tensor:
        feats = list(feats)
        if self.neck is not None:
            feats = self.neck(feats)
        lats = [lat(f) for lat, f in zip(self.lateral, feats[:-1])]
        lats.append(self._psp(feats[-1]))
        for i in range(len(lats) - 1, 0, -1):  # top-down pathway
            lats[i - 1] = lats[i - 1] + F.interpolate(
                lats[i], size=lats[i - 1].shape[-2:], mode="bilinear", align_corners=False
            )
        outs = [conv(lat) for conv, lat in zip(self.fpn, lats[:-1])] + [lats[-1]]
        size = outs[0].shape[-2:]
        outs = [outs[0]] + [
            F.interpolate(o, size=size, mode="bilinear", align_corners=False) for o in outs[1:]
        ]
        logits = self.classifier(self.dropout(self.fuse(torch.cat(outs, dim=1))))
        if out_size is not None:
            logits = F.interpolate(logits, size=out_size, mode="bilinear", align_corners=False)
        return logits


class LinearSegHead(nn.Module):
    """A linear probe for segmentation: all levels upsampled to the finest, BatchNorm, 1x1 conv."""

    def __init__(self, in_channels: Sequence[int], in_strides: Sequence[int], num_classes: int):
        super().__init__()
        total = sum(in_channels)
        self.in_channels = list(in_channels)
        self.num_classes = num_classes
        self.norm = nn.BatchNorm2d(total)
        self.classifier = nn.Conv2d(total, num_classes, 1)

    def forward(self, feats: Sequence[Tensor], out_size: tuple[int, int] | None = None) -> Tensor:
        size = max((f.shape[-2:] for f in feats), key=lambda s: s[0] * s[1])
        x = torch.cat(
            [
                F.interpolate(f, size=size, mode="bilinear", align_corners=False)
                if f.shape[-2:] != size
                else f
                for f in feats
            ],
            1,
        )
        logits = self.classifier(self.norm(x))
        if out_size is not None:
            logits = F.interpolate(logits, size=out_size, mode="bilinear", align_corners=False)
        return logits


SEG_HEADS = {"upernet": UPerNetHead, "linear": LinearSegHead}


def build_seg_head(
    kind: str, in_channels: Sequence[int], in_strides: Sequence[int], num_classes: int
) -> nn.Module:
    """A segmentation head by name (``upernet`` as in the paper, or ``linear``)."""
    if kind not in SEG_HEADS:
        from deo_cli.errors import UsageError

        raise UsageError(f"unknown segmentation head {kind!r}", f"use one of {', '.join(SEG_HEADS)}")
    return SEG_HEADS[kind](in_channels, in_strides, num_classes)
