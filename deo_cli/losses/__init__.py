"""DEO's losses, one per file (docs/method.md §2.6-2.8), all stateless ``nn.Module``s.

Each returns the quantity to *minimise* (a negated similarity or rate): ``compression`` (-C),
``coding_rate`` (-R), ``distill_cls`` (-S_cls), ``distill_patch`` (-S_mid or -S_late), and
``deo`` (the weighted total, with every term returned for logging).
"""

from deo_cli.losses._views import cross_view_cosine
from deo_cli.losses.coding_rate import CodingRateLoss, coding_rate
from deo_cli.losses.compression import CompressionLoss
from deo_cli.losses.deo_loss import TERMS, DeoLoss
from deo_cli.losses.distill_cls import ClsDistillLoss
from deo_cli.losses.distill_patch import PatchDistillLoss
from deo_cli.losses.registry import build_loss, get_loss_class, list_losses, register_loss

__all__ = [
    "TERMS",
    "ClsDistillLoss",
    "CodingRateLoss",
    "CompressionLoss",
    "DeoLoss",
    "PatchDistillLoss",
    "build_loss",
    "coding_rate",
    "cross_view_cosine",
    "get_loss_class",
    "list_losses",
    "register_loss",
]
