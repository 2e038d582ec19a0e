"""Small building blocks shared by the mixers: RMS norms, relu² and the non-gated MLP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .caches import InferenceCache


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * h).to(dtype)


class GatedRMSNorm(nn.Module):
    """``norm(y · silu(z))`` with the mean square taken per group of ``size / groups`` channels."""

    def __init__(self, size: int, groups: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.groups = groups
        self.eps = eps

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        dtype = y.dtype
        h = y.float() * F.silu(z.float())
        shape = h.shape
        h = h.view(*shape[:-1], self.groups, shape[-1] // self.groups)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.view(shape).to(dtype)


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
