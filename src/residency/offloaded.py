"""``OffloadedNemotron``: the user-facing model object.

Without ``vram_budget`` or ``plan`` every weight is resident on one device. With either, the
routed experts live in the host store and the device holds the dense weights, the plan's expert
slots and the runtime's buffers under the budget (:mod:`residency.offload`,
:mod:`residency.runtime.backend`); the answers are the same either way.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from .config import NemotronHConfig
from .devices import resolve_device
from .errors import InputError
from .model.checkpoint import Checkpoint
from .model.loading import build_model
from .model.modeling import NemotronHForCausalLM
from .model.sampling import check_max_new_tokens, check_sampling, check_seed, sample_next
from .model.tokenizer import Tokenizer, as_token_ids, load_tokenizer, missing_tokenizer_reason


class OffloadedNemotron:
    """A Nemotron-H model ready for ``model(input_ids)``, ``generate`` and ``profile``."""

    def __init__(self, model: NemotronHForCausalLM, tokenizer: Tokenizer | None = None, path: Path | None = None,
                 runtime: Any = None, slots: Any = None, prefill_chunk: int | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.path = path
        self.runtime = runtime  # residency.runtime.backend.OffloadRuntime when offloaded
        self.slots = slots  # residency.offload.SlotLayout when offloaded
        self.prefill_chunk = prefill_chunk
        self._stats: dict[str, Any] = {}

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        device: str | torch.device | None = None,
        vram_budget: str | int | float | None = None,
        plan: Any = None,
        profile: Any = None,
        dtype: torch.dtype | None = None,
        progress: bool | None = None,
        policy: str | None = None,
        prefetch: bool = True,
        cpu_experts: str | bool = "auto",
        context: int | None = None,
        prefill_chunk: int | None = None,
        quiet: bool = False,
        runtime_options: dict[str, Any] | None = None,
    ) -> OffloadedNemotron:
        """Open a Hugging Face Nemotron-H folder, validate it and load it.

        ``device`` defaults to ``cuda`` when available, else ``cpu`` (see
        :func:`residency.devices.resolve_device`; an unsupported or unavailable device raises
        :class:`~residency.errors.DeviceError`); ``"unified"`` is a unified-memory machine (DGX
        Spark, GH200-class), where the kernels read the expert store in place. ``dtype`` defaults
        to the checkpoint's dtype. Every problem with the device or the folder is reported before
        weights are read.

        Offloading starts when ``vram_budget`` or ``plan`` is given. ``vram_budget``: "20GiB",
        "24GB" (decimal), bytes, or a fraction of free device memory such as 0.8; a hard cap on
        what the library allocates on the device. ``plan``: a :class:`~residency.Plan` (e.g. from
        ``residency plan``), whose slot layout and policy are used; without one the layout is
        planned here for the budget from ``profile`` (a :class:`~residency.Profile`) or a uniform
        prior. ``policy``: eviction policy (default the plan's, else ``lru``); ``prefetch``:
        look-ahead copies; ``cpu_experts``: compute misses on the CPU always (True), never
        (False) or where cheaper (``"auto"``); ``context``: tokens of KV cache the budget keeps;
        ``prefill_chunk``: prompt tokens per forward call. A short plan summary is printed unless
        ``quiet``. ``runtime_options`` (tests): ``verify``, ``copy_delay``, ``mode``, ``staging_slots``.
        """
        path = Path(path)
        mode = None
        if isinstance(device, str) and device.strip().lower() == "unified":
            mode = "unified"
            device = None
        device = resolve_device(device)
        ckpt = Checkpoint(path)
        tokenizer = load_tokenizer(path)  # a corrupt tokenizer file is reported before the weights are read
        if vram_budget is None and plan is None:
            model = build_model(ckpt, device=device, dtype=dtype, progress=progress)
            return cls(model, tokenizer, path, prefill_chunk=prefill_chunk)
        from .offload import DEFAULT_CONTEXT, DEFAULT_PREFILL_CHUNK, load_offloaded

        options = dict(runtime_options or {})
        mode = options.pop("mode", mode) or device.type
        chunk = prefill_chunk or DEFAULT_PREFILL_CHUNK
        model, runtime, slots = load_offloaded(
            ckpt, device, mode=mode, dtype=dtype, vram_budget=vram_budget, plan=plan, profile=profile,
            policy=policy, prefetch=prefetch, cpu_experts=cpu_experts, context=context or DEFAULT_CONTEXT,
            prefill_chunk=chunk, progress=progress, **options,
        )
        self = cls(model, tokenizer, path, runtime=runtime, slots=slots, prefill_chunk=chunk)
        if not quiet:
            print(self.plan_summary())
        return self

    def plan_summary(self) -> str:
        """One line: where the experts are and what the plan predicts (offloaded models)."""
        if self.runtime is None:
            return "all experts resident"
        from .sizes import format_bytes

        s, r, c = self.slots, self.runtime, self.config
        static = sum(len(lp.static) for lp in s.layers)
        dynamic = sum(lp.dynamic_slots for lp in s.layers)
        total = c.num_moe_layers * c.n_routed_experts
        hit = "n/a" if s.predicted_hit_rate is None else f"{100 * s.predicted_hit_rate:.1f} %"
        return (
            f"residency: {r.options.mode} device, budget {format_bytes(r.ledger.budget_bytes)}: {static} static + "
            f"{dynamic} dynamic expert slots of {total} experts ({s.source}, policy {r.options.policy}), "
            f"{r.options.staging_slots} staging slots, host store {format_bytes(r.store.nbytes)}"
            f"{' pinned' if r.store.pinned else ''}; predicted hit rate {hit}"
        )

    @property
    def config(self) -> NemotronHConfig:
        return self.model.config

    @property
    def device(self) -> torch.device:
        return self.model.lm_head.weight.device

    # ------------------------------------------------------------------ inputs
    def encode(self, inputs: str | list[int] | list[list[int]] | torch.Tensor) -> torch.Tensor:
        """Text, a token list, a batch of equal-length token lists or a tensor → ``[B, T]`` int64 on device.

        Text without a tokenizer, no ids, ragged batches, non-integers and ids outside the
        vocabulary raise :class:`~residency.errors.InputError` (a ``ValueError``).
        """
        if isinstance(inputs, str):
            inputs = [self._tokenizer_for_text().encode(inputs)]
        return as_token_ids(inputs, self.config.vocab_size).to(self.device)

    def _tokenizer_for_text(self) -> Tokenizer:
        if self.tokenizer is None:
            raise InputError(
                f"{self.path or 'this model'} {missing_tokenizer_reason(self.path)}, so it cannot encode text: "
                "pass token ids instead, or add the model's tokenizer.json to the checkpoint folder"
            )
        return self.tokenizer

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
        are padded with ``pad_token_id`` afterwards; generation stops when every row has. Bad
        inputs or settings (``temperature < 0``, ``top_p`` outside (0, 1], ``max_new_tokens < 1``, a
        seed that is not an integer) raise :class:`~residency.errors.InputError` before any compute.
        """
        temperature, top_p = check_sampling(temperature, top_p)
        max_new_tokens = check_max_new_tokens(max_new_tokens)
        seed = check_seed(seed)
        ids = self.encode(inputs)
        gen = torch.Generator(device=ids.device).manual_seed(seed) if seed is not None else None
        eos = self.config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        pad = self.config.pad_token_id if self.config.pad_token_id is not None else 0
        cache = self.model.new_cache(ids.shape[0])
        out = [ids]
        done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        t0 = time.perf_counter()
        logits = self._prefill(ids, cache)
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
        """Profile which experts ``prompts`` route to; see :func:`residency.profiling.profile.profile_model`.

        Every prompt is checked first (:func:`check_prompts`), as are ``decode_tokens`` and
        ``co_activation``: problems raise :class:`~residency.errors.InputError` before any prompt runs.
        """
        from .profiling.profile import profile_model

        prompts = [prompts] if isinstance(prompts, (str, dict)) else list(prompts)
        check_profile_options(**{k: v for k, v in kwargs.items() if k in ("decode_tokens", "co_activation")})
        check_prompts(prompts, vocab_size=self.config.vocab_size, has_tokenizer=self.tokenizer is not None,
                      path=self.path)
        return profile_model(self, prompts, **kwargs)

    def _prefill(self, ids: torch.Tensor, cache: Any) -> torch.Tensor:
        """Last-position logits after the prompt, in chunks of ``prefill_chunk`` tokens (activation memory)."""
        chunk = self.prefill_chunk or ids.shape[1]
        for start in range(0, ids.shape[1], chunk):
            logits = self.model(ids[:, start:start + chunk], cache, last_only=True)[:, -1]
        return logits

    def stats(self) -> dict[str, Any]:
        """Telemetry: the last ``generate`` call's timings and token counts; for offloaded models also
        ``"experts"`` (hits, misses, copies, prefetch, CPU experts, bytes, stalls, per layer, since
        load or :meth:`reset_stats`) and ``"memory"`` (device bytes allocated and budget, host store)."""
        out = dict(self._stats)
        if self.runtime is not None:
            r = self.runtime
            out["experts"] = r.stats()
            out["memory"] = {
                "device_allocated_bytes": r.ledger.allocated_bytes,
                "device_peak_bytes": r.ledger.peak_bytes,
                "device_budget_bytes": r.ledger.budget_bytes,
                "host_store_bytes": r.store.nbytes,
                "pinned": r.store.pinned,
            }
        return out

    def reset_stats(self) -> None:
        """Zero the expert counters (offloaded models)."""
        if self.runtime is not None:
            self.runtime.reset_stats()

    def telemetry_line(self) -> str:
        """The one-line summary printed after generation."""
        if self.runtime is None:
            return "experts: all resident"
        from .runtime.telemetry import summary_line

        stats = self.stats()
        line = summary_line(stats["experts"], stats["memory"])
        if self.slots.predicted_hit_rate is not None:
            line += f"; predicted hit rate {100 * self.slots.predicted_hit_rate:.1f} %"
        return line


def check_profile_options(decode_tokens: int = 0, co_activation: int = 0) -> None:
    """Raise :class:`~residency.errors.InputError` unless both are whole numbers >= 0."""
    for name, value in (("decode_tokens", decode_tokens), ("co_activation", co_activation)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InputError(f"{name} must be a whole number >= 0, got {value!r}")


def check_prompts(prompts: list[Any], *, vocab_size: int, has_tokenizer: bool, path: Path | None = None) -> None:
    """Check profiling prompts (texts, token-id lists, or dicts with text / prompt / input_ids).

    Text needs a tokenizer; token ids must form one non-empty flat list inside ``[0, vocab_size)``.
    The first bad prompt raises :class:`~residency.errors.InputError` naming it.
    """
    from .profiling.profile import PROMPT_KEYS

    if not prompts:
        raise InputError("no prompts to profile; give at least one")
    for i, prompt in enumerate(prompts):
        name = f"prompt {i}"
        if isinstance(prompt, dict):
            name = f"prompt {prompt.get('id', prompt.get('name', i))!r}"
            keys = [k for k in PROMPT_KEYS if k in prompt]
            if not keys:
                raise InputError(f"{name} has none of the keys {', '.join(map(repr, PROMPT_KEYS))}; give one")
            prompt = prompt[keys[0]]
        if isinstance(prompt, int):
            raise InputError(f"{name} is a single integer; give a list of prompts, e.g. [[1, 40, 41]] for one "
                             "prompt of token ids")
        if isinstance(prompt, str):
            if not has_tokenizer:
                raise InputError(
                    f"{name} is text, but {path or 'this model'} {missing_tokenizer_reason(path)}: give the "
                    "prompt as token ids ('input_ids' in a JSONL prompt file), or add the model's tokenizer.json "
                    "to the checkpoint folder"
                )
            continue
        try:
            as_token_ids(prompt, vocab_size)
        except InputError as exc:
            raise InputError(f"{name}: {exc}") from None
        if torch.as_tensor(prompt).dim() != 1:
            raise InputError(f"{name}: give one prompt as a flat list of token ids, got a nested list or tensor "
                             f"of shape {tuple(torch.as_tensor(prompt).shape)}")
