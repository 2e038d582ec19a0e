"""How long planning Nemotron 3 Super takes for a target GPU, from the config alone (no weights, no GPU).

    python benchmarks/bench_plan.py [--out docs/benchmarks/planning]

Plans the built-in Super config for each target (default: RTX 4090, H100 PCIe, DGX Spark) with the
default settings (NVFP4 experts, BF16 dense weights, 32k context, uniform prior) and, per target,
once more from a synthetic 2,000-token trace; reports the median wall time of ``--repeats`` runs
after one warm-up (numba compilation is excluded) and the plan's predictions. Goal: under 1 s each.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from _machine import cpu_model, git_commit

from residency.cli.plan import resolve_config
from residency.planning.plan import plan_residency
from residency.planning.simulate import synthetic_trace

TARGETS = ("RTX 4090", "H100 PCIe", "DGX Spark")


def median_time(fn, repeats: int):
    fn()  # warm-up
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="write OUT.json and OUT.md")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--gpu", action="append", default=None, help="target (repeatable)")
    args = parser.parse_args()
    config = resolve_config("nemotron-3-super", None)
    trace = synthetic_trace(config, 2000, skew=1.0, locality=0.3, seed=0)
    rows = []
    for gpu in args.gpu or TARGETS:
        for source, kwargs in (("uniform prior", {}), ("2k-token trace", {"trace": trace})):
            seconds, plan = median_time(lambda g=gpu, kw=kwargs: plan_residency(config, g, **kw), args.repeats)
            rows.append({"gpu": gpu, "input": source, "seconds": seconds, "hit_rate": plan.hit_rate,
                         "tokens_per_s": plan.tokens_per_s, "bound": plan.predicted.bound})
            print(f"{gpu:12s} {source:15s} {seconds * 1e3:8.1f} ms  predicted hit rate {plan.hit_rate:.3f}, "
                  f"{plan.tokens_per_s:.1f} tok/s ({plan.predicted.bound}-bound)")
    commit = git_commit()
    cpu = cpu_model()
    env = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "cpu": cpu, "python": platform.python_version(),
           "numpy": np.__version__, "commit_measured": commit, "repeats": args.repeats}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps({"environment": env, "results": rows}, indent=2) + "\n")
        lines = ["# Planning time for Nemotron 3 Super", "",
                 "Median wall time of `plan_residency` on the built-in Super config (no weights, no GPU), "
                 f"{args.repeats} runs after a warm-up. Produced by `python benchmarks/bench_plan.py --out "
                 "docs/benchmarks/planning`. Predictions are the planner's model, not measurements.", "",
                 f"- machine: {cpu}; python {env['python']}, numpy {env['numpy']}",
                 f"- date: {env['date']}; measured at commit {commit}", "",
                 "| target | input | time (ms) | predicted hit rate | predicted tok/s | bound |",
                 "|---|---|---:|---:|---:|---|"]
        lines += [f"| {r['gpu']} | {r['input']} | {r['seconds'] * 1e3:.1f} | {r['hit_rate']:.3f} | "
                  f"{r['tokens_per_s']:.1f} | {r['bound']} |" for r in rows]
        args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
        print(f"wrote {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
