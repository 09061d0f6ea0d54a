"""The paper's segmentation protocol: frozen encoder + UPerNet, trained by ``fit_dense``.

Everything that trains and selects is :mod:`deo_cli.train.supervised` (shared with ``deo
segment train``): AdamW (lr 1e-4, weight decay 0.01), 5 warm-up epochs then cosine to 1e-6,
50 epochs, best validation mIoU (docs/method.md §3.1). This module adds the test pass that keeps one
confusion matrix per test image, for the bootstrap interval.

Known differences from the paper's code: ``fit_dense`` uses cross-entropy where the paper uses
BCE-with-logits on one-hot masks, and takes one optimiser step per batch where the paper
accumulates 4 batches of 16 (effective batch 64).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from deo_cli.models.upernet import build_seg_head
from deo_cli.progress import Progress
from deo_cli.runtime import autocast
from deo_cli.train.supervised import FitResult, FitSettings, FrozenEncoderSegmenter, fit_dense

__all__ = ["SegmentationOutcome", "per_sample_confusions", "run_segmentation"]

log = logging.getLogger(__name__)


@dataclass
class SegmentationOutcome:
    confusions: np.ndarray  # (N_test, K, K)
    fit: FitResult


@torch.no_grad()
def per_sample_confusions(
    model: nn.Module,
    loader: Iterable[dict],
    num_classes: int,
    device: torch.device,
    dtype: torch.dtype | None = None,
) -> np.ndarray:
    """One confusion matrix (rows truth, columns prediction) per image; negative labels ignored."""
    model.eval()
    out = []
    k = num_classes
    for batch in loader:
        x = batch["image"].to(device, non_blocking=True)
        with autocast(device, dtype):
            pred = model(x).argmax(1).cpu().numpy().astype(np.int64)
        target = batch["mask"].numpy().astype(np.int64)
        for p, t in zip(pred, target):
            keep = (t >= 0) & (t < k)
            out.append(np.bincount(t[keep] * k + p[keep], minlength=k * k).reshape(k, k))
    return np.stack(out) if out else np.zeros((0, k, k), dtype=np.int64)


def run_segmentation(
    encoder: nn.Module,
    train_loader: Iterable[dict],
    val_loader: Iterable[dict],
    test_loader: Iterable[dict],
    num_classes: int,
    settings: FitSettings,
    device: torch.device,
    dtype: torch.dtype | None = None,
    head: str = "upernet",
    seed: int = 0,
    progress: Progress | None = None,
) -> SegmentationOutcome:
    """Train a fresh ``head`` on the frozen ``encoder``, keep the best validation epoch, test it."""
    torch.manual_seed(seed)
    seg_head = build_seg_head(head, encoder.feature_channels, encoder.feature_strides, num_classes)
    model = FrozenEncoderSegmenter(encoder, seg_head, freeze=True).to(device)
    fit = fit_dense(model, train_loader, val_loader, settings, device, dtype, progress=progress)
    state = {k.removeprefix("head."): v for k, v in fit.best_state.items() if k.startswith("head.")}
    model.head.load_state_dict(state)
    log.info("segmentation: best validation mIoU %.4f at epoch %d", fit.best_metric, fit.best_epoch)
    return SegmentationOutcome(per_sample_confusions(model, test_loader, num_classes, device, dtype), fit)
