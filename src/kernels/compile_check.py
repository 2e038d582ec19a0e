"""Compile every Triton kernel (float and quantized MoE, router) for CUDA architectures ahead of time, without a GPU.

    python -m residency.kernels.compile_check            # sm_90 and sm_80, prints JSON

The CPU interpreter accepts programs a GPU backend rejects (``tl.dot`` below 16 rows, some
control flow and typing), so the tests also compile each kernel to a cubin with the shipped
default tiles (bf16, Super's 512 experts and top-22), plus the fp32 variant. The compiler is given the
specialisations a real launch gets (16-byte aligned pointers, integers divisible by 16, unit
strides folded to constants), so the code generated is the code a launch would run. Reported per
kernel: shared memory bytes and spill stores (``st.local`` in the PTX).

Run it in a process without ``TRITON_INTERPRET=1``: an interpreted triton cannot compile.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings

EXPERTS, TOP_K = 512, 22
# a kernel may use at most this much shared memory per block (bytes)
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}


def _compile(fn, sig: dict, consts: dict, arch: int, **options) -> dict:
    """Compile ``fn``; ``sig`` types ending in ``D`` (and all pointers) are marked divisible by 16."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = list(sig) + [c for c in consts if c not in sig]
    signature = {n: "constexpr" if n in consts else sig[n].removesuffix("D") for n in names}
    divisible = [n for n in names if n not in consts and (sig[n].startswith("*") or sig[n].endswith("D"))]
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in divisible}
    kernel = triton.compile(
        ASTSource(fn, signature, constexprs=consts, attrs=attrs),
        target=GPUTarget("cuda", arch, 32),
        options=options,
    )
    return {"shared": kernel.metadata.shared, "spills": kernel.asm["ptx"].count("st.local")}


