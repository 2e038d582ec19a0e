"""Decode state carried between forward calls: KV per attention layer, conv and SSM state per Mamba layer."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class InferenceCache:
    """Decode state for a batch: KV per attention layer, conv + SSM state per Mamba layer.

    ``pos`` is the number of tokens already processed. KV buffers grow by doubling.
    """

    batch: int
    pos: int = 0
    kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    conv: dict[int, torch.Tensor] = field(default_factory=dict)  # [B, conv_dim, K-1]
    ssm: dict[int, torch.Tensor] = field(default_factory=dict)  # [B, nh, p, N] fp32
