"""``OffloadedNemotron``: the user-facing model object.

This version keeps every weight resident on one device (``cpu`` or ``cuda``). The routed-expert
implementation is pluggable (see :mod:`residency.model.moe`), which is where the offload runtime
attaches; until it does, ``from_pretrained`` takes no VRAM budget or plan.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from .config import NemotronHConfig
from .model.checkpoint import Checkpoint
from .model.loading import build_model
from .model.modeling import NemotronHForCausalLM
from .model.sampling import sample_next
from .model.tokenizer import Tokenizer, load_tokenizer


class OffloadedNemotron:
    """A Nemotron-H model ready for ``model(input_ids)``, ``generate`` and ``profile``."""

    def __init__(self, model: NemotronHForCausalLM, tokenizer: Tokenizer | None = None, path: Path | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.path = path
        self._stats: dict[str, Any] = {}

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        progress: bool | None = None,
    ) -> OffloadedNemotron:
        """Open a Hugging Face Nemotron-H folder, validate it and load it.

        ``device`` defaults to ``cuda`` when available, else ``cpu``. ``dtype`` defaults to the
        checkpoint's dtype. Every problem with the folder is reported before weights are read.
        """
        path = Path(path)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        model = build_model(Checkpoint(path), device=device, dtype=dtype, progress=progress)
        return cls(model, load_tokenizer(path), path)

    @property
    def config(self) -> NemotronHConfig:
        return self.model.config

    @property
    def device(self) -> torch.device:
        return self.model.lm_head.weight.device

    # ------------------------------------------------------------------ inputs
    def encode(self, inputs: str | list[int] | list[list[int]] | torch.Tensor) -> torch.Tensor:
        """Text, a token list, a batch of equal-length token lists or a tensor → ``[B, T]`` int64 on device."""
        if isinstance(inputs, str):
            if self.tokenizer is None:
                raise ValueError(
                    f"{self.path}: this checkpoint has no tokenizer; pass token ids instead of text"
                )
            inputs = [self.tokenizer.encode(inputs)]
        ids = torch.as_tensor(inputs, dtype=torch.long)
        if ids.dim() == 1:
            ids = ids[None]
        if ids.dim() != 2 or ids.shape[1] == 0:
            raise ValueError(f"input ids must be a non-empty [batch, seq] array, got shape {tuple(ids.shape)}")
        vocab = self.config.vocab_size
        if int(ids.min()) < 0 or int(ids.max()) >= vocab:
            raise ValueError(f"token ids must lie in [0, {vocab}); got min {int(ids.min())}, max {int(ids.max())}")
        return ids.to(self.device)

    # ------------------------------------------------------------------ forward and generation
    def __call__(self, input_ids: torch.Tensor | list[int] | list[list[int]]) -> torch.Tensor:
        """Full forward without cache: fp32 logits ``[B, T, V]``."""
        return self.model(self.encode(input_ids))

    @torch.no_grad()
    def generate(
        self,
        inputs: str | list[int] | list[list[int]] | torch.Tensor,
        max_new_tokens: int = 32,
        temperature: float = 1.0,
        top_p: float = 0.95,
        seed: int | None = None,
        stop_at_eos: bool = True,
    ) -> torch.Tensor | str:
        """Decode with the KV and SSM caches.

        Returns ``[B, T + new]`` token ids (prompt included) for id input, and the generated text
        for text input. ``temperature=0`` is greedy. Rows that produced an end-of-sequence token
        are padded with ``pad_token_id`` afterwards; generation stops when every row has.
        """
        ids = self.encode(inputs)
        gen = torch.Generator(device=ids.device).manual_seed(seed) if seed is not None else None
        eos = self.config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        pad = self.config.pad_token_id if self.config.pad_token_id is not None else 0
        cache = self.model.new_cache(ids.shape[0])
        out = [ids]
        done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        t0 = time.perf_counter()
        logits = self.model(ids, cache, last_only=True)[:, -1]
        t_prefill = time.perf_counter() - t0
        steps = 0
        for step in range(max_new_tokens):
            nxt = sample_next(logits, temperature, top_p, gen)
            nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
            out.append(nxt[:, None])
            steps += 1
            if stop_at_eos and eos_ids:
                done |= torch.isin(nxt, torch.tensor(sorted(eos_ids), device=nxt.device))
                if bool(done.all()):
                    break
            if step + 1 < max_new_tokens:
                logits = self.model(nxt[:, None], cache)[:, -1]
        total = time.perf_counter() - t0
        decode_time = total - t_prefill
        self._stats = {
            "prompt_tokens": int(ids.shape[1]),
            "batch": int(ids.shape[0]),
            "new_tokens": steps,
            "prefill_s": t_prefill,
            "decode_s": decode_time,
            "decode_tokens_per_s": (steps - 1) * ids.shape[0] / decode_time if steps > 1 and decode_time > 0 else None,
            "tokens_per_s": steps * ids.shape[0] / total if total > 0 else None,
            "device": str(self.device),
        }
        result = torch.cat(out, dim=1)
        if isinstance(inputs, str) and self.tokenizer is not None:
            return self.tokenizer.decode(result[0, ids.shape[1]:].tolist())
        return result

    def profile(self, prompts: Any, **kwargs: Any) -> Any:
        """Profile which experts ``prompts`` route to; see :func:`residency.profiling.profile.profile_model`."""
        from .profiling.profile import profile_model

        return profile_model(self, prompts, **kwargs)

    def stats(self) -> dict[str, Any]:
        """Telemetry of the last ``generate`` call (timings and token counts)."""
        return dict(self._stats)
