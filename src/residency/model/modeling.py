"""Pure-torch Nemotron-H forward: Mamba-2, attention (GQA, KV cache, no RoPE) and LatentMoE blocks.

The math follows Hugging Face ``transformers``' ``NemotronHForCausalLM``, which tests compare
against on tiny random checkpoints. Module names mirror the checkpoint's tensor names
(``backbone.layers.N.mixer...``) so loading is a direct mapping, except that routed experts are
stacked into one ``[E, I, L]`` / ``[E, L, I]`` pair per layer (:class:`ResidentExperts`).

The routed-expert computation is pluggable: every :class:`MoEMixer` hands its work to
``self.experts``, an :class:`~residency.model.moe.ExpertBackend` (see :mod:`residency.model.moe`),
so the offload runtime can swap in its own implementation without touching the rest; observers
(the profiler) see each routing decision, and step listeners see each forward call begin and end.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from ..config import NemotronHConfig
from .attention import Attention
from .caches import InferenceCache
from .layers import MLP, RMSNorm
from .mamba import Mamba2Mixer
from .moe import ExpertBackend, MoEMixer, MoEObserver, StepListener


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
        out = self.mixer(self.norm(h.to(self.norm.weight.dtype)), cache)
        residual = h.float() if self.residual_in_fp32 else h
        return residual + out


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

    def new_cache(self, batch: int) -> InferenceCache:
        return InferenceCache(batch=batch)

    @torch.no_grad()
    def forward(
        self, input_ids: torch.Tensor, cache: InferenceCache | None = None, *, last_only: bool = False
    ) -> torch.Tensor:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        is_decode = cache is not None and cache.pos > 0
        for m in self.moe_mixers:
            m.is_decode = is_decode
        for listener in self.step_listeners:
            listener.begin_step(input_ids, is_decode)
        try:
            h = self.backbone.embeddings(input_ids)
            for block in self.backbone.layers:
                h = block(h, cache)
        finally:
            for listener in self.step_listeners:
                listener.end_step()
        if cache is not None:
            cache.pos += input_ids.shape[1]
        if last_only:
            h = h[:, -1:]
        h = self.backbone.norm_f(h)
        return self.lm_head(h.to(self.lm_head.weight.dtype)).float()


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


def meta_model(config: NemotronHConfig) -> NemotronHForCausalLM:
    """The model's module tree on the ``meta`` device: shapes and dtypes, no storage, no initialisation."""
    with torch.device("meta"), _skip_random_init():
        return NemotronHForCausalLM(config)
