"""Triton kernels of the Mamba-2 decode step (see ``step.py`` for the launchers, ``reference.py`` for the math).

Imported only when a kernel is launched, so that importing the package never imports triton.
Both kernels compute in fp32 whatever the storage dtypes (the CPU interpreter computes bf16
wrongly, so tests run fp32 tensors; on the GPU the loads are upcast once).
"""

import triton
import triton.language as tl


@triton.jit
def _softplus(v):
    # softplus(v) = log(1 + e^v) as torch computes it (v above 20 is returned as is); for tiny e^v
    # a short series replaces log(1 + e^v), which loses the digits of e^v in fp32 (no log1p here:
    # the interpreter has no libdevice)
    e = tl.exp(v)
    small = e * (1.0 - e * (0.5 - e * (1.0 / 3.0)))
    return tl.where(v > 20.0, v, tl.where(e < 1e-2, small, tl.log(1.0 + e)))


@triton.jit
def selective_state_update_fwd_kernel(
    state,  # [Bt, H, P, N], updated in place
    x,  # [Bt, H, P]
    dt,  # [Bt, H]
    A_log,  # [H]
    B,  # [Bt, G, N]
    C,  # [Bt, G, N]
    D,  # [H]
    dt_bias,  # [H]
    y,  # [Bt, H, P]
    P,
    N,
    HEADS_PER_GROUP,
    dt_min,
    dt_max,
    stride_s_b, stride_s_h, stride_s_p, stride_s_n,
    stride_x_b, stride_x_h, stride_x_p,
    stride_dt_b, stride_dt_h,
    stride_B_b, stride_B_g, stride_B_n,
    stride_C_b, stride_C_g, stride_C_n,
    stride_y_b, stride_y_h, stride_y_p,
    DT_CLAMP: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # one program per (sequence, head, block of head channels); the whole state row of N in registers
    i_b = tl.program_id(0).to(tl.int64)
    i_h = tl.program_id(1).to(tl.int64)
    i_p = tl.program_id(2).to(tl.int64)
    i_g = i_h // HEADS_PER_GROUP
    o_p = i_p * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)
    o_n = tl.arange(0, BLOCK_N).to(tl.int64)
    m_p = o_p < P
    m_n = o_n < N

    b_dt = tl.load(dt + i_b * stride_dt_b + i_h * stride_dt_h).to(tl.float32)
    b_dt = _softplus(b_dt + tl.load(dt_bias + i_h).to(tl.float32))
    if DT_CLAMP:
        b_dt = tl.minimum(tl.maximum(b_dt, dt_min), dt_max)
    b_decay = tl.exp(-b_dt * tl.exp(tl.load(A_log + i_h).to(tl.float32)))
    b_D = tl.load(D + i_h).to(tl.float32)

    b_x = tl.load(x + i_b * stride_x_b + i_h * stride_x_h + o_p * stride_x_p, mask=m_p, other=0.0).to(tl.float32)
    b_B = tl.load(B + i_b * stride_B_b + i_g * stride_B_g + o_n * stride_B_n, mask=m_n, other=0.0).to(tl.float32)
    b_C = tl.load(C + i_b * stride_C_b + i_g * stride_C_g + o_n * stride_C_n, mask=m_n, other=0.0).to(tl.float32)

    p_s = state + i_b * stride_s_b + i_h * stride_s_h + o_p[:, None] * stride_s_p + o_n[None, :] * stride_s_n
    m_s = m_p[:, None] & m_n[None, :]
    b_s = tl.load(p_s, mask=m_s, other=0.0).to(tl.float32)  # [BLOCK_P, BLOCK_N]
    b_s = b_s * b_decay + (b_dt * b_x)[:, None] * b_B[None, :]
    tl.store(p_s, b_s.to(state.dtype.element_ty), mask=m_s)
    b_y = tl.sum(b_s * b_C[None, :], axis=1) + b_D * b_x  # [BLOCK_P]
    tl.store(y + i_b * stride_y_b + i_h * stride_y_h + o_p * stride_y_p, b_y.to(y.dtype.element_ty), mask=m_p)


@triton.jit
def causal_conv1d_update_fwd_kernel(
    x,  # [B, C]
    conv_state,  # [B, C, K-1], updated in place
    weight,  # [C, K]
    bias,  # [C]
    out,  # [B, C]
    C,
    stride_x_b, stride_x_c,
    stride_s_b, stride_s_c, stride_s_k,
    stride_w_c, stride_w_k,
    stride_o_b, stride_o_c,
    KERNEL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SILU: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # one program per (sequence, block of channels): the K-1 kept inputs and the new one as one
    # [BLOCK_C, BLOCK_K] tile, so every load of the state happens before its shifted store
    i_b = tl.program_id(0).to(tl.int64)
    o_c = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    o_k = tl.arange(0, BLOCK_K).to(tl.int64)
    m_c = o_c < C
    m_old = m_c[:, None] & (o_k[None, :] < KERNEL - 1)
    m_w = m_c[:, None] & (o_k[None, :] < KERNEL)

    p_s = conv_state + i_b * stride_s_b + o_c[:, None] * stride_s_c + o_k[None, :] * stride_s_k
    b_old = tl.load(p_s, mask=m_old, other=0.0)
    b_x = tl.load(x + i_b * stride_x_b + o_c * stride_x_c, mask=m_c, other=0.0).to(conv_state.dtype.element_ty)
    b_full = tl.where(o_k[None, :] == KERNEL - 1, b_x[:, None], b_old)  # [BLOCK_C, BLOCK_K]
    b_w = tl.load(weight + o_c[:, None] * stride_w_c + o_k[None, :] * stride_w_k, mask=m_w, other=0.0)
    b_y = tl.sum(b_full.to(tl.float32) * b_w.to(tl.float32), axis=1)  # [BLOCK_C]
    if HAS_BIAS:
        b_y += tl.load(bias + o_c, mask=m_c, other=0.0).to(tl.float32)
    if SILU:
        b_y = b_y * tl.sigmoid(b_y)
    # shift: input k (1 <= k <= K-1) becomes kept input k-1
    m_new = m_c[:, None] & (o_k[None, :] >= 1) & (o_k[None, :] < KERNEL)
    tl.store(p_s - stride_s_k, b_full, mask=m_new)
    tl.store(out + i_b * stride_o_b + o_c * stride_o_c, b_y.to(out.dtype.element_ty), mask=m_c)
