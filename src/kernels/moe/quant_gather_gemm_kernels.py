"""Triton kernels of the quantized slot-bank MoE (launchers and semantics in ``quant_gather_gemm.py``).

Imported only when a kernel is launched (see ``residency.kernels._dispatch``). The weights are read
from the slot bank in their stored form and dequantized in registers with the same fp32 products as
the reference (``quant_formats.py``): NVFP4 ``(e2m1 * e4m3_scale) * global``, FP8 ``e4m3 * scale``,
W4A16 ``(q - z) * scale``. E2M1 and E4M3 codes are decoded with integer and bit operations (no
fp8 types, so the same code runs on sm_80, sm_90 and in the interpreter). Address arithmetic is
int64 and every dimension that can overrun is masked; products and sums are fp32.

``FORMAT``: 0 = nvfp4 (``PACK`` 2 codes per uint8), 1 = fp8 (``PACK`` 1), 2 = w4a16 (``PACK`` 8
codes per int32). ``data`` is ``[slots, N, ceil(K / PACK)]`` words; ``scale`` ``[slots, N, groups]``
(nvfp4: E4M3 bytes; w4a16: float); ``scale2`` the per-tensor fp32 scale of each slot (nvfp4, fp8);
``zero`` ``[slots, ceil(N / 8), groups]`` int32 (asymmetric w4a16).
"""

import triton
import triton.language as tl

NVFP4: tl.constexpr = 0
FP8: tl.constexpr = 1
W4A16: tl.constexpr = 2


@triton.jit
def _e2m1(code):
    # code: int32 in [0, 16): sign bit 3, exponent bits 2..1, mantissa bit 0
    c = code & 7
    e = c >> 1
    m = c & 1
    bits = tl.where(e == 0, m * (126 << 23), ((e + 126) << 23) | (m << 22))
    bits = bits | ((code >> 3) << 31)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _e4m3(byte):
    # byte: int32 in [0, 256): E4M3 (fn): sign, 4 exponent bits (bias 7), 3 mantissa bits; 0x7F/0xFF NaN
    e = (byte >> 3) & 15
    m = byte & 7
    normal = ((e + 120) << 23) | (m << 20)
    sub = (m.to(tl.float32) * 0.001953125).to(tl.int32, bitcast=True)  # m * 2^-9, exact
    bits = tl.where(e == 0, sub, normal) | ((byte >> 7) << 31)
    value = bits.to(tl.float32, bitcast=True)
    return tl.where((e == 15) & (m == 7), float("nan"), value)


