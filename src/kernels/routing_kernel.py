"""Triton router kernel (see ``routing.py`` for the semantics and the launcher).

Imported only when a kernel is launched, so that importing the package never imports triton:
``triton.jit`` and triton's own library functions bind to the compiler or to the interpreter
according to ``TRITON_INTERPRET`` at the moment triton is first imported.
"""

import triton
import triton.language as tl


@triton.jit
def route_fwd_kernel(
    logits,  # [T, E]
    bias,  # [E]
    ids,  # [T, K] int64, contiguous
    weights,  # [T, K] fp32, contiguous
    E,
    GROUP_SIZE,
    stride_lt,
    stride_le,
    scaling_factor,
    K: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    N_GROUP: tl.constexpr,
    TOPK_GROUP: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    # one program per token: all E scores in registers, then K rounds of argmax
    i_t = tl.program_id(0).to(tl.int64)
    o_e = tl.arange(0, BLOCK_E)
    m_e = o_e < E
    b_l = tl.load(logits + i_t * stride_lt + o_e.to(tl.int64) * stride_le, mask=m_e, other=0.0).to(tl.float32)
    b_s = tl.sigmoid(b_l)  # [BLOCK_E]
    b_c = b_s
    if HAS_BIAS:
        b_c = b_c + tl.load(bias + o_e, mask=m_e, other=0.0).to(tl.float32)

    # an explicit "still available" mask keeps the choice exact even when biased scores are -inf
    m_avail = m_e
    if N_GROUP > 1:
        # group-limited routing: a group scores the sum of its two best biased scores; only the
        # experts of the TOPK_GROUP best groups stay available (lower group index first on ties)
        grp = o_e // GROUP_SIZE
        o_g = tl.arange(0, BLOCK_G)
        b_gs = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
        for g in tl.static_range(N_GROUP):
            m_g = m_e & (grp == g)
            v1 = tl.max(tl.where(m_g, b_c, float("-inf")), axis=0)
            i1 = tl.min(tl.where(m_g & (b_c == v1), o_e, BLOCK_E), axis=0)
            v2 = tl.max(tl.where(m_g & (o_e != i1), b_c, float("-inf")), axis=0)
            b_gs = tl.where(o_g == g, v1 + v2, b_gs)
        m_gavail = o_g < N_GROUP
        m_keep = o_e < 0
        for _ in tl.static_range(TOPK_GROUP):
            g_max = tl.max(tl.where(m_gavail, b_gs, float("-inf")), axis=0)
            i_g = tl.min(tl.where(m_gavail & (b_gs == g_max), o_g, BLOCK_G), axis=0)
            m_keep = m_keep | (grp == i_g)
            m_gavail = m_gavail & (o_g != i_g)
        m_avail = m_avail & m_keep

    o_k = tl.arange(0, BLOCK_K)
    b_ids = tl.zeros([BLOCK_K], dtype=tl.int32)
    b_w = tl.zeros([BLOCK_K], dtype=tl.float32)
    for j in range(K):
        b_max = tl.max(tl.where(m_avail, b_c, float("-inf")), axis=0)
        # lowest index among the maxima
        i_e = tl.min(tl.where(m_avail & (b_c == b_max), o_e, BLOCK_E), axis=0)
        w = tl.sum(tl.where(o_e == i_e, b_s, 0.0), axis=0)
        b_ids = tl.where(o_k == j, i_e, b_ids)
        b_w = tl.where(o_k == j, w, b_w)
        m_avail = m_avail & (o_e != i_e)
    if RENORMALIZE:
        b_w = b_w / (tl.sum(b_w, axis=0) + 1e-20)
    b_w = b_w * scaling_factor
    m_k = o_k < K
    tl.store(ids + i_t * K + o_k, b_ids.to(tl.int64), mask=m_k)
    tl.store(weights + i_t * K + o_k, b_w, mask=m_k)
