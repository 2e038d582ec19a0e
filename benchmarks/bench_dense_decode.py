"""Decode step of a Nemotron 3 Super-shaped stack: eager vs CUDA graph against the memory floor; ops per step.

    python benchmarks/bench_dense_decode.py --out docs/benchmarks/dense_decode     # needs a CUDA GPU
    python benchmarks/bench_dense_decode.py --count-ops docs/benchmarks/decode_ops  # CPU, tiny model

GPU mode builds the real 88-layer pattern with Super's dimensions (hidden 4096, 128 Mamba heads
of 64 with 8 groups and state 128, 32/2 attention heads of 128, shared expert 5376, latent 1024,
vocabulary 131072), bf16, random weights on the device, with few routed experts so that it fits
one GPU. Variants: ``experts-22`` (22 experts per layer, top-22: every expert read once per
token, the real model's expert traffic) and ``dense`` (one expert, top-1: the dense path alone
plus one expert per layer). For each: the decode step at ``--context`` tokens of KV cache, timed
eagerly and replayed from a CUDA graph (``DecodeGraphs`` mode ``full``), as the median of CUDA-event
timings; the floor = bytes the step must read and write (weights once, KV cache, Mamba state) /
the device-to-device copy rate measured in the same run; kernels per step from the profiler;
host syncs inside an eager step (``torch.cuda.set_sync_debug_mode``). Every graph step is
checked against an eager step from the same state before anything is timed. Target: the graph
step at >= 70 % of the floor.

``--count-ops`` profiles one decode step of the tiny test model on the CPU (torch references)
and writes the aten ops per step and per block kind, beside the numbers measured before the
decode path was rebuilt.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import gc
import json
import math
import statistics
import sys
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from _machine import cpu_model, git_commit
from torch import nn

from residency.config import NemotronHConfig
from residency.model.modeling import NemotronHForCausalLM, meta_model
from residency.model.moe import ResidentExperts, Router

VARIANTS = {"experts-22": (22, 22), "dense": (1, 1)}
TARGET = 0.70
DEVICE = "cuda"

# view and metadata ops: no data is touched (``--count-ops`` reports them apart)
VIEW_OPS = frozenset({
    "aten::view", "aten::reshape", "aten::_unsafe_view", "aten::split", "aten::split_with_sizes", "aten::slice",
    "aten::select", "aten::transpose", "aten::t", "aten::numpy_T", "aten::permute", "aten::unsqueeze",
    "aten::squeeze", "aten::expand", "aten::as_strided", "aten::alias", "aten::unflatten", "aten::flatten",
    "aten::detach", "aten::lift_fresh", "aten::resolve_conj", "aten::resolve_neg", "aten::result_type",
    "aten::contiguous", "aten::empty", "aten::empty_strided", "aten::is_nonzero",
})  # fmt: skip

# aten ops of one decode step of the tiny model (batch 1, torch backend, CPU), measured with
# count_decode_ops before this decode path existed: commit 640e4a3 (chunked scan for one token,
# KV cache repeated per query head, eager matmul attention)
BEFORE = {
    "commit": "640e4a3",
    "top_level": 911, "top_level_compute": 677,
    "per_block": {"mamba": 101, "attention": 43, "moe": 138},
    "per_block_compute": {"mamba": 72, "attention": 28, "moe": 105},
    "outside_blocks": 13,
}  # fmt: skip


# ---------------------------------------------------------------------- model and bytes
def super_config(experts: int, top_k: int) -> NemotronHConfig:
    """Nemotron 3 Super's config (88 layers, real dimensions) with ``experts`` routed experts, top-``top_k``."""
    return NemotronHConfig(n_routed_experts=experts, num_experts_per_tok=top_k)


def _init_(name: str, t: torch.Tensor, gen: torch.Generator) -> None:
    # values only need to keep activations finite; the shapes and dtypes are what is measured
    if not t.is_floating_point():
        return
    if name.endswith("norm.weight") or name.endswith("norm_f.weight"):
        t.normal_(1.0, 0.1, generator=gen)
    elif name.endswith("A_log"):
        t.uniform_(0.0, 2.0, generator=gen)
    elif name.endswith("dt_bias"):
        t.uniform_(-3.0, -1.5, generator=gen)
    elif name.endswith(".D"):
        t.uniform_(0.5, 1.5, generator=gen)
    elif name.endswith("embeddings.weight"):
        t.normal_(0.0, 1.0, generator=gen)
    elif name.endswith("bias") or t.dim() < 2:
        t.normal_(0.0, 0.02, generator=gen)
    else:
        t.normal_(0.0, 1.0 / math.sqrt(t.shape[-1]), generator=gen)


