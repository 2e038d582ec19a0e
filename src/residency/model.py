"""Pure-torch Nemotron-H forward: Mamba-2, attention (GQA, KV cache, no RoPE) and LatentMoE blocks.

The math follows Hugging Face ``transformers``' ``NemotronHForCausalLM``, which tests compare
against on tiny random checkpoints. Module names mirror the checkpoint's tensor names
(``backbone.layers.N.mixer...``) so loading is a direct mapping, except that routed experts are
stacked into one ``[E, I, L]`` / ``[E, L, I]`` pair per layer (:class:`ResidentExperts`).

The routed-expert computation is pluggable: every :class:`MoEMixer` calls ``self.experts`` with
latent activations and the router's choice, so the offload runtime can swap in its own
implementation without touching the rest, and observers (the profiler) see each routing decision.

One deliberate difference from ``transformers``: its pure-torch chunked Mamba scan clamps the
time step at ``time_step_min`` during prefill only, while its own decode step, the fused
``mamba_ssm`` kernels and vLLM do not. Here ``dt`` is clamped to ``config.time_step_limit``
(default ``(0, inf)``, i.e. no clamp) in both paths, so prefill and decode agree.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .config import NemotronHConfig

# ---------------------------------------------------------------------- caches


@dataclass
class InferenceCache:
    """Decode state for a batch: KV per attention layer, conv + SSM state per Mamba layer.

    ``pos`` is the number of tokens already processed. KV buffers grow by doubling.
    """

    batch: int
    pos: int = 0
    kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    conv: dict[int, torch.Tensor] = field(default_factory=dict)  # [B, conv_dim, K-1]
    ssm: dict[int, torch.Tensor] = field(default_factory=dict)  # [B, nh, p, N] fp32


# ---------------------------------------------------------------------- norms


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * h).to(dtype)


class GatedRMSNorm(nn.Module):
    """``norm(y · silu(z))`` with the mean square taken per group of ``size / groups`` channels."""

    def __init__(self, size: int, groups: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.groups = groups
        self.eps = eps

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        dtype = y.dtype
        h = y.float() * F.silu(z.float())
        shape = h.shape
        h = h.view(*shape[:-1], self.groups, shape[-1] // self.groups)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.view(shape).to(dtype)


def relu2(x: torch.Tensor) -> torch.Tensor:
    return torch.relu(x).square()


# ---------------------------------------------------------------------- Mamba-2


class Mamba2Mixer(nn.Module):
    """Mamba-2 mixer: in_proj → causal conv (SiLU) → selective scan → gated group RMSNorm → out_proj."""

    def __init__(self, config: NemotronHConfig, layer_idx: int) -> None:
        super().__init__()
        c = config
        self.layer_idx = layer_idx
        self.heads, self.head_dim = c.mamba_num_heads, c.mamba_head_dim
        self.groups, self.state = c.n_groups, c.ssm_state_size
        self.inner, self.conv_dim, self.kernel = c.mamba_inner, c.mamba_conv_dim, c.conv_kernel
        self.chunk = c.chunk_size
        self.dt_limit = c.time_step_limit
        self.in_proj = nn.Linear(c.hidden_size, c.mamba_in_proj_size, bias=c.use_bias)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, c.conv_kernel, groups=self.conv_dim,
                                bias=c.use_conv_bias)
        self.dt_bias = nn.Parameter(torch.zeros(self.heads))
        self.A_log = nn.Parameter(torch.zeros(self.heads))
        self.D = nn.Parameter(torch.ones(self.heads))
        self.norm = GatedRMSNorm(self.inner, c.n_groups, c.layer_norm_epsilon)
        self.out_proj = nn.Linear(self.inner, c.hidden_size, bias=c.use_bias)

    def forward(self, x: torch.Tensor, cache: InferenceCache | None) -> torch.Tensor:
        bsz, seq, _ = x.shape
        z, xbc, dt = self.in_proj(x).split([self.inner, self.conv_dim, self.heads], dim=-1)

        # causal depthwise conv over xBC, continuing from the cached last K-1 inputs
        prev = cache.conv.get(self.layer_idx) if cache is not None else None
        if prev is None:
            prev = xbc.new_zeros(bsz, self.conv_dim, self.kernel - 1)
        full = torch.cat([prev.to(xbc.dtype), xbc.transpose(1, 2)], dim=-1)  # [B, C, K-1+T]
        if cache is not None:
            cache.conv[self.layer_idx] = full[:, :, -(self.kernel - 1):].clone()
        weight = self.conv1d.weight.to(full.dtype)
        bias = self.conv1d.bias.to(full.dtype) if self.conv1d.bias is not None else None
        xbc = F.silu(F.conv1d(full, weight, bias, groups=self.conv_dim)).transpose(1, 2)  # [B, T, C]

        xs, B, C = xbc.split([self.inner, self.groups * self.state, self.groups * self.state], dim=-1)
        dt = F.softplus(dt + self.dt_bias)
        dt = dt.clamp(min=self.dt_limit[0], max=self.dt_limit[1])
        A = -torch.exp(self.A_log.float())
        xs = xs.reshape(bsz, seq, self.heads, self.head_dim)
        B = B.reshape(bsz, seq, self.groups, self.state)
        C = C.reshape(bsz, seq, self.groups, self.state)

        state = cache.ssm.get(self.layer_idx) if cache is not None else None
        y, final = ssd_scan(xs, dt, A, B, C, self.D, self.chunk, state)
        if cache is not None:
            cache.ssm[self.layer_idx] = final
        y = self.norm(y.reshape(bsz, seq, self.inner), z)  # fp32 in, as the reference prefill path
        return self.out_proj(y.to(x.dtype))


def ssd_scan(
    x: torch.Tensor,  # [B, T, H, P]
    dt: torch.Tensor,  # [B, T, H] (after softplus)
    A: torch.Tensor,  # [H] negative, fp32
    B: torch.Tensor,  # [B, T, G, N]
    C: torch.Tensor,  # [B, T, G, N]
    D: torch.Tensor,  # [H]
    chunk: int,
    state: torch.Tensor | None,  # [B, H, P, N] fp32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Selective scan ``S_t = exp(dt·A)·S_{t-1} + dt·B_t⊗x_t``, ``y_t = C_t·S_t + D·x_t``, in fp32.

    Works chunk by chunk (quadratic inside a chunk, recurrent across chunks), which is the
    state-space-duality form of the recurrence; a single token is one chunk of length 1, so the
    decode step and prefill share this code. Returns ``(y [B, T, H, P] fp32, final state)``.
    """
    bsz, seq, heads, hd = x.shape
    groups = B.shape[2]
    rep = heads // groups
    xf, dtf = x.float(), dt.float()
    Bf = B.float().repeat_interleave(rep, dim=2)  # [B, T, H, N]
    Cf = C.float().repeat_interleave(rep, dim=2)
    if state is None:
        state = x.new_zeros(bsz, heads, hd, B.shape[-1], dtype=torch.float32)
    a = dtf * A  # [B, T, H] log-decay per step
    xbar = xf * dtf[..., None]  # [B, T, H, P]
    out = torch.empty_like(xf)
    for start in range(0, seq, chunk):
        end = min(start + chunk, seq)
        ac = a[:, start:end]  # [B, L, H]
        cs = ac.cumsum(1)  # inclusive cumulative log-decay
        cb, cc, xc = Bf[:, start:end], Cf[:, start:end], xbar[:, start:end]
        # intra-chunk: y_t += sum_{s<=t} exp(cs_t - cs_s) (C_t . B_s) xbar_s
        diff = cs[:, :, None, :] - cs[:, None, :, :]  # [B, Lt, Ls, H]
        n = end - start
        causal = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
        decay = torch.exp(diff.masked_fill(~causal[None, :, :, None], -math.inf))
        scores = torch.einsum("bthn,bshn->btsh", cc, cb) * decay
        y = torch.einsum("btsh,bshp->bthp", scores, xc)
        # carried state: y_t += exp(cs_t) C_t . S_prev
        y = y + torch.einsum("bthn,bhpn->bthp", cc, state) * torch.exp(cs)[..., None]
        out[:, start:end] = y
        # state at chunk end
        tail = torch.exp(cs[:, -1:, :] - cs)  # [B, L, H]
        state = state * torch.exp(cs[:, -1])[:, :, None, None] + torch.einsum(
            "bshn,bshp->bhpn", cb * tail[..., None], xc
        )
    out = out + xf * D.float()[None, None, :, None]
    return out, state


