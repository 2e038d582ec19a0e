"""CPU expert throughput: the numba kernel against a plain memory read and torch, at Nemotron 3 Super shape.

    python benchmarks/bench_cpu_experts.py --out docs/benchmarks/cpu_experts [--note "..."]

One token routed to k experts (1, 4 and 22 by default) of a bank of 64 BF16 experts (L=1024,
I=2688: 11 MB each, 704 MB in all, far beyond the last-level cache). Each repetition times, in
turn:

- ``numba``: :func:`residency.runtime.cpu_experts.cpu_moe` on the BF16 bits in place;
- ``read``: the same number of bytes only read, the faster of a numba parallel sum over the
  experts' words and numpy's ``sum`` (one thread) — the bandwidth the kernel can hope for;
- ``torch``: per expert ``relu(F.linear(x, up[e])) ** 2`` then ``F.linear(h, down[e])`` on the
  BF16 tensors, weighted and summed in fp32, the way torch runs a BF16 model on the CPU.

Each call takes the next k experts of a rotation through a random permutation of the bank, so an
expert is read again only after the whole bank was (704 MB later): all three read from memory.
GB/s = weight bytes of the step (k x 2 x L x I x 2) / median seconds over the repetitions after
the warm-up. Targets: the kernel at >= 60 % of the read and >= 1x torch. Before timing, the
kernel's output on one step is checked against the torch reference of the slot-bank MoE. Then, at
the largest k and the first thread count, each quantized record format (``--formats``; W4A16 with
groups of 128) is timed the same way through :func:`residency.runtime.cpu_quant.cpu_moe_quant`,
each repetition also timing a read of the same records' bytes and a BF16 step, so each quantized
row shows its fraction of the read bandwidth and its time per expert against BF16 (the goal: no
more). The
last line printed is
``cpu experts: X GB/s = R of memory read Y GB/s, S x torch`` for the largest k (22).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import numba
import numpy as np
import torch
import torch.nn.functional as F
from _machine import cpu_model, git_commit
from residency.runtime.cpu_experts import bank_view, cpu_moe, cpu_moe_reference, step_bytes

from residency import __version__

_READ_CHUNK = 1 << 14  # uint64 words per task of the parallel read (128 KiB)


# no on-disk cache: this file is also imported by the tests under another module name, and numba's
# cache would then point a later direct run at a module that does not exist
@numba.njit(parallel=True, nogil=True)
def _parallel_read(banks: tuple[np.ndarray, np.ndarray], experts: np.ndarray) -> np.uint64:
    """Sum of every 64-bit word of the given experts in both banks ([E, words] uint64 views)."""
    total = np.uint64(0)
    for bank in banks:
        words = bank.shape[1]
        chunks = (words + _READ_CHUNK - 1) // _READ_CHUNK
        partial = np.zeros(experts.shape[0] * chunks, np.uint64)
        for task in numba.prange(experts.shape[0] * chunks):
            start = (task % chunks) * _READ_CHUNK
            seg = bank[experts[task // chunks]][start:min(words, start + _READ_CHUNK)]
            s = np.uint64(0)
            for j in range(seg.shape[0]):  # from 0: no negative-index handling, so it vectorises
                s += seg[j]
            partial[task] = s
        total += partial.sum()
    return total


class Bench:
    """The bank, the methods and the expert rotation."""

    def __init__(self, experts: int, latent: int, inter: int, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.up = (torch.randn(experts, inter, latent, generator=gen) * 0.02).bfloat16()
        self.down = (torch.randn(experts, latent, inter, generator=gen) * 0.02).bfloat16()
        self.up_bits, self.down_bits = bank_view(self.up), bank_view(self.down)
        self.words = (self.up_bits.reshape(experts, -1).view(np.uint64),
                      self.down_bits.reshape(experts, -1).view(np.uint64))
        self.x = torch.randn(1, latent, generator=gen)
        self.x_np = self.x.numpy()
        self.x_bf16 = self.x.bfloat16()
        self.order = np.random.default_rng(seed).permutation(experts)
        self.cursor = 0
        self.latent, self.inter = latent, inter

    def next_experts(self, k: int) -> np.ndarray:
        picked = np.take(self.order, np.arange(self.cursor, self.cursor + k), mode="wrap")
        self.cursor += k
        return picked

    def numba(self, experts: np.ndarray) -> None:
        k = len(experts)
        out = np.zeros_like(self.x_np)
        cpu_moe(self.x_np, self.up_bits, self.down_bits, np.zeros(k, np.int64), experts,
                np.full(k, 1.0 / k, np.float32), out)

    def read_numba(self, experts: np.ndarray) -> None:
        _parallel_read(self.words, experts)

    def read_numpy(self, experts: np.ndarray) -> None:
        for e in experts:
            self.words[0][e].sum()
            self.words[1][e].sum()

    def torch(self, experts: np.ndarray) -> None:
        out = torch.zeros(1, self.latent)
        w = 1.0 / len(experts)
        for e in experts.tolist():
            h = F.relu(F.linear(self.x_bf16, self.up[e])) ** 2
            out.add_(F.linear(h, self.down[e]).float(), alpha=w)

    def check(self, k: int) -> float:
        """Relative error (norm-wise) of the kernel against the torch reference on one step of k experts."""
        experts = self.next_experts(k)
        args = (self.x_np, self.up_bits, self.down_bits, np.zeros(k, np.int64), experts,
                np.full(k, 1.0 / k, np.float32))
        got = cpu_moe(*args, np.zeros_like(self.x_np))
        want = cpu_moe_reference(*args, np.zeros_like(self.x_np))
        return float(np.linalg.norm(got - want) / np.linalg.norm(want))


METHODS = ("numba", "read_numba", "read_numpy", "torch")


def timed(fn: Callable[[np.ndarray], None], experts: np.ndarray) -> float:
    start = time.perf_counter()
    fn(experts)
    return time.perf_counter() - start


def run(bench: Bench, ks: list[int], repeats: int, warmup: int, threads: int) -> list[dict]:
    """Medians per k with ``threads`` numba and torch threads."""
    numba.set_num_threads(threads)
    torch.set_num_threads(threads)
    rows = []
    for k in ks:
        samples: dict[str, list[float]] = {m: [] for m in METHODS}
        for rep in range(warmup + repeats):
            for m in METHODS:  # interleaved, so drift and neighbours affect all methods alike
                seconds = timed(getattr(bench, m), bench.next_experts(k))
                if rep >= warmup:
                    samples[m].append(seconds)
        nbytes = step_bytes(k, bench.latent, bench.inter)
        gbps = {m: nbytes / statistics.median(s) / 1e9 for m, s in samples.items()}
        read = max(gbps["read_numba"], gbps["read_numpy"])
        rows.append({
            "threads": threads, "k": k, "bytes": nbytes,
            "numba_gbps": round(gbps["numba"], 2), "read_gbps": round(read, 2),
            "read_numba_gbps": round(gbps["read_numba"], 2), "read_numpy_gbps": round(gbps["read_numpy"], 2),
            "torch_bf16_gbps": round(gbps["torch"], 2),
            "fraction_of_read": round(gbps["numba"] / read, 3), "x_torch": round(gbps["numba"] / gbps["torch"], 3),
            "numba_ms": round(1e3 * statistics.median(samples["numba"]), 3),
            "torch_ms": round(1e3 * statistics.median(samples["torch"]), 3),
            "samples_s": {m: [round(v, 6) for v in s] for m, s in samples.items()},
        })
    return rows


def logical_cores() -> int:
    """What ``nproc`` says: the CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def summary(row: dict) -> str:
    return (f"cpu experts: {row['numba_gbps']:.1f} GB/s = {row['fraction_of_read']:.2f} of memory read "
            f"{row['read_gbps']:.1f} GB/s, {row['x_torch']:.2f} x torch")


