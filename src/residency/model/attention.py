"""Causal grouped-query attention with a static KV cache and no positional encoding (Nemotron-H uses none).

Attention runs through ``torch.nn.functional.scaled_dot_product_attention`` on views of the
cache (see :mod:`residency.model.caches`): the KV heads are never repeated per query head. For
one decoded token the ``H / H_kv`` query heads that share a KV head are folded into the query
length, so a plain (non-GQA) SDPA call reads each KV head once, with any backend; several tokens
use SDPA's own grouped-query support (``enable_gqa``, torch >= 2.5).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import NemotronHConfig
from .caches import InferenceCache

_TORCH_GQA = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)


def sdpa_gqa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
             causal: bool = False) -> torch.Tensor:
    """SDPA of ``q [B, H, T, D]`` over ``k, v [B, H_kv, S, D]``, query head i reading KV head ``i // (H / H_kv)``."""
    if q.shape[1] != k.shape[1]:
        if _TORCH_GQA:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True)
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)


class Attention(nn.Module):
    """Causal GQA attention without positional encoding (Nemotron-H uses none)."""

    def __init__(self, config: NemotronHConfig, layer_idx: int) -> None:
        super().__init__()
        c = config
        self.layer_idx = layer_idx
        self.heads, self.kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, self.heads * self.head_dim, bias=c.attention_bias)
        self.k_proj = nn.Linear(c.hidden_size, self.kv_heads * self.head_dim, bias=c.attention_bias)
        self.v_proj = nn.Linear(c.hidden_size, self.kv_heads * self.head_dim, bias=c.attention_bias)
        self.o_proj = nn.Linear(self.heads * self.head_dim, c.hidden_size, bias=c.attention_bias)

    def forward(self, x: torch.Tensor, cache: InferenceCache | None) -> torch.Tensor:
        bsz, seq, _ = x.shape
        q = self.q_proj(x)
        k = self.k_proj(x).view(bsz, seq, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(bsz, seq, self.kv_heads, self.head_dim).transpose(1, 2)
        if cache is None:
            q = q.view(bsz, seq, self.heads, self.head_dim).transpose(1, 2)
            out = sdpa_gqa(q, k, v, causal=seq > 1).transpose(1, 2)
            return self.o_proj(out.reshape(bsz, seq, -1))
        k, v = cache.write_kv(self.layer_idx, k, v)  # views [B, H_kv, S, D] of the cache
        step = cache.step
        if seq == 1:
            # the query heads of one KV head as query rows: [B, H_kv, H / H_kv, D]
            qg = q.view(bsz, self.kv_heads, self.heads // self.kv_heads, self.head_dim)
            out = F.scaled_dot_product_attention(qg, k, v, attn_mask=step.mask)
            return self.o_proj(out.reshape(bsz, 1, -1))
        q = q.view(bsz, seq, self.heads, self.head_dim).transpose(1, 2)
        out = sdpa_gqa(q, k, v, step.mask, step.causal).transpose(1, 2)
        return self.o_proj(out.reshape(bsz, seq, -1))