def check(arch: int) -> list[dict]:
    """Compile the router and MoE kernels for ``sm_{arch}``; one record per kernel variant."""
    import triton.language as tl

    from .moe import gather_gemm_kernels as moe
    from .moe.tuning import DEFAULT_TABLE, load_table
    from .routing_kernel import route_fwd_kernel

    results = []

    def record(name: str, fn, sig: dict, consts: dict, **options) -> None:
        results.append({"kernel": name, "arch": arch, **_compile(fn, sig, consts, arch, **options)})

    # "i32D": an integer the launch will see divisible by 16
    for n_group, topk_group in ((1, 1), (8, 4)):  # Super's plain routing, and a group-limited variant
        record(
            f"route.groups{n_group}", route_fwd_kernel,
            {"logits": "*fp32", "bias": "*fp32", "ids": "*i64", "weights": "*fp32", "E": "i32D",
             "GROUP_SIZE": "i32D", "stride_lt": "i32D", "stride_le": "i32", "scaling_factor": "fp32"},
            {"stride_le": 1, "K": TOP_K, "BLOCK_E": EXPERTS, "BLOCK_K": 32, "HAS_BIAS": True, "RENORMALIZE": True,
             "N_GROUP": n_group, "TOPK_GROUP": topk_group, "BLOCK_G": n_group},
        )  # fmt: skip
    table = load_table(DEFAULT_TABLE)
    pair = {"topk_ids": "*i64", "skip": "*u8", "slot_of_expert": "*i32", "topk_weights": "*fp32", "E": "i32D"}
    for tokens, config in table.decode.items():
        for proj, tile, a, row_div in (("up", config.up, "*bf16", TOP_K), ("down", config.down, "*fp32", 1)):
            record(
                f"decode.{tokens}.{proj}", moe.moe_gemv_decode_kernel,
                {"a": a, "b": "*bf16", "c": "*fp32", **pair, "N": "i32D", "D": "i32D", "stride_am": "i32D",
                 "stride_ad": "i32", "stride_bs": "i32D", "stride_bn": "i32D", "stride_bd": "i32", "stride_cm": "i32D"},
                {"stride_ad": 1, "stride_bd": 1, "A_ROW_DIV": row_div, "HAS_SKIP": True, "RELU2": proj == "up",
                 "MUL_WEIGHT": proj == "down", "BLOCK_N": tile.BLOCK_N, "BLOCK_K": tile.BLOCK_K},
                num_warps=tile.num_warps, num_stages=tile.num_stages,
            )  # fmt: skip
    variants = [(tokens, config, "bf16") for tokens, config in table.prefill.items()]
    variants.append(("fp32", table.config("prefill", 16), "fp32"))
    for tokens, config, dtype in variants:
        compute = tl.bfloat16 if dtype == "bf16" else tl.float32
        for proj, tile, a, c, row_div in (("up", config.up, f"*{dtype}", f"*{dtype}", TOP_K),
                                          ("down", config.down, f"*{dtype}", "*fp32", 1)):  # fmt: skip
            record(
                f"prefill.{tokens}.{proj}", moe.moe_gemm_prefill_kernel,
                {"a": a, "b": f"*{dtype}", "c": c, "sorted_pair_ids": "*i32", "block_slot": "*i32", "num_rows": "*i32",
                 "topk_weights": "*fp32", "N": "i32D", "D": "i32D", "P": "i32", "num_blocks": "i32",
                 "stride_am": "i32D", "stride_ad": "i32", "stride_bs": "i32D", "stride_bn": "i32D", "stride_bd": "i32",
                 "stride_cm": "i32D"},
                {"stride_ad": 1, "stride_bd": 1, "A_ROW_DIV": row_div, "RELU2": proj == "up",
                 "MUL_WEIGHT": proj == "down", "COMPUTE_DTYPE": compute,
                 "DOT_PRECISION": "tf32" if dtype == "bf16" else "ieee",
                 "BLOCK_M": config.BLOCK_M, "BLOCK_N": tile.BLOCK_N, "BLOCK_K": tile.BLOCK_K, "GROUP_M": tile.GROUP_M},
                num_warps=tile.num_warps, num_stages=tile.num_stages,
            )  # fmt: skip
    _quant_variants(record, table)
    record(
        "reduce", moe.moe_reduce_kernel,
        {"y": "*fp32", "out": "*bf16", "topk_ids": "*i64", "skip": "*u8", "slot_of_expert": "*i32", "L": "i32D",
         "E": "i32D", "stride_ym": "i32D", "stride_ot": "i32D", "stride_ol": "i32"},
        {"stride_ol": 1, "TOP_K": TOP_K, "HAS_SKIP": True, "BLOCK_N": 128},
    )  # fmt: skip
    return results


