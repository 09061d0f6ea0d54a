"""kNN on frozen pooled features: a fast extra protocol (not in the paper; torchgeo-bench's kNN-5).

Features are L2-normalised and compared by cosine similarity (a dot product); the training
split is the memory bank, with no tuning and therefore no use of the validation split. A
single-label prediction is the majority class of the ``k`` nearest neighbours (ties go to the
class with the larger summed similarity); a multi-label prediction switches on every label that
more than half of the neighbours carry.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["knn_predict"]


@torch.no_grad()
def knn_predict(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    num_classes: int,
    k: int = 5,
    multilabel: bool = False,
    device: torch.device | None = None,
    chunk: int = 1024,
) -> np.ndarray:
    """Predictions for ``test_x (M, D)`` from the bank ``train_x (N, D)``, ``train_y``
    (``(N,)`` class indices or ``(N, K)`` multi-hot): ``(M,)`` classes or ``(M, K)`` bool."""
    device = device or torch.device("cpu")
    bank = F.normalize(train_x.float().to(device), dim=1)
    labels = train_y.to(device)
    k = min(k, len(bank))
    out = []
    for q in test_x.float().split(chunk):
        sims = F.normalize(q.to(device), dim=1) @ bank.T
        top_sim, top_idx = sims.topk(k, dim=1)
        if multilabel:
            votes = labels[top_idx].float().mean(1)
            out.append((votes > 0.5).cpu())
        else:
            onehot = F.one_hot(labels[top_idx].long(), num_classes).float()
            # majority vote; the summed similarity (< 1 per neighbour, scaled below 1) breaks ties
            score = onehot.sum(1) + 1e-3 * (onehot * top_sim.unsqueeze(-1)).sum(1) / k
            out.append(score.argmax(1).cpu())
    return torch.cat(out).numpy()
