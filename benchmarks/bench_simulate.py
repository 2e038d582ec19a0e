"""CPU benchmark of the trace-replay simulator at Nemotron 3 Super shape (40 MoE layers x 22 picks).

    python benchmarks/bench_simulate.py --out docs/benchmarks/simulator.json

Generates a synthetic trace (default 10,000 tokens, Zipf skew 1.0, locality 0.3), plans an RTX 4090
with misses copied (so every layer has static and dynamic slots and all four policies differ),
then times, per policy, ``residency.planning.simulate.simulate`` on all layers (best of ``--repeats`` after a
compile warm-up), once with the default thread pool and once on one thread. For scale it also
times the plain-Python :func:`residency.planning.simulate.reference_replay` on two layers and checks that
both give the same counts there. Prints a table and writes the numbers, the machine and the
versions as JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import numba
import numpy as np
import torch
from _machine import cpu_model
from residency.runtime.policy import LRU, POLICY_NAMES

from residency import __version__
from residency.cli.plan import resolve_config
from residency.planning.plan import plan_residency
from residency.planning.simulate import reference_replay, simulate, static_set_for, synthetic_trace


def best_of(fn, repeats: int) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=10_000)
    ap.add_argument("--skew", type=float, default=1.0)
    ap.add_argument("--locality", type=float, default=0.3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gpu", default="RTX 4090")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    args = ap.parse_args()

    config = resolve_config("nemotron-3-super", None)

    start = time.perf_counter()
    synthetic_trace(config, 16, seed=1)  # compile the generator
    compile_gen = time.perf_counter() - start
    gen_s, trace = best_of(lambda: synthetic_trace(config, args.tokens, skew=args.skew, locality=args.locality,
                                                   seed=args.seed), 1)
    plan_s, plan = best_of(lambda: plan_residency(config, args.gpu, trace=trace, miss_path="copy"), 1)

    start = time.perf_counter()
    warm = synthetic_trace(config, 16, seed=2)
    for policy in POLICY_NAMES:
        simulate(plan, warm, policy=policy)
    compile_sim = time.perf_counter() - start

    accesses = trace.num_tokens * trace.num_moe_layers * trace.top_k
    rows = []
    for policy in POLICY_NAMES:
        t_pool, result = best_of(lambda p=policy: simulate(plan, trace, policy=p), args.repeats)
        t_one, _ = best_of(lambda p=policy: simulate(plan, trace, policy=p, threads=1), args.repeats)
        rows.append({
            "policy": policy, "seconds": round(t_pool, 4), "seconds_one_thread": round(t_one, 4),
            "accesses_per_s": round(accesses / t_pool), "ns_per_access_one_thread": round(1e9 * t_one / accesses, 1),
            "hit_rate": round(result.hit_rate, 5), "tokens_per_s_predicted": round(result.cost.tokens_per_s, 3),
            "bound": result.cost.bound,
        })

    ids = trace.ids.numpy()
    layers = [j for j, lp in enumerate(plan.layers) if lp.dynamic_slots > 0][:2] or [0, 1]
    start = time.perf_counter()
    ref = {j: reference_replay(ids[:, j, :], static_set_for(plan, j, LRU.name).tolist(), plan.layers[j].slots,
                               LRU.name)
           for j in layers}
    ref_s = (time.perf_counter() - start) / len(layers)
    fast = simulate(plan, trace, policy=LRU.name)
    agree = all(ref[j][k] == int(fast.counters[k][j]) for j in layers for k in ref[j])

    report = {
        "benchmark": "trace replay simulator",
        "date": datetime.date.today().isoformat(),
        "commit": "see git log for this file",
        "machine": {"cpu": cpu_model(), "logical_cores": os.cpu_count(), "platform": platform.platform()},
        "versions": {"python": sys.version.split()[0], "numpy": np.__version__, "numba": numba.__version__,
                     "torch": torch.__version__, "residency": __version__},
        "trace": {"tokens": trace.num_tokens, "moe_layers": trace.num_moe_layers, "top_k": trace.top_k,
                  "accesses": accesses, **trace.meta},
        "plan": {"gpu": plan.gpu.name, "expert_dtype": plan.settings.expert_dtype,
                 "static_experts": plan.budget.static_experts, "dynamic_slots": plan.budget.dynamic_slots,
                 "predicted_hit_rate": plan.hit_rate},
        "timings_s": {"generate_trace": round(gen_s, 3), "plan_with_trace": round(plan_s, 3),
                      "compile_generator": round(compile_gen, 3), "compile_and_warm_simulator": round(compile_sim, 3),
                      "reference_replay_per_layer": round(ref_s, 3)},
        "reference_agrees": agree,
        "policies": rows,
    }
    print(f"{report['machine']['cpu']}, {os.cpu_count()} logical cores; python {report['versions']['python']}, "
          f"numpy {np.__version__}, numba {numba.__version__}, torch {torch.__version__}")
    print(f"trace: {trace.num_tokens} tokens x {trace.num_moe_layers} layers x {trace.top_k} picks = {accesses:,} "
          f"accesses (skew {args.skew}, locality {args.locality}); generated in {gen_s:.2f} s, planned in "
          f"{plan_s:.2f} s; compile + warm-up {compile_gen + compile_sim:.2f} s")
    print(f"{'policy':<8} {'all threads s':>13} {'1 thread s':>10} {'M access/s':>10} {'ns/access':>9} "
          f"{'hit %':>6} {'tok/s':>7}  bound")
    for r in rows:
        print(f"{r['policy']:<8} {r['seconds']:>13.3f} {r['seconds_one_thread']:>10.3f} "
              f"{r['accesses_per_s'] / 1e6:>10.1f} {r['ns_per_access_one_thread']:>9.1f} {100 * r['hit_rate']:>6.2f} "
              f"{r['tokens_per_s_predicted']:>7.2f}  {r['bound']}")
    print(f"plain-Python reference replay: {ref_s:.2f} s per layer (x40 layers = {40 * ref_s:.0f} s); "
          f"counts agree: {agree}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0 if agree else 1


if __name__ == "__main__":
    raise SystemExit(main())
