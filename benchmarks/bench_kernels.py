"""GPU benchmark of the routing and slot-bank MoE kernels at Nemotron 3 Super shapes.

    python benchmarks/bench_kernels.py --out docs/benchmarks/kernels

writes ``<out>.json`` (raw numbers) and ``<out>.md`` (tables). Shapes: latent 1024, expert FFN
2688, 512 experts all resident in a random slot permutation, top-22, bf16; 1 to 2048 tokens.

Measured in the same process, each as the median of ``--repeats`` CUDA-event timings after
``--warmup`` calls (the MoE kernel and its baselines queued behind a spin kernel,
:func:`cuda_time_queued`: the GPU's time without the host's launch work, as autotune times them;
the host time per kernel call is recorded beside it):

- ``moe_gather_gemm`` on the path ``auto`` picks (and on the other path up to 64 tokens);
- baseline "torch loop": one pair of matmuls per hit expert, the way ``transformers`` runs it;
- baseline "gathered bmm": the distinct experts' weights gathered into a batch, tokens padded to the
  busiest expert, two ``torch.bmm``;
- the floor: a device-to-device copy of a 2 GiB tensor (bandwidth = bytes read + written / time)
  and dense bf16 ``torch.matmul`` at the same GEMM shapes (TFLOP/s).

Achieved bandwidth counts the bytes of the distinct experts read once plus the activations in and
out; workspaces are the kernels' own overhead and not counted. Every kernel result is checked
against the torch reference before it is timed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from _machine import git_commit
from residency.kernels import moe_gather_gemm, moe_gather_gemm_reference, route, route_reference
from residency.kernels.moe.tuning import table_for

SUPER = {"latent": 1024, "inter": 2688, "experts": 512, "top_k": 22, "scaling": 5.0}
TOKENS = (1, 2, 4, 8, 64, 512, 2048)


def cuda_time(fn: Callable[[], object], warmup: int, repeats: int) -> float:
    """Median milliseconds of ``fn`` by CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    events = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        events.append((start, end))
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events)


def cuda_time_queued(calls: Sequence[Callable[[], object]], warmup: int, repeats: int) -> dict:
    """GPU milliseconds per call of ``calls`` run in turn, with the host's launch work kept out of the time.

    Timing one call between two events counts the GPU's idle time while the host launches it whenever the
    host's work per call exceeds the kernel's (small decode calls: about as long as the kernel). Here each
    timed round queues every call once between one pair of events, behind a spin kernel
    (``torch.cuda._sleep``) that holds the GPU for twice the time the host took to queue a round, so the
    calls then run back to back. Calls that read different data (routings over other experts) in turn keep
    one call from reading what the previous one left in L2. Returns ``{"ms": median GPU ms per call over
    the rounds, "host_ms": host ms to queue one call, "rounds_with_gaps": rounds the spin did not cover}``: a
    call whose ``host_ms`` exceeds ``ms`` is host-bound when it is launched one at a time (a CUDA graph removes that).
    A round whose start event had passed by the time the host had queued it is run again with the spin doubled.
    """
    for _ in range(warmup):
        for call in calls:
            call()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(1_000_000)
    end.record()
    end.synchronize()
    cycles_per_ms = 1_000_000 / max(start.elapsed_time(end), 1e-3)
    t0 = time.perf_counter()
    for call in calls:
        call()
    host_s = time.perf_counter() - t0
    torch.cuda.synchronize()
    spin = int(cycles_per_ms * max(2e3 * host_s, 0.5))
    per_call, gaps = [], 0
    for _ in range(repeats):
        for _attempt in range(4):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda._sleep(spin)
            start.record()
            for call in calls:
                call()
            queued = not start.query()  # the spin still held the GPU when the round was queued: no launch gaps
            end.record()
            end.synchronize()
            if queued:
                break
            spin *= 2  # the host took longer than the spin (or a call waited for the GPU): again, held longer
        gaps += not queued
        per_call.append(start.elapsed_time(end) / len(calls))
    # rounds_with_gaps: rounds the spin did not cover even when held 8x longer (a call that waits for the GPU on the
    # host, say): their time may include the host's launch work
    return {"ms": statistics.median(per_call), "host_ms": 1e3 * host_s / len(calls), "rounds_with_gaps": gaps}


