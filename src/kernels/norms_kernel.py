"""Triton group RMS norm kernel, optionally gated by ``silu(z)`` (see ``norms.py`` for the semantics).

Imported only when a kernel is launched, so that importing the package never imports triton.
"""

import triton
import triton.language as tl


@triton.jit
def group_rms_norm_fwd_kernel(
    y,  # [R, I], last dim contiguous
    z,  # [R, I]
    weight,  # [I]
    out,  # [R, I], contiguous
    GROUP_SIZE,
    stride_y_r,
    stride_z_r,
    stride_o_r,
    eps,
    HAS_Z: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # one program per (row, group): the group is read once, reduced in fp32, scaled and written
    i_r = tl.program_id(0).to(tl.int64)
    i_g = tl.program_id(1).to(tl.int64)
    o = tl.arange(0, BLOCK).to(tl.int64)
    m = o < GROUP_SIZE
    o_c = i_g * GROUP_SIZE + o
    b_u = tl.load(y + i_r * stride_y_r + o_c, mask=m, other=0.0).to(tl.float32)
    if HAS_Z:
        b_z = tl.load(z + i_r * stride_z_r + o_c, mask=m, other=0.0).to(tl.float32)
        b_u = b_u * (b_z * tl.sigmoid(b_z))
    b_ms = tl.sum(b_u * b_u, axis=0) / GROUP_SIZE
    b_u = b_u * (1.0 / tl.sqrt(b_ms + eps))
    b_u = b_u * tl.load(weight + o_c, mask=m, other=0.0).to(tl.float32)
    tl.store(out + i_r * stride_o_r + o_c, b_u.to(out.dtype.element_ty), mask=m)
