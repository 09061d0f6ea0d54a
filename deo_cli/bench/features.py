"""Frozen pooled features, computed once per split and cached for the probes.

The paper's linear probe reads one vector per image from a frozen encoder (docs/method.md §3.1), so
the encoder's output never changes during the 50 probe epochs: deo runs the encoder once per
split (eval mode, ``no_grad``, batched, autocast on GPU) and trains the linear layer on the
cached vectors, which takes seconds instead of 50 encoder passes over the training set. The
paper trains with random flips; with ``flips=True`` the cache holds the features of all four
flips of every training image (identity, horizontal, vertical, both), and each probe epoch
draws one of them per image, which is the same augmentation at 4 encoder passes instead of 50.

Pooling ``mean`` averages the last feature map of ``encoder(x)`` without the final norm, as
the paper's evaluation code does ("the final LayerNorm is accidentally skipped", docs/method.md
§3.1); ``model`` uses ``encoder.forward_pooled`` (final norm, then pool or CLS).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from deo_cli.progress import NullProgress, Progress
from deo_cli.runtime import autocast

__all__ = ["FeatureCache", "extract_features", "pool_features"]

log = logging.getLogger(__name__)

#: The four flips cached for augmentation: none, horizontal, vertical, both.
FLIPS: tuple[tuple[int, ...], ...] = ((), (-1,), (-2,), (-2, -1))


@dataclass
class FeatureCache:
    """Features ``(V, N, D)`` (``V`` flip variants, 1 without augmentation) and targets ``(N,)``
    (class index) or ``(N, K)`` (multi-hot), on the CPU in float32."""

    features: Tensor
    targets: Tensor

    @property
    def num_samples(self) -> int:
        return int(self.features.shape[1])

    @property
    def dim(self) -> int:
        return int(self.features.shape[-1])


def pool_features(encoder: nn.Module, x: Tensor, pool: str = "mean") -> Tensor:
    """One vector per image: mean of the last map (``mean``) or ``forward_pooled`` (``model``)."""
    if pool == "model":
        return encoder.forward_pooled(x)
    if pool != "mean":
        raise ValueError(f"unknown pooling {pool!r}")
    return encoder(x)[-1].float().mean(dim=(-2, -1))


@torch.no_grad()
def extract_features(
    encoder: nn.Module,
    loader: Iterable[dict],
    device: torch.device,
    dtype: torch.dtype | None = None,
    pool: str = "mean",
    flips: bool = False,
    progress: Progress | None = None,
    total: int | None = None,
) -> FeatureCache:
    """Run the frozen ``encoder`` over ``loader`` (batches with ``image`` and ``label``)."""
    progress = progress or NullProgress()
    was_training = encoder.training
    encoder.eval()
    variants = FLIPS if flips else ((),)
    feats: list[list[Tensor]] = [[] for _ in variants]
    targets: list[Tensor] = []
    progress.start(total, "features")
    try:
        for batch in loader:
            x = batch["image"].to(device, non_blocking=True)
            for v, dims in enumerate(variants):
                xv = x.flip(dims) if dims else x
                with autocast(device, dtype):
                    f = pool_features(encoder, xv, pool)
                feats[v].append(f.float().cpu())
            targets.append(batch["label"].cpu())
            progress.advance(len(x))
    finally:
        progress.finish()
        encoder.train(was_training)
    if not targets:
        raise ValueError("no samples to extract features from")
    stacked = torch.stack([torch.cat(f) for f in feats])
    return FeatureCache(stacked, torch.cat(targets))