def copy_bandwidth(warmup: int, repeats: int, nbytes: int = 2 << 30) -> float:
    """Device-to-device copy rate in GB/s, counting the bytes read plus the bytes written."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = cuda_time(lambda: dst.copy_(src), warmup, repeats)
    return 2 * nbytes / ms / 1e6


def matmul_tflops(rows: int, latent: int, inter: int, warmup: int, repeats: int) -> float:
    """Dense bf16 matmul rate at the MoE's two GEMM shapes with ``rows`` rows (TFLOP/s)."""
    a = torch.randn(rows, latent, device="cuda", dtype=torch.bfloat16)
    w_up = torch.randn(latent, inter, device="cuda", dtype=torch.bfloat16)
    h = torch.randn(rows, inter, device="cuda", dtype=torch.bfloat16)
    w_down = torch.randn(inter, latent, device="cuda", dtype=torch.bfloat16)
    ms = cuda_time(lambda: (a @ w_up, h @ w_down), warmup, repeats)
    return 2 * 2 * rows * latent * inter / ms / 1e9


def torch_loop_moe(x, up_bank, down_bank, slot_of_expert, ids, weights) -> torch.Tensor:
    """Baseline: loop over the hit experts, one matmul pair each (the ``transformers`` way)."""
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for expert in ids.unique().tolist():
        tokens, k = torch.where(ids == expert)
        slot = int(slot_of_expert[expert])
        h = torch.relu(x[tokens] @ up_bank[slot].T) ** 2
        y = h @ down_bank[slot].T
        out.index_add_(0, tokens, y.float() * weights[tokens, k, None])
    return out.to(x.dtype)


def gathered_bmm_moe(x, up_bank, down_bank, slot_of_expert, ids, weights) -> torch.Tensor:
    """Baseline: gather the distinct experts into a batch, pad tokens to the busiest one, two bmm."""
    top_k = ids.shape[1]
    experts, group = ids.flatten().unique(return_inverse=True)  # [n], [P]
    order = torch.argsort(group, stable=True)
    counts = torch.bincount(group, minlength=experts.numel())
    first = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=x.device) - first[group[order]]
    tokens = torch.arange(ids.numel(), device=x.device) // top_k
    xs = x.new_zeros(experts.numel(), int(counts.max()), x.shape[1])  # [n, cap, L]
    xs[group, rank] = x[tokens]
    slots = slot_of_expert[experts].long()
    h = torch.relu(torch.bmm(xs, up_bank[slots].transpose(1, 2))) ** 2  # [n, cap, I]
    y = torch.bmm(h, down_bank[slots].transpose(1, 2))  # [n, cap, L]
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    out.index_add_(0, tokens, y[group, rank].float() * weights.flatten()[:, None])
    return out.to(x.dtype)


def floor_ms(moved_bytes: float, flops: float, copy_gb_per_s: float, matmul_tflops: float | None) -> tuple[float, str]:
    """The roofline floor of one call and what bounds it: ``"memory"`` or ``"compute"``.

    Memory time is the bytes at the copy rate measured in the run; compute time is the FLOPs at
    the dense matmul rate measured at the same shapes (unknown below 64 tokens, where no call is
    near compute-bound).
    """
    memory = moved_bytes / copy_gb_per_s / 1e6
    compute = flops / matmul_tflops / 1e9 if matmul_tflops else 0.0
    return (memory, "memory") if memory >= compute else (compute, "compute")


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    scale = expected.float().abs().max().clamp_min(1e-30)
    return float((actual.float() - expected.float()).abs().max() / scale)


def make_inputs(tokens: int, generator: torch.Generator, bank: dict) -> dict:
    """Activations and routing for one token count (routing from random logits and bias)."""
    e, k = SUPER["experts"], SUPER["top_k"]
    logits = torch.randn(tokens, e, device="cuda", generator=generator)
    bias = 0.1 * torch.randn(e, device="cuda", generator=generator)
    ids, weights = route(logits, bias, k, SUPER["scaling"])
    x = torch.randn(tokens, SUPER["latent"], device="cuda", generator=generator).to(torch.bfloat16)
    return {"x": x, "ids": ids, "weights": weights, "logits": logits, "bias": bias, **bank}


