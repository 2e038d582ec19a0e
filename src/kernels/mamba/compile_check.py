"""Compile the Mamba-2 decode-step and RMS-norm kernels for CUDA architectures ahead of time, without a GPU.

    python -m residency.kernels.mamba.compile_check      # sm_90 and sm_80, prints JSON

The companion of ``residency.kernels.compile_check`` (router and MoE kernels), with the same
compiler settings, at Nemotron 3 Super's shapes: state update for 64 head channels x 128 states
in tiles of 16 (bf16 and fp32 inputs, fp32 state, with and without the dt clamp), conv update of
10240 channels with kernel 4, the block RMS norm over 4096 and the gated norm over groups of 1024.
Reported per kernel: shared memory bytes and spill stores. Run it without ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import sys

from .. import compile_check
from ..compile_check import _compile


def check(arch: int) -> list[dict]:
    """One record per kernel variant compiled for ``sm_{arch}``."""
    from .. import norms_kernel
    from . import step_kernels

    results = []

    def record(name: str, fn, sig: dict, consts: dict, **options) -> None:
        results.append({"kernel": name, "arch": arch, **_compile(fn, sig, consts, arch, **options)})

    unit = ("stride_s_n", "stride_x_p", "stride_dt_h", "stride_B_n", "stride_C_n")
    strides = ("stride_s_b", "stride_s_h", "stride_s_p", "stride_x_b", "stride_x_h", "stride_dt_b", "stride_B_b",
               "stride_B_g", "stride_C_b", "stride_C_g", "stride_y_b", "stride_y_h", "stride_y_p")
    for dtype in ("bf16", "fp32"):
        for clamp in (False, True):
            record(
                f"selective_state_update.{dtype}{'.clamp' if clamp else ''}",
                step_kernels.selective_state_update_fwd_kernel,
                {"state": "*fp32", "x": f"*{dtype}", "dt": f"*{dtype}", "A_log": f"*{dtype}", "B": f"*{dtype}",
                 "C": f"*{dtype}", "D": f"*{dtype}", "dt_bias": f"*{dtype}", "y": "*fp32", "P": "i32D", "N": "i32D",
                 "HEADS_PER_GROUP": "i32D", "dt_min": "fp32", "dt_max": "fp32", **dict.fromkeys(strides, "i32D"),
                 **dict.fromkeys(unit, "i32")},
                {**dict.fromkeys(unit, 1), "DT_CLAMP": clamp, "BLOCK_P": 16, "BLOCK_N": 128},
                num_warps=4,
            )  # fmt: skip
        record(
            f"causal_conv1d_update.{dtype}", step_kernels.causal_conv1d_update_fwd_kernel,
            {"x": f"*{dtype}", "conv_state": f"*{dtype}", "weight": f"*{dtype}", "bias": f"*{dtype}",
             "out": f"*{dtype}", "C": "i32D", "stride_x_b": "i32D", "stride_x_c": "i32", "stride_s_b": "i32D",
             "stride_s_c": "i32", "stride_s_k": "i32", "stride_w_c": "i32", "stride_w_k": "i32", "stride_o_b": "i32D",
             "stride_o_c": "i32"},
            {"stride_x_c": 1, "stride_s_k": 1, "stride_w_k": 1, "stride_o_c": 1, "KERNEL": 4, "HAS_BIAS": True,
             "SILU": True, "BLOCK_C": 256, "BLOCK_K": 4},
            num_warps=4,
        )  # fmt: skip
    norms = (("rms_norm", "*bf16", False, 4096, 16), ("gated_rms_norm", "*fp32", True, 1024, 4))
    for name, y, gate, block, warps in norms:
        record(
            name, norms_kernel.group_rms_norm_fwd_kernel,
            {"y": y, "z": "*bf16", "weight": "*bf16", "out": "*bf16", "GROUP_SIZE": "i32D", "stride_y_r": "i32D",
             "stride_z_r": "i32D", "stride_o_r": "i32D", "eps": "fp32"},
            {"HAS_Z": gate, "BLOCK": block},
            num_warps=warps,
        )  # fmt: skip
    return results


def main(argv: list[str] | None = None) -> int:
    return compile_check.main(argv, checks=[check], description=__doc__.split("\n\n")[0])


if __name__ == "__main__":
    sys.exit(main())
