"""Fitting a dense-prediction head on a (frozen) DEO encoder: the paper's protocol (docs/method.md §3.1).

Shared by ``deo segment train``, ``deo detect-change train`` and ``deo bench``'s segmentation
protocol, so all three train and select models the same way:

- AdamW on the trainable parameters only (lr 1e-4, torch's default weight decay 0.01);
- per-iteration schedule: linear warm-up over ``warmup_epochs``, then cosine to ``min_lr``;
- cross-entropy with an ignore index (and optional class weights for rare classes such as
  change);
- mixed precision on GPU (autocast; a gradient scaler for fp16), fp32 on CPU;
- the best validation epoch (mIoU, or F1 of class 1 for change) is kept and returned.

A frozen encoder stays in eval mode and runs under ``torch.no_grad`` (docs/method.md §3.1).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deo_cli.metrics import ConfusionMatrix
from deo_cli.progress import NullProgress, Progress
from deo_cli.runtime import autocast
from deo_cli.train.schedules import cosine_schedule

log = logging.getLogger(__name__)

#: ``forward_fn(model, batch, device) -> (logits (B, K, H, W), target (B, H, W) long)``
ForwardFn = Callable[[nn.Module, dict, torch.device], tuple[Tensor, Tensor]]


class FrozenEncoderSegmenter(nn.Module):
    """Encoder + segmentation head; logits at the input size. ``freeze`` keeps the encoder fixed."""

    def __init__(self, encoder: nn.Module, head: nn.Module, freeze: bool = True):
        super().__init__()
        self.encoder = encoder
        self.head = head
        self.freeze = freeze
        if freeze:
            self.encoder.requires_grad_(False)
            self.encoder.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze:
            self.encoder.eval()
        return self

    def features(self, x: Tensor) -> list[Tensor]:
        if self.freeze:
            with torch.no_grad():
                return [f.float() for f in self.encoder(x)]
        return self.encoder(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x), out_size=tuple(x.shape[-2:]))

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """The parameters and buffers that training changes (the head; everything if fine-tuned)."""
        sd = self.state_dict()
        if self.freeze:
            sd = {k: v for k, v in sd.items() if not k.startswith("encoder.")}
        return {k: v.detach().cpu().clone() for k, v in sd.items()}


def image_forward(model: nn.Module, batch: dict, device: torch.device) -> tuple[Tensor, Tensor]:
    """The default :data:`ForwardFn`: ``batch["image"]`` in, ``batch["mask"]`` as the target."""
    x = batch["image"].to(device, non_blocking=True)
    return model(x), batch["mask"].to(device, non_blocking=True).long()


@dataclass
class FitSettings:
    """Optimisation settings (defaults: docs/method.md §3.1 segmentation)."""

    epochs: int = 50
    warmup_epochs: float = 5
    lr: float = 1e-4
    min_lr: float = 1e-6
    weight_decay: float = 0.01
    num_classes: int = 2
    ignore_index: int | None = None
    class_weights: list[float] | None = None
    #: ``miou`` (segmentation) or ``f1`` (F1 of class 1: change detection).
    select: str = "miou"


@dataclass
class FitResult:
    best_metric: float
    best_epoch: int
    best_state: dict[str, Tensor]
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0


def evaluate_dense(
    model: nn.Module,
    loader: Iterable[dict],
    num_classes: int,
    device: torch.device,
    dtype: torch.dtype | None = None,
    ignore_index: int | None = None,
    forward_fn: ForwardFn = image_forward,
) -> dict:
    """mIoU, accuracy, per-class IoU and F1 of class 1 over ``loader`` (one confusion matrix)."""
    cm = ConfusionMatrix(num_classes, ignore_index)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for batch in loader:
            with autocast(device, dtype):
                logits, target = forward_fn(model, batch, device)
            cm.update(logits.argmax(1).cpu().numpy(), target.cpu().numpy())
    model.train(was_training)
    iou = cm.iou()
    return {
        "miou": cm.miou(),
        "accuracy": cm.accuracy(),
        "f1": cm.f1(1) if num_classes > 1 else float("nan"),
        "iou": [None if not np.isfinite(v) else float(v) for v in iou],
        "confusion": cm.matrix.tolist(),
    }


def fit_dense(
    model: nn.Module,
    train_loader: Iterable[dict],
    val_loader: Iterable[dict] | None,
    settings: FitSettings,
    device: torch.device,
    dtype: torch.dtype | None = None,
    forward_fn: ForwardFn = image_forward,
    progress: Progress | None = None,
    steps_per_epoch: int | None = None,
) -> FitResult:
    """Train the trainable parameters of ``model``; keep the best validation epoch.

    Without a validation loader the last epoch is kept. Returns the best state (trainable
    parameters and buffers) and the per-epoch history (loss, lr, validation metrics).
    """
    progress = progress or NullProgress()
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay, fused=fused or None)
    n_steps = steps_per_epoch or len(train_loader)  # type: ignore[arg-type]
    total = max(1, settings.epochs * n_steps)
    lrs = cosine_schedule(
        settings.lr, settings.min_lr, total, min(int(settings.warmup_epochs * n_steps), total - 1)
    )
    scaler = torch.amp.GradScaler(device.type) if dtype is torch.float16 else None
    weight = (
        torch.tensor(settings.class_weights, dtype=torch.float32, device=device)
        if settings.class_weights
        else None
    )
    ignore = settings.ignore_index if settings.ignore_index is not None else -100
    best = FitResult(best_metric=-math.inf, best_epoch=-1, best_state={})
    grabbed = getattr(model, "trainable_state_dict", None)
    start = time.perf_counter()
    step = 0
    progress.start(total, "training")
    for epoch in range(settings.epochs):
        model.train()
        losses = []
        for i, batch in enumerate(train_loader):
            if i >= n_steps:
                break
            for g in opt.param_groups:
                g["lr"] = float(lrs[min(step, total - 1)])
            with autocast(device, dtype):
                logits, target = forward_fn(model, batch, device)
                loss = F.cross_entropy(logits.float(), target, weight=weight, ignore_index=ignore)
            opt.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                opt.step()
            losses.append(float(loss.detach()))
            step += 1
            progress.advance(1, loss=losses[-1], lr=float(lrs[min(step - 1, total - 1)]))
        row = {
            "epoch": epoch,
            "loss": float(np.mean(losses)) if losses else float("nan"),
            "lr": float(lrs[min(step - 1, total - 1)]),
        }
        if val_loader is not None:
            metrics = evaluate_dense(
                model, val_loader, settings.num_classes, device, dtype, settings.ignore_index, forward_fn
            )
            row.update({f"val_{k}": v for k, v in metrics.items() if k in ("miou", "accuracy", "f1")})
            score = metrics[settings.select]
            progress.advance(0, loss=row["loss"], **{f"val_{settings.select}": float(score)})
        else:
            score = -row["loss"]
        score = score if np.isfinite(score) else -math.inf
        best.history.append(row)
        log.info(
            "epoch %d: %s", epoch, ", ".join(f"{k} {v:.4g}" for k, v in row.items() if isinstance(v, float))
        )
        if score > best.best_metric or best.best_epoch < 0:
            best.best_metric, best.best_epoch = score, epoch
            best.best_state = (
                grabbed()
                if grabbed
                else copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})
            )
    progress.finish()
    best.seconds = time.perf_counter() - start
    return best
