"""The paper's linear probe, trained on cached frozen features (docs/method.md §3.1).

- one ``nn.Linear(D, K)`` on the pooled feature;
- AdamW with torch's default weight decay 0.01 (the paper passes none), batch 64, 50 epochs,
  lr 1e-3 (m-bigearthnet, m-so2sat) or 1e-2 (m-eurosat);
- per-iteration schedule: linear warm-up over 5 epochs, then half-cosine to 1e-6 (read in the
  authors' evaluation code, which uses the segmentation schedule for classification too);
- cross-entropy, or BCE-with-logits for multi-label BigEarthNet;
- the validation epoch with the best metric (overall accuracy, or micro F1 of ``sigmoid > 0.5``
  for multi-label, as the paper's torchmetrics ``F1Score(task="multilabel")``) is kept; the
  test split is scored once with it.

With a feature cache of several flip variants, every epoch draws one variant per training image.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deo_cli.bench.features import FeatureCache
from deo_cli.metrics import multilabel_micro_f1, overall_accuracy
from deo_cli.progress import NullProgress, Progress
from deo_cli.train.schedules import cosine_schedule

__all__ = ["ProbeResult", "ProbeSettings", "predict", "train_linear_probe"]

log = logging.getLogger(__name__)


@dataclass
class ProbeSettings:
    """Linear-probe optimisation (defaults: docs/method.md §3.1 classification)."""

    epochs: int = 50
    warmup_epochs: float = 5
    batch_size: int = 64
    lr: float = 1e-3
    min_lr: float = 1e-6
    weight_decay: float = 0.01


@dataclass
class ProbeResult:
    layer: nn.Linear
    best_epoch: int
    best_val: float
    history: list[dict] = field(default_factory=list)


def predict(layer: nn.Module, features: Tensor, multilabel: bool, device: torch.device) -> np.ndarray:
    """Class indices ``(N,)`` or multi-hot ``(N, K)`` (``sigmoid > 0.5``) for ``features (N, D)``."""
    layer.eval()
    with torch.no_grad():
        logits = torch.cat([layer(chunk.to(device)).float().cpu() for chunk in features.split(4096)])
    if multilabel:
        return (torch.sigmoid(logits) > 0.5).numpy()
    return logits.argmax(1).numpy()


def _score(pred: np.ndarray, target: Tensor, multilabel: bool) -> float:
    t = target.numpy()
    return multilabel_micro_f1(pred, t) if multilabel else overall_accuracy(pred, t)


def train_linear_probe(
    train: FeatureCache,
    val: FeatureCache | None,
    num_classes: int,
    multilabel: bool,
    settings: ProbeSettings,
    device: torch.device,
    seed: int = 0,
    progress: Progress | None = None,
) -> ProbeResult:
    """Fit the linear layer on ``train`` and keep the best ``val`` epoch (the last without ``val``)."""
    progress = progress or NullProgress()
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    layer = nn.Linear(train.dim, num_classes).to(device)
    opt = torch.optim.AdamW(layer.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    n = train.num_samples
    steps = max(1, math.ceil(n / settings.batch_size))
    total = settings.epochs * steps
    lrs = cosine_schedule(
        settings.lr, settings.min_lr, total, min(int(settings.warmup_epochs * steps), total - 1)
    )
    feats = train.features.to(device)
    targets = train.targets.to(device)
    targets = targets.float() if multilabel else targets.long()
    variants = feats.shape[0]
    best = ProbeResult(layer=copy.deepcopy(layer), best_epoch=-1, best_val=-math.inf)
    step = 0
    progress.start(total, "linear probe")
    for epoch in range(settings.epochs):
        layer.train()
        order = torch.randperm(n, generator=gen)
        choice = torch.randint(0, variants, (n,), generator=gen)
        losses = []
        for b in range(steps):
            idx = order[b * settings.batch_size : (b + 1) * settings.batch_size]
            x = feats[choice[idx].to(device), idx.to(device)]
            y = targets[idx.to(device)]
            for g in opt.param_groups:
                g["lr"] = float(lrs[step])
            logits = layer(x)
            loss = F.binary_cross_entropy_with_logits(logits, y) if multilabel else F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            step += 1
            progress.advance(1, loss=losses[-1])
        row = {"epoch": epoch, "loss": float(np.mean(losses)), "lr": float(lrs[step - 1])}
        if val is not None:
            row["val"] = _score(predict(layer, val.features[0], multilabel, device), val.targets, multilabel)
            score = row["val"] if np.isfinite(row["val"]) else -math.inf
        else:
            score = -row["loss"]
        best.history.append(row)
        if score > best.best_val or best.best_epoch < 0:
            best.best_val, best.best_epoch = score, epoch
            best.layer = copy.deepcopy(layer)
    progress.finish()
    last = best.history[-1]
    log.info(
        "linear probe: %d epochs, last loss %.4g, best validation %.4g at epoch %d",
        settings.epochs,
        last["loss"],
        best.best_val,
        best.best_epoch,
    )
    return best
