"""Triton kernels of the slot-bank MoE (launchers and semantics in ``gather_gemm.py``).

Imported only when a kernel is launched, so that importing the package never imports triton
(see ``residency.kernels._dispatch``). Every kernel takes ``[slots, N, D]`` weight banks with
explicit strides, does all address arithmetic in int64 (slot x slot stride passes 2^31 for a real
bank), masks every dimension that can overrun, and accumulates in fp32.
"""

import triton
import triton.language as tl


@triton.jit
def moe_gemv_decode_kernel(
    a,  # [rows, D] activations: x (row = pair // k) or h (row = pair)
    b,  # [slots, N, D] weight bank
    c,  # [P, N] fp32 output per pair
    topk_ids,  # [P]
    skip,  # [P] uint8, read when HAS_SKIP
    slot_of_expert,  # [E]
    topk_weights,  # [P]
    E,
    N,
    D,
    stride_am,
    stride_ad,
    stride_bs,
    stride_bn,
    stride_bd,
    stride_cm,
    A_ROW_DIV: tl.constexpr,
    HAS_SKIP: tl.constexpr,
    RELU2: tl.constexpr,
    MUL_WEIGHT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # one program per (pair, BLOCK_N output rows); products and sums in fp32
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
    p_b = b + i_s * stride_bs + o_n[:, None] * stride_bn
    # a 2-D accumulator defers the cross-lane sum to the end of the loop
    b_acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_K):
        o_d = d0 + tl.arange(0, BLOCK_K).to(tl.int64)
        m_d = o_d < D
        b_a = tl.load(a + i_m * stride_am + o_d * stride_ad, mask=m_d, other=0.0).to(tl.float32)  # [BK]
        b_w = tl.load(p_b + o_d[None, :] * stride_bd, mask=m_n[:, None] & m_d[None, :], other=0.0)  # [BN, BK]
        b_acc += b_w.to(tl.float32) * b_a[None, :]
    b_c = tl.sum(b_acc, axis=1)  # [BN]
    if RELU2:
        b_c = tl.maximum(b_c, 0.0)
        b_c = b_c * b_c
    if MUL_WEIGHT:
        b_c = b_c * tl.load(topk_weights + i_p).to(tl.float32)
    tl.store(c + i_p * stride_cm + o_n, b_c, mask=m_n)


@triton.jit
def moe_gemm_prefill_kernel(
    a,  # [rows, D] activations: x (row = pair // k) or h (row = pair)
    b,  # [slots, N, D] weight bank
    c,  # [P, N] output per pair
    sorted_pair_ids,  # [num_blocks * BLOCK_M] int32, sentinel P
    block_slot,  # [num_blocks] int32
    num_rows,  # [1] int32
    topk_weights,  # [P]
    N,
    D,
    P,
    num_blocks,
    stride_am,
    stride_ad,
    stride_bs,
    stride_bn,
    stride_bd,
    stride_cm,
    A_ROW_DIV: tl.constexpr,
    RELU2: tl.constexpr,
    MUL_WEIGHT: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # grouped program order: GROUP_M row blocks share each column sweep, for L2 reuse of x rows
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
    p_b = b + i_s * stride_bs + o_n[None, :] * stride_bn
    b_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_K):
        o_d = d0 + tl.arange(0, BLOCK_K).to(tl.int64)
        m_d = o_d < D
        b_a = tl.load(p_a + o_d[None, :] * stride_ad, mask=m_m[:, None] & m_d[None, :], other=0.0)  # [BM, BK]
        b_b = tl.load(p_b + o_d[:, None] * stride_bd, mask=m_d[:, None] & m_n[None, :], other=0.0)  # [BK, BN]
        b_acc = tl.dot(b_a.to(COMPUTE_DTYPE), b_b.to(COMPUTE_DTYPE), b_acc, input_precision=DOT_PRECISION)
    if RELU2:
        b_acc = tl.maximum(b_acc, 0.0)
        b_acc = b_acc * b_acc
    if MUL_WEIGHT:
        b_acc = b_acc * tl.load(topk_weights + o_pair, mask=m_m, other=0.0).to(tl.float32)[:, None]
    p_c = c + o_pair[:, None] * stride_cm + o_n[None, :]
    tl.store(p_c, b_acc.to(c.dtype.element_ty), mask=m_m[:, None] & m_n[None, :])


@triton.jit
def moe_reduce_kernel(
    y,  # [P, L] fp32 weighted pair outputs
    out,  # [T, L]
    topk_ids,  # [T, TOP_K]
    skip,  # [T, TOP_K] uint8, read when HAS_SKIP
    slot_of_expert,  # [E]
    L,
    E,
    stride_ym,
    stride_ot,
    stride_ol,
    TOP_K: tl.constexpr,
    HAS_SKIP: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # one program per (token, BLOCK_N columns); pairs added in order j = 0..TOP_K-1
    i_t = tl.program_id(0).to(tl.int64)
    i_n = tl.program_id(1).to(tl.int64)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    m_n = o_n < L
    b_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for j in range(TOP_K):
        i_p = i_t * TOP_K + j
        i_e = tl.load(topk_ids + i_p).to(tl.int64)
        active = i_e >= 0
        if HAS_SKIP:
            active = active & (tl.load(skip + i_p) == 0)
        i_s = tl.load(slot_of_expert + i_e, mask=active & (i_e < E), other=-1)
        # a column bound of 0 masks the whole row (the interpreter mis-types scalar bools splatted into masks)
        n_cols = tl.where(active & (i_s >= 0), L, 0)
        b_acc += tl.load(y + i_p * stride_ym + o_n, mask=o_n < n_cols, other=0.0)
        # an active pair with no slot was never computed: poison the row rather than drop it
        b_acc = tl.where(active & (i_s < 0), float("nan"), b_acc)
    tl.store(out + i_t * stride_ot + o_n * stride_ol, b_acc.to(out.dtype.element_ty), mask=m_n)