@triton.jit
def _dequant_plane(words, i: tl.constexpr, o_n, g_idx, p_scale, stride_sn, p_zero, stride_zn, m_nw, scale2,
                   FORMAT: tl.constexpr, SYMMETRIC: tl.constexpr):
    # fp32 weights of code plane i of a [BN, BW] tile of words; g_idx: [1, BW] group column of each word
    if FORMAT == 1:
        w = _e4m3(words & 255) * scale2
    elif FORMAT == 0:
        code = (words >> (4 * i)) & 15
        s = tl.load(p_scale + o_n[:, None] * stride_sn + g_idx, mask=m_nw, other=0).to(tl.int32)
        w = (_e2m1(code) * _e4m3(s)) * scale2
    else:
        code = (words >> (4 * i)) & 15
        s = tl.load(p_scale + o_n[:, None] * stride_sn + g_idx, mask=m_nw, other=0.0).to(tl.float32)
        if SYMMETRIC:
            z = 8
        else:
            zw = tl.load(p_zero + (o_n[:, None] // 8) * stride_zn + g_idx, mask=m_nw, other=0)
            z = (zw >> ((o_n[:, None] % 8) * 4)) & 15
        w = (code - z).to(tl.float32) * s
    return w


@triton.jit
def moe_quant_gemv_decode_kernel(
    a,  # [rows, K] activations: x (row = pair // k) or h (row = pair)
    data,  # [slots, N, KW] words
    scale,  # [slots, N, groups] (nvfp4: uint8 E4M3; w4a16: float); unused for fp8
    scale2,  # [slots] fp32 (nvfp4, fp8)
    zero,  # [slots, ceil(N / 8), groups] int32 (asymmetric w4a16)
    c,  # [P, N] fp32 output per pair
    topk_ids,  # [P]
    skip,  # [P] uint8, read when HAS_SKIP
    slot_of_expert,  # [E]
    topk_weights,  # [P]
    E,
    N,
    K,
    KW,
    GROUP_W,  # words per scale group (nvfp4: 8; w4a16: group / 8, or KW for one group per row)
    stride_am,
    stride_ak,
    stride_ds,
    stride_dn,
    stride_ss,
    stride_sn,
    stride_s2,
    stride_zs,
    stride_zn,
    stride_cm,
    A_ROW_DIV: tl.constexpr,
    HAS_SKIP: tl.constexpr,
    RELU2: tl.constexpr,
    MUL_WEIGHT: tl.constexpr,
    FORMAT: tl.constexpr,
    PACK: tl.constexpr,
    SYMMETRIC: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    # one program per (pair, BLOCK_N output rows); the K loop walks BLOCK_W words (BLOCK_W * PACK inputs)
    i_p = tl.program_id(0).to(tl.int64)
    i_n = tl.program_id(1).to(tl.int64)
    i_e = tl.load(topk_ids + i_p).to(tl.int64)
    ok = (i_e >= 0) & (i_e < E)
    if HAS_SKIP:
        ok = ok & (tl.load(skip + i_p) == 0)
    i_s = tl.load(slot_of_expert + i_e, mask=ok, other=-1).to(tl.int64)
    if i_s < 0:
        return
    i_m = i_p // A_ROW_DIV
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    m_n = o_n < N
    p_data = data + i_s * stride_ds + o_n[:, None] * stride_dn
    p_scale = scale + i_s * stride_ss
    p_zero = zero + i_s * stride_zs
    s2 = 1.0
    if FORMAT != 2:
        s2 = tl.load(scale2 + i_s * stride_s2).to(tl.float32)
    p_a = a + i_m * stride_am
    b_acc = tl.zeros([BLOCK_N, BLOCK_W], dtype=tl.float32)
    for w0 in range(0, KW, BLOCK_W):
        o_w = w0 + tl.arange(0, BLOCK_W).to(tl.int64)
        m_nw = m_n[:, None] & (o_w < KW)[None, :]
        words = tl.load(p_data + o_w[None, :], mask=m_nw, other=0).to(tl.int32)  # [BN, BW]
        g_idx = (o_w // GROUP_W)[None, :]
        for i in tl.static_range(PACK):
            o_k = o_w * PACK + i
            x = tl.load(p_a + o_k * stride_ak, mask=o_k < K, other=0.0).to(tl.float32)  # [BW]
            w = _dequant_plane(words, i, o_n, g_idx, p_scale, stride_sn, p_zero, stride_zn, m_nw, s2,
                               FORMAT, SYMMETRIC)
            # padding codes past K multiply a zero activation; masked rows were loaded as zeros
            b_acc += tl.where(m_nw, w, 0.0) * x[None, :]
    b_c = tl.sum(b_acc, axis=1)  # [BN]
    if RELU2:
        b_c = tl.maximum(b_c, 0.0)
        b_c = b_c * b_c
    if MUL_WEIGHT:
        b_c = b_c * tl.load(topk_weights + i_p).to(tl.float32)
    tl.store(c + i_p * stride_cm + o_n, b_c, mask=m_n)


@triton.jit
def moe_quant_gemm_prefill_kernel(
    a,  # [rows, K] activations: x (row = pair // k) or h (row = pair)
    data,  # [slots, N, KW] words
    scale,
    scale2,
    zero,
    c,  # [P, N] output per pair
    sorted_pair_ids,  # [num_blocks * BLOCK_M] int32, sentinel P
    block_slot,  # [num_blocks] int32
    num_rows,  # [1] int32
    topk_weights,  # [P]
    N,
    K,
    GROUP,  # K inputs per scale (nvfp4 16; w4a16 group, or K)
    P,
    num_blocks,
    stride_am,
    stride_ak,
    stride_ds,
    stride_dn,
    stride_ss,
    stride_sn,
    stride_s2,
    stride_zs,
    stride_zn,
    stride_cm,
    A_ROW_DIV: tl.constexpr,
    RELU2: tl.constexpr,
    MUL_WEIGHT: tl.constexpr,
    FORMAT: tl.constexpr,
    PACK: tl.constexpr,
    SYMMETRIC: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    SCALE_PER_TILE: tl.constexpr,  # w4a16: each K tile lies in one scale group (BLOCK_K divides GROUP, or one group)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # grouped program order as in the float prefill kernel; each B tile [BK, BN] is dequantized in registers.
    # The dot takes what the compute dtype holds exactly: E4M3 values (fp8), E2M1 x E4M3 block scale (nvfp4:
    # at most 6 significant bits), q - z (w4a16); the per-tensor scale multiplies the fp32 sum after the loop
    # and a w4a16 group scale each tile's fp32 product, so a 16-bit dot rounds no weight.
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_pid_n
    first_m = (pid // group) * GROUP_M
    size_m = tl.minimum(num_blocks - first_m, GROUP_M)
    i_mb = (first_m + (pid % group) % size_m).to(tl.int64)
    i_n = ((pid % group) // size_m).to(tl.int64)
    if i_mb * BLOCK_M >= tl.load(num_rows):
        return
    i_s = tl.load(block_slot + i_mb).to(tl.int64)

    o_m = i_mb * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    o_pair = tl.load(sorted_pair_ids + o_m).to(tl.int64)  # [BM]
    m_m = o_pair < P
    o_row = o_pair // A_ROW_DIV
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    m_n = o_n < N
    p_a = a + o_row[:, None] * stride_am
    p_data = data + i_s * stride_ds + o_n[None, :] * stride_dn
    p_scale = scale + i_s * stride_ss + o_n[None, :] * stride_sn
    p_zero = zero + i_s * stride_zs + (o_n[None, :] // 8) * stride_zn
    s2 = 1.0
    if FORMAT != 2:
        s2 = tl.load(scale2 + i_s * stride_s2).to(tl.float32)
    b_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        o_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        m_k = o_k < K
        m_kn = m_k[:, None] & m_n[None, :]
        b_a = tl.load(p_a + o_k[None, :] * stride_ak, mask=m_m[:, None] & m_k[None, :], other=0.0)  # [BM, BK]
        words = tl.load(p_data + (o_k // PACK)[:, None], mask=m_kn, other=0).to(tl.int32)  # [BK, BN]
        g = (o_k // GROUP)[:, None]
        if FORMAT == 1:
            w = _e4m3(words & 255)
        else:
            code = (words >> ((o_k % PACK) * 4)[:, None].to(tl.int32)) & 15
            if FORMAT == 0:
                s = tl.load(p_scale + g, mask=m_kn, other=0).to(tl.int32)
                w = _e2m1(code) * _e4m3(s)
            else:
                if SYMMETRIC:
                    z = 8
                else:
                    zw = tl.load(p_zero + g, mask=m_kn, other=0)
                    z = (zw >> ((o_n[None, :] % 8) * 4).to(tl.int32)) & 15
                w = (code - z).to(tl.float32)
                if not SCALE_PER_TILE:  # (group sizes no power-of-two tile divides: dequantized, then rounded)
                    w = w * tl.load(p_scale + g, mask=m_kn, other=0.0).to(tl.float32)
        w = tl.where(m_kn, w, 0.0)
        if FORMAT == 2 and SCALE_PER_TILE:
            s = tl.load(p_scale + k0 // GROUP, mask=m_n[None, :], other=0.0).to(tl.float32)  # [1, BN]
            b_acc += tl.dot(b_a.to(COMPUTE_DTYPE), w.to(COMPUTE_DTYPE), input_precision=DOT_PRECISION) * s
        else:
            b_acc = tl.dot(b_a.to(COMPUTE_DTYPE), w.to(COMPUTE_DTYPE), b_acc, input_precision=DOT_PRECISION)
    if FORMAT != 2:
        b_acc = b_acc * s2
    if RELU2:
        b_acc = tl.maximum(b_acc, 0.0)
        b_acc = b_acc * b_acc
    if MUL_WEIGHT:
        b_acc = b_acc * tl.load(topk_weights + o_pair, mask=m_m, other=0.0).to(tl.float32)[:, None]
    p_c = c + o_pair[:, None] * stride_cm + o_n[None, :]
    tl.store(p_c, b_acc.to(c.dtype.element_ty), mask=m_m[:, None] & m_n[None, :])
