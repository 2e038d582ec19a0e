"""Pure-torch Nemotron-H forward: Mamba-2, attention (GQA, KV cache, no RoPE) and LatentMoE blocks.

The math follows Hugging Face ``transformers``' ``NemotronHForCausalLM``, which tests compare
against on tiny random checkpoints. Module names mirror the checkpoint's tensor names
(``backbone.layers.N.mixer...``) so loading is a direct mapping, except that routed experts are
stacked into one ``[E, I, L]`` / ``[E, L, I]`` pair per layer (:class:`ResidentExperts`).

The routed-expert computation is pluggable: every :class:`MoEMixer` hands its work to
``self.experts``, an :class:`~residency.model.moe.ExpertBackend` (see :mod:`residency.model.moe`),
so the offload runtime can swap in its own implementation without touching the rest; observers
(the profiler) see each routing decision, and step listeners see each forward call begin and end.

The embedding table may stay in host memory (:class:`HostEmbedding`, installed by the loader when
the offload plan says so): each forward call then gathers its tokens' rows on the host and copies
them to the device.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import NemotronHConfig
from ..kernels._dispatch import next_power_of_2
from .attention import Attention
from .caches import DEFAULT_KV_CAPACITY, InferenceCache
from .layers import MLP, RMSNorm
from .mamba import Mamba2Mixer
from .moe import ExpertBackend, MoEMixer, MoEObserver, ResidentExperts, StepListener


class Block(nn.Module):
    """``h + mixer(norm(h))``; with ``residual_in_fp32`` the residual stream is carried in fp32."""

    def __init__(self, config: NemotronHConfig, layer_idx: int, moe_index: int | None) -> None:
        super().__init__()
        kind = config.layer_kinds[layer_idx]
        self.kind = kind
        self.residual_in_fp32 = config.residual_in_fp32
        self.norm = RMSNorm(config.hidden_size, config.layer_norm_epsilon)
        if kind == "mamba":
            self.mixer: nn.Module = Mamba2Mixer(config, layer_idx)
        elif kind == "attention":
            self.mixer = Attention(config, layer_idx)
        elif kind == "moe":
            self.mixer = MoEMixer(config, layer_idx, moe_index)
        else:
            self.mixer = MLP(config.hidden_size, config.intermediate_size, config.mlp_bias)

    def forward(self, h: torch.Tensor, cache: InferenceCache | None) -> torch.Tensor:
        x = h if h.dtype == self.norm.weight.dtype else h.to(self.norm.weight.dtype)
        out = self.mixer(self.norm(x), cache)
        residual = h.float() if self.residual_in_fp32 and h.dtype != torch.float32 else h
        return residual + out


class HostEmbedding(nn.Module):
    """The input embedding table kept in host memory; the rows a call needs are copied to ``device``.

    Numerically :class:`torch.nn.Embedding` (a row gather), but the table is a host tensor that
    no device budget pays for: 1 GiB for Super (vocab 131072 x hidden 4096, bf16), of which a
    token reads one 8 KiB row. A call moves its token ids to the host (a device-to-host copy of
    8 bytes per token, which waits for the kernel that produced them), gathers the rows into a
    buffer of exactly that size and copies it to ``device``. On CUDA the buffer is page-locked
    (PyTorch's caching host allocator, which keeps a block until its copy has completed), so the
    copy is asynchronous; where page-locking fails the copy falls back to pageable memory (once,
    with a warning). On the ``cpu`` device the gathered rows are the output.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, device: str | torch.device = "cpu") -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        # a parameter so that the loader fills it from ``backbone.embeddings.weight``; it is allocated on
        # the host (build_model) and never moved with the model
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim), requires_grad=False)
        self.device = torch.device(device)
        self.pin = self.device.type == "cuda"
        self.pin_problem: str | None = None if self.pin else "not needed"

    @property
    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()

    def _buffer(self, rows: int) -> torch.Tensor:
        if self.pin:
            try:
                return torch.empty(rows, self.embedding_dim, dtype=self.weight.dtype, pin_memory=True)
            except RuntimeError as exc:
                import warnings

                self.pin, self.pin_problem = False, f"page-locked allocation failed ({exc})"
                warnings.warn(f"embedding rows: {self.pin_problem}; copying them from pageable memory",
                              RuntimeWarning, stacklevel=3)
        return torch.empty(rows, self.embedding_dim, dtype=self.weight.dtype)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        ids = input_ids.reshape(-1)
        if ids.device.type != "cpu":
            ids = ids.cpu()  # waits for the kernel that produced the ids (the sampler, in decode)
        rows = torch.index_select(self.weight, 0, ids, out=self._buffer(ids.numel()))
        if self.device.type != "cpu":
            rows = rows.to(self.device, non_blocking=self.pin)
        return rows.view(*input_ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, in host memory, rows to {self.device}"


def keep_embeddings_on_host(model: NemotronHForCausalLM, device: str | torch.device) -> HostEmbedding:
    """Replace the embedding module of a ``meta`` model (before its weights are allocated) with a
    :class:`HostEmbedding` whose rows go to ``device``; returns it."""
    old = model.backbone.embeddings
    if old.weight.device.type != "meta":
        raise ValueError("keep_embeddings_on_host works on a meta model, before the weights are allocated")
    with torch.device("meta"):
        new = HostEmbedding(old.num_embeddings, old.embedding_dim, device)
    model.backbone.embeddings = new
    return new


class Backbone(nn.Module):
    def __init__(self, config: NemotronHConfig) -> None:
        super().__init__()
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        moe_index = {layer: j for j, layer in enumerate(config.moe_layers)}
        self.layers = nn.ModuleList(Block(config, i, moe_index.get(i)) for i in range(config.num_layers))
        self.norm_f = RMSNorm(config.hidden_size, config.layer_norm_epsilon)


class NemotronHForCausalLM(nn.Module):
    """The whole model. ``forward(input_ids [B, T], cache=None) -> fp32 logits [B, T, V]``."""

    def __init__(self, config: NemotronHConfig) -> None:
        super().__init__()
        self.config = config
        self.backbone = Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.step_listeners: list[StepListener] = []
        self.cuda_graphs: bool | str = False  # the default of new_cache(cuda_graphs=...)

    @property
    def embeddings_on_host(self) -> bool:
        """True when the embedding table is in host memory (:class:`HostEmbedding`)."""
        return isinstance(self.backbone.embeddings, HostEmbedding)

    @property
    def moe_mixers(self) -> list[MoEMixer]:
        return [b.mixer for b in self.backbone.layers if isinstance(b.mixer, MoEMixer)]

    def add_observer(self, observer: MoEObserver) -> Callable[[], None]:
        """Attach an observer to every MoE layer; returns a function that detaches it."""
        mixers = self.moe_mixers
        for m in mixers:
            m.observers.append(observer)

        def remove() -> None:
            for m in mixers:
                if observer in m.observers:
                    m.observers.remove(observer)

        return remove

    def add_step_listener(self, listener: StepListener) -> Callable[[], None]:
        """Tell ``listener`` when each forward call begins and ends; returns a function that detaches it."""
        self.step_listeners.append(listener)

        def remove() -> None:
            if listener in self.step_listeners:
                self.step_listeners.remove(listener)

        return remove

    def set_experts(self, factory: Callable[[MoEMixer], ExpertBackend]) -> None:
        """Replace each MoE layer's routed-expert backend with ``factory(mixer)``."""
        for m in self.moe_mixers:
            backend = factory(m)
            if not isinstance(backend, ExpertBackend):
                raise TypeError(f"set_experts: the factory returned {type(backend).__name__}, not an ExpertBackend")
            m.experts = backend

    def new_cache(self, batch: int, *, max_len: int | None = None, kv_dtype: torch.dtype | None = None,
                  cuda_graphs: bool | str | None = None) -> InferenceCache:
        """Decode state for ``batch`` sequences, preallocated on the model's device (:mod:`.caches`).

        Args:
            batch: sequences decoded together.
            max_len: KV capacity in tokens (prompt + generated); writing past it is an error.
                Default: ``min(max_position_embeddings, 4096)``, doubled whenever a call needs more.
            kv_dtype: KV cache dtype (default the attention weights'); ``torch.float8_e4m3fn``
                halves the cache (values saturate at ±448, widened to the compute dtype when read).
            cuda_graphs: capture decode steps in CUDA graphs (:class:`DecodeGraphs`): True or
                ``"auto"`` (the whole step when every expert is resident, else the dense segments
                between MoE layers), ``"full"``, ``"dense"``, False; None = ``self.cuda_graphs``.
        """
        if max_len is not None and max_len < 1:
            raise ValueError(f"max_len must be a positive number of tokens, got {max_len}")
        cache = InferenceCache(batch=batch, max_len=max_len, kv_dtype=kv_dtype)
        device = self.lm_head.weight.device
        if device.type == "meta":
            return cache
        cache.capacity = max_len or min(self.config.max_position_embeddings, DEFAULT_KV_CAPACITY)
        for i, block in enumerate(self.backbone.layers):
            mixer = block.mixer
            act_dtype = block.norm.weight.dtype  # the mixer's input and projections' output dtype
            if isinstance(mixer, Mamba2Mixer):
                cache.conv[i], cache.ssm[i] = mixer.new_state(batch, act_dtype)
            elif isinstance(mixer, Attention):
                shape = (batch, mixer.kv_heads, cache.capacity, mixer.head_dim)
                dtype = kv_dtype or act_dtype
                cache.kv[i] = (torch.zeros(shape, dtype=dtype, device=device),
                               torch.zeros(shape, dtype=dtype, device=device))  # fmt: skip
        cache.device_pos(device)
        graphs = self.cuda_graphs if cuda_graphs is None else cuda_graphs
        if graphs:
            if device.type != "cuda":
                raise ValueError(f"cuda_graphs needs the model on a CUDA device; it is on {device}")
            cache.graphs = DecodeGraphs(self, cache, mode="auto" if graphs is True else graphs)
        return cache

    @torch.no_grad()
    def forward(
        self, input_ids: torch.Tensor, cache: InferenceCache | None = None, *, last_only: bool = False,
        prefill: bool = False,
    ) -> torch.Tensor:
        """Logits of ``input_ids [batch, seq]``, continuing ``cache`` when given.

        A call is a decode step when it feeds one token per sequence after earlier ones; ``prefill=True`` says the
        call feeds (a chunk of) a prompt, so that a chunk after the first, even a one-token one, is not taken for a
        decode step (the offloaded runtime serves prefill and decode differently and counts them apart, and the
        profiler records them apart).
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        if cache is not None and cache.graphs is not None and not prefill and cache.graphs.handles(input_ids):
            return cache.graphs.step(input_ids)
        seq = input_ids.shape[1]
        is_decode = cache is not None and cache.pos > 0 and seq == 1 and not prefill
        self._begin_step(input_ids, is_decode)
        try:
            if cache is not None:
                cache.begin_step(seq, input_ids.device)
            h = self.backbone.embeddings(input_ids)
            for block in self.backbone.layers:
                h = block(h, cache)
        finally:
            self._end_step()
            if cache is not None:
                cache.step = None
        if cache is not None:
            cache.advance(seq)
        if last_only:
            h = h[:, -1:]
        return self.logits(h)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """fp32 logits of final hidden states (``norm_f``, then ``lm_head``)."""
        h = self.backbone.norm_f(h)
        dtype = self.lm_head.weight.dtype
        logits = self.lm_head(h if h.dtype == dtype else h.to(dtype))
        return logits if logits.dtype == torch.float32 else logits.float()

    def _begin_step(self, input_ids: torch.Tensor, is_decode: bool) -> None:
        for m in self.moe_mixers:
            m.is_decode = is_decode
        for listener in self.step_listeners:
            listener.begin_step(input_ids, is_decode)

    def _end_step(self) -> None:
        for listener in self.step_listeners:
            listener.end_step()


GRAPH_MODES = ("auto", "full", "dense")
# records a function without running it; returns (replay, the function's static output)
Capture = Callable[[Callable[[], torch.Tensor]], tuple[Callable[[], None], torch.Tensor]]


@dataclass
class GraphPiece:
    """A run of blocks of the decode step: captured in one graph, or (MoE blocks) run eagerly between replays.

    The first piece also sets up the step (positions, mask) and embeds the tokens (with the table
    in host memory the rows are copied in before the replay instead, into its ``inp``); the last one
    advances ``pos_t`` and computes the logits. ``inp``/``out`` are a captured piece's static
    input and output; ``keep`` holds tensors later pieces read (the step's mask).
    """

    blocks: list[int]
    graph: bool
    first: bool = False
    last: bool = False
    inp: torch.Tensor | None = None
    out: torch.Tensor | None = None
    replay: Callable[[], None] | None = None
    keep: Any = None


def plan_pieces(kinds: Sequence[str], mode: str) -> list[GraphPiece]:
    """Split a decode step over blocks of these kinds: ``"full"`` = one captured piece; ``"dense"`` =
    each run of non-MoE blocks captured, each MoE block eager (an offloading backend syncs)."""
    if mode == "full":
        return [GraphPiece(list(range(len(kinds))), True, first=True, last=True)]
    pieces = [GraphPiece([], True, first=True)]
    for i, kind in enumerate(kinds):
        if kind == "moe":
            pieces.append(GraphPiece([i], False))
            continue
        if not pieces[-1].graph:
            pieces.append(GraphPiece([], True))
        pieces[-1].blocks.append(i)
    if not pieces[-1].graph:
        pieces.append(GraphPiece([], True))
    pieces[-1].last = True
    return pieces


class DecodeGraphs:
    """CUDA graphs of the one-token decode step of one cache (design: ``docs/decode.md``).

    Modes: ``"full"`` captures the whole step (every expert resident: the MoE layers compute
    through the identity slot table and never leave the device); ``"dense"`` captures the runs of
    Mamba and attention blocks between MoE layers and runs each MoE block eagerly in between
    (what an offloading backend needs: its lookups and copies are host-driven); ``"auto"`` picks
    ``"full"`` when every MoE layer has :class:`ResidentExperts` and no observer, else ``"dense"``.

    A step at position ``p`` reads the first ``bucket(p)`` KV entries (powers of two from
    ``min_bucket`` up to the cache capacity) under a mask built on the device from ``pos_t``, so
    one set of graphs serves every position of its bucket; a new bucket is captured when the
    sequence reaches it. Its first ``warmup`` steps run the same code eagerly (real steps, on a
    side stream; they compile every kernel), the next one captures, then replays. Graphs are
    dropped when the cache reallocates (KV growth) or the experts' backends change.

    With the embedding table in host memory (:class:`HostEmbedding`) the host gathers and copies
    the step's rows before the first piece, which takes them as its static input.

    ``capture(fn) -> (replay, out)`` records ``fn`` without running it; the default uses
    ``torch.cuda.CUDAGraph``. Tests pass one that runs ``fn`` eagerly on CPU.
    """

    def __init__(self, model: NemotronHForCausalLM, cache: InferenceCache, *, mode: str = "auto",
                 min_bucket: int = 256, warmup: int = 1, capture: Capture | None = None):
        if mode not in GRAPH_MODES:
            raise ValueError(f"cuda_graphs mode must be one of {GRAPH_MODES} (or True/False), got {mode!r}")
        self.model, self.cache, self.mode = model, cache, mode
        self.min_bucket, self.warmup = min_bucket, warmup
        self.device = model.lm_head.weight.device
        self._capture = capture or self._cuda_capture
        self.input_ids = torch.zeros(cache.batch, 1, dtype=torch.int64, device=self.device)
        self.buckets: dict[int, list[GraphPiece]] = {}
        self._warm: dict[int, int] = {}
        self._key: tuple | None = None
        self._pool: Any = None
        self._stream: Any = None
        self.counts = {"eager": 0, "captured": 0, "replayed": 0}

    def resolved_mode(self) -> str | None:
        """The mode the model allows now: None when ``"full"`` was asked for but cannot be had."""
        mixers = self.model.moe_mixers
        resident = all(type(m.experts) is ResidentExperts and not m.observers for m in mixers)
        if self.mode == "auto":
            return "full" if resident else "dense"
        return self.mode if resident or self.mode == "dense" else None

    def handles(self, input_ids: torch.Tensor) -> bool:
        """True for a one-token call this cache's graphs can run (else the model runs eagerly)."""
        c = self.cache
        return (tuple(input_ids.shape) == (c.batch, 1) and 0 < c.pos < c.capacity
                and input_ids.device == self.device and self.resolved_mode() is not None)  # fmt: skip

    def bucket(self, pos: int) -> int:
        """KV entries a step at position ``pos`` attends to (masked past ``pos``)."""
        return min(self.cache.capacity, max(self.min_bucket, next_power_of_2(pos + 1)))

    def reset(self) -> None:
        self.buckets.clear()
        self._warm.clear()

    @torch.no_grad()
    def step(self, input_ids: torch.Tensor) -> torch.Tensor:
        """One decode step ``[B, 1]`` → fp32 logits ``[B, 1, V]``, replayed (or warmed up / captured)."""
        model, cache = self.model, self.cache
        mode = self.resolved_mode()
        key = (cache.generation, mode, model.embeddings_on_host, tuple(type(m.experts) for m in model.moe_mixers))
        if key != self._key:
            self.reset()
            self._key = key
        length = self.bucket(cache.pos)
        cache.device_pos(self.device)  # any refresh of pos_t happens here, never inside a capture
        model._begin_step(input_ids, True)
        try:
            self.input_ids.copy_(input_ids)
            pieces = self.buckets.get(length)
            if pieces is None and self._warm.get(length, 0) < self.warmup:
                self._warm[length] = self._warm.get(length, 0) + 1
                self.counts["eager"] += 1
                with self._side_stream():
                    out = self._run(plan_pieces(self._kinds(), mode), length)
            else:
                if pieces is None:
                    pieces = self.buckets[length] = self._capture_pieces(mode, length)
                    self.counts["captured"] += 1
                out = self._replay(pieces)
                self.counts["replayed"] += 1
        finally:
            model._end_step()
            cache.step = None
        cache.advanced_on_device(1)
        return out.clone()

    def _kinds(self) -> list[str]:
        return [b.kind for b in self.model.backbone.layers]

    def _host_rows(self) -> torch.Tensor | None:
        """The step's embedded tokens when the table is in host memory (gathered and copied eagerly), else None."""
        model = self.model
        return model.backbone.embeddings(self.input_ids) if model.embeddings_on_host else None

    def _run_piece(self, piece: GraphPiece, h: torch.Tensor | None, length: int) -> torch.Tensor:
        model, cache = self.model, self.cache
        if piece.first:
            cache.begin_step(1, self.device, attend_len=length)
            if not model.embeddings_on_host:  # else h holds the rows, copied in before the piece
                h = model.backbone.embeddings(self.input_ids)
        for i in piece.blocks:
            h = model.backbone.layers[i](h, cache)
        if piece.last:
            cache.pos_t.add_(1)
            h = model.logits(h)
        return h

    def _run(self, pieces: list[GraphPiece], length: int) -> torch.Tensor:
        h = self._host_rows()
        for piece in pieces:
            h = self._run_piece(piece, h, length)
        return h

    def _capture_pieces(self, mode: str, length: int) -> list[GraphPiece]:
        pieces = plan_pieces(self._kinds(), mode)
        prev = None
        emb = self.model.backbone.embeddings
        if self.model.embeddings_on_host:  # the first piece reads the rows copied in before each replay
            prev = torch.zeros(*self.input_ids.shape, emb.embedding_dim, dtype=emb.weight.dtype, device=self.device)
        for piece in pieces:
            if not piece.graph:
                continue
            if prev is not None:  # after an eager MoE block, whose output has its input's shape and dtype
                piece.inp = torch.zeros_like(prev)
            piece.replay, piece.out = self._capture(lambda p=piece: self._run_piece(p, p.inp, length))
            if piece.first:
                piece.keep = self.cache.step  # positions and mask, read by the later pieces
            prev = piece.out
        return pieces

    def _replay(self, pieces: list[GraphPiece]) -> torch.Tensor:
        layers, h = self.model.backbone.layers, self._host_rows()
        for piece in pieces:
            if piece.graph:
                if piece.inp is not None:
                    piece.inp.copy_(h)
                piece.replay()
                h = piece.out
            else:
                for i in piece.blocks:
                    h = layers[i](h, self.cache)
        return h

    def _side(self) -> Any:
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
        return self._stream

    @contextlib.contextmanager
    def _side_stream(self) -> Iterator[None]:
        if self.device.type != "cuda":
            yield
            return
        side, main = self._side(), torch.cuda.current_stream(self.device)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            yield
        main.wait_stream(side)

    def _cuda_capture(self, fn: Callable[[], torch.Tensor]) -> tuple[Callable[[], None], torch.Tensor]:
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        # thread-local: an offloading backend's copy threads may keep working during a capture
        with torch.cuda.graph(graph, pool=self._pool, stream=self._side(), capture_error_mode="thread_local"):
            out = fn()
        return graph.replay, out


_INIT_FUNCTIONS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "kaiming_uniform_",
                   "kaiming_normal_", "xavier_uniform_", "xavier_normal_")


@contextlib.contextmanager
def _skip_random_init() -> Iterator[None]:
    # torch's layers initialise their weights in __init__; on the meta device those calls run
    # through torch._refs, whose first use imports torch._dynamo and sympy (~140 MiB resident,
    # seconds of start-up) for weights that are replaced by the checkpoint's anyway
    saved = {name: getattr(nn.init, name) for name in _INIT_FUNCTIONS}
    for name in _INIT_FUNCTIONS:
        setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(nn.init, name, fn)


def tie_embeddings(model: NemotronHForCausalLM) -> None:
    """Make ``lm_head`` read the embedding table (``tie_word_embeddings`` with no ``lm_head.weight`` stored)."""
    model.lm_head.weight = model.backbone.embeddings.weight


def meta_model(config: NemotronHConfig) -> NemotronHForCausalLM:
    """The model's module tree on the ``meta`` device: shapes and dtypes, no storage, no initialisation."""
    with torch.device("meta"), _skip_random_init():
        return NemotronHForCausalLM(config)