def bench_tokens(tokens: int, inputs: dict, floors: dict, args: argparse.Namespace) -> dict:
    """All timings for one token count."""
    latent, inter, top_k = SUPER["latent"], SUPER["inter"], SUPER["top_k"]
    x, ids, weights = inputs["x"], inputs["ids"], inputs["weights"]
    problem = (x, inputs["up"], inputs["down"], inputs["slot_of_expert"], ids, weights)
    w, r = args.warmup, args.repeats
    distinct = int(ids.unique().numel())
    weight_bytes = distinct * 2 * latent * inter * x.element_size()
    moved = weight_bytes + 2 * x.numel() * x.element_size()
    flops = 2 * 2 * ids.numel() * latent * inter
    reference = moe_gather_gemm_reference(*problem)
    row = {"tokens": tokens, "pairs": ids.numel(), "distinct_experts": distinct, "bytes": moved, "flops": flops}

    for path in ("auto", "decode", "prefill"):
        if path != "auto" and (tokens > 64 or path == row.get("auto_path")):
            continue
        out = moe_gather_gemm(*problem, path=path)
        row[f"{path}_error"] = relative_error(out, reference)
        if row[f"{path}_error"] > 2e-2:
            raise SystemExit(f"moe_gather_gemm path={path} at {tokens} tokens differs from the reference by "
                             f"{row[f'{path}_error']:.3g}; not timing a wrong kernel")
        timed = cuda_time_queued([lambda p=path: moe_gather_gemm(*problem, path=p)], w, r)
        row[f"{path}_ms"], row[f"{path}_host_ms"] = timed["ms"], timed["host_ms"]
        if path == "auto":
            table = table_for(x.device, latent, inter, x.dtype)
            row["auto_path"] = table.choose_path(tokens, top_k, SUPER["experts"])
            row["tuning_table"] = table.source
    ms = row["auto_ms"]
    row["gb_per_s"] = moved / ms / 1e6
    row["copy_fraction"] = row["gb_per_s"] / floors["copy_gb_per_s"]
    row["tflops"] = flops / ms / 1e9

    row["torch_loop_error"] = relative_error(torch_loop_moe(*problem), reference)
    # (the same timing as the kernel's; the loop's own waits for the GPU stay in its time, as they would in use)
    row["torch_loop_ms"] = cuda_time_queued([lambda: torch_loop_moe(*problem)], w, r)["ms"]
    row["bmm_error"] = relative_error(gathered_bmm_moe(*problem), reference)
    row["bmm_ms"] = cuda_time_queued([lambda: gathered_bmm_moe(*problem)], w, r)["ms"]
    row["speedup_vs_loop"] = row["torch_loop_ms"] / ms
    row["speedup_vs_bmm"] = row["bmm_ms"] / ms
    if tokens >= 64:
        row["matmul_tflops"] = matmul_tflops(ids.numel(), latent, inter, w, r)
        row["matmul_fraction"] = row["tflops"] / row["matmul_tflops"]
    row["floor_ms"], row["bound"] = floor_ms(moved, flops, floors["copy_gb_per_s"], row.get("matmul_tflops"))
    row["floor_fraction"] = row["floor_ms"] / ms

    logits, bias = inputs["logits"], inputs["bias"]
    row["route_ms"] = cuda_time(lambda: route(logits, bias, top_k, SUPER["scaling"]), w, r)
    row["route_torch_ms"] = cuda_time(lambda: route_reference(logits, bias, top_k, SUPER["scaling"]), w, r)
    return row


def targets(rows: list[dict]) -> list[dict]:
    """The issue's targets, each with the measured value and whether it is met."""
    checks = []

    def check(name: str, value: float, goal: float, attainable: float | None = None) -> None:
        checks.append({"target": name, "value": value, "goal": goal, "met": value >= goal, "attainable": attainable})

    for row in rows:
        if row["auto_path"] == "decode":
            check(f"decode {row['tokens']} tok: fraction of copy bandwidth", row["copy_fraction"], 0.80)
            check(f"decode {row['tokens']} tok: speed-up over the torch loop", row["speedup_vs_loop"], 3.0)
        if row["tokens"] == 2048:
            # at the roofline floor the call would reach flops / floor of the matmul rate, no more
            best = min(1.0, row["flops"] / row["floor_ms"] / 1e9 / row["matmul_tflops"])
            check("prefill 2048 tok: fraction of the bf16 matmul rate", row["matmul_fraction"], 0.50, best)
    return checks


def environment() -> dict:
    """Device, versions, commit and date of this run."""
    import triton

    return {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "shapes": SUPER,
    }


