"""Launchers of the Mamba-2 decode-step kernels: selective state update and causal conv update.

The recurrent (one-token) forms of the two Mamba-2 sequence ops, beside the chunked scan that
prefill uses (``residency.model.mamba.ssd_scan``). Semantics: ``reference.py``. Each function runs
Triton on CUDA tensors (or under ``TRITON_INTERPRET=1``) and the torch reference otherwise, as
``residency.kernels`` decides for every kernel. Input checks look at shapes, dtypes and devices
only, so a launch never waits for the GPU and can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch

from .._dispatch import cdiv, next_power_of_2, use_triton
from .reference import NO_LIMIT, causal_conv1d_update_reference, selective_state_update_reference

# state elements per program of the state update: 16 head channels x 128 states for Super
STATE_TILE = 2048
CONV_BLOCK_C = 256


def selective_state_update(
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
    backend: str | None = None,
) -> torch.Tensor:
    """One Mamba-2 recurrent step: ``S = exp(dt·A)·S + dt·x⊗B``, ``y = S·C + D·x``, ``dt = softplus(dt + dt_bias)``.

    Args:
        state: ``[Bt, H, P, N]`` SSM state (fp32 for Nemotron-H), updated in place.
        x: ``[Bt, H, P]`` the step's input per head.
        dt: ``[Bt, H]`` time step before the bias and softplus.
        A_log: ``[H]``; ``A = -exp(A_log)``.
        B, C: ``[Bt, G, N]``; head h reads group ``h // (H / G)`` (G divides H).
        D: ``[H]`` skip weight. dt_bias: ``[H]``.
        dt_limit: ``(min, max)`` clamp of dt after the softplus; ``(0, inf)`` (the default) is none.
        out: optional ``[Bt, H, P]`` output (any float dtype); every element is written.
        backend: ``"auto"``, ``"triton"``, ``"torch"``, or None for the library-wide setting.

    Returns:
        ``y [Bt, H, P]``, fp32 unless ``out`` is given.
    """
    _check_state_update(state, x, dt, A_log, B, C, D, dt_bias, out)
    if not use_triton(backend, state, x, dt, B, C):
        return selective_state_update_reference(state, x, dt, A_log, B, C, D, dt_bias, dt_limit=dt_limit, out=out)
    bsz, heads, hd = x.shape
    groups, nstate = B.shape[1], B.shape[2]
    if out is None:
        out = torch.empty(bsz, heads, hd, dtype=torch.float32, device=x.device)
    if out.numel() == 0:
        return out
    from .step_kernels import selective_state_update_fwd_kernel

    block_n = next_power_of_2(nstate)
    block_p = min(next_power_of_2(hd), max(1, STATE_TILE // block_n))
    lo, hi = float(dt_limit[0]), float(dt_limit[1])
    selective_state_update_fwd_kernel[(bsz, heads, cdiv(hd, block_p))](
        state, x, dt, A_log, B, C, D, dt_bias, out,
        hd, nstate, heads // groups, lo, hi,
        *state.stride(), *x.stride(), *dt.stride(), *B.stride(), *C.stride(), *out.stride(),
        DT_CLAMP=(lo, hi) != NO_LIMIT, BLOCK_P=block_p, BLOCK_N=block_n,
        num_warps=4 if block_p * block_n >= 1024 else 1,
    )  # fmt: skip
    return out


def causal_conv1d_update(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    silu: bool = True,
    *,
    out: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """One step of a depthwise causal conv over channels, continuing from the kept inputs.

    Args:
        x: ``[B, C]`` this step's input.
        conv_state: ``[B, C, K-1]`` the last K-1 inputs per channel (oldest first); shifted in place
            (x becomes the newest).
        weight: ``[C, K]`` taps, the last one for the current input (``conv1d.weight[:, 0]``).
        bias: ``[C]`` or None.
        silu: apply SiLU to the output.
        out: optional ``[B, C]`` output; default a new tensor of x's dtype.
        backend: ``"auto"``, ``"triton"``, ``"torch"``, or None for the library-wide setting.
    """
    _check_conv_update(x, conv_state, weight, bias, out)
    if not use_triton(backend, x, conv_state, weight):
        return causal_conv1d_update_reference(x, conv_state, weight, bias, silu, out=out)
    bsz, channels = x.shape
    kernel = weight.shape[1]
    if out is None:
        out = torch.empty_like(x)
    if out.numel() == 0:
        return out
    from .step_kernels import causal_conv1d_update_fwd_kernel

    block_c = min(CONV_BLOCK_C, next_power_of_2(channels))
    causal_conv1d_update_fwd_kernel[(bsz, cdiv(channels, block_c))](
        x, conv_state, weight, weight if bias is None else bias, out, channels,
        *x.stride(), *conv_state.stride(), *weight.stride(), *out.stride(),
        KERNEL=kernel, HAS_BIAS=bias is not None, SILU=bool(silu), BLOCK_C=block_c,
        BLOCK_K=next_power_of_2(kernel), num_warps=4 if block_c >= 128 else 1,
    )  # fmt: skip
    return out


def _check_state_update(state, x, dt, A_log, B, C, D, dt_bias, out) -> None:
    if x.dim() != 3:
        raise ValueError(f"x must be [batch, heads, head_dim], got {tuple(x.shape)}")
    bsz, heads, hd = x.shape
    if state.dim() != 4 or tuple(state.shape[:3]) != (bsz, heads, hd):
        raise ValueError(f"state must be [batch={bsz}, heads={heads}, head_dim={hd}, N], got {tuple(state.shape)}")
    nstate = state.shape[3]
    if tuple(dt.shape) != (bsz, heads):
        raise ValueError(f"dt must be [batch={bsz}, heads={heads}], got {tuple(dt.shape)}")
    if B.dim() != 3 or B.shape[0] != bsz or B.shape[2] != nstate or B.shape[1] < 1 or heads % B.shape[1]:
        raise ValueError(f"B must be [batch={bsz}, groups dividing {heads} heads, N={nstate}], got {tuple(B.shape)}")
    if C.shape != B.shape:
        raise ValueError(f"C must be shaped like B {tuple(B.shape)}, got {tuple(C.shape)}")
    for name, t in (("A_log", A_log), ("D", D), ("dt_bias", dt_bias)):
        if tuple(t.shape) != (heads,):
            raise ValueError(f"{name} must be [heads={heads}], got {tuple(t.shape)}")
    if out is not None and tuple(out.shape) != (bsz, heads, hd):
        raise ValueError(f"out must be [{bsz}, {heads}, {hd}], got {tuple(out.shape)}")
    _same_device(x, state, dt, A_log, B, C, D, dt_bias, out)


def _check_conv_update(x, conv_state, weight, bias, out) -> None:
    if x.dim() != 2:
        raise ValueError(f"x must be [batch, channels], got {tuple(x.shape)}")
    bsz, channels = x.shape
    if weight.dim() != 2 or weight.shape[0] != channels or weight.shape[1] < 2:
        raise ValueError(f"weight must be [channels={channels}, K >= 2], got {tuple(weight.shape)}")
    kernel = weight.shape[1]
    if tuple(conv_state.shape) != (bsz, channels, kernel - 1):
        raise ValueError(f"conv_state must be [{bsz}, {channels}, K-1={kernel - 1}], got {tuple(conv_state.shape)}")
    if bias is not None and tuple(bias.shape) != (channels,):
        raise ValueError(f"bias must be [channels={channels}], got {tuple(bias.shape)}")
    if out is not None and out.shape != x.shape:
        raise ValueError(f"out must be shaped like x {tuple(x.shape)}, got {tuple(out.shape)}")
    _same_device(x, conv_state, weight, bias, out)


def _same_device(first: torch.Tensor, *rest: torch.Tensor | None) -> None:
    for t in rest:
        if t is not None and t.device != first.device:
            raise ValueError(f"all inputs must be on {first.device}; found one on {t.device}")
