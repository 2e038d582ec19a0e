"""Mamba-2 mixer: in_proj, causal conv, selective scan, gated group RMSNorm, out_proj.

Prefill runs the chunked (SSD) scan; a decoded token runs the recurrent step kernels of
:mod:`residency.kernels.mamba` on the cache's preallocated state.

One deliberate difference from ``transformers``: its pure-torch chunked Mamba scan clamps the
time step at ``time_step_min`` during prefill only, while its own decode step, the fused
``mamba_ssm`` kernels and vLLM do not. Here ``dt`` is clamped to ``config.time_step_limit``
(default ``(0, inf)``, i.e. no clamp) in both paths, so prefill and decode agree.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import NemotronHConfig
from ..kernels import causal_conv1d_update, selective_state_update
from .caches import InferenceCache
from .layers import GatedRMSNorm


class Mamba2Mixer(nn.Module):
    """Mamba-2 mixer: in_proj → causal conv (SiLU) → selective scan → gated group RMSNorm → out_proj.

    A call of one token with a cache takes the recurrent step (``use_step_kernels``, the
    default): :func:`~residency.kernels.causal_conv1d_update` and
    :func:`~residency.kernels.selective_state_update` on the cache's buffers in place. Longer
    calls (prefill) run the chunked scan. Both end in :func:`~residency.kernels.gated_rms_norm`.
    """

    use_step_kernels = True

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

    def new_state(self, batch: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Zero decode state: conv ``[B, conv_dim, K-1]`` in the activations' ``dtype``, SSM ``[B, nh, p, N]`` fp32."""
        device = self.dt_bias.device
        conv = torch.zeros(batch, self.conv_dim, self.kernel - 1, dtype=dtype, device=device)
        ssm = torch.zeros(batch, self.heads, self.head_dim, self.state, dtype=torch.float32, device=device)
        return conv, ssm

    def forward(self, x: torch.Tensor, cache: InferenceCache | None) -> torch.Tensor:
        bsz, seq, _ = x.shape
        zxbcdt = self.in_proj(x)
        if cache is not None and seq == 1 and self.use_step_kernels:
            return self._step(zxbcdt[:, 0], cache).unsqueeze(1)
        z, xbc, dt = zxbcdt.split([self.inner, self.conv_dim, self.heads], dim=-1)

        # causal depthwise conv over xBC, continuing from the cached last K-1 inputs
        conv_state = ssm_state = None
        if cache is not None:
            if self.layer_idx not in cache.conv:
                cache.conv[self.layer_idx], cache.ssm[self.layer_idx] = self.new_state(bsz, xbc.dtype)
            conv_state, ssm_state = cache.conv[self.layer_idx], cache.ssm[self.layer_idx]
        prev = conv_state if conv_state is not None else xbc.new_zeros(bsz, self.conv_dim, self.kernel - 1)
        full = torch.cat([prev.to(xbc.dtype), xbc.transpose(1, 2)], dim=-1)  # [B, C, K-1+T]
        if conv_state is not None:
            conv_state.copy_(full[:, :, -(self.kernel - 1):])
        weight = self.conv1d.weight.to(full.dtype)
        bias = self.conv1d.bias.to(full.dtype) if self.conv1d.bias is not None else None
        xbc = F.silu(F.conv1d(full, weight, bias, groups=self.conv_dim)).transpose(1, 2)  # [B, T, C]

        xs, B, C = xbc.split([self.inner, self.groups * self.state, self.groups * self.state], dim=-1)
        # dt in fp32, as the decode step computes it
        dt = F.softplus(dt.float() + self.dt_bias.float())
        if tuple(self.dt_limit) != (0.0, math.inf):
            dt = dt.clamp(min=self.dt_limit[0], max=self.dt_limit[1])
        A = -torch.exp(self.A_log.float())
        xs = xs.reshape(bsz, seq, self.heads, self.head_dim)
        B = B.reshape(bsz, seq, self.groups, self.state)
        C = C.reshape(bsz, seq, self.groups, self.state)

        start = ssm_state if cache is not None and cache.pos > 0 else None
        y, final = ssd_scan(xs, dt, A, B, C, self.D, self.chunk, start)
        if ssm_state is not None:
            ssm_state.copy_(final)
        y = self.norm(y.reshape(bsz, seq, self.inner), z, out_dtype=x.dtype)  # fp32 in, as the reference prefill path
        return self.out_proj(y)

    def _step(self, zxbcdt: torch.Tensor, cache: InferenceCache) -> torch.Tensor:
        """One token ``[B, in_proj]`` through the recurrent kernels, updating the cache in place."""
        bsz = zxbcdt.shape[0]
        if self.layer_idx not in cache.conv:
            cache.conv[self.layer_idx], cache.ssm[self.layer_idx] = self.new_state(bsz, zxbcdt.dtype)
        z, xbc, dt = zxbcdt.split([self.inner, self.conv_dim, self.heads], dim=-1)
        bias = self.conv1d.bias
        xbc = causal_conv1d_update(xbc, cache.conv[self.layer_idx], self.conv1d.weight[:, 0], bias, True)
        xs, B, C = xbc.split([self.inner, self.groups * self.state, self.groups * self.state], dim=-1)
        y = selective_state_update(
            cache.ssm[self.layer_idx], xs.view(bsz, self.heads, self.head_dim), dt, self.A_log,
            B.view(bsz, self.groups, self.state), C.view(bsz, self.groups, self.state), self.D, self.dt_bias,
            dt_limit=self.dt_limit,
        )  # [B, nh, p] fp32
        return self.out_proj(self.norm(y.view(bsz, self.inner), z, out_dtype=zxbcdt.dtype))


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