def markdown(result: dict) -> str:
    env, floors = result["environment"], result["floors"]
    lines = [
        "# Kernel benchmark: slot-bank MoE and routing at Nemotron 3 Super shapes",
        "",
        f"Device {env['device']}; torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}; "
        f"commit {env['commit']}; {env['date']}.",
        f"Made by `python benchmarks/bench_kernels.py` (median of {result['repeats']} CUDA-event timings after "
        f"{result['warmup']} warm-up calls). bf16, latent 1024, FFN 2688, 512 experts all resident, top-22.",
        "",
        f"Floors measured in the same run: device-to-device copy {floors['copy_gb_per_s']:.0f} GB/s "
        "(read + write); dense bf16 matmul TFLOP/s per row below.",
        "",
        "| tokens | path | distinct experts | ours ms | floor ms (bound) | of floor | GB/s | of copy | TFLOP/s "
        "| of matmul | torch loop ms | × loop | gathered bmm ms | × bmm | other path ms | route ms | torch route ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        other = "decode" if row["auto_path"] == "prefill" else "prefill"
        cells = [
            row["tokens"], row["auto_path"], row["distinct_experts"], f"{row['auto_ms']:.3f}",
            f"{row['floor_ms']:.3f} ({row['bound']})", f"{row['floor_fraction']:.0%}",
            f"{row['gb_per_s']:.0f}", f"{row['copy_fraction']:.0%}", f"{row['tflops']:.1f}",
            f"{row['matmul_fraction']:.0%} of {row['matmul_tflops']:.0f}" if "matmul_fraction" in row else "",
            f"{row['torch_loop_ms']:.3f}", f"{row['speedup_vs_loop']:.1f}", f"{row['bmm_ms']:.3f}",
            f"{row['speedup_vs_bmm']:.1f}", f"{row[other + '_ms']:.3f} ({other})" if other + "_ms" in row else "",
            f"{row['route_ms']:.3f}", f"{row['route_torch_ms']:.3f}",
        ]  # fmt: skip
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    lines += ["", "| target | goal | measured | met | best possible at the floor |", "|---|---|---|---|---|"]
    lines += [
        f"| {t['target']} | {t['goal']:.2f} | {t['value']:.2f} | {'yes' if t['met'] else 'no'} "
        f"| {'' if t.get('attainable') is None else format(t['attainable'], '.2f')} |"
        for t in result["targets"]
    ]
    lines += [
        "",
        "Floor: the larger of the bytes (distinct experts + activations) at the measured copy rate and the "
        "FLOPs at the measured matmul rate; \"of floor\" is floor / measured time. \"Best possible\" is the "
        "fraction of the matmul rate a call running exactly at its floor would reach.",
    ]
    tables = sorted({row["tuning_table"] for row in result["rows"]})
    lines += ["", f"Tuning table(s) used: {', '.join(f'`{Path(t).name}`' for t in tables)}.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output path without extension: writes OUT.json and OUT.md")
    parser.add_argument("--tokens", default=",".join(map(str, TOKENS)), help="comma-separated token counts")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_kernels.py needs a CUDA GPU and found none (torch.cuda.is_available() is False); "
              "nothing was measured.", file=sys.stderr)  # fmt: skip
        return 2

    generator = torch.Generator(device="cuda").manual_seed(args.seed)
    slots = SUPER["experts"]
    shape_up = (slots, SUPER["inter"], SUPER["latent"])
    bank = {
        "up": (torch.randn(shape_up, device="cuda", generator=generator) / 32).to(torch.bfloat16),
        "down": (torch.randn(slots, SUPER["latent"], SUPER["inter"], device="cuda", generator=generator) / 52)
        .to(torch.bfloat16),
        "slot_of_expert": torch.randperm(slots, device="cuda", generator=generator).to(torch.int32),
    }  # fmt: skip
    floors = {"copy_gb_per_s": copy_bandwidth(args.warmup, args.repeats)}
    rows = []
    for tokens in (int(t) for t in args.tokens.split(",")):
        row = bench_tokens(tokens, make_inputs(tokens, generator, bank), floors, args)
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
        rows.append(row)
    result = {"environment": environment(), "warmup": args.warmup, "repeats": args.repeats, "floors": floors,
              "rows": rows, "targets": targets(rows)}  # fmt: skip
    write_report(args.out, result, markdown(result))
    return 0


def write_report(out: str, result: dict, text: str) -> None:
    """``OUT.json`` (raw numbers) and ``OUT.md`` (tables)."""
    json_path, md_path = Path(out + ".json"), Path(out + ".md")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    md_path.write_text(text)
    print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    sys.exit(main())
