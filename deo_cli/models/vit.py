"""DEO's dual-stem ViT (docs/method.md §2.5 "ViT variant"), built from timm's VisionTransformer blocks.

The trunk is a DINO-style ViT whose patch embedding is replaced by two:
``patch_embed_ms`` (Conv ``in_chans`` -> D) and ``patch_embed_rgb`` (Conv 3 -> D). Both share
the CLS token and the learned position embeddings, which are bicubic-interpolated to the input's
token grid (docs/method.md §2.5). Module names follow DINO's ViT (``cls_token``, ``pos_embed``,
``patch_embed_*.proj``, ``blocks.N.*``, ``norm``); timm's blocks use the same parameter names.

``forward`` returns the outputs of the blocks in ``out_indices`` (0-based, default 3, 5, 8, 11:
blocks 4, 6, 9 and 12, as the released ViT-B/8 feature extractor, docs/method.md §2.13) as NCHW maps
without the final norm; ``forward_pooled`` returns the final-normed CLS token. The input is
zero-padded right/bottom to a multiple of the patch size, so every level has
``ceil(H / patch)`` x ``ceil(W / patch)`` tokens.

DEO's patch distillation uses blocks 6 and 12 (0-based 5 and 11, docs/method.md §2.5) as its
mid/late levels, consistently. (The official ViT path swaps them, docs/method.md §2.7; deo does not
copy that bug.) Stochastic depth is 0.1 when training (docs/method.md §2.9).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.layers import PatchEmbed
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from deo_cli.models.encoder import DeoEncoder, ceil_div
from deo_cli.models.registry import register_model
from deo_cli.sensors import DEO_S2_MANIFEST

DEFAULT_OUT_INDICES = (3, 5, 8, 11)


def _patch_embed(in_chans: int, patch_size: int, embed_dim: int) -> PatchEmbed:
    return PatchEmbed(
        img_size=None,
        patch_size=patch_size,
        in_chans=in_chans,
        embed_dim=embed_dim,
        output_fmt="NHWC",
        strict_img_size=False,
    )


class DeoViT(DeoEncoder):
    """Dual-stem ViT returning chosen block outputs as NCHW maps.

    Args:
        in_chans: bands of the multispectral stem (10 for DEO).
        img_size: the size the position embeddings are learned at (other sizes interpolate).
        patch_size: token size in pixels.
        embed_dim, depth, num_heads, mlp_ratio: the transformer.
        drop_path_rate: stochastic depth (0.1 in DEO's pretraining, docs/method.md §2.9).
        out_indices: 0-based blocks returned by ``forward``, increasing.
    """

    ms_stem_name = "patch_embed_ms"
    rgb_stem_name = "patch_embed_rgb"

    def __init__(
        self,
        in_chans: int = 10,
        img_size: int = 224,
        patch_size: int = 16,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.1,
        out_indices: Sequence[int] = DEFAULT_OUT_INDICES,
    ):
        super().__init__(in_chans=in_chans, stem_stride=patch_size)
        out_indices = tuple(int(i) for i in out_indices)
        if list(out_indices) != sorted(set(out_indices)) or not all(0 <= i < depth for i in out_indices):
            raise ValueError(f"out_indices {out_indices} must increase and lie in [0, {depth})")
        trunk = VisionTransformer(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            num_classes=0,
            global_pool="token",
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            qkv_bias=True,
            drop_path_rate=drop_path_rate,
        )
        self.cls_token = trunk.cls_token
        self.pos_embed = trunk.pos_embed
        self.blocks = trunk.blocks
        self.norm = trunk.norm
        self.patch_embed_ms = _patch_embed(in_chans, patch_size, embed_dim)
        self.patch_embed_rgb = _patch_embed(3, patch_size, embed_dim)
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.pos_grid = (img_size // patch_size, img_size // patch_size)
        self.out_indices = out_indices

    @property
    def feature_channels(self) -> tuple[int, ...]:
        return (self.embed_dim,) * len(self.out_indices)

    @property
    def feature_strides(self) -> tuple[int, ...]:
        return (self.patch_size,) * len(self.out_indices)

    @property
    def pooled_dim(self) -> int:
        return self.embed_dim

    def feature_grid(self, height: int, width: int) -> list[tuple[int, int]]:
        grid = (ceil_div(height, self.patch_size), ceil_div(width, self.patch_size))
        return [grid] * len(self.out_indices)

    def interpolate_pos_embed(self, h: int, w: int) -> Tensor:
        """Position embeddings for an ``h`` x ``w`` token grid (bicubic, CLS entry unchanged)."""
        if (h, w) == self.pos_grid:
            return self.pos_embed
        cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        gh, gw = self.pos_grid
        grid = patch_pos.reshape(1, gh, gw, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid.float(), size=(h, w), mode="bicubic", align_corners=False)
        patch_pos = grid.to(patch_pos.dtype).permute(0, 2, 3, 1).reshape(1, h * w, -1)
        return torch.cat([cls_pos, patch_pos], dim=1)

    def _forward_levels(
        self, x: Tensor, stem: nn.Module, need_maps: bool, need_pooled: bool
    ) -> tuple[list[Tensor], Tensor | None]:
        x = stem(x)  # (B, h, w, D)
        b, h, w, d = x.shape
        x = torch.cat([self.cls_token.expand(b, -1, -1), x.reshape(b, h * w, d)], dim=1)
        x = x + self.interpolate_pos_embed(h, w)
        last = len(self.blocks) - 1 if need_pooled else self.out_indices[-1]
        maps = []
        for i in range(last + 1):
            x = self.blocks[i](x)
            if need_maps and i in self.out_indices:
                maps.append(x[:, 1:].reshape(b, h, w, d).permute(0, 3, 1, 2))
        pooled = self.norm(x)[:, 0] if need_pooled else None
        return maps, pooled


def _vit_spec(dim: int, patch: int, size: int, **extra) -> dict:
    return dict(
        family="vit",
        feature_channels=(dim,) * 4,
        feature_strides=(patch,) * 4,
        pooled_dim=dim,
        input_size=size,
        default_layer=3,
        distill_levels=(1, 3),
        **extra,
    )


def _build(defaults: dict, kwargs: dict) -> DeoViT:
    args = dict(in_chans=DEO_S2_MANIFEST.num_bands, drop_path_rate=0.1, out_indices=DEFAULT_OUT_INDICES)
    return DeoViT(**{**args, **defaults, **kwargs})


@register_model("deo_vit_s16", **_vit_spec(384, 16, 224, description="DEO ViT-S/16"))
def deo_vit_s16(**kwargs) -> DeoViT:
    """ViT-S/16: embed 384, depth 12, heads 6, at 224 px."""
    return _build(dict(img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6), kwargs)


@register_model("deo_vit_b16", **_vit_spec(768, 16, 224, description="DEO ViT-B/16"))
def deo_vit_b16(**kwargs) -> DeoViT:
    """ViT-B/16: embed 768, depth 12, heads 12, at 224 px."""
    return _build(dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12), kwargs)


@register_model(
    "deo_vit_b8",
    **_vit_spec(768, 8, 256, description="DEO ViT-B/8 at 256 px (the released ViT-B, docs/method.md §2.13)"),
)
def deo_vit_b8(**kwargs) -> DeoViT:
    """ViT-B/8: embed 768, depth 12, heads 12, at 256 px (docs/method.md §2.5, §2.13)."""
    return _build(dict(img_size=256, patch_size=8, embed_dim=768, depth=12, num_heads=12), kwargs)


@register_model(
    "deo_vit_test",
    **_vit_spec(
        32, 8, 64, description="tiny ViT for tests (two stems, shared CLS/pos-embed)", test_only=True
    ),
)
def deo_vit_test(**kwargs) -> DeoViT:
    """Tiny ViT: embed 32, depth 4, heads 2, patch 8, at 64 px; returns all four blocks."""
    defaults = dict(img_size=64, patch_size=8, embed_dim=32, depth=4, num_heads=2, out_indices=(0, 1, 2, 3))
    return _build(defaults, kwargs)
