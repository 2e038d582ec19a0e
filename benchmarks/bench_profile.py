"""Profiling overhead: a profiled forward against a plain forward on the same input, same process.

    python benchmarks/bench_profile.py [--out docs/benchmarks/profiling]

For each model (the built-in tiny model and a larger tiny configuration) and sequence length,
plain and profiled forwards alternate (so drift affects both), and the ratio of the medians is
reported. The profiled forward includes everything ``model.profile`` adds per forward: the
observer's accumulation and the expert-output norms for REAP saliency. Target: ratio <= 1.10.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from _machine import cpu_model, git_commit

from residency import OffloadedNemotron
from residency.profiling.profile import ProfileObserver
from residency.testing import write_tiny_checkpoint

CASES = [
    ("tiny (32 experts, top-4)", {}, (1, 64, 512)),
    ("larger tiny (64 experts, top-8, hidden 256)", dict(n_routed_experts=64, num_experts_per_tok=8, hidden_size=256,
                                                        moe_latent_size=128, moe_intermediate_size=192), (512,)),
]


def time_pair(model: OffloadedNemotron, seq: int, repeats: int) -> tuple[float, float]:
    ids = torch.randint(3, model.config.vocab_size, (1, seq))
    obs = ProfileObserver(model.config.num_moe_layers, model.config.n_routed_experts, model.device)
    plain, profiled = [], []
    for _ in range(3):  # warm-up
        model(ids)
    for _ in range(repeats):
        t0 = time.perf_counter()
        model(ids)
        plain.append(time.perf_counter() - t0)
        detach = model.model.add_observer(obs)
        t0 = time.perf_counter()
        model(ids)
        profiled.append(time.perf_counter() - t0)
        detach()
    return statistics.median(plain), statistics.median(profiled)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="write OUT.json and OUT.md")
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides, seqs in CASES:
            folder = write_tiny_checkpoint(Path(tmp) / name.split()[0] / str(len(rows)), **overrides)
            model = OffloadedNemotron.from_pretrained(folder, device="cpu")
            for seq in seqs:
                plain, profiled = time_pair(model, seq, args.repeats)
                rows.append({"model": name, "tokens": seq, "plain_ms": plain * 1e3, "profiled_ms": profiled * 1e3,
                             "ratio": profiled / plain})
                print(f"{name:45s} {seq:5d} tokens: plain {plain * 1e3:8.2f} ms, profiled {profiled * 1e3:8.2f} ms, "
                      f"ratio {profiled / plain:.3f}")
    commit = git_commit()
    env = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "cpu": cpu_model(),
        "cores": torch.get_num_threads(), "python": platform.python_version(), "torch": torch.__version__,
        "commit_measured": commit, "repeats": args.repeats,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps({"environment": env, "results": rows}, indent=2) + "\n")
        lines = [
            "# Profiling overhead", "",
            "Profiled forward (observer attached: counts, gate mass, expert-output norms for REAP saliency) "
            "against a plain forward on the same input, alternating, median of "
            f"{args.repeats} runs each. Produced by `python benchmarks/bench_profile.py --out "
            "docs/benchmarks/profiling`.", "",
            f"- machine: {env['cpu']}, {env['cores']} torch threads (CPU only)",
            f"- date: {env['date']}; python {env['python']}, torch {env['torch']}; measured at commit "
            f"{env['commit_measured']} (the commit that adds this file follows it)", "",
            "| model | tokens | plain ms | profiled ms | ratio |", "|---|---:|---:|---:|---:|",
        ]
        lines += [f"| {r['model']} | {r['tokens']} | {r['plain_ms']:.2f} | {r['profiled_ms']:.2f} | "
                  f"{r['ratio']:.3f} |" for r in rows]
        args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
        print(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