def _quant_variants(record, table) -> None:
    """The quantized MoE kernels: decode per format (and W4A16 asymmetric), prefill per format in bf16 (W4A16 with
    its group scales per tile and with dequantized tiles), and NVFP4 prefill in fp32 (8 decode + 10 prefill
    variants)."""
    import triton.language as tl

    from .moe import quant_gather_gemm_kernels as quant

    formats = {  # name: (FORMAT, PACK, data, scale, scale2, zero, symmetric)
        "nvfp4": (0, 2, "*u8", "*u8", "*fp32", "*u8", True),
        "fp8": (1, 1, "*u8", "*u8", "*fp32", "*u8", True),
        "w4a16": (2, 8, "*i32", "*bf16", "*i32", "*i32", True),
        "w4a16-asym": (2, 8, "*i32", "*bf16", "*i32", "*i32", False),
    }
    strides = {"stride_ds": "i32D", "stride_dn": "i32D", "stride_ss": "i32D", "stride_sn": "i32",
               "stride_s2": "i32", "stride_zs": "i32D", "stride_zn": "i32", "stride_cm": "i32D"}
    pair = {"topk_ids": "*i64", "skip": "*u8", "slot_of_expert": "*i32", "topk_weights": "*fp32", "E": "i32D"}
    decode = table.config("decode", 1)
    for name, (fmt, pack, data, scale, scale2, zero, sym) in formats.items():
        for proj, tile, a, row_div in (("up", decode.up, "*bf16", TOP_K), ("down", decode.down, "*fp32", 1)):
            record(
                f"quant.decode.{name}.{proj}", quant.moe_quant_gemv_decode_kernel,
                {"a": a, "data": data, "scale": scale, "scale2": scale2, "zero": zero, "c": "*fp32", **pair,
                 "N": "i32D", "K": "i32D", "KW": "i32D", "GROUP_W": "i32", "stride_am": "i32D", "stride_ak": "i32",
                 **strides},
                {"stride_ak": 1, "A_ROW_DIV": row_div, "HAS_SKIP": True, "RELU2": proj == "up",
                 "MUL_WEIGHT": proj == "down", "FORMAT": fmt, "PACK": pack, "SYMMETRIC": sym,
                 "BLOCK_N": tile.BLOCK_N, "BLOCK_W": max(1, tile.BLOCK_K // pack)},
                num_warps=tile.num_warps, num_stages=tile.num_stages,
            )  # fmt: skip
    prefill = table.config("prefill", 256)
    # (name, dtype, W4A16 scales per tile: the usual groups; dequantized tiles: groups no tile of 16+ divides)
    variants = [("nvfp4", "bf16", False), ("fp8", "bf16", False), ("w4a16-asym", "bf16", True),
                ("w4a16-asym", "bf16", False), ("nvfp4", "fp32", False)]
    for name, dtype, per_tile in variants:
        fmt, pack, data, scale, scale2, zero, sym = formats[name]
        compute = tl.bfloat16 if dtype == "bf16" else tl.float32
        label = f"{name}.{dtype}" + (".dequantized-tiles" if fmt == 2 and not per_tile else "")
        for proj, tile, a, c, row_div in (("up", prefill.up, f"*{dtype}", f"*{dtype}", TOP_K),
                                          ("down", prefill.down, f"*{dtype}", "*fp32", 1)):  # fmt: skip
            record(
                f"quant.prefill.{label}.{proj}", quant.moe_quant_gemm_prefill_kernel,
                {"a": a, "data": data, "scale": scale, "scale2": scale2, "zero": zero, "c": c,
                 "sorted_pair_ids": "*i32", "block_slot": "*i32", "num_rows": "*i32", "topk_weights": "*fp32",
                 "N": "i32D", "K": "i32D", "GROUP": "i32D", "P": "i32", "num_blocks": "i32", "stride_am": "i32D",
                 "stride_ak": "i32", **strides},
                {"stride_ak": 1, "A_ROW_DIV": row_div, "RELU2": proj == "up", "MUL_WEIGHT": proj == "down",
                 "FORMAT": fmt, "PACK": pack, "SYMMETRIC": sym, "COMPUTE_DTYPE": compute,
                 "DOT_PRECISION": "tf32" if dtype == "bf16" else "ieee", "SCALE_PER_TILE": per_tile,
                 "BLOCK_M": prefill.BLOCK_M,
                 "BLOCK_N": tile.BLOCK_N, "BLOCK_K": tile.BLOCK_K, "GROUP_M": tile.GROUP_M},
                num_warps=tile.num_warps, num_stages=tile.num_stages,
            )  # fmt: skip


def main(argv: list[str] | None = None, checks=None, description: str | None = None) -> int:
    """Compile the kernels of ``checks`` (default this module's :func:`check`) and print the JSON report."""
    parser = argparse.ArgumentParser(description=description or __doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, action="append", help="CUDA compute capability x10 (default 90 and 80)")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    results = [r for arch in args.arch or [90, 80] for fn in (checks or [check]) for r in fn(arch)]
    over = [r for r in results if r["shared"] > SHARED_LIMIT.get(r["arch"], 0) or r["spills"]]
    print(json.dumps({"results": results, "problems": over}, indent=1))
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
