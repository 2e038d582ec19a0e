"""LatentMoE layer: router, latent projections, shared expert, and the seam to the routed-expert backend."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import NemotronHConfig
from .caches import InferenceCache
from .layers import MLP, relu2


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


class ResidentExperts(nn.Module):
    """All routed experts of one layer held as stacked tensors; the default expert implementation.

    Any replacement (the offload runtime) must accept the same call: latent activations ``[T, L]``,
    ids ``[T, k]``, fp32 weights ``[T, k]`` and an optional ``pair_norms`` buffer ``[T, k]`` to fill
    with unweighted output norms; it returns the weighted sum ``[T, L]`` accumulated in fp32.
    """

    def __init__(self, num_experts: int, inner: int, width: int) -> None:
        super().__init__()
        self.up_proj = nn.Parameter(torch.empty(num_experts, inner, width))  # [E, I, L]
        self.down_proj = nn.Parameter(torch.empty(num_experts, width, inner))  # [E, L, I]

    def forward(
        self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, pair_norms: torch.Tensor | None = None
    ) -> torch.Tensor:
        tokens, k = ids.shape
        flat = ids.reshape(-1)
        order = torch.argsort(flat, stable=True)
        experts, counts = torch.unique_consecutive(flat[order], return_counts=True)
        pair_out = torch.empty(tokens * k, x.shape[1], dtype=torch.float32, device=x.device)  # [T*k, L]
        start = 0
        for expert, count in zip(experts.tolist(), counts.tolist()):
            pairs = order[start:start + count]
            start += count
            h = relu2(F.linear(x[pairs // k], self.up_proj[expert]))
            pair_out[pairs] = F.linear(h, self.down_proj[expert]).float()
        if pair_norms is not None:
            pair_norms.copy_(pair_out.norm(dim=-1).view(tokens, k))
        # weighted sum over k in fp32, in a fixed order
        return (pair_out.view(tokens, k, -1) * weights.float()[..., None]).sum(1)


def route_tokens(
    logits: torch.Tensor, bias: torch.Tensor | None, config: NemotronHConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nemotron-H router on fp32 logits ``[T, E]`` → (ids ``[T, k]`` by descending biased score, fp32 weights).

    sigmoid scores; selection on score + correction bias (optionally restricted to the best
    ``topk_group`` of ``n_group`` groups); weights from the unbiased scores, renormalised, scaled.
    """
    scores = torch.sigmoid(logits.float())
    choice = scores + bias.float() if bias is not None else scores
    if config.n_group > 1:
        grouped = choice.view(choice.shape[0], config.n_group, -1)
        group_scores = grouped.topk(2, dim=-1).values.sum(-1)
        keep = torch.zeros_like(group_scores, dtype=torch.bool)
        keep.scatter_(1, group_scores.topk(config.topk_group, dim=-1).indices, True)
        choice = grouped.masked_fill(~keep[..., None], float("-inf")).view_as(choice)
    ids = choice.topk(config.num_experts_per_tok, dim=-1, sorted=True).indices
    weights = scores.gather(1, ids)
    if config.norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return ids, weights * config.routed_scaling_factor


class Router(nn.Module):
    def __init__(self, config: NemotronHConfig) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(config.n_routed_experts, dtype=torch.float32))


class MoEMixer(nn.Module):
    """LatentMoE: fp32 router on the full hidden state, routed experts in the latent space, shared expert."""

    def __init__(self, config: NemotronHConfig, layer_idx: int, moe_index: int) -> None:
        super().__init__()
        c = config
        self.config = c
        self.layer_idx, self.moe_index = layer_idx, moe_index
        self.gate = Router(c)
        self.experts: nn.Module = ResidentExperts(c.n_routed_experts, c.moe_intermediate_size, c.expert_input_size)
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

    def route(self, xn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids, weights, fp32 logits) for normalised hidden states ``[T, D]``."""
        logits = F.linear(xn.float(), self.gate.weight.float())
        ids, weights = route_tokens(logits, self.gate.e_score_correction_bias, self.config)
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
        routed = self.experts(latent, ids, weights, norms).to(x.dtype)
        if self.fc2_latent_proj is not None:
            routed = self.fc2_latent_proj(routed)
        if self.observers:
            event = RoutingEvent(self.moe_index, self.layer_idx, ids, weights, logits, norms, self.is_decode)
            for observer in self.observers:
                observer.on_routing(event)
        out = routed.view(shape)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out
