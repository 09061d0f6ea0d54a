"""AdamW, its parameter groups, DINO-style gradient clipping and the per-step schedules (docs/method.md §2.9).

- **Groups**: weights are decayed; biases and every 1-D parameter (norm scales and shifts) get
  weight decay 0 (DINO's ``get_params_groups`` rule). The weight-decay schedule is applied to the
  first (decayed) group only; the learning rate to both.
- **Learning rate**: peak ``lr * global_batch / 256`` (5e-4 at DEO's 4 x 64 = 256), linear warm-up
  from 0 over ``warmup_epochs`` (10), then cosine to ``min_lr`` (1e-6).
- **Weight decay**: cosine 0.04 -> 0.4. **EMA momentum**: cosine 0.996 -> 1.
- **Clipping**: each parameter's gradient is scaled to norm <= 3.0 on its own (DINO's
  ``clip_gradients``), not one global norm.
- **Fused AdamW** on CUDA and the CPU when asked for (the official run uses it); foreach elsewhere.
  On the CPU the fused kernel takes a third of the foreach update's time (Swin-T: 0.03 s against
  0.10 s a step).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from deo_cli.train.schedules import cosine_schedule

#: The reference global batch the learning rate is quoted for (docs/method.md §2.9).
REFERENCE_BATCH = 256


def param_groups(module: nn.Module) -> list[dict]:
    """``[{"params": decayed}, {"params": not decayed, "weight_decay": 0}]`` (biases and 1-D tensors)."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if name.endswith(".bias") or p.ndim <= 1 else decay).append(p)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(
    module: nn.Module,
    betas: tuple[float, float] = (0.9, 0.999),
    fused: bool = True,
    device: torch.device | None = None,
) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`; lr and weight decay are set every step from the schedules."""
    kwargs: dict = {}
    if fused and device is not None and device.type in ("cuda", "cpu"):
        kwargs["fused"] = True
    optimizer = torch.optim.AdamW(
        param_groups(module), lr=0.0, weight_decay=0.0, betas=tuple(betas), **kwargs
    )
    allocate_state(optimizer)
    return optimizer


@torch.no_grad()
def allocate_state(optimizer: torch.optim.Optimizer) -> None:
    """Create the optimiser's state (AdamW's two moments, a step count) now, as its first step would.

    PyTorch creates it lazily in the first ``step()``, after the first backward pass, wherever the
    freed activations left room: memory the next forward pass then has to go around (on the CPU
    the process grows by about the state's size, twice the student's parameters). Created here,
    right after the weights, it sits beside them. How: one step with zero gradients at learning
    rate and weight decay 0 (every parameter and moment stays exactly as it was: 0 moments, a
    ``-0 * 0`` update), then the step counts are set back to 0. Parameters that already have a
    state (a loaded checkpoint) are left alone."""
    params = [
        p
        for g in optimizer.param_groups
        for p in g["params"]
        if p.requires_grad and not optimizer.state.get(p)
    ]
    if not params:
        return
    for p in params:
        p.grad = torch.zeros_like(p)
    saved = [(g["lr"], g["weight_decay"]) for g in optimizer.param_groups]
    for g in optimizer.param_groups:
        g["lr"], g["weight_decay"] = 0.0, 0.0
    try:
        optimizer.step()
    finally:
        for g, (lr, wd) in zip(optimizer.param_groups, saved, strict=True):
            g["lr"], g["weight_decay"] = lr, wd
        for p in params:
            p.grad = None
            step = optimizer.state[p].get("step")
            if torch.is_tensor(step):
                step.zero_()
            elif step is not None:
                optimizer.state[p]["step"] = 0


@torch.no_grad()
def clip_gradients(module: nn.Module, clip: float) -> torch.Tensor | None:
    """Scale each parameter's gradient to L2 norm <= ``clip`` (DINO style: ``g *= clip / (|g| + 1e-6)``
    when that factor is below 1). Returns the norms before clipping (one per tensor), without a
    device sync."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads or clip <= 0:
        return None
    norms = torch.stack(torch._foreach_norm(grads, 2))
    coefs = (clip / (norms + 1e-6)).clamp(max=1.0)  # one vector operation, not one per tensor
    torch._foreach_mul_(grads, list(coefs.unbind()))
    return norms


@dataclass(frozen=True)
class Schedules:
    """One value per optimisation step for the learning rate, weight decay and EMA momentum."""

    lr: np.ndarray
    weight_decay: np.ndarray
    momentum: np.ndarray

    @property
    def total_steps(self) -> int:
        return len(self.lr)


def build_schedules(
    *,
    lr: float,
    min_lr: float,
    warmup_epochs: float,
    weight_decay: float,
    weight_decay_end: float,
    momentum: float,
    momentum_end: float,
    epochs: int,
    steps_per_epoch: int,
    global_batch: int,
) -> Schedules:
    """DEO's schedules over ``epochs * steps_per_epoch`` steps (module docstring)."""
    total = epochs * steps_per_epoch
    warmup = min(int(round(warmup_epochs * steps_per_epoch)), total)
    peak = lr * global_batch / REFERENCE_BATCH
    return Schedules(
        lr=cosine_schedule(peak, min_lr, total, warmup_steps=warmup),
        weight_decay=cosine_schedule(weight_decay, weight_decay_end, total),
        momentum=cosine_schedule(momentum, momentum_end, total),
    )


def apply_schedules(optimizer: torch.optim.Optimizer, schedules: Schedules, step: int) -> tuple[float, float]:
    """Set this step's learning rate (all groups) and weight decay (the first group)."""
    lr, wd = float(schedules.lr[step]), float(schedules.weight_decay[step])
    for i, group in enumerate(optimizer.param_groups):
        group["lr"] = lr
        if i == 0:
            group["weight_decay"] = wd
    return lr, wd
