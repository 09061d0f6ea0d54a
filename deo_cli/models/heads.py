"""DEO's projection heads (docs/method.md §2.5 "Projection heads").

Every head is SimDINO's DINOHead without the prototype layer: a 3-layer MLP
``in -> 2048 -> 2048 -> out`` with GELU and no BatchNorm, then L2 normalisation; Linear weights
trunc-normal (std 0.02), biases zero. There is no weight-normalised last layer.

DEO has four (:func:`build_deo_heads`):

======================  ===========================  ==========================
head                    input                        output
======================  ===========================  ==========================
``head_ms``             pooled MS feature            256 (``z_dim``), also in the EMA teacher
``cls_head``            pooled RGB feature           teacher width (768 / 1024)
``patch_head_mid``      stage-3 tokens (Swin)        teacher width
``patch_head_late``     stage-4 tokens (Swin)        teacher width
======================  ===========================  ==========================
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional as F

#: Width of the multispectral self-distillation space (SimDINO ``z_dim``, docs/method.md §2.5).
MS_DIM = 256
HIDDEN_DIM = 2048


class ProjectionHead(nn.Module):
    """MLP (Linear-GELU x (nlayers-1), Linear) followed by L2 normalisation over the last dim.

    Args:
        in_dim: input width.
        out_dim: output width.
        hidden_dim: hidden width (2048, docs/method.md §2.5).
        nlayers: number of Linear layers (3).
    """

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = HIDDEN_DIM, nlayers: int = 3):
        super().__init__()
        if nlayers < 1:
            raise ValueError("nlayers must be >= 1")
        dims = [in_dim] + [hidden_dim] * (nlayers - 1) + [out_dim]
        layers: list[nn.Module] = []
        for i in range(nlayers):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < nlayers - 1:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        self.in_dim, self.out_dim = in_dim, out_dim
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        """``(..., in_dim) -> (..., out_dim)``, unit L2 norm along the last dimension."""
        return F.normalize(self.mlp(x), dim=-1)

    def forward_map(self, x: Tensor) -> Tensor:
        """Apply the head to every token of an NCHW map: ``(B, in_dim, H, W) -> (B, out_dim, H, W)``."""
        return self(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def build_deo_heads(
    encoder: nn.Module,
    teacher_dim: int = 768,
    ms_dim: int = MS_DIM,
    hidden_dim: int = HIDDEN_DIM,
    nlayers: int = 3,
) -> nn.ModuleDict:
    """DEO's four heads for ``encoder`` (docs/method.md §2.5).

    ``head_ms`` and ``cls_head`` take the pooled vector (``encoder.pooled_dim``); the patch heads
    take the levels named by ``encoder.spec.distill_levels`` (Swin stages 3 and 4).
    ``teacher_dim`` is the optical teacher's width (768 for base, 1024 for large teachers).
    """
    spec = encoder.spec
    mid, late = spec.distill_levels
    channels = encoder.feature_channels
    pooled = encoder.pooled_dim
    return nn.ModuleDict(
        {
            "head_ms": ProjectionHead(pooled, ms_dim, hidden_dim, nlayers),
            "cls_head": ProjectionHead(pooled, teacher_dim, hidden_dim, nlayers),
            "patch_head_mid": ProjectionHead(channels[mid], teacher_dim, hidden_dim, nlayers),
            "patch_head_late": ProjectionHead(channels[late], teacher_dim, hidden_dim, nlayers),
        }
    )
