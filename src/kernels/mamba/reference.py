"""Torch references of the Mamba-2 decode step: the semantics the Triton kernels match, and the CPU path.

One decode step of a Mamba-2 mixer, for each sequence b of the batch:

- Causal conv update (depthwise, kernel K): with the last K-1 inputs of every channel kept in
  ``conv_state [B, C, K-1]`` (oldest first),
  ``out[b, c] = bias[c] + sum_{k<K-1} w[c, k] * state[b, c, k] + w[c, K-1] * x[b, c]``, then SiLU;
  the state shifts left by one and ``x`` becomes its last column.
- Selective state update, per head h of group ``g = h // (H / G)``:
  ``dt = softplus(dt_raw + dt_bias)`` (clamped to ``dt_limit`` unless it is ``(0, inf)``),
  ``A = -exp(A_log)``, ``S = exp(dt * A) * S + dt * x ⊗ B[g]`` and ``y = S @ C[g] + D * x``.
  Everything is computed in fp32; the state is updated in place and keeps its dtype.

Both equal the chunked scan of ``residency.model.mamba`` run on one token.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

NO_LIMIT = (0.0, math.inf)


def _f32(t: torch.Tensor) -> torch.Tensor:
    # skip the no-op conversion: on CPU every aten call counts against the decode step
    return t if t.dtype == torch.float32 else t.float()


def causal_conv1d_update_reference(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    silu: bool = True,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """One step of a depthwise causal conv: ``x [B, C]``, ``conv_state [B, C, K-1]`` (updated in place),
    ``weight [C, K]``, ``bias [C]``; returns ``[B, C]`` in x's dtype (or ``out``)."""
    xs = x if x.dtype == conv_state.dtype else x.to(conv_state.dtype)
    full = torch.cat([conv_state, xs.unsqueeze(-1)], dim=-1)  # [B, C, K]
    y = (_f32(full) * _f32(weight)).sum(-1)
    if bias is not None:
        y = y + _f32(bias)
    if silu:
        y = F.silu(y)
    conv_state.copy_(full[..., 1:])
    if out is not None:
        return out.copy_(y)
    return y if y.dtype == x.dtype else y.to(x.dtype)


def selective_state_update_reference(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A_log: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    dt_bias: torch.Tensor,
    *,
    dt_limit: tuple[float, float] = NO_LIMIT,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """One recurrent step of the selective scan; see the module docstring.

    Shapes: ``state [Bt, H, P, N]`` (updated in place), ``x [Bt, H, P]``, ``dt [Bt, H]`` (before the
    bias and softplus), ``A_log, D, dt_bias [H]``, ``B, C [Bt, G, N]`` with G dividing H. Returns
    ``y [Bt, H, P]`` fp32 (or ``out``).
    """
    bsz, heads, hd = x.shape
    groups, nstate = B.shape[1], B.shape[2]
    rep = heads // groups
    dtf = F.softplus(_f32(dt) + _f32(dt_bias))  # [Bt, H]
    if tuple(dt_limit) != NO_LIMIT:
        dtf = dtf.clamp(min=dt_limit[0], max=dt_limit[1])
    decay = torch.exp(dtf * -torch.exp(_f32(A_log))).view(bsz, groups, rep, 1, 1)
    xf = _f32(x)
    dx = (xf * dtf.unsqueeze(-1)).view(bsz, groups, rep, hd, 1)
    Bg = _f32(B).view(bsz, groups, 1, 1, nstate)
    # heads of one group are adjacent: view them as [Bt, G, H/G, ...] instead of repeating B and C
    s = state.view(bsz, groups, rep, hd, nstate)
    if state.dtype == torch.float32:
        new = s.mul_(decay).addcmul_(dx, Bg)
    else:  # a low-precision state: update in fp32, store once
        new = torch.addcmul(s * decay, dx, Bg)
        s.copy_(new)
    y = torch.einsum("bgrpn,bgn->bgrp", new, _f32(C)).reshape(bsz, heads, hd)
    y = torch.addcmul(y, xf, _f32(D).unsqueeze(-1))
    if out is None:
        return y
    return out.copy_(y)
