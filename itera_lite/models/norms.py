"""RMSNorm and the gated RMSNorm of Mamba-2."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def rms_normalize(x: Tensor, eps: float) -> Tensor:
    # Written as x / sqrt(mean(x^2) + eps): onnxruntime fuses exactly this pattern into
    # SimplifiedLayerNormalization at opset 18, where F.rms_norm exports as unfused ops.
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return rms_normalize(x, self.eps) * self.weight


class GatedRMSNorm(RMSNorm):
    """rmsnorm(y * silu(z)) * w, normalising over the whole width (as HF Mamba2 does)."""

    def forward(self, y: Tensor, z: Tensor) -> Tensor:  # type: ignore[override]
        return rms_normalize(y * F.silu(z), self.eps) * self.weight
