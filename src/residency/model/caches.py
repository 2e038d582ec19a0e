"""Decode state carried between forward calls: KV per attention layer, conv and SSM state per Mamba layer.

Layout (what :meth:`NemotronHForCausalLM.new_cache` preallocates, zero-filled, on the model's device):

- ``kv[layer] = (k, v)``, each ``[B, kv_heads, capacity, head_dim]`` in ``kv_dtype`` (default the
  attention weights' dtype; ``torch.float8_e4m3fn`` halves it). Token ``t`` is written at index
  ``t``; attention reads the first ``pos + T`` entries as a view, never a copy (except the FP8
  cache, which is widened to the compute dtype when read).
- ``conv[layer]``: ``[B, conv_dim, K-1]``, the last K-1 conv inputs (oldest first), in the Mamba
  weights' dtype. ``ssm[layer]``: ``[B, heads, head_dim, state]`` fp32.
- ``pos``: tokens already processed (a host int, the public counter); ``pos_t`` holds the same
  value as a one-element int64 device tensor, which is what a captured decode step reads and
  advances. Buffers keep their addresses for the cache's life, except when the KV cache grows.

``max_len`` fixes the KV capacity: writing past it is an error. Without it the capacity starts
at ``min(max_position_embeddings, DEFAULT_KV_CAPACITY)`` and doubles when a call needs more (one
copy per doubling, never per step). A cache built directly (``InferenceCache(batch=B)``) allocates
each buffer the first time a layer needs it, the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

DEFAULT_KV_CAPACITY = 4096


@dataclass
class StepState:
    """What one forward call's attention layers share: where its tokens go and what they attend to.

    ``positions [T]`` (device) are the tokens' cache positions. ``attend_len`` is how many KV
    entries the call reads; ``mask [T, attend_len]`` (bool, True = attend) is None when every
    token attends to all of them (an eager decode step), and ``causal`` says that the plain
    causal mask applies instead (a first prefill chunk).
    """

    start: int
    seq: int
    positions: torch.Tensor
    attend_len: int
    mask: torch.Tensor | None = None
    causal: bool = False


@dataclass
class InferenceCache:
    """Decode state for a batch: KV per attention layer, conv + SSM state per Mamba layer (see the module doc)."""

    batch: int
    pos: int = 0
    kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # [B, Hkv, cap, D]
    conv: dict[int, torch.Tensor] = field(default_factory=dict)  # [B, conv_dim, K-1]
    ssm: dict[int, torch.Tensor] = field(default_factory=dict)  # [B, nh, p, N] fp32
    max_len: int | None = None  # fixed KV capacity; None = grow by doubling
    kv_dtype: torch.dtype | None = None
    capacity: int = 0  # current KV capacity (0 = nothing allocated yet)
    pos_t: torch.Tensor | None = None  # [1] int64 on the model's device, equal to pos
    graphs: Any = None  # residency.model.modeling.DecodeGraphs when CUDA graphs are on
    generation: int = 0  # bumped whenever a buffer is reallocated (captured graphs become stale)
    step: StepState | None = field(default=None, repr=False)
    _pos_t_value: int = field(default=0, repr=False)

    # ------------------------------------------------------------------ positions
    def device_pos(self, device: torch.device) -> torch.Tensor:
        """``pos`` as a device tensor, refreshed (without a sync) when ``pos`` was set by hand."""
        if self.pos_t is None or self.pos_t.device != device:
            self.pos_t = torch.full((1,), self.pos, dtype=torch.int64, device=device)
            self._pos_t_value = self.pos
        elif self._pos_t_value != self.pos:
            self.pos_t.fill_(self.pos)
            self._pos_t_value = self.pos
        return self.pos_t

    def advance(self, seq: int) -> None:
        """Count ``seq`` processed tokens on the host and on the device."""
        self.pos += seq
        if self.pos_t is not None:
            self.pos_t.add_(seq)
            self._pos_t_value = self.pos

    def begin_step(self, seq: int, device: torch.device, attend_len: int | None = None) -> StepState:
        """Set up a forward call of ``seq`` tokens: room in the KV cache, positions, attention mask.

        ``attend_len`` None (eager calls): attention reads exactly ``pos + seq`` entries. A captured
        decode step passes a fixed ``attend_len`` (its KV-length bucket) instead; the mask, built
        on the device from ``pos_t``, then hides the entries past each token's position.
        """
        start = self.pos
        self.reserve(max(start + seq, attend_len or 0))
        pos_t = self.device_pos(device)
        positions = pos_t if seq == 1 else pos_t + torch.arange(seq, device=device)
        if attend_len is None:
            step = StepState(start, seq, positions, start + seq, causal=start == 0 and seq > 1)
            if start > 0 and seq > 1:
                step.mask = torch.arange(start + seq, device=device)[None, :] <= positions[:, None]
        else:
            mask = torch.arange(attend_len, device=device)[None, :] <= positions[:, None]
            step = StepState(start, seq, positions, attend_len, mask)
        self.step = step
        return step

    def advanced_on_device(self, seq: int) -> None:
        """Count ``seq`` tokens on the host after a captured step advanced ``pos_t`` itself."""
        self.pos += seq
        self._pos_t_value = self.pos

    # ------------------------------------------------------------------ KV
    def reserve(self, end: int) -> None:
        """Make room for KV positions ``[0, end)``: an error past ``max_len``, else grow by doubling."""
        if end <= self.capacity:
            return
        if self.max_len is not None:
            if end > self.max_len:
                raise ValueError(
                    f"the KV cache holds {self.max_len} tokens (max_len), but this call needs {end}; "
                    "create the cache with a larger max_len"
                )
            new = self.max_len
        elif self.capacity == 0:
            new = max(end, DEFAULT_KV_CAPACITY)
        else:
            new = max(end, 2 * self.capacity)
        for layer, (k, v) in list(self.kv.items()):
            self.kv[layer] = (_grown(k, new, self.pos), _grown(v, new, self.pos))
        if self.kv:
            self.generation += 1
        self.capacity = new

    def kv_buffers(self, layer: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's ``(k, v)`` buffers ``[B, Hkv, capacity, D]``, allocated on first use like ``like``."""
        buf = self.kv.get(layer)
        if buf is None:
            self.reserve(self.pos + like.shape[2])
            shape = (like.shape[0], like.shape[1], self.capacity, like.shape[3])
            dtype = self.kv_dtype or like.dtype
            buf = (torch.zeros(shape, dtype=dtype, device=like.device),
                   torch.zeros(shape, dtype=dtype, device=like.device))  # fmt: skip
            self.kv[layer] = buf
        return buf

    def write_kv(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``k, v [B, Hkv, T, D]`` at this call's positions; return the entries it attends to.

        The result is a view of the cache (``[B, Hkv, attend_len, D]``), widened to k's dtype for
        an FP8 cache.
        """
        step = self.step
        k_buf, v_buf = self.kv_buffers(layer, k)
        dtype = k.dtype
        if k_buf.dtype != dtype:
            k, v = _to_kv(k, k_buf.dtype), _to_kv(v, v_buf.dtype)
        if k_buf.element_size() == 1:  # index_copy_ has no float8 kernels: copy the bytes
            k_buf.view(torch.uint8).index_copy_(2, step.positions, k.view(torch.uint8))
            v_buf.view(torch.uint8).index_copy_(2, step.positions, v.view(torch.uint8))
        else:
            k_buf.index_copy_(2, step.positions, k)
            v_buf.index_copy_(2, step.positions, v)
        keys, values = k_buf[:, :, :step.attend_len], v_buf[:, :, :step.attend_len]
        if keys.dtype != dtype:
            keys, values = keys.to(dtype), values.to(dtype)
        return keys, values

    def nbytes(self) -> int:
        """Device bytes held by every buffer of this cache."""
        tensors = [t for pair in self.kv.values() for t in pair] + list(self.conv.values()) + list(self.ssm.values())
        return sum(t.numel() * t.element_size() for t in tensors)


def _grown(buf: torch.Tensor, capacity: int, keep: int) -> torch.Tensor:
    new = buf.new_zeros(buf.shape[0], buf.shape[1], capacity, buf.shape[3])
    new[:, :, :keep] = buf[:, :, :keep]
    return new


def _to_kv(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if dtype.is_floating_point and dtype.itemsize == 1:  # float8: saturate instead of producing NaN
        limit = torch.finfo(dtype).max
        t = t.clamp(-limit, limit)
    return t.to(dtype)
