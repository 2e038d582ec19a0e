"""GPU benchmark of the quantized slot-bank MoE kernel (NVFP4, FP8, W4A16) at Nemotron 3 Super shapes.

    python benchmarks/bench_quant_kernels.py --out docs/benchmarks/quant_kernels

writes ``<out>.json`` (raw numbers) and ``<out>.md`` (tables). Shapes: latent 1024, expert FFN
2688, 512 experts as packed records (``ExpertRecordLayout``, the offload runtime's slot-bank
layout) in a random slot permutation, top-22, bf16 activations; decode token counts 1 to 8 by
default. Per format and token count, ``--routings`` routings (8) over the 512 experts are timed in
turn, so a call reads other experts than the one before rather than what it left in L2; each of
``--repeats`` rounds queues all of them behind a spin kernel between one pair of CUDA events
(``bench_kernels.cuda_time_queued``: GPU time, the host's launch work kept out; that host time per
call is reported beside it), after ``--warmup`` rounds; the median round gives the time per call:

- ``moe_gather_gemm_quant`` (the path ``auto`` picks), checked against the torch reference
  (``moe_gather_gemm_quant_reference``, full dequantization) before it is timed;
- the BF16 ``moe_gather_gemm`` on the same routing with BF16 weights of the same shape (what the
  quantized record saves per token);
- the floor: a device-to-device copy of a 2 GiB tensor (bytes read + written / time).

Achieved bandwidth counts the packed bytes of the distinct experts' records read once plus the
activations in and out. Target (issue 11): at least 70 % of the copy bandwidth at decode.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

import torch
from bench_kernels import SUPER, copy_bandwidth, cuda_time_queued, environment, relative_error, write_report
from residency.kernels import moe_gather_gemm, route
from residency.kernels.moe.quant_formats import ExpertRecordLayout, QuantSpec
from residency.kernels.moe.quant_gather_gemm import moe_gather_gemm_quant
from residency.kernels.moe.quant_reference import moe_gather_gemm_quant_reference

FORMATS = {"nvfp4": QuantSpec("nvfp4"), "fp8": QuantSpec("fp8"), "w4a16": QuantSpec("w4a16", group_size=128)}
TOKENS = (1, 2, 4, 8)
TARGET = 0.70


def random_records(layout: ExpertRecordLayout, count: int, generator: torch.Generator,
                   device: torch.device | str) -> torch.Tensor:
    """``[count, record_bytes]`` uint8 records of random codes with finite, moderate scales.

    NVFP4: block scales E4M3 codes 0x20-0x3f (about 2^-3 .. 2^-2) and a global scale of 1/16; FP8:
    codes without NaN (bit 7 and the exponent's top bit cleared) and a per-tensor scale of 1/64;
    W4A16: group scales 1/64. The activations then stay well inside bf16 through relu^2.
    """
    records = torch.randint(0, 256, (count, layout.record_bytes), dtype=torch.uint8, device=device,
                            generator=generator)
    for proj in ("up", "down"):
        w = layout.projection(records, proj)
        if layout.spec.format == "nvfp4":
            w.scale.view(torch.uint8).copy_(torch.randint(0x20, 0x40, tuple(w.scale.shape), dtype=torch.uint8,
                                                          device=device, generator=generator))
            w.scale2.fill_(1 / 16)
        elif layout.spec.format == "fp8":
            w.data.view(torch.uint8).bitwise_and_(0x77)
            w.scale2.fill_(1 / 64)
        else:
            w.scale.fill_(1 / 64)
    return records


def moved_bytes(layout: ExpertRecordLayout, ids: torch.Tensor, x: torch.Tensor) -> int:
    """Bytes a call must move at least: each distinct expert's record once, the activations in and out."""
    return int(ids.unique().numel()) * layout.record_bytes + 2 * x.numel() * x.element_size()


def bench_format(name: str, spec: QuantSpec, token_counts: list[int], floors: dict, generator: torch.Generator,
                 args: argparse.Namespace, *, device: str = "cuda", shapes: dict = SUPER,
                 timer: Callable[..., dict] = cuda_time_queued) -> list[dict]:
    """The rows of one format (``device``, ``shapes`` and ``timer`` are for the CPU test of this program)."""
    latent, inter, experts, top_k = shapes["latent"], shapes["inter"], shapes["experts"], shapes["top_k"]
    layout = ExpertRecordLayout(spec, inter, latent)
    bank = random_records(layout, experts, generator, device)
    up, down = layout.up(bank), layout.down(bank)
    table = torch.randperm(experts, device=device, generator=generator).to(torch.int32)
    # BF16 weights of the same shape, for the per-token comparison (random: only the time is used)
    bf16_up = torch.randn(experts, inter, latent, device=device, generator=generator).to(torch.bfloat16)
    bf16_down = torch.randn(experts, latent, inter, device=device, generator=generator).to(torch.bfloat16)
    rows = []
    for tokens in token_counts:
        # several routings, timed in turn: each call reads other experts than the one before (22 NVFP4 experts are
        # 68 MB, about the L2 of an H100 / H200, so one routing timed again and again would partly read from L2)
        problems = []
        for _ in range(args.routings):
            logits = torch.randn(tokens, experts, device=device, generator=generator)
            bias = 0.1 * torch.randn(experts, device=device, generator=generator)
            ids, weights = route(logits, bias, top_k, shapes["scaling"])
            x = torch.randn(tokens, latent, device=device, generator=generator).to(torch.bfloat16)
            problems.append((x, up, down, table, ids, weights))
        reference = moe_gather_gemm_quant_reference(*problems[0])
        error = relative_error(moe_gather_gemm_quant(*problems[0]), reference)
        if error > 2e-2:
            raise SystemExit(f"moe_gather_gemm_quant ({name}, {tokens} tokens) differs from the reference by "
                             f"{error:.3g}; not timing a wrong kernel")
        timed = timer([lambda p=p: moe_gather_gemm_quant(*p) for p in problems], args.warmup, args.repeats)
        bf16 = [(p[0], bf16_up, bf16_down, *p[3:]) for p in problems]
        bf16_timed = timer([lambda p=p: moe_gather_gemm(*p) for p in bf16], args.warmup, args.repeats)
        ms, bf16_ms = timed["ms"], bf16_timed["ms"]
        moved = sum(moved_bytes(layout, p[4], p[0]) for p in problems) / len(problems)
        gbps = moved / ms / 1e6
        distinct = sum(int(p[4].unique().numel()) for p in problems) / len(problems)
        rows.append({"format": name, "tokens": tokens, "routings": len(problems), "distinct_experts": distinct,
                     "record_bytes": layout.record_bytes, "bytes": moved, "error": error, "ms": ms,
                     "host_ms": timed["host_ms"], "rounds_with_gaps": timed["rounds_with_gaps"], "gb_per_s": gbps,
                     "copy_fraction": gbps / floors["copy_gb_per_s"],
                     "bf16_ms": bf16_ms, "speedup_vs_bf16": bf16_ms / ms})
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in rows[-1].items()}), flush=True)
    return rows


