"""Small building blocks shared by the mixers: RMS norms, relu² and the non-gated MLP."""

from __future__ import annotations

import torch
from torch import nn

from ..kernels import gated_rms_norm, rms_norm
from .caches import InferenceCache


class RMSNorm(nn.Module):
    """``weight · x / sqrt(mean(x²) + eps)`` in fp32, cast back to x's dtype (one kernel on GPU)."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class GatedRMSNorm(nn.Module):
    """``norm(y · silu(z))`` with the mean square taken per group of ``size / groups`` channels.

    Computed in fp32 in one pass (:func:`~residency.kernels.gated_rms_norm`); the result has
    ``out_dtype``, by default the promotion of y's and the weight's dtypes.
    """

    def __init__(self, size: int, groups: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.groups = groups
        self.eps = eps

    def forward(self, y: torch.Tensor, z: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        dtype = out_dtype or torch.promote_types(y.dtype, self.weight.dtype)
        return gated_rms_norm(y, z, self.weight, self.groups, self.eps, out_dtype=dtype)


def relu2(x: torch.Tensor) -> torch.Tensor:
    return torch.relu(x).square()


class MLP(nn.Module):
    """Non-gated relu² MLP (shared expert and dense ``-`` layers)."""

    def __init__(self, hidden: int, inner: int, bias: bool) -> None:
        super().__init__()
        self.up_proj = nn.Linear(hidden, inner, bias=bias)
        self.down_proj = nn.Linear(inner, hidden, bias=bias)

    def forward(self, x: torch.Tensor, cache: InferenceCache | None = None) -> torch.Tensor:
        return self.down_proj(relu2(self.up_proj(x)))
