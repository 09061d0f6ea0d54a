"""Per-iteration schedules for learning rate, weight decay and EMA momentum (docs/method.md §2.9).

DEO uses DINO-style schedules, one value per optimisation step:

- learning rate: linear warm-up from 0 over 10 epochs to 5e-4 x (global batch / 256), then
  cosine to 1e-6;
- weight decay: cosine from 0.04 to 0.4;
- EMA momentum: cosine from 0.996 to 1.

This module imports no torch.
"""

from __future__ import annotations

import numpy as np


def cosine_schedule(
    base: float,
    final: float,
    total_steps: int,
    warmup_steps: int = 0,
    warmup_start: float = 0.0,
) -> np.ndarray:
    """One value per step: linear warm-up, then a half cosine from ``base`` to ``final``.

    As DINO's ``cosine_scheduler``: the warm-up is ``linspace(warmup_start, base, warmup_steps)``
    (its last step already equals ``base``); step ``i`` of the ``n = total_steps - warmup_steps``
    cosine steps is ``final + (base - final) * (1 + cos(pi * i / n)) / 2``, so the first cosine
    step is ``base`` and the last approaches ``final`` without reaching it exactly.

    Returns a float64 array of length ``total_steps``.
    """
    if total_steps < 0 or warmup_steps < 0:
        raise ValueError("total_steps and warmup_steps must be >= 0")
    if warmup_steps > total_steps:
        raise ValueError(f"warmup_steps ({warmup_steps}) exceeds total_steps ({total_steps})")
    warmup = np.linspace(warmup_start, base, warmup_steps) if warmup_steps else np.zeros(0)
    n = total_steps - warmup_steps
    steps = np.arange(n)
    cosine = final + 0.5 * (base - final) * (1.0 + np.cos(np.pi * steps / max(n, 1)))
    return np.concatenate([warmup, cosine]).astype(np.float64)
