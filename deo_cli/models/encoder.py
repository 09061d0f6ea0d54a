"""What every DEO encoder shares: two stems routed by channel count, padding, the feature API.

DEO's student has one trunk and **two stems**: a multispectral stem for the model's band
manifest (10 Sentinel-2 bands for DEO) and an RGB stem for 3-band input; everything after the
stem is shared (docs/method.md §2.5, docs/design.md §2). The stem is chosen by the number of input
channels: ``len(manifest.bands)`` -> multispectral, 3 -> RGB, anything else is a
:class:`~deo_cli.errors.UsageError`.

The feature API (all families):

- ``forward(x) -> list[Tensor]``: one NCHW map per level (``feature_channels`` /
  ``feature_strides``), without the final norm (as the official feature extractor,
  docs/method.md §2.13). The maps are permuted views (channels-last in memory); call
  ``.contiguous()`` before ``.view``.
- ``forward_pooled(x) -> Tensor (B, pooled_dim)``: the global vector (final norm, then global
  average pool for Swin; the normed CLS token for ViT).
- ``forward_with_pooled(x) -> (maps, pooled)``: both from one pass (DEO's student RGB pass
  needs the stage maps and the pooled vector, docs/method.md §2.7).
- ``feature_grid(h, w)``: the (height, width) of each level for an ``h`` x ``w`` input.

Any input size works: the input is zero-padded on the right and bottom to a multiple of the
stem stride inside ``forward``, so level ``i`` has ``ceil(h / stride_i)`` rows (see each
family's ``feature_grid``) and its pixel ``(r, c)`` covers input pixels
``[r * stride_i, (r + 1) * stride_i)`` (the top-left corners stay aligned).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from deo_cli.errors import UsageError
from deo_cli.models.registry import ModelSpec
from deo_cli.sensors import BandManifest


class DeoEncoder(nn.Module):
    """Base class of the dual-stem encoders (:class:`~deo_cli.models.swin.DeoSwin`,
    :class:`~deo_cli.models.vit.DeoViT`).

    Subclasses set ``ms_stem_name`` / ``rgb_stem_name`` (attribute names of the two stems, kept
    identical to the official release so its keys map by prefix stripping only), ``stem_stride``
    and implement ``_forward_levels(x, stem, need_maps, need_pooled)``.
    """

    ms_stem_name: str = "stem_ms"
    rgb_stem_name: str = "stem_rgb"

    def __init__(self, in_chans: int, stem_stride: int):
        super().__init__()
        self.in_chans = in_chans
        self.stem_stride = stem_stride
        # Set by build_encoder(); a bare module gets a spec-less identity.
        self.spec: ModelSpec | None = None
        self.manifest: BandManifest | None = None
        self.rgb_manifest: BandManifest | None = None
        self.model_kwargs: dict = {}
        self.weights_uri: str | None = None
        self.weights_sha256: str | None = None

    # -- identity ---------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.spec.name if self.spec is not None else type(self).__name__

    @property
    def feature_channels(self) -> tuple[int, ...]:
        raise NotImplementedError

    @property
    def feature_strides(self) -> tuple[int, ...]:
        raise NotImplementedError

    @property
    def pooled_dim(self) -> int:
        raise NotImplementedError

    def feature_grid(self, height: int, width: int) -> list[tuple[int, int]]:
        """(rows, cols) of every level for an input of ``height`` x ``width`` pixels."""
        raise NotImplementedError

    # -- stems ------------------------------------------------------------------------------

    @property
    def ms_stem(self) -> nn.Module:
        return getattr(self, self.ms_stem_name)

    @property
    def rgb_stem(self) -> nn.Module | None:
        return getattr(self, self.rgb_stem_name)

    @property
    def has_rgb_stem(self) -> bool:
        return self.rgb_stem is not None

    def remove_rgb_stem(self) -> None:
        """Drop the RGB stem (DEO's EMA teacher has none, docs/method.md §2.6)."""
        setattr(self, self.rgb_stem_name, None)

    def stem_for(self, x: Tensor) -> nn.Module:
        """The stem that takes ``x``: chosen by its number of channels."""
        if x.ndim != 4:
            raise UsageError(
                f"{self.name} takes a 4-D batch (batch, bands, height, width), got shape {tuple(x.shape)}",
                "add a batch dimension",
            )
        c = x.shape[1]
        if c == self.in_chans:
            return self.ms_stem
        if c == 3:
            if self.rgb_stem is None:
                raise UsageError(
                    f"{self.name} has no RGB stem (an EMA teacher keeps only the multispectral stem)",
                    f"pass {self.in_chans}-band input",
                )
            return self.rgb_stem
        bands = ",".join(self.manifest.bands) if self.manifest is not None else f"{self.in_chans} bands"
        raise UsageError(
            f"input has {c} bands but {self.name} takes {self.in_chans} ({bands}) or 3 (red,green,blue)",
            "select the bands by name with --bands",
        )

    def pad_input(self, x: Tensor) -> Tensor:
        """Zero-pad right/bottom so height and width are multiples of the stem stride."""
        s = self.stem_stride
        h, w = x.shape[-2:]
        ph, pw = (-h) % s, (-w) % s
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph))
        return x

    # -- the feature API --------------------------------------------------------------------

    def _forward_levels(
        self, x: Tensor, stem: nn.Module, need_maps: bool, need_pooled: bool
    ) -> tuple[list[Tensor], Tensor | None]:
        raise NotImplementedError

    def forward(self, x: Tensor) -> list[Tensor]:
        """NCHW feature maps, one per level, without the final norm."""
        stem = self.stem_for(x)
        maps, _ = self._forward_levels(self.pad_input(x), stem, need_maps=True, need_pooled=False)
        return maps

    def forward_pooled(self, x: Tensor) -> Tensor:
        """The global feature vector ``(B, pooled_dim)``."""
        stem = self.stem_for(x)
        _, pooled = self._forward_levels(self.pad_input(x), stem, need_maps=False, need_pooled=True)
        return pooled

    def forward_with_pooled(self, x: Tensor) -> tuple[list[Tensor], Tensor]:
        """``forward`` and ``forward_pooled`` from one pass."""
        stem = self.stem_for(x)
        return self._forward_levels(self.pad_input(x), stem, need_maps=True, need_pooled=True)

    def forward_many(
        self, inputs: Sequence[Tensor], need_maps: Sequence[bool]
    ) -> list[tuple[list[Tensor], Tensor]]:
        """``forward_with_pooled`` of each input (maps only where ``need_maps``; ``[]`` elsewhere), with
        the results and random draws of running them one after the other, in order.

        The base class runs them one by one; a family may run same-size inputs through the trunk
        together (:meth:`deo_cli.models.swin.DeoSwin.forward_many`)."""
        out = []
        for x, maps in zip(inputs, need_maps, strict=True):
            levels, pooled = self._forward_levels(self.pad_input(x), self.stem_for(x), maps, need_pooled=True)
            out.append((levels, pooled))
        return out

    def extra_repr(self) -> str:
        return f"name={self.name}, in_chans={self.in_chans}, strides={self.feature_strides}"


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def num_parameters(module: nn.Module) -> int:
    """Number of parameters (shared tensors counted once)."""
    seen = {id(p): p.numel() for p in module.parameters()}
    return int(sum(seen.values()))


__all__ = ["DeoEncoder", "ceil_div", "num_parameters"]