def build_model(config: NemotronHConfig, device: str, dtype: torch.dtype, seed: int = 0) -> NemotronHForCausalLM:
    """The model of ``config`` with random weights allocated once on ``device`` (router fp32, rest ``dtype``)."""
    model = meta_model(config)
    gen = torch.Generator(device=device).manual_seed(seed)
    for module_name, module in model.named_modules():
        for kind in ("_parameters", "_buffers"):
            for name, meta in list(getattr(module, kind).items()):
                if meta is None:
                    continue
                target = meta.dtype if not meta.is_floating_point() or isinstance(module, Router) else dtype
                real = torch.empty(meta.shape, dtype=target, device=device)
                _init_(f"{module_name}.{name}", real, gen)
                getattr(module, kind)[name] = nn.Parameter(real, requires_grad=False) if kind == "_parameters" else real
        if isinstance(module, ResidentExperts):
            module.reset_slot_table()
    return model.eval()


def step_bytes(model: NemotronHForCausalLM, batch: int, context: int, kv_bytes: int = 2) -> dict[str, int]:
    """Bytes one decode step must move at least, by category (works on a meta model).

    Weights are read once per step: every dense tensor, one embedding row per token, and the
    distinct routed experts (``min(E, batch * top_k)`` per layer); the KV cache of ``context``
    tokens is read; the Mamba state (SSM fp32 and conv) is read and written.
    """
    c = model.config
    distinct = min(c.n_routed_experts, batch * c.num_experts_per_tok)  # experts read per MoE layer
    dense = routed = 0
    for name, p in model.named_parameters():
        nbytes = p.numel() * p.element_size()
        if name.endswith("embeddings.weight"):
            dense += batch * p.shape[1] * p.element_size()
        elif ".experts." in name:  # a bank [E, ...] of one layer
            routed += distinct * (nbytes // p.shape[0])
        else:
            dense += nbytes
    kv = batch * context * c.kv_bytes_per_token(kv_bytes)
    mamba = 2 * batch * c.mamba_state_bytes(4, model.lm_head.weight.element_size())
    out = {"dense_weights": dense, "routed_experts": routed, "kv_cache": kv, "mamba_state": mamba}
    out["total"] = sum(out.values())
    return out


# ---------------------------------------------------------------------- counting
def count_kernels(events: Iterable) -> dict[str, int]:
    """Device activity of profiler events: GPU kernels, memory copies / sets, graph launches.

    ``events`` are ``torch.profiler`` ``FunctionEvent``-like objects (``name``, ``device_type``).
    """
    counts = collections.Counter()
    for e in events:
        name = e.name
        on_device = getattr(e.device_type, "name", str(e.device_type)).upper().endswith("CUDA")
        if on_device:
            if name.startswith(("Memcpy", "Memset")) or "memcpy" in name.lower() or "memset" in name.lower():
                counts["copies"] += 1
            else:
                counts["kernels"] += 1
        elif name in ("cudaGraphLaunch", "cuGraphLaunch"):
            counts["graph_launches"] += 1
        elif name in ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC"):
            counts["host_launches"] += 1
    return {k: counts.get(k, 0) for k in ("kernels", "copies", "host_launches", "graph_launches")}


def _enclosing(event, prefix: str):
    p = event.cpu_parent
    while p is not None:
        if p.name.startswith(prefix):
            return p
        p = p.cpu_parent
    return None


def count_decode_ops(model: NemotronHForCausalLM, cache, token: torch.Tensor) -> dict:
    """Aten ops of one decode step ``model(token, cache)`` on the CPU, per step and per block kind.

    Top-level ops are the aten calls made by the model code (not those an aten op makes inside
    itself); ``compute`` leaves out the view and metadata ops of :data:`VIEW_OPS`.
    """
    from torch.autograd.profiler import record_function
    from torch.profiler import ProfilerActivity, profile

    ranges: dict[int, record_function] = {}
    handles = []
    for i, block in enumerate(model.backbone.layers):
        def pre(module, args, _i=i, _kind=block.kind):
            ranges[_i] = record_function(f"block:{_kind}:{_i}")
            ranges[_i].__enter__()

        def post(module, args, output, _i=i):
            ranges.pop(_i).__exit__(None, None, None)

        handles += [block.register_forward_pre_hook(pre), block.register_forward_hook(post)]
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            model(token, cache)
    finally:
        for h in handles:
            h.remove()
    top = [e for e in prof.events() if e.name.startswith("aten::") and _enclosing(e, "aten::") is None]
    per_block: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    outside = 0
    for e in top:
        block = _enclosing(e, "block:")
        if block is None:
            outside += 1
        else:
            per_block[block.name][e.name] += 1
    kinds: dict[str, dict[str, int]] = {}
    for name, ops in per_block.items():
        kind = name.split(":")[1]
        total, compute = sum(ops.values()), sum(n for op, n in ops.items() if op not in VIEW_OPS)
        best = kinds.setdefault(kind, {"top_level": 0, "compute": 0, "ops": {}})
        if total > best["top_level"]:
            kinds[kind] = {"top_level": total, "compute": compute, "ops": dict(ops.most_common())}
    return {
        "top_level": len(top),
        "top_level_compute": sum(e.name not in VIEW_OPS for e in top),
        "all_aten": sum(e.name.startswith("aten::") for e in prof.events()),
        "per_block": {k: v["top_level"] for k, v in sorted(kinds.items())},
        "per_block_compute": {k: v["compute"] for k, v in sorted(kinds.items())},
        "outside_blocks": outside,
        "ops_by_kind": {k: v["ops"] for k, v in sorted(kinds.items())},
    }


def tiny_decode_ops(prompt: int = 7) -> dict:
    """:func:`count_decode_ops` for the tiny test model (fp32, CPU, torch backend) after a short prompt."""
    from residency.kernels import kernel_backend

    from residency.model.checkpoint import Checkpoint
    from residency.model.loading import build_model as load
    from residency.testing import write_tiny_checkpoint

    with tempfile.TemporaryDirectory() as folder:
        model = load(Checkpoint(write_tiny_checkpoint(Path(folder) / "tiny", seed=0)), device="cpu")
    gen = torch.Generator().manual_seed(0)
    with kernel_backend("torch"):
        cache = model.new_cache(1)
        model(torch.randint(0, model.config.vocab_size, (1, prompt), generator=gen), cache)
        model(torch.tensor([[5]]), cache)  # one step first: lazy state is made outside the count
        result = count_decode_ops(model, cache, torch.tensor([[7]]))
    result["pattern"] = model.config.pattern
    return result


def ops_markdown(after: dict, env: dict) -> str:
    lines = [
        "# Aten ops per decode step of the tiny model (CPU)",
        "",
        f"Made by `python benchmarks/bench_dense_decode.py --count-ops docs/benchmarks/decode_ops` on {env['cpu']}; "
        f"torch {env['torch']}; commit {env['commit']}; {env['date']}.",
        "",
        f"One decode step (batch 1, after a 7-token prompt and one step) of the tiny test model "
        f"(`residency.testing`, pattern `{after['pattern']}`: 3 Mamba, 1 attention, 4 MoE blocks), fp32, "
        "torch backend (the kernels' references, what the CPU device runs), counted with `torch.profiler`. "
        "Top-level = aten calls made by the model code; compute = without view and metadata ops. On a GPU "
        "a Mamba block of the step is 7 kernels (block norm, in_proj, conv update, state update, gated norm, "
        "out_proj, residual add), and a CUDA graph replays the whole step with one launch (`docs/decode.md`).",
        "",
        "| | before (commit {}) | after |".format(BEFORE["commit"]),
        "|---|---|---|",
        f"| top-level aten ops per step | {BEFORE['top_level']} | {after['top_level']} |",
        f"| of which compute | {BEFORE['top_level_compute']} | {after['top_level_compute']} |",
    ]
    for kind in ("mamba", "attention", "moe"):
        lines.append(f"| per {kind} block (compute) | {BEFORE['per_block'][kind]} "
                     f"({BEFORE['per_block_compute'][kind]}) | {after['per_block'][kind]} "
                     f"({after['per_block_compute'][kind]}) |")  # fmt: skip
    lines += [f"| outside the blocks | {BEFORE['outside_blocks']} | {after['outside_blocks']} |", ""]
    lines += ["The MoE block's ops are mostly the torch reference of the gather-GEMM (`moe.py`, "
              "`kernels/moe/reference.py`), which this change does not touch.", ""]
    lines += ["Ops of one block after the change:", ""]
    for kind, ops in after["ops_by_kind"].items():
        lines.append(f"- {kind}: " + ", ".join(f"`{op.removeprefix('aten::')}` {n}" for op, n in ops.items()))
    lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------- GPU measurement
def cuda_time(fn: Callable[[], object], warmup: int, repeats: int) -> float:
    """Median milliseconds of ``fn`` by CUDA events, each call timed on its own."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    pairs = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        pairs.append((start, end))
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in pairs)


def snapshot(cache) -> dict:
    """Copies of every buffer of a cache and its position (to run one step twice from the same state)."""
    return {"pos": cache.pos, "kv": {i: (k.clone(), v.clone()) for i, (k, v) in cache.kv.items()},
            "conv": {i: t.clone() for i, t in cache.conv.items()}, "ssm": {i: t.clone() for i, t in cache.ssm.items()}}


def restore(cache, saved: dict) -> None:
    for i, (k, v) in saved["kv"].items():
        cache.kv[i][0].copy_(k)
        cache.kv[i][1].copy_(v)
    for name in ("conv", "ssm"):
        for i, t in saved[name].items():
            getattr(cache, name)[i].copy_(t)
    cache.pos = saved["pos"]


def host_syncs(fn: Callable[[], object]) -> str | None:
    """None when ``fn`` runs without a host-device sync, else the first sync's message."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
    except RuntimeError as exc:
        return str(exc).splitlines()[0]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return None


def profile_step(fn: Callable[[], object]) -> dict[str, int]:
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return count_kernels(prof.events())


def make_graphs(model: NemotronHForCausalLM, cache):
    """The CUDA graphs of the whole decode step (every expert is resident here)."""
    from residency.model.modeling import DecodeGraphs

    return DecodeGraphs(model, cache, mode="full", warmup=1)


def bench_variant(name: str, args: argparse.Namespace, copy_gb_per_s: float,
                  config: NemotronHConfig | None = None) -> dict:
    """Everything measured for one variant (``config`` replaces the Super-shaped one in tests)."""
    experts, top_k = VARIANTS[name]
    config = config or super_config(experts, top_k)
    experts, top_k = config.n_routed_experts, config.num_experts_per_tok
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    model = build_model(config, DEVICE, dtype, seed=args.seed)
    row: dict = {"variant": name, "experts": experts, "top_k": top_k, "batch": args.batch, "context": args.context}
    row["bytes"] = step_bytes(model, args.batch, args.context)
    row["floor_ms"] = row["bytes"]["total"] / copy_gb_per_s / 1e6
    cache = model.new_cache(args.batch, max_len=args.context + 4 * args.steps + 64)
    cache.graphs = make_graphs(model, cache)
    cache.pos = args.context  # the KV entries before it are zeros: values do not change the time
    token = torch.randint(0, config.vocab_size, (args.batch, 1), device=DEVICE)

    def eager() -> torch.Tensor:
        graphs, cache.graphs = cache.graphs, None
        try:
            return model(token, cache)
        finally:
            cache.graphs = graphs

    def graph() -> torch.Tensor:
        return model(token, cache)

    eager()  # compiles every kernel
    row["eager_host_sync"] = host_syncs(eager)
    graph()  # warm-up step of the bucket, then the capture
    graph()
    saved = snapshot(cache)
    expected = eager()
    restore(cache, saved)
    got = graph()
    row["graph_vs_eager_error"] = float((got - expected).norm() / expected.norm())
    if not math.isfinite(row["graph_vs_eager_error"]) or row["graph_vs_eager_error"] > 2e-2:
        raise SystemExit(f"{name}: the CUDA-graph step differs from the eager step by "
                         f"{row['graph_vs_eager_error']:.3g}; not timing a wrong step")  # fmt: skip
    row["graph_host_sync"] = host_syncs(graph)
    row["eager_launches"] = profile_step(eager)
    row["graph_launches"] = profile_step(graph)
    row["eager_ms"] = cuda_time(eager, 2, args.steps)
    row["graph_ms"] = cuda_time(graph, 3, args.steps)
    row["eager_of_floor"] = row["floor_ms"] / row["eager_ms"]
    row["graph_of_floor"] = row["floor_ms"] / row["graph_ms"]
    row["graph_speedup"] = row["eager_ms"] / row["graph_ms"]
    row["captures"] = dict(cache.graphs.counts)
    cache.graphs = None  # the graphs hold the cache and the model: let them go with this frame
    return row


def copy_bandwidth(nbytes: int = 2 << 30) -> float:
    """Device-to-device copy rate in GB/s, counting bytes read plus bytes written."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = cuda_time(lambda: dst.copy_(src), 3, 10)
    return 2 * nbytes / ms / 1e6


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = [
        "# Decode step of a Super-shaped stack: eager vs CUDA graph against the memory floor",
        "",
        f"Device {env['device']}; torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}; "
        f"commit {env['commit']}; {env['date']}.",
        f"Made by `python benchmarks/bench_dense_decode.py` (median of {result['steps']} CUDA-event timed steps). "
        "Nemotron 3 Super's 88-layer pattern and dimensions in bf16 with random weights and few routed experts; "
        f"batch {result['batch']}, {result['context']} tokens of KV cache. Copy rate measured in the same run: "
        f"{result['copy_gb_per_s']:.0f} GB/s (read + write).",
        "",
        "| variant | bytes / step | floor ms | eager ms | graph ms | graph × | eager of floor | graph of floor "
        "| kernels / step | eager host launches | graph launches | host syncs (eager / graph) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        syncs = " / ".join("none" if r[key] is None else "yes" for key in ("eager_host_sync", "graph_host_sync"))
        cells = [
            f"{r['variant']} ({r['experts']} experts, top-{r['top_k']})", f"{r['bytes']['total'] / 1e9:.2f} GB",
            f"{r['floor_ms']:.3f}", f"{r['eager_ms']:.3f}", f"{r['graph_ms']:.3f}", f"{r['graph_speedup']:.1f}",
            f"{r['eager_of_floor']:.0%}", f"{r['graph_of_floor']:.0%}", r["eager_launches"]["kernels"],
            r["eager_launches"]["host_launches"], r["graph_launches"]["graph_launches"], syncs,
        ]  # fmt: skip
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    lines += ["", f"Target: graph step at >= {TARGET:.0%} of the floor.", ""]
    for r in result["rows"]:
        b = r["bytes"]
        met = "met" if r["graph_of_floor"] >= TARGET else "not met"
        lines.append(f"- {r['variant']}: {met}. Bytes: dense weights {b['dense_weights'] / 1e9:.2f} GB, routed experts "
                     f"{b['routed_experts'] / 1e9:.2f} GB, KV {b['kv_cache'] / 1e6:.1f} MB, Mamba state "
                     f"{b['mamba_state'] / 1e6:.1f} MB; graph vs eager relative error {r['graph_vs_eager_error']:.2g}.")
    lines.append("")
    return "\n".join(lines)


def environment() -> dict:
    import triton

    return {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "cuda": torch.version.cuda, "commit": git_commit(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}  # fmt: skip


def write(out: str, result: dict, text: str) -> None:
    json_path, md_path = Path(out + ".json"), Path(out + ".md")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    md_path.write_text(text)
    print(f"wrote {json_path} and {md_path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="GPU run: output path without extension (writes OUT.json and OUT.md)")
    parser.add_argument("--count-ops", metavar="OUT", help="CPU: ops per decode step of the tiny model (OUT.json/md)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {', '.join(VARIANTS)}")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--context", type=int, default=1024, help="tokens already in the KV cache")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per measurement")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.count_ops:
        after = tiny_decode_ops()
        env = {"cpu": cpu_model(), "torch": torch.__version__, "commit": git_commit(),
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}  # fmt: skip
        write(args.count_ops, {"environment": env, "before": BEFORE, "after": after}, ops_markdown(after, env))
        if not args.out:
            return 0
    if not args.out:
        parser.error("give --out (GPU benchmark) or --count-ops (CPU op count)")
    if not torch.cuda.is_available():
        print("bench_dense_decode.py needs a CUDA GPU and found none (torch.cuda.is_available() is False); "
              "nothing was measured.", file=sys.stderr)  # fmt: skip
        return 2
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    copy_gb_per_s = copy_bandwidth()
    rows = []
    for name in variants:
        row = bench_variant(name, args, copy_gb_per_s)
        print(json.dumps(row), flush=True)
        rows.append(row)
        gc.collect()  # free one variant's weights before the next is built
        torch.cuda.empty_cache()
    result = {"environment": environment(), "batch": args.batch, "context": args.context, "steps": args.steps,
              "copy_gb_per_s": copy_gb_per_s, "rows": rows, "target": TARGET}  # fmt: skip
    write(args.out, result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
