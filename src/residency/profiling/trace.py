"""Routing traces: per token and MoE layer, the chosen expert ids and their weights.

A trace is what the simulator replays and what the runtime can be checked against. It is stored
compactly (``int16`` ids when the expert count allows, ``float32`` weights) with prompt boundaries
and a prefill/decode flag per token, as safetensors with JSON metadata.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import FileFormatError
from ..files import load_tensors, save_tensors

TRACE_FORMAT_VERSION = 1


@dataclass
class RoutingTrace:
    """Expert choices of a run, token by token.

    - ``ids`` ``[tokens, moe_layers, top_k]`` integer expert ids (row order = token order).
    - ``weights`` ``[tokens, moe_layers, top_k]`` float32 routing weights (after renormalisation and scaling).
    - ``prompt_offsets`` ``[prompts + 1]`` int64: tokens of prompt p are rows ``offsets[p]:offsets[p+1]``.
    - ``is_decode`` ``[tokens]`` bool: True for tokens produced by decode steps, False for prefill.
    """

    ids: torch.Tensor
    weights: torch.Tensor
    prompt_offsets: torch.Tensor
    is_decode: torch.Tensor
    num_experts: int
    fingerprint: str
    prompts: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.ids.dim() != 3 or self.weights.shape != self.ids.shape:
            raise FileFormatError(
                f"trace ids {tuple(self.ids.shape)} and weights {tuple(self.weights.shape)} must both be "
                "[tokens, moe_layers, top_k]"
            )
        n = self.ids.shape[0]
        offsets = self.prompt_offsets
        if offsets.dim() != 1 or offsets.numel() < 1 or int(offsets[0]) != 0 or int(offsets[-1]) != n:
            raise FileFormatError(f"trace prompt_offsets must start at 0 and end at the token count {n}")
        if bool((offsets[1:] < offsets[:-1]).any()):
            raise FileFormatError("trace prompt_offsets must be non-decreasing")
        if self.is_decode.shape != (n,):
            raise FileFormatError(f"trace is_decode must have one entry per token ({n})")
        if n and (int(self.ids.min()) < 0 or int(self.ids.max()) >= self.num_experts):
            raise FileFormatError(f"trace expert ids must lie in [0, {self.num_experts})")
        if self.prompts and len(self.prompts) != offsets.numel() - 1:
            raise FileFormatError("trace has a different number of prompt names than prompt boundaries")

    # ------------------------------------------------------------------ shape
    @property
    def num_tokens(self) -> int:
        return int(self.ids.shape[0])

    @property
    def num_moe_layers(self) -> int:
        return int(self.ids.shape[1])

    @property
    def top_k(self) -> int:
        return int(self.ids.shape[2])

    @property
    def num_prompts(self) -> int:
        return int(self.prompt_offsets.numel() - 1)

    def prompt_slice(self, p: int) -> slice:
        return slice(int(self.prompt_offsets[p]), int(self.prompt_offsets[p + 1]))

    def select_prompts(self, indices: list[int]) -> RoutingTrace:
        """A trace of a subset of prompts, in the given order."""
        parts = [self.prompt_slice(p) for p in indices]
        rows = torch.cat([torch.arange(s.start, s.stop) for s in parts]) if parts else torch.zeros(0, dtype=torch.long)
        lengths = torch.tensor([s.stop - s.start for s in parts], dtype=torch.int64)
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
        return RoutingTrace(
            ids=self.ids[rows], weights=self.weights[rows], prompt_offsets=offsets, is_decode=self.is_decode[rows],
            num_experts=self.num_experts, fingerprint=self.fingerprint,
            prompts=[self.prompts[p] for p in indices] if self.prompts else [], meta=dict(self.meta),
        )

    @staticmethod
    def concat(traces: list[RoutingTrace]) -> RoutingTrace:
        """Join traces of the same model one after another (prompt boundaries kept)."""
        if not traces:
            raise ValueError("concat needs at least one trace")
        first = traces[0]
        for t in traces[1:]:
            if (t.fingerprint, t.num_experts, t.ids.shape[1:]) != (first.fingerprint, first.num_experts,
                                                                    first.ids.shape[1:]):
                raise FileFormatError("cannot concatenate traces of different models or routing shapes")
        offsets = [torch.zeros(1, dtype=torch.int64)]
        base = 0
        for t in traces:
            offsets.append(t.prompt_offsets[1:] + base)
            base += t.num_tokens
        return RoutingTrace(
            ids=torch.cat([t.ids for t in traces]), weights=torch.cat([t.weights for t in traces]),
            prompt_offsets=torch.cat(offsets), is_decode=torch.cat([t.is_decode for t in traces]),
            num_experts=first.num_experts, fingerprint=first.fingerprint,
            prompts=[p for t in traces for p in t.prompts] if all(t.prompts for t in traces) else [],
            meta=dict(first.meta),
        )

    # ------------------------------------------------------------------ files
    def save(self, path: str | Path) -> Path:
        """Write as safetensors (atomic)."""
        id_dtype = torch.int16 if self.num_experts <= 32767 else torch.int32
        meta = {
            "kind": "trace", "format_version": TRACE_FORMAT_VERSION, "fingerprint": self.fingerprint,
            "num_experts": self.num_experts, "prompts": self.prompts, "meta": self.meta,
        }
        tensors = {
            "ids": self.ids.to(id_dtype), "weights": self.weights.float(),
            "prompt_offsets": self.prompt_offsets.to(torch.int64), "is_decode": self.is_decode.to(torch.uint8),
        }
        return save_tensors(path, tensors, meta)

    @classmethod
    def load(cls, path: str | Path, fingerprint: str | None = None) -> RoutingTrace:
        """Read and validate; with ``fingerprint``, refuse a trace of another model."""
        tensors, meta = load_tensors(path, "trace", TRACE_FORMAT_VERSION, fingerprint)
        missing = {"ids", "weights", "prompt_offsets", "is_decode"} - set(tensors)
        if missing:
            raise FileFormatError(f"{path}: trace lacks tensors {sorted(missing)}; regenerate it")
        try:
            return cls(
                ids=tensors["ids"].long(), weights=tensors["weights"].float(),
                prompt_offsets=tensors["prompt_offsets"].long(), is_decode=tensors["is_decode"].bool(),
                num_experts=int(meta["num_experts"]), fingerprint=str(meta["fingerprint"]),
                prompts=list(meta.get("prompts", [])), meta=dict(meta.get("meta", {})),
            )
        except (KeyError, TypeError) as exc:
            raise FileFormatError(f"{path}: trace metadata is incomplete ({exc}); regenerate it") from exc
