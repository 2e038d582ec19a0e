"""Causal grouped-query attention with a KV cache and no positional encoding (Nemotron-H uses none)."""

from __future__ import annotations

import torch
from torch import nn

from ..config import NemotronHConfig
from .caches import InferenceCache


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
        q = self.q_proj(x).view(bsz, seq, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(bsz, seq, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(bsz, seq, self.kv_heads, self.head_dim).transpose(1, 2)
        start = 0
        if cache is not None:
            start = cache.pos
            k, v = self._append(cache, k, v, start)
        rep = self.heads // self.kv_heads
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
        scores = torch.matmul(q, k.transpose(2, 3)) * (self.head_dim**-0.5)  # [B, H, T, S]
        q_pos = torch.arange(start, start + seq, device=x.device)[:, None]
        k_pos = torch.arange(k.shape[2], device=x.device)[None, :]
        scores = scores.masked_fill(k_pos > q_pos, float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        out = torch.matmul(probs, v).transpose(1, 2).reshape(bsz, seq, -1)
        return self.o_proj(out)

    def _append(self, cache: InferenceCache, k: torch.Tensor, v: torch.Tensor, start: int):
        end = start + k.shape[2]
        buf = cache.kv.get(self.layer_idx)
        if buf is None or buf[0].shape[2] < end:
            cap = max(end, 2 * (buf[0].shape[2] if buf is not None else 0), 16)
            new_k = k.new_zeros(k.shape[0], k.shape[1], cap, k.shape[3])
            new_v = torch.zeros_like(new_k)
            if buf is not None:
                new_k[:, :, :start] = buf[0][:, :, :start]
                new_v[:, :, :start] = buf[1][:, :, :start]
            buf = (new_k, new_v)
            cache.kv[self.layer_idx] = buf
        buf[0][:, :, start:end] = k
        buf[1][:, :, start:end] = v
        return buf[0][:, :, :end], buf[1][:, :, :end]