# ---------------------------------------------------------------------- attention


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


# ---------------------------------------------------------------------- MoE


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


class MLP(nn.Module):
    """Non-gated relu² MLP (shared expert and dense ``-`` layers)."""

    def __init__(self, hidden: int, inner: int, bias: bool) -> None:
        super().__init__()
        self.up_proj = nn.Linear(hidden, inner, bias=bias)
        self.down_proj = nn.Linear(inner, hidden, bias=bias)

    def forward(self, x: torch.Tensor, cache: InferenceCache | None = None) -> torch.Tensor:
        return self.down_proj(relu2(self.up_proj(x)))


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


# ---------------------------------------------------------------------- model


class Block(nn.Module):
    def __init__(self, config: NemotronHConfig, layer_idx: int, moe_index: int | None) -> None:
        super().__init__()
        kind = config.layer_kinds[layer_idx]
        self.kind = kind
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
        return h + self.mixer(self.norm(h.to(self.norm.weight.dtype)), cache)


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

    def set_experts(self, factory: Callable[[MoEMixer], nn.Module]) -> None:
        """Replace each MoE layer's routed-expert implementation with ``factory(mixer)``."""
        for m in self.moe_mixers:
            m.experts = factory(m)

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
        h = self.backbone.embeddings(input_ids)
        for block in self.backbone.layers:
            h = block(h, cache)
        if cache is not None:
            cache.pos += input_ids.shape[1]
        if last_only:
            h = h[:, -1:]
        h = self.backbone.norm_f(h)
        return self.lm_head(h.to(self.lm_head.weight.dtype)).float()
