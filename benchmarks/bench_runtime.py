"""Control-plane cost of the offload runtime: host bookkeeping per MoE layer per decode step, CPU device.

    python benchmarks/bench_runtime.py [--out docs/benchmarks/runtime] [--steps 200] [--repeats 3]

A Super-shaped routing problem (512 experts, top-22, one token per step) runs through the real
runtime on the ``cpu`` device with tiny expert records (so copies cost almost nothing), for
several slot budgets and with prefetch on and off. The routing of every step, and the look-ahead
router's predictions, are drawn before the run, and the expert kernels (the slot-bank kernel and
the CPU one) are stubs that write nothing: neither routing compute nor expert compute is
bookkeeping. Per layer-step the time of :meth:`OffloadRuntime.submit` + :meth:`OffloadRuntime.collect`
is measured, plus the layer's share of the step boundary (:meth:`OffloadRuntime.begin_step`, which
retires landed copies), minus the time waiting for copies; what remains is the bookkeeping the
runtime adds: the device-to-host read of the routing ids, lookups and admission through the
policy, copy issue, slot-table updates, skip masks, the CPU part's inputs and telemetry (the calls
of the stubs and of the look-ahead router, which returns its drawn ids, are counted with it).
Each case runs twice: with the cpu device's copy thread (a copy's hand-over to that thread and the
GIL is part of the cost) and with copies done inline at issue (the runtime's own work per miss, as
on CUDA where a copy is an asynchronous stream operation). Every case runs ``--repeats`` times,
interleaved with the others; the table gives the run with the lowest median and the range of
the runs' medians (on a shared machine, load from elsewhere only ever adds time). Target:
<= 25 us per MoE layer per decode step.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from _machine import git_commit, run_meta, save_report
from residency.runtime import backend as backend_module
from residency.runtime import copies as copies_module
from residency.runtime import cpu_experts as cpu_experts_module
from residency.runtime.backend import LayerSlotPlan, OffloadRuntime, RuntimeOptions
from residency.runtime.control import copy_rows
from residency.runtime.ledger import DeviceLedger
from residency.runtime.store import ExpertLayout, HostExpertStore

EXPERTS, TOP_K, LAYERS = 512, 22, 8
WARM_UP = 20  # steps before the timed ones: numba compilation, the allocator, the first fills
INNER, WIDTH = 8, 8  # tiny records: the benchmark measures bookkeeping, not copies or math


class Work:
    """What an MoE layer hands its backend (the attributes of residency.model.moe.ExpertWork)."""

    def __init__(self, ids: torch.Tensor, weights: torch.Tensor, latent: torch.Tensor, hidden: torch.Tensor):
        self.ids, self.weights, self.latent, self.hidden = ids, weights, latent, hidden
        self.pair_norms = None
        self.is_decode = True


def inline_copies(copies_module, copy_rows_fn) -> type:
    """A copy engine (of ``copies_module``, the runtime's ``copies``) whose copies are done on the calling thread at
    issue, with ``copy_rows_fn`` (the runtime's ``control.copy_rows``): it isolates the runtime's own per-miss work
    from the cpu device's hand-over to its copy thread (on CUDA a copy is an asynchronous stream operation).
    A factory, so that ``ab_runtime.py`` builds one per revision it imports."""

    class Done(copies_module.CopyTicket):
        def done(self) -> bool:
            return True

        def wait(self) -> float:
            return 0.0

    class InlineCopies(copies_module.CopyEngine):
        def __init__(self) -> None:
            # byte views of banks and buffers, kept as the engines keep them
            self.views: dict[int, tuple[torch.Tensor, np.ndarray]] = {}

        def _bytes(self, t: torch.Tensor) -> np.ndarray:
            hit = self.views.get(id(t))
            if hit is None or hit[0] is not t:
                hit = self.views[id(t)] = (t, t.view(torch.uint8).numpy())
            return hit[1]

        def copy_records(self, dst, src, dst_rows, src_rows, priority=0, after=None):
            d, s = self._bytes(dst), self._bytes(src)
            copy_rows_fn(d, s, dst_rows, src_rows)
            return Done(dst_rows.size * s.shape[1])

        def copy_many(self, jobs, priority=0):
            for dst, src, _ in jobs:
                dst.copy_(src)
            return Done(sum(src.numel() * src.element_size() for _, src, _ in jobs))

        def synchronize(self) -> None:
            pass

    return InlineCopies


InlineCopies = inline_copies(copies_module, copy_rows)


def draw_routing(seed: int, total: int) -> tuple[list[list[torch.Tensor]], list[list[torch.Tensor]]]:
    """``total`` decode steps of skewed routing with some repeats, roughly like real traces, per MoE layer: the ids
    each layer routes to and the look-ahead's predictions of them (the same draws for every case of one seed)."""
    torch.manual_seed(seed)  # (the Dirichlet draws from the global generator)
    gen = torch.Generator().manual_seed(seed)
    popularity = torch.distributions.Dirichlet(torch.full((EXPERTS,), 0.3)).sample((LAYERS,))
    routes = [[torch.multinomial(popularity[j], TOP_K, generator=gen)[None] for j in range(LAYERS)]
              for _ in range(total)]
    predictions = [[torch.multinomial(popularity[j], TOP_K, generator=gen)[None] for j in range(LAYERS)]
                   for _ in range(total)]
    return routes, predictions


def timed_decode_step(runtime, routes: list[torch.Tensor], weights: torch.Tensor, x: torch.Tensor,
                      times: list[float] | None) -> None:
    """One decode step of every MoE layer (``routes``: each layer's ids) through ``runtime``; appends each layer-step's
    bookkeeping seconds to ``times`` (None: untimed): its submit + collect, plus its share of the step boundary
    (which retires landed copies of every layer), minus its waits for copies."""
    t0 = time.perf_counter()
    runtime.begin_step(None, True)
    boundary = (time.perf_counter() - t0) / LAYERS
    stall = runtime.telemetry["decode"].stall_s
    for j in range(LAYERS):
        work = Work(routes[j], weights, x, x)
        before = stall[j]
        t0 = time.perf_counter()
        runtime.collect(j, runtime.submit(j, work), work)
        took = time.perf_counter() - t0
        if times is not None:
            times.append(boundary + took - (stall[j] - before))


def run_case(slots_per_layer: int, prefetch: bool, steps: int, seed: int = 0, static: bool = False,
             inline: bool = False, cpu: bool = False) -> dict:
    layout = ExpertLayout(INNER, WIDTH, torch.float32)
    store = HostExpertStore(layout, LAYERS, EXPERTS)
    for buf in store.buffers:
        buf.normal_()
    # drawn before the run, the look-ahead's predictions too, so that the timed calls contain no routing compute
    # (the router's call is counted)
    total = steps + WARM_UP
    routes, predictions = draw_routing(seed, total)
    now = [0]

    def make_router(j: int):
        def router(hidden):
            return predictions[now[0]][j], None, None
        return router

    plans = [LayerSlotPlan(tuple(range(slots_per_layer)), 0, "copy") if static else
             LayerSlotPlan((), slots_per_layer, "copy") for _ in range(LAYERS)]
    ledger = DeviceLedger(torch.device("cpu"), None)
    runtime = OffloadRuntime(store, plans, ledger, RuntimeOptions(mode="cpu", prefetch=prefetch, cpu_experts=cpu,
                                                                  staging_slots=2 * TOP_K),
                             [make_router(j) for j in range(LAYERS)], TOP_K)
    if inline:
        runtime.copies.close()
        runtime.copies = InlineCopies()
    # the expert kernels are stubs that write nothing (their compute is not bookkeeping; their call is counted)
    real_kernel, real_cpu_kernel = backend_module.moe_gather_gemm, cpu_experts_module._cpu_moe_kernel

    def kernel_stub(x, *args, out=None, **kwargs):
        return torch.empty_like(x) if out is None else out

    def cpu_kernel_stub(*args):
        pass

    backend_module.moe_gather_gemm = kernel_stub
    cpu_experts_module._cpu_moe_kernel = cpu_kernel_stub
    per_step = []
    try:
        x = torch.randn(1, WIDTH)
        weights = torch.rand(1, TOP_K)
        for step in range(total):
            if step == WARM_UP:  # warm-up done: numba compilation, allocator, first fills
                runtime.reset_stats()
            now[0] = step
            timed_decode_step(runtime, routes[step], weights, x, per_step if step >= WARM_UP else None)
        stats = runtime.stats()
    finally:
        backend_module.moe_gather_gemm = real_kernel
        cpu_experts_module._cpu_moe_kernel = real_cpu_kernel
        runtime.close()
    us = np.array(per_step) * 1e6
    looked = stats["hits"] + stats["misses"]
    return {"slots_per_layer": slots_per_layer, "static": static, "prefetch": prefetch, "inline_copies": inline,
            "cpu_experts": cpu,
            "layer_steps": len(per_step),
            "median_us": float(statistics.median(us)), "p90_us": float(np.percentile(us, 90)),
            "hit_rate": stats["hits"] / looked if looked else None, "demand_copies": stats["demand_copies"],
            "prefetch_issued": stats["prefetch_issued"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="write OUT.json and OUT.md")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs of every case, interleaved; the table shows the lowest median and the spread")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cases = [dict(slots_per_layer=EXPERTS, prefetch=False, static=True)]  # every expert static: the hit path alone
    cases += [dict(slots_per_layer=slots, prefetch=prefetch, inline=inline) for inline in (False, True)
              for slots in (0, 64, 256, EXPERTS) for prefetch in (False, True)
              if not (slots in (0, EXPERTS) and prefetch)]
    # misses computed on the CPU (a plan's `cpu` miss path), with inline copies of the admitted ones
    cases += [dict(slots_per_layer=slots, prefetch=False, inline=True, cpu=True) for slots in (0, 64, 256)]
    runs: list[list[dict]] = [[] for _ in cases]
    for rep in range(args.repeats):  # interleaved, so a burst of load on the shared machine hits one run of each
        for i, case in enumerate(cases):
            runs[i].append(run_case(steps=args.steps, seed=rep, **case))
    rows = []
    for case_runs in runs:
        best = min(case_runs, key=lambda r: r["median_us"])
        rows.append({**best, "medians_us": [r["median_us"] for r in case_runs]})
    lines = [
        f"Control-plane cost per MoE layer per decode step (512 experts, top-{TOP_K}, cpu device, "
        f"{args.steps} steps x {LAYERS} layers each; lowest median of {args.repeats} interleaved runs, then the "
        "range of the runs' medians)",
        "",
        "| slots per layer | prefetch | misses | copies | hit rate | demand copies per layer-step | median us | "
        "runs' medians us | p90 us |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        hit = "n/a" if r["hit_rate"] is None else f"{100 * r['hit_rate']:.1f} %"
        kind = "static" if r["static"] else "dynamic"
        copies = "inline" if r["inline_copies"] else "copy thread"
        lines.append(f"| {r['slots_per_layer']} {kind} | {'on' if r['prefetch'] else 'off'} | "
                     f"{'CPU' if r['cpu_experts'] else 'copied'} | {copies} | {hit} | "
                     f"{r['demand_copies'] / r['layer_steps']:.1f} | {r['median_us']:.1f} | "
                     f"{min(r['medians_us']):.1f}-{max(r['medians_us']):.1f} | {r['p90_us']:.1f} |")
    own = max(r["median_us"] for r in rows if r["inline_copies"] or r["static"])
    thread = max(r["median_us"] for r in rows if not (r["inline_copies"] or r["static"]))
    lines += ["", f"worst median, copies inline (the runtime's own work; on CUDA a copy is a stream operation): "
              f"{own:.1f} us; with the cpu device's copy thread: {thread:.1f} us (target <= 25 us)"]
    text = "\n".join(lines)
    print(text)
    if args.out is not None:
        meta = run_meta(numpy=np.__version__, commit=git_commit(), threads=1)
        header = (f"# Runtime control-plane cost\n\n`benchmarks/bench_runtime.py`, {meta['date']}, {meta['cpu']}, "
                  f"torch {meta['torch']}, numpy {meta['numpy']}, commit {meta['commit']}, 1 torch thread. "
                  "Bookkeeping = time of submit + collect, plus a layer's share of the step boundary, minus copy "
                  "waits; the expert kernels are stubs that write nothing, routing is drawn before the run.\n\n")
        save_report(args.out, meta, rows, header, text)


if __name__ == "__main__":
    main()
