"""LatentMoE layer: router, latent projections, shared expert, and the seam to the routed-expert backend.

The layer routes with :func:`residency.kernels.route` and hands the routed-expert work of each
forward call to its backend (``MoEMixer.experts``) as an :class:`ExpertWork`: the normalised
hidden state the router saw (what look-ahead routing with the next layer's router needs), the
latent expert input, the routing ids and fp32 weights, and an optional per-pair norm buffer for
the profiler. The call is split in two, :meth:`ExpertBackend.submit` then
:meth:`ExpertBackend.collect`, with the shared expert computed in between, so a backend can
overlap copies and CPU expert work with it. The fully resident path is one backend
(:class:`ResidentExperts`: every expert in one slot bank, identity slot table, one
:func:`residency.kernels.moe_gather_gemm` call); the offload runtime provides another.

Step boundaries (a whole forward call over all layers) are announced to
:class:`StepListener` objects registered on the model, which is where a runtime pins the step's
experts and advances its telemetry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..config import NemotronHConfig
from ..kernels import moe_gather_gemm, route
from .caches import InferenceCache
from .layers import MLP


@dataclass
class RoutingEvent:
    """What an MoE layer decided for a batch of tokens; handed to observers such as the profiler.

    ``pair_norms`` ``[T, k]`` holds ``||E_e(x_t)||₂`` (unweighted expert output, in the space the
    experts compute in: the latent space for LatentMoE) when an observer asked for it.
    """

    moe_index: int
    layer_idx: int
    ids: torch.Tensor  # [T, k]
    weights: torch.Tensor  # [T, k] fp32
    router_logits: torch.Tensor  # [T, E] fp32
    pair_norms: torch.Tensor | None
    is_decode: bool


class MoEObserver:
    """Base observer: override :meth:`on_routing`. Set ``wants_pair_norms`` to get expert output norms."""

    wants_pair_norms: bool = False

    def on_routing(self, event: RoutingEvent) -> None:  # pragma: no cover - interface
        raise NotImplementedError


@dataclass
class ExpertWork:
    """One MoE layer's routed-expert work in one forward call, as the layer hands it to its backend.

    ``pair_norms``, when not None, is an fp32 ``[T, k]`` buffer filled with NaN: the backend must
    write each pair's unweighted expert-output L2 norm into it (the profiler refuses NaN left over).
    """

    moe_index: int
    layer_idx: int
    hidden: torch.Tensor  # [T, D] normalised hidden state (the router's input)
    latent: torch.Tensor  # [T, L] expert input (latent space for LatentMoE, else = hidden)
    ids: torch.Tensor  # [T, k] int64 expert ids
    weights: torch.Tensor  # [T, k] fp32 routing weights
    pair_norms: torch.Tensor | None
    is_decode: bool


class ExpertBackend(nn.Module):
    """Computes one MoE layer's routed experts. Subclasses implement :meth:`submit` and :meth:`collect`.

    ``submit(work)`` starts the work and returns a handle; ``collect(handle)`` returns the weighted
    sum over each token's k experts, ``[T, L]`` in ``work.latent``'s dtype, accumulated in fp32.
    Between the two the layer computes its shared expert. ``forward`` runs both, for direct use.
    """

    def submit(self, work: ExpertWork) -> Any:  # pragma: no cover - interface
        raise NotImplementedError

    def collect(self, handle: Any) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def forward(self, work: ExpertWork) -> torch.Tensor:
        return self.collect(self.submit(work))


class StepListener(Protocol):
    """Told when a forward call (one prefill chunk or one decode step over every layer) begins and ends."""

    def begin_step(self, input_ids: torch.Tensor, is_decode: bool) -> None: ...

    def end_step(self) -> None: ...


class ResidentExperts(ExpertBackend):
    """All routed experts of one layer in one slot bank with the identity slot table.

    The banks are the checkpoint's per-expert tensors stacked: ``up_proj [E, I, L]``,
    ``down_proj [E, L, I]``; one :func:`~residency.kernels.moe_gather_gemm` call computes the step
    (Triton on CUDA, the torch reference on CPU, as the kernel backend switch decides).
    """

    def __init__(self, num_experts: int, inner: int, width: int) -> None:
        super().__init__()
        self.up_proj = nn.Parameter(torch.empty(num_experts, inner, width))  # [E, I, L]
        self.down_proj = nn.Parameter(torch.empty(num_experts, width, inner))  # [E, L, I]
        self.register_buffer("slot_of_expert", torch.empty(num_experts, dtype=torch.int32), persistent=False)
        if self.slot_of_expert.device.type != "meta":  # (arange on meta would import sympy: 140 MB)
            self.reset_slot_table()

    def reset_slot_table(self) -> None:
        """The identity slot table: expert e is in slot e."""
        self.slot_of_expert.copy_(torch.arange(self.slot_of_expert.numel(), dtype=torch.int32))

    def submit(self, work: ExpertWork) -> torch.Tensor:
        return moe_gather_gemm(
            work.latent, self.up_proj, self.down_proj, self.slot_of_expert, work.ids, work.weights,
            pair_norms=work.pair_norms,
        )

    def collect(self, handle: torch.Tensor) -> torch.Tensor:
        return handle


class Router(nn.Module):
    """Router weights, kept in fp32 (converted once at load): the logits decide which experts run."""

    def __init__(self, config: NemotronHConfig) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size, dtype=torch.float32))
        self.register_buffer("e_score_correction_bias", torch.zeros(config.n_routed_experts, dtype=torch.float32))


class MoEMixer(nn.Module):
    """LatentMoE: fp32 router on the full hidden state, routed experts in the latent space, shared expert."""

    def __init__(self, config: NemotronHConfig, layer_idx: int, moe_index: int) -> None:
        super().__init__()
        c = config
        self.config = c
        self.layer_idx, self.moe_index = layer_idx, moe_index
        self.gate = Router(c)
        self.experts: ExpertBackend = ResidentExperts(c.n_routed_experts, c.moe_intermediate_size,
                                                      c.expert_input_size)
        self.shared_experts = (
            MLP(c.hidden_size, c.moe_shared_expert_intermediate_size, c.mlp_bias) if c.n_shared_experts else None
        )
        if c.moe_latent_size is not None:
            self.fc1_latent_proj = nn.Linear(c.hidden_size, c.moe_latent_size, bias=c.mlp_bias)
            self.fc2_latent_proj = nn.Linear(c.moe_latent_size, c.hidden_size, bias=c.mlp_bias)
        else:
            self.fc1_latent_proj = self.fc2_latent_proj = None
        self.observers: list[MoEObserver] = []
        self.is_decode = False

    def router_logits(self, xn: torch.Tensor) -> torch.Tensor:
        """fp32 router logits ``[T, E]`` for normalised hidden states ``[T, D]``."""
        return F.linear(xn.float(), self.gate.weight)

    def route(self, xn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids, weights, fp32 logits) for normalised hidden states ``[T, D]``."""
        c = self.config
        logits = self.router_logits(xn)
        ids, weights = route(
            logits, self.gate.e_score_correction_bias, c.num_experts_per_tok, c.routed_scaling_factor,
            c.norm_topk_prob, n_group=c.n_group, topk_group=c.topk_group,
        )
        return ids, weights, logits

    def forward(self, x: torch.Tensor, cache: InferenceCache | None = None) -> torch.Tensor:
        shape = x.shape
        xn = x.reshape(-1, shape[-1])
        ids, weights, logits = self.route(xn)
        latent = self.fc1_latent_proj(xn) if self.fc1_latent_proj is not None else xn
        norms = None
        if any(o.wants_pair_norms for o in self.observers):
            # NaN until the experts fill it, so an implementation that skips the buffer is caught
            norms = torch.full(ids.shape, float("nan"), dtype=torch.float32, device=x.device)
        work = ExpertWork(self.moe_index, self.layer_idx, xn, latent, ids, weights, norms, self.is_decode)
        handle = self.experts.submit(work)
        shared = self.shared_experts(x) if self.shared_experts is not None else None
        routed = self.experts.collect(handle).to(x.dtype)
        if self.fc2_latent_proj is not None:
            routed = self.fc2_latent_proj(routed)
        if self.observers:
            event = RoutingEvent(self.moe_index, self.layer_idx, ids, weights, logits, norms, self.is_decode)
            for observer in self.observers:
                observer.on_routing(event)
        out = routed.view(shape)
        return out if shared is None else out + shared