def markdown(report: dict) -> str:
    m, v, s = report["machine"], report["versions"], report["shape"]
    lines = [
        "# CPU expert throughput", "",
        f"One token routed to k experts of a {s['bank_experts']}-expert BF16 bank"
        f"{' at Nemotron 3 Super shape' if (s['latent'], s['intermediate']) == (1024, 2688) else ''} "
        f"(L={s['latent']}, I={s['intermediate']}: {step_bytes(1, s['latent'], s['intermediate']) / 1e6:.1f} MB of "
        "weights per expert), computed on the CPU from host memory. GB/s = weight bytes of the step / median "
        f"seconds of {report['repeats']} repetitions after {report['warmup']} warm-up; each call takes the next k "
        "experts of a rotation through the bank, so it reads them from memory. Columns: `numba` = "
        "`residency.runtime.cpu_experts.cpu_moe` on the BF16 bits in place; `read` = the same bytes only read "
        "(faster of a numba parallel sum and numpy `sum`); `torch` = `F.linear` per expert on the BF16 tensors. "
        "Targets: >= 60 % of the read, >= 1x torch. "
        f"Produced by `python benchmarks/bench_cpu_experts.py --out docs/benchmarks/cpu_experts`; raw numbers "
        "in [`cpu_experts.json`](cpu_experts.json).", "",
        f"- Machine: {m['cpu']}, {m['logical_cores']} logical cores (`nproc`), {m['platform']}.",
        f"- Threads: the same count for numba ({report['threads']['numba_layer']} layer) and torch in each run: "
        f"{', '.join(str(t) for t in report['threads']['runs'])}.",
        f"- Date: {report['date']}. Commit measured: {report['commit']}.",
        f"- Versions: Python {v['python']}, numpy {v['numpy']}, numba {v['numba']}, torch {v['torch']}, "
        f"residency {v['residency']}.",
        f"- Load average (1 min) before / after the run: {report['loadavg_1min']['before']:.2f} / "
        f"{report['loadavg_1min']['after']:.2f} (other jobs on the machine count here).",
        f"- Check: kernel vs torch reference on a {report['check']['k']}-expert step, relative error "
        f"{report['check']['rel_err']:.1e}.",
    ]
    if report.get("note"):
        lines.append(f"- Note: {report['note']}")
    lines += ["", "| threads | k | MB per step | numba GB/s | read GB/s (numba / numpy) | torch bf16 GB/s | of read "
              "| x torch | numba ms | torch ms |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["results"]:
        lines.append(f"| {r['threads']} | {r['k']} | {r['bytes'] / 1e6:.0f} | {r['numba_gbps']:.1f} | "
                     f"{r['read_gbps']:.1f} "
                     f"({r['read_numba_gbps']:.1f} / {r['read_numpy_gbps']:.1f}) | {r['torch_bf16_gbps']:.1f} | "
                     f"{100 * r['fraction_of_read']:.0f} % | {r['x_torch']:.2f} | {r['numba_ms']:.2f} | "
                     f"{r['torch_ms']:.2f} |")
    if report.get("quantized"):
        q0 = report["quantized"][0]
        lines += ["", f"Quantized records (`residency.runtime.cpu_quant.cpu_moe_quant`, same shape, packed bytes read "
                  f"in place; {q0['threads']} threads, one token to k = {q0['k']} records of a "
                  f"{q0['bank_records']}-record bank per step). Timed in turn each repetition: the kernel, a plain "
                  "read of the same records' bytes (numba parallel sum) and a step of the BF16 kernel above at the "
                  "same k and threads. Goal: per expert no more time than BF16 (`x BF16 time` <= 1).", "",
                  "| format | k | MB per expert | GB/s of records | read GB/s (same bytes) | of read | ms per expert "
                  "| BF16 ms per expert | x BF16 time | experts/s |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for q in report["quantized"]:
            lines.append(f"| {q['format']} | {q['k']} | {q['record_bytes'] / 1e6:.2f} | {q['gbps']:.2f} | "
                         f"{q['read_gbps']:.1f} | {100 * q['fraction_of_read']:.0f} % | {q['ms_per_expert']:.3f} | "
                         f"{q['bf16_ms_per_expert']:.3f} | {q['x_bf16_time']:.2f} | {q['experts_per_s']:.0f} |")
        lines += ["", "Formats: " + "; ".join(f"{q['format']} = {q['spec']}" for q in report["quantized"]) + "."]
    lines += ["", "`" + report["summary"] + "`"]
    return "\n".join(lines) + "\n"


#: the quantized formats the benchmark times (W4A16 as Super's checkpoint is assumed to be: groups of 128)
QUANT_SPECS = {"nvfp4": {"format": "nvfp4"}, "fp8": {"format": "fp8"}, "w4a16": {"format": "w4a16", "group_size": 128}}


def quant_records(layout, count: int, seed: int) -> np.ndarray:
    """``count`` random records of ``layout``: random codes (no FP8 NaN codes), finite scales."""
    rng = np.random.default_rng(seed)
    records = rng.integers(0, 256, size=(count, layout.record_bytes), dtype=np.uint8)
    bank = torch.from_numpy(records)
    for proj in ("up", "down"):
        w = layout.projection(bank, proj)
        if layout.spec.format == "nvfp4":
            w.scale.view(torch.uint8).copy_(torch.from_numpy(
                rng.integers(0x20, 0x40, size=tuple(w.scale.shape), dtype=np.uint8)))
        if w.scale2 is not None:
            w.scale2.fill_(1e-3)
        if layout.spec.format == "fp8":
            w.data.view(torch.uint8).bitwise_and_(0x77)
        if layout.spec.format == "w4a16":
            w.scale.fill_(1e-3)
    return records


def quant_samples(bench: Bench, layout, records: np.ndarray, k: int, args: argparse.Namespace) -> dict[str, list]:
    """Seconds per step of ``cpu_moe_quant``, of reading the same records, and of the BF16 kernel, in turn."""
    from residency.runtime.cpu_quant import cpu_moe_quant

    n_bank = records.shape[0]
    tokens, weights = np.zeros(k, np.int64), np.full(k, 1.0 / k, np.float32)
    words = (records.view(np.uint64), np.zeros((n_bank, 0), np.uint64))  # record_bytes is a multiple of 16
    order = np.random.default_rng(args.seed).permutation(n_bank)
    cursor = [0]

    def pick() -> np.ndarray:
        picked = np.take(order, np.arange(cursor[0], cursor[0] + k), mode="wrap")
        cursor[0] += k
        return picked

    def quant(recs: np.ndarray) -> None:
        cpu_moe_quant(bench.x_np, layout, records, tokens, recs, weights, np.zeros_like(bench.x_np))

    def read(recs: np.ndarray) -> None:
        _parallel_read(words, recs)

    methods = {"quant": quant, "read": read, "bf16": lambda _: bench.numba(bench.next_experts(k))}
    samples: dict[str, list[float]] = {m: [] for m in methods}
    warmup = max(args.warmup, 1)  # at least one: the first call compiles or loads the kernel
    for rep in range(warmup + args.repeats):
        for m, fn in methods.items():
            seconds = timed(fn, pick())
            if rep >= warmup:
                samples[m].append(seconds)
    return samples


def quantized_rows(bench: Bench, formats: list[str], k: int, threads: int, args: argparse.Namespace) -> list[dict]:
    """Per quantized format: GB/s of packed record bytes a k-expert step of ``cpu_moe_quant`` processes, the
    read bandwidth of the same bytes, and the time per expert against the BF16 kernel (same k and threads),
    the three timed in turn each repetition."""
    from residency.kernels.moe.quant_formats import ExpertRecordLayout, QuantSpec

    numba.set_num_threads(threads)
    torch.set_num_threads(threads)
    n_bank = max(2 * k, args.experts)
    rows = []
    for fmt in formats:
        spec = QuantSpec(**QUANT_SPECS[fmt])
        layout = ExpertRecordLayout(spec, args.inter, args.latent)
        samples = quant_samples(bench, layout, quant_records(layout, n_bank, args.seed), k, args)
        step = k * layout.record_bytes
        gbps = step / statistics.median(samples["quant"]) / 1e9
        read_gbps = step / statistics.median(samples["read"]) / 1e9
        ms, bf16_ms = (1e3 * statistics.median(samples[m]) / k for m in ("quant", "bf16"))
        rows.append({"format": fmt, "spec": spec.describe(), "threads": threads, "k": k, "bank_records": n_bank,
                     "record_bytes": layout.record_bytes, "gbps": gbps, "read_gbps": read_gbps,
                     "fraction_of_read": gbps / read_gbps, "ms_per_expert": ms, "bf16_ms_per_expert": bf16_ms,
                     "x_bf16_time": ms / bf16_ms, "goal_met": ms <= bf16_ms,
                     "experts_per_s": gbps * 1e9 / layout.record_bytes,
                     "samples_s": {m: [round(v, 6) for v in s] for m, s in samples.items()}})
        print(f"{fmt:>6} k={k} threads={threads}: {gbps:.2f} GB/s of packed records ({layout.record_bytes / 1e6:.2f} "
              f"MB per expert) = {gbps / read_gbps:.2f} of reading them ({read_gbps:.1f} GB/s); {ms:.3f} ms per "
              f"expert = {ms / bf16_ms:.2f} x BF16 ({bf16_ms:.3f} ms)")
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ks", default="1,4,22", help="comma-separated expert counts per step")
    ap.add_argument("--experts", type=int, default=64, help="experts in the bank")
    ap.add_argument("--latent", type=int, default=1024)
    ap.add_argument("--inter", type=int, default=2688)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", default=f"{logical_cores()},1" if logical_cores() > 1 else "1",
                    help="comma-separated numba/torch thread counts, one run each (the first is the summary's)")
    ap.add_argument("--note", default="", help="free text for the markdown (e.g. what else ran on the machine)")
    ap.add_argument("--formats", default="nvfp4,fp8,w4a16",
                    help="quantized record formats to time as well (runtime/cpu_quant.py; '' for none)")
    ap.add_argument("--out", type=Path, help="write OUT.json and OUT.md (a .json/.md suffix is replaced)")
    args = ap.parse_args(argv)
    ks = sorted(int(k) for k in args.ks.split(","))
    threads = [int(t) for t in args.threads.split(",")]
    if min(threads) < 1 or max(threads) > numba.config.NUMBA_NUM_THREADS:
        ap.error(f"each thread count must be in 1..{numba.config.NUMBA_NUM_THREADS}")
    if ks[0] < 1 or ks[-1] > args.experts:
        ap.error(f"each k must be in 1..{args.experts} (the bank size)")

    load_before = os.getloadavg()
    bench = Bench(args.experts, args.latent, args.inter, args.seed)
    start = time.perf_counter()
    bench.numba(bench.next_experts(1))
    bench.read_numba(bench.next_experts(1))
    first_call = time.perf_counter() - start
    check_k = min(4, ks[-1])
    rel_err = bench.check(check_k)
    saved = numba.get_num_threads(), torch.get_num_threads()
    try:
        rows = [row for t in threads for row in run(bench, ks, args.repeats, args.warmup, t)]
    finally:
        numba.set_num_threads(saved[0])
        torch.set_num_threads(saved[1])

    report = {
        "benchmark": "cpu experts",
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "commit": git_commit(),
        "machine": {"cpu": cpu_model(), "logical_cores": logical_cores(), "platform": platform.platform()},
        "versions": {"python": sys.version.split()[0], "numpy": np.__version__, "numba": numba.__version__,
                     "torch": torch.__version__, "residency": __version__},
        "threads": {"runs": threads, "numba_layer": numba.threading_layer()},
        "shape": {"latent": args.latent, "intermediate": args.inter, "bank_experts": args.experts, "dtype": "bf16"},
        "repeats": args.repeats, "warmup": args.warmup,
        "first_call_s": round(first_call, 3),
        # Other jobs on a shared machine show here: a load near the core count means they competed.
        "loadavg_1min": {"before": round(load_before[0], 2), "after": round(os.getloadavg()[0], 2)},
        "check": {"k": check_k, "rel_err": rel_err},
        "note": args.note,
        "results": rows,
    }
    saved = numba.get_num_threads(), torch.get_num_threads()
    try:
        report["quantized"] = quantized_rows(bench, [f for f in args.formats.split(",") if f], ks[-1], threads[0],
                                             args)
    finally:
        numba.set_num_threads(saved[0])
        torch.set_num_threads(saved[1])
    report["summary"] = summary(next(r for r in rows if r["threads"] == threads[0] and r["k"] == ks[-1]))

    print(f"{report['machine']['cpu']}, {report['machine']['logical_cores']} logical cores; numba "
          f"{numba.__version__} ({report['threads']['numba_layer']}), torch {torch.__version__}, "
          f"numpy {np.__version__}; "
          f"load average {load_before[0]:.2f} before, {report['loadavg_1min']['after']:.2f} after")
    print(f"bank: {args.experts} experts, L={args.latent}, I={args.inter}, bf16; first call (compile or cache load) "
          f"{first_call:.2f} s; check vs reference: rel err {rel_err:.1e}")
    print(f"{'thr':>3} {'k':>3} {'MB':>6} {'numba GB/s':>10} {'read GB/s':>9} {'(numba':>7} {'numpy)':>7} "
          f"{'torch GB/s':>10} {'of read':>7} {'x torch':>7}")
    for r in rows:
        print(f"{r['threads']:>3} {r['k']:>3} {r['bytes'] / 1e6:>6.0f} {r['numba_gbps']:>10.1f} {r['read_gbps']:>9.1f} "
              f"{r['read_numba_gbps']:>7.1f} {r['read_numpy_gbps']:>7.1f} {r['torch_bf16_gbps']:>10.1f} "
              f"{r['fraction_of_read']:>7.2f} {r['x_torch']:>7.2f}")
    if args.out:
        stem = args.out.with_suffix("") if args.out.suffix in (".json", ".md") else args.out
        stem.parent.mkdir(parents=True, exist_ok=True)
        stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
        stem.with_suffix(".md").write_text(markdown(report))
        print(f"wrote {stem.with_suffix('.json')} and {stem.with_suffix('.md')}")
    print(report["summary"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