def markdown(result: dict) -> str:
    env, floors = result["environment"], result["floors"]
    lines = [
        "# Quantized MoE kernel (decode)",
        "",
        f"`benchmarks/bench_quant_kernels.py` on {env['device']}, {env['date']}, torch {env['torch']}, "
        f"triton {env['triton']}, CUDA {env['cuda']}, commit {env['commit']}. Super shapes (latent 1024, "
        "FFN 2688, 512 experts as packed records, top-22), bf16 activations; median of "
        f"{result['repeats']} rounds of {result['routings']} routings timed in turn behind a spin kernel (GPU time per "
        f"call, without the host's launch work: host ms per call beside it) after {result['warmup']} warm-up rounds; "
        "every kernel checked against the torch reference first.",
        "",
        f"Floor measured in the same run: device-to-device copy {floors['copy_gb_per_s']:.0f} GB/s "
        "(read + written).",
        "",
        "| format | tokens | distinct experts | MB per expert | ms | host ms | GB/s | of copy | BF16 ms | x BF16 "
        "| error |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(f"| {r['format']} | {r['tokens']} | {r['distinct_experts']:.1f} | {r['record_bytes'] / 1e6:.2f} | "
                     f"{r['ms']:.3f} | {r['host_ms']:.3f} | {r['gb_per_s']:.0f} | {r['copy_fraction']:.0%} | "
                     f"{r['bf16_ms']:.3f} | "
                     f"{r['speedup_vs_bf16']:.2f} | {r['error']:.1e} |")
    lines += ["", "| target | goal | measured | met |", "|---|---|---|---|"]
    lines += [f"| {t['target']} | {t['goal']:.2f} | {t['value']:.2f} | {'yes' if t['met'] else 'no'} |"
              for t in result["targets"]]
    return "\n".join(lines) + "\n"


def targets(rows: list[dict]) -> list[dict]:
    return [{"target": f"{r['format']} decode {r['tokens']} tok: fraction of copy bandwidth",
             "value": r["copy_fraction"], "goal": TARGET, "met": r["copy_fraction"] >= TARGET}
            for r in rows if r["format"] in ("nvfp4", "fp8")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output path without extension: writes OUT.json and OUT.md")
    parser.add_argument("--tokens", default=",".join(map(str, TOKENS)), help="comma-separated token counts")
    parser.add_argument("--formats", default=",".join(FORMATS), help="comma-separated formats")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--routings", type=int, default=8, help="routings timed in turn (each over other experts)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_quant_kernels.py needs a CUDA GPU and found none (torch.cuda.is_available() is False); "
              "nothing was measured.", file=sys.stderr)
        return 2
    generator = torch.Generator(device="cuda").manual_seed(args.seed)
    floors = {"copy_gb_per_s": copy_bandwidth(args.warmup, args.repeats)}
    token_counts = [int(t) for t in args.tokens.split(",")]
    rows = []
    for name in args.formats.split(","):
        rows += bench_format(name, FORMATS[name], token_counts, floors, generator, args)
    result = {"environment": environment(), "warmup": args.warmup, "repeats": args.repeats,
              "routings": args.routings, "floors": floors,
              "rows": rows, "targets": targets(rows)}
    write_report(args.out, result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
