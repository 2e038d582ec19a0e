"""``OffloadedNemotron``: the user-facing model object.

Without ``vram_budget`` or ``plan`` every weight is resident on one device. With either, the
routed experts live in the host store and the device holds the dense weights (the embedding table
may stay in host memory), the plan's expert slots and the runtime's buffers under the budget
(:mod:`residency.offload`, :mod:`residency.runtime.backend`); the answers are the same either way.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from .config import NemotronHConfig
from .devices import resolve_device
from .errors import BudgetError, InputError
from .model.checkpoint import Checkpoint
from .model.detokenize import check_stop
from .model.generation_config import GenerationDefaults, load_generation_defaults
from .model.loading import build_model
from .model.modeling import NemotronHForCausalLM
from .model.reasoning import prompt_opens_reasoning
from .model.sampling import check_max_new_tokens, check_sampling, check_seed, sample_next
from .model.streaming import ChatResult, ChatStream, TextStream
from .model.tokenizer import Tokenizer, as_token_ids, load_tokenizer, missing_tokenizer_reason
from .sizes import format_bytes

DTYPE_NAMES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
               "half": torch.float16, "fp32": torch.float32, "float32": torch.float32, "float": torch.float32}


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """The compute dtype ``from_pretrained`` was asked for (None: the checkpoint's); anything else is refused."""
    if dtype is None or (isinstance(dtype, str) and dtype.strip().lower() == "auto"):
        return None
    if isinstance(dtype, str):
        name = dtype.strip().lower().removeprefix("torch.")
        if name in DTYPE_NAMES:
            return DTYPE_NAMES[name]
    elif dtype in (torch.bfloat16, torch.float16, torch.float32):
        return dtype
    raise InputError(f"dtype={dtype!r} is not a compute dtype residency runs in; use torch.bfloat16, torch.float16 "
                     "or torch.float32 (or 'bf16', 'fp16', 'fp32', 'auto'); quantized checkpoints keep their packed "
                     "weights whatever the compute dtype")


def check_offload_options(*, policy: Any, prefetch: Any, cpu_experts: Any) -> None:
    """InputError naming the accepted values, before any weight is read, for an offloading option of the wrong kind
    (``cpu_experts=1`` is not True: ``"auto"``, True or False; ``prefetch`` a bool; ``policy`` a known name)."""
    from .runtime.backend import is_cpu_choice
    from .runtime.policy import POLICY_NAMES

    if not is_cpu_choice(cpu_experts):
        raise InputError(f"cpu_experts must be 'auto', True or False, got {cpu_experts!r}")
    if not isinstance(prefetch, bool):
        raise InputError(f"prefetch must be True or False, got {prefetch!r}")
    if policy is not None and policy not in POLICY_NAMES:
        raise InputError(f"policy must be one of {', '.join(POLICY_NAMES)} (or None for the plan's), got {policy!r}")


class OffloadedNemotron:
    """A Nemotron-H model ready for ``model(input_ids)``, ``generate`` and ``profile``."""

    def __init__(self, model: NemotronHForCausalLM, tokenizer: Tokenizer | None = None, path: Path | None = None,
                 runtime: Any = None, slots: Any = None, prefill_chunk: int | None = None, context: int | None = None,
                 max_batch: int | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.path = path
        self.runtime = runtime  # residency.runtime.backend.OffloadRuntime when offloaded
        self.slots = slots  # residency.offload.SlotLayout when offloaded
        self.prefill_chunk = prefill_chunk
        # offloaded: the tokens per sequence and the sequences whose KV cache, Mamba state and chunk activations the
        # device budget reserves
        self.context = context
        self.max_batch = max_batch
        self._stats: dict[str, Any] = {}
        self._generation_defaults: GenerationDefaults | None = None

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
        dtype: torch.dtype | str | None = None,
        progress: bool | None = None,
        policy: str | None = None,
        prefetch: bool = True,
        cpu_experts: str | bool = "auto",
        context: int | None = None,
        max_batch: int | None = None,
        prefill_chunk: int | None = None,
        quiet: bool = False,
        runtime_options: dict[str, Any] | None = None,
        embeddings: str | None = None,
    ) -> OffloadedNemotron:
        """Open a Hugging Face Nemotron-H folder, validate it and load it.

        ``device`` defaults to ``cuda`` when available, else ``cpu`` (see
        :func:`residency.devices.resolve_device`; an unsupported or unavailable device raises
        :class:`~residency.errors.DeviceError`); ``"unified"`` is a unified-memory machine (DGX
        Spark, GH200-class), where the kernels read the expert store in place. ``dtype``: the
        compute dtype, ``torch.bfloat16`` / ``float16`` / ``float32`` or their names ("bf16",
        "bfloat16", "auto" ...); default (None or "auto") the checkpoint's dtype. Every problem with
        the device or the folder is reported before weights are read.

        Offloading starts when ``vram_budget`` or ``plan`` is given. ``vram_budget``: "20GiB",
        "24GB" (decimal), bytes, or a fraction of free device memory such as 0.8; a hard cap on
        what the library allocates on the device. ``plan``: a :class:`~residency.Plan` (e.g. from
        ``residency plan``), whose slot layout and policy are used; without one the layout is
        planned here for the budget from ``profile`` (a :class:`~residency.Profile`) or a uniform
        prior. ``policy``: eviction policy (default the plan's, else ``lru``); ``prefetch``:
        look-ahead copies; ``cpu_experts``: compute misses on the CPU always (True), never (False) or
        where cheaper (``"auto"``); ``context``: tokens of KV cache the budget keeps per sequence
        (default: the plan's, else ``residency.offload.DEFAULT_CONTEXT``; a longer prompt plus generation
        is refused); ``max_batch``: sequences generated at once that the budget keeps this for (default:
        the plan's batch, else 1; a larger batch is refused); ``prefill_chunk``: prompt tokens per forward
        call; ``embeddings``: where the embedding table lives when offloading, ``"host"`` (host memory,
        not charged to the budget; each step's rows are copied to the device), ``"device"``, or None for
        the plan's placement, else host memory unless the device is unified memory, the embeddings are
        tied, or the budget holds every expert (:func:`residency.offload.embeddings_on_host`). A short
        plan summary is printed unless ``quiet``. ``runtime_options``: ``disk_readers`` (experts a copy
        reads from disk at once, default 8), and for tests ``verify``, ``copy_delay``, ``mirror_tables``,
        ``mode``, ``staging_slots``.
        """
        path = Path(path)
        dtype = resolve_dtype(dtype)
        check_offload_options(policy=policy, prefetch=prefetch, cpu_experts=cpu_experts)
        for name, value in (("context", context), ("prefill_chunk", prefill_chunk), ("max_batch", max_batch)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                unit = "sequences" if name == "max_batch" else "tokens"
                error = InputError(f"{name} must be a positive number of {unit}, got {value!r}")
                error.cli_message = f"--{name.replace('_', '-')} must be a positive number of {unit}, got {value!r}"
                raise error
        mode = None
        if isinstance(device, str) and device.strip().lower() == "unified":
            mode = "unified"
            device = None
        device = resolve_device(device)
        ckpt = Checkpoint(path)
        tokenizer = load_tokenizer(path)  # a corrupt tokenizer file is reported before the weights are read
        if vram_budget is None and plan is None:
            if embeddings == "host":
                raise InputError("embeddings='host' applies to offloaded models: give vram_budget= or plan= too")
            model = build_model(ckpt, device=device, dtype=dtype, progress=progress)
            return cls(model, tokenizer, path, prefill_chunk=prefill_chunk)
        from .offload import DEFAULT_CONTEXT, DEFAULT_PREFILL_CHUNK, load_offloaded

        options = dict(runtime_options or {})
        mode = options.pop("mode", mode) or device.type
        chunk = prefill_chunk or DEFAULT_PREFILL_CHUNK
        if plan is not None:  # what the plan accounted memory for, unless asked otherwise
            context = context or int(plan.settings.context)
            max_batch = max_batch or int(plan.settings.batch)
        model, runtime, slots = load_offloaded(
            ckpt, device, mode=mode, dtype=dtype, vram_budget=vram_budget, plan=plan, profile=profile,
            policy=policy, prefetch=prefetch, cpu_experts=cpu_experts, context=context or DEFAULT_CONTEXT,
            max_batch=max_batch or 1, prefill_chunk=chunk, progress=progress, embeddings=embeddings, **options,
        )
        self = cls(model, tokenizer, path, runtime=runtime, slots=slots, prefill_chunk=chunk,
                   context=context or DEFAULT_CONTEXT, max_batch=max_batch or 1)
        if not quiet:
            print(self.plan_summary())
        return self

    def plan_summary(self) -> str:
        """One line: where the experts are and what the plan predicts (offloaded models)."""
        if self.runtime is None:
            return "all experts resident"
        s, r, c = self.slots, self.runtime, self.config
        static = sum(len(lp.static) for lp in s.layers)
        dynamic = sum(lp.dynamic_slots for lp in s.layers)
        total = c.num_moe_layers * c.n_routed_experts
        hit = "n/a" if s.predicted_hit_rate is None else f"{100 * s.predicted_hit_rate:.1f} %"
        return (
            f"residency: {r.options.mode} device, budget {format_bytes(r.ledger.budget_bytes)}: {static} static + "
            f"{dynamic} dynamic expert slots of {total} experts ({s.source}, policy {r.options.policy}), "
            f"{r.options.staging_slots} staging slots, host store {format_bytes(r.store.nbytes)}"
            f"{' pinned' if r.store.pinned else ''}"
            + (f", embedding table {format_bytes(self.host_embedding_bytes)} in host memory"
               if self.model.embeddings_on_host else "")
            + f"; predicted hit rate {hit}"
        )

    @property
    def host_embedding_bytes(self) -> int:
        """Bytes of the embedding table when it is kept in host memory (offloaded models), else 0."""
        return self.model.backbone.embeddings.nbytes if self.model.embeddings_on_host else 0

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
        temperature: float | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop_at_eos: bool = True,
        stop: str | list[str] | None = None,
        stream: bool = False,
    ) -> torch.Tensor | str | TextStream:
        """Decode with the KV and SSM caches.

        Text in (used as it is, no chat template: see :meth:`chat`), text out: returns the generated
        text. Token ids in: returns ``[B, T + new]`` token ids (prompt included); rows that produced
        an end token are padded with ``pad_token_id`` afterwards, and generation stops when every
        row has. ``stream=True`` returns a :class:`~residency.model.streaming.TextStream` instead,
        which yields text pieces as tokens are decoded (never half a UTF-8 character) and holds the
        :class:`~residency.model.streaming.GenerationResult` in ``.result`` when done; its pieces
        joined equal the non-streamed text. ``stop``: strings that end generation (not included in
        the text). End tokens: ``eos_token_id`` of ``generation_config.json`` and ``config.json`` and
        the tokenizer's ``eos_token`` (``stop_at_eos=False`` ignores them). ``temperature`` and
        ``top_p`` default to the folder's ``generation_config.json``, else 1.0 and 0.95;
        ``temperature=0`` is greedy; the same ``seed`` gives the same tokens. Streams and stop
        strings take one prompt. Bad inputs or settings (``temperature < 0``, ``top_p`` outside
        (0, 1], ``max_new_tokens < 1``, a seed that is not an integer, an empty stop string, a prompt
        plus ``max_new_tokens`` past :attr:`context_length`) raise :class:`~residency.errors.InputError`
        before any compute; so does, as :class:`~residency.errors.BudgetError`, an offloaded model's
        batch larger than the ``max_batch`` it was loaded with.
        """
        temperature, top_p = self._sampling(temperature, top_p)
        max_new_tokens = check_max_new_tokens(max_new_tokens)
        seed = check_seed(seed)
        stops = check_stop(stop)
        ids = self.encode(inputs)
        self._check_length(ids, max_new_tokens)
        end_ids = self.end_token_ids() if stop_at_eos else ()
        if isinstance(inputs, str) or stream or stops:
            text = self._text_stream(ids, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                     seed=seed, stop=stops, end_ids=end_ids)
            if stream:
                return text
            result = text.read()
            if isinstance(inputs, str):
                return result.text
            return torch.cat([ids, torch.tensor([result.token_ids], dtype=ids.dtype, device=ids.device)], dim=1)
        pad = self.config.pad_token_id if self.config.pad_token_id is not None else 0
        ends = torch.tensor(sorted(end_ids), dtype=torch.long, device=ids.device)
        out = [ids]
        done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        steps = self._decode_loop(ids, max_new_tokens, temperature, top_p, seed,
                                  choose=lambda nxt: torch.where(done, torch.full_like(nxt, pad), nxt))
        try:
            for nxt in steps:
                out.append(nxt[:, None])
                if end_ids:
                    done |= torch.isin(nxt, ends)
                    if bool(done.all()):
                        break
        finally:
            steps.close()
        return torch.cat(out, dim=1)

    def chat(
        self,
        messages: str | list[dict[str, Any]],
        *,
        enable_thinking: bool = True,
        low_effort: bool = False,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop: str | list[str] | None = None,
        stream: bool = False,
        tools: list[dict[str, Any]] | None = None,
        force_nonempty_content: bool = False,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> ChatResult | ChatStream:
        """Reply to ``messages`` (a list of ``{"role", "content"}`` dicts, or one user message as a string)
        through the folder's chat template.

        ``enable_thinking`` and ``low_effort`` are passed to the template (Nemotron 3's switches), as
        is every entry of ``chat_template_kwargs`` (which wins over both). The reply is split into
        ``reasoning`` and ``content`` where the template marks the thinking span
        (:mod:`residency.model.reasoning`), also when the template opened the span in the prompt.
        ``force_nonempty_content``: a reply that never left the thinking span gives its reasoning as
        the content too. ``max_new_tokens`` defaults to ``generation_config.json``'s, else to the rest
        of the context (``max_position_embeddings``); sampling settings, ``seed`` and ``stop`` work as
        in :meth:`generate`. Returns a :class:`~residency.model.streaming.ChatResult`; with
        ``stream=True`` a :class:`~residency.model.streaming.ChatStream` of
        :class:`~residency.model.streaming.ChatDelta` pieces whose ``.result`` is that ChatResult.
        Bad messages or settings raise :class:`~residency.errors.InputError` before any compute.
        """
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        kwargs: dict[str, Any] = {"enable_thinking": bool(enable_thinking), "low_effort": bool(low_effort)}
        if force_nonempty_content:
            kwargs["force_nonempty_content"] = True
        if chat_template_kwargs is not None:
            if not isinstance(chat_template_kwargs, dict) or not all(isinstance(k, str) for k in chat_template_kwargs):
                raise InputError("chat_template_kwargs must be a dict with string keys, "
                                 "e.g. {'enable_thinking': False}")
            kwargs.update(chat_template_kwargs)
        temperature, top_p = self._sampling(temperature, top_p)
        seed = check_seed(seed)
        stops = check_stop(stop)
        prompt = self.apply_chat_template(messages, tools=tools, **kwargs)
        ids = self.encode_prompt(prompt)
        if max_new_tokens is None:
            max_new_tokens = self.generation_defaults.max_new_tokens or max(1, self.context_length - ids.shape[1])
        max_new_tokens = check_max_new_tokens(max_new_tokens)
        text = self._text_stream(ids, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                 seed=seed, stop=stops, end_ids=self.end_token_ids())
        chat = ChatStream(text, prompt=prompt, in_reasoning=prompt_opens_reasoning(prompt),
                          force_nonempty_content=bool(kwargs.get("force_nonempty_content")))
        return chat if stream else chat.read()

    def apply_chat_template(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
                            tools: list[dict[str, Any]] | None = None, **template_kwargs: Any) -> str:
        """The prompt text the folder's chat template makes of ``messages`` (see :mod:`residency.model.chat`)."""
        template = getattr(self.tokenizer, "chat_template", None) if self.tokenizer is not None else None
        if template is None:
            tok = self._tokenizer_for_text()
            if getattr(tok, "chat_template_missing", None):
                raise InputError(f"{self.path or 'this model'}: {tok.chat_template_missing}")
            raise InputError(
                f"{self.path or 'this model'} has no chat template (chat_template.jinja, or chat_template in "
                "tokenizer_config.json): add the model's template to the folder, or pass plain text to generate()"
            )
        return template.render(messages, add_generation_prompt=add_generation_prompt, tools=tools, **template_kwargs)

    def encode_prompt(self, prompt: str) -> torch.Tensor:
        """A rendered chat prompt → ``[1, T]`` ids; special tokens come from the text (none are added)."""
        tok = self._tokenizer_for_text()
        try:
            ids = tok.encode(prompt, add_special_tokens=False)
        except TypeError:  # a tokenizer without the option
            ids = tok.encode(prompt)
        return as_token_ids([ids], self.config.vocab_size).to(self.device)

    @property
    def generation_defaults(self) -> GenerationDefaults:
        """Sampling defaults and end tokens from the folder's ``generation_config.json`` (read once)."""
        if self._generation_defaults is None:
            self._generation_defaults = load_generation_defaults(self.path)
        return self._generation_defaults

    def end_token_ids(self) -> tuple[int, ...]:
        """Tokens that end generation: ``generation_config.json``'s and ``config.json``'s ``eos_token_id``
        and the tokenizer's ``eos_token``."""
        eos = self.config.eos_token_id
        ids = list(self.generation_defaults.eos_token_ids)
        ids += eos if isinstance(eos, list) else [eos] if eos is not None else []
        tok_eos = getattr(self.tokenizer, "eos_token_id", None) if self.tokenizer is not None else None
        if tok_eos is not None:
            ids.append(int(tok_eos))
        return tuple(dict.fromkeys(int(i) for i in ids))

    @property
    def context_length(self) -> int:
        """Prompt plus generated tokens one sequence may hold: ``max_position_embeddings``, and for an offloaded
        model at most the ``context`` its device budget keeps KV cache for."""
        n = int(self.config.max_position_embeddings)
        return n if self.context is None else min(n, int(self.context))

    def _check_length(self, ids: torch.Tensor, max_new_tokens: int) -> None:
        """:meth:`check_fits` for a ``[batch, tokens]`` prompt; BudgetError when an offloaded model gets a larger
        batch than the device budget reserves KV cache for (``max_batch``)."""
        if self.max_batch is not None and ids.shape[0] > self.max_batch:
            raise BudgetError(
                f"a batch of {ids.shape[0]} sequences needs the KV cache, Mamba state and activations of each, and the "
                f"device budget reserves them for {self.max_batch} (max_batch={self.max_batch} at load, "
                f"{self.context} tokens each); generate fewer sequences at once, or load with max_batch={ids.shape[0]}")
        self.check_fits(ids.shape[1], max_new_tokens)

    def check_fits(self, prompt_tokens: int, new_tokens: int, *, what: str = "the prompt",
                   new_name: str = "max_new_tokens") -> None:
        """InputError, naming the fixes, when ``prompt_tokens`` plus ``new_tokens`` do not fit :attr:`context_length`
        (``what`` and ``new_name`` name the prompt and the setting that asked for the new tokens)."""
        if prompt_tokens + new_tokens <= self.context_length:
            return
        fix = f"lower {new_name} or shorten {what}"
        if self.context is not None and self.context_length < int(self.config.max_position_embeddings):
            fix += ", or load the model with a larger context= (the budget keeps the KV cache of that many tokens)"
        raise InputError(f"{what} has {prompt_tokens} tokens, which with {new_name} {new_tokens} exceed the model's "
                         f"context of {self.context_length} tokens; {fix}")

    def _sampling(self, temperature: float | None, top_p: float | None) -> tuple[float, float]:
        d = self.generation_defaults
        return check_sampling(d.temperature if temperature is None else temperature,
                              d.top_p if top_p is None else top_p)

    def _text_stream(self, ids: torch.Tensor, *, max_new_tokens: int, temperature: float, top_p: float,
                     seed: int | None, stop: tuple[str, ...], end_ids: tuple[int, ...]) -> TextStream:
        """A lazy :class:`TextStream` of one prompt; checks the batch and the context length first."""
        if ids.shape[0] != 1:
            raise InputError(f"streaming and stop strings take one prompt, got a batch of {ids.shape[0]}; "
                             "generate the rows one by one")
        tok = self._tokenizer_for_text()
        self._check_length(ids, max_new_tokens)

        def tokens(cancel: threading.Event) -> Iterator[int]:
            steps = self._decode_loop(ids, max_new_tokens, temperature, top_p, seed, cancel=cancel)
            try:
                for nxt in steps:
                    yield int(nxt[0])
            finally:
                steps.close()

        return TextStream(tokens, tok.decode, end_ids=end_ids, stop=stop, prompt_tokens=int(ids.shape[1]))

    @torch.no_grad()
    def _decode_loop(self, ids: torch.Tensor, max_new_tokens: int, temperature: float, top_p: float,
                     seed: int | None, *, cancel: threading.Event | None = None,
                     choose: Any = None) -> Iterator[torch.Tensor]:
        """Prefill, then yield each step's sampled tokens ``[B]``; the next forward runs only when the
        consumer asks for the next token, so stopping early costs nothing. ``choose`` may replace the
        sampled tokens before they are fed back; ``cancel`` stops before the next token. Timings and
        counts go to :meth:`stats` when the loop ends, however it ends."""
        gen = torch.Generator(device=ids.device).manual_seed(seed) if seed is not None else None
        # offloaded: exactly the context the budget reserves (the KV cache would otherwise grow by doubling)
        cache = (self.model.new_cache(ids.shape[0]) if self.context is None
                 else self.model.new_cache(ids.shape[0], max_len=self.context))
        steps = 0
        # on CUDA the clock is read after a synchronize: the host queues kernels (CUDA-graph replays, an on-device
        # argmax) ahead of the GPU, so without it the GPU's unfinished work would fall outside the timings
        sync = (lambda: torch.cuda.synchronize(ids.device)) if ids.is_cuda else (lambda: None)
        t0 = time.perf_counter()
        logits = self._prefill(ids, cache)
        sync()
        t_prefill = time.perf_counter() - t0
        try:
            for step in range(max_new_tokens):
                if cancel is not None and cancel.is_set():
                    break
                nxt = sample_next(logits, temperature, top_p, gen)
                if choose is not None:
                    nxt = choose(nxt)
                steps += 1
                yield nxt
                if step + 1 < max_new_tokens:
                    logits = self.model(nxt[:, None], cache)[:, -1]
        finally:
            # (a flag, not the error itself: a local holding the error would make a cycle through its traceback,
            # keeping this frame's model and runtime alive after the caller dropped them)
            failing = sys.exc_info()[1] is not None and not isinstance(sys.exc_info()[1], GeneratorExit)
            try:
                sync()
            except Exception:
                if not failing:
                    raise  # (else the error already on its way out is the one to report, not its echo here)
            total = time.perf_counter() - t0
            decode_time = total - t_prefill
            self._stats = {
                "prompt_tokens": int(ids.shape[1]),
                "batch": int(ids.shape[0]),
                "new_tokens": steps,
                "prefill_s": t_prefill,
                "decode_s": decode_time,
                "decode_tokens_per_s": ((steps - 1) * ids.shape[0] / decode_time
                                        if steps > 1 and decode_time > 0 else None),
                "tokens_per_s": steps * ids.shape[0] / total if total > 0 else None,
                "device": str(self.device),
            }

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
            logits = self.model(ids[:, start:start + chunk], cache, last_only=True, prefill=True)[:, -1]
        return logits

    def stats(self) -> dict[str, Any]:
        """Telemetry: the last ``generate`` call's timings and token counts; for offloaded models also
        ``"experts"`` (hits, misses, copies, prefetch, CPU experts, bytes, stalls, per layer, since
        load or :meth:`reset_stats`) and ``"memory"`` (device bytes allocated and budget, host store,
        host embedding table: ``host_embedding_bytes``, 0 when the table is on the device)."""
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
                "host_embedding_bytes": self.host_embedding_bytes,
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
