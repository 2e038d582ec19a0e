"""Plan Nemotron 3 Super for GPUs you may not own, from its config alone (no weights, no GPU).

    python examples/plan_for_target_gpu.py [--gpus "RTX 4090" "H100 SXM" "DGX Spark"] [--context 32768]

For each target this prints the device-memory table (what the dense weights, caches, staging
and expert slots take), then one comparison line per GPU: expert slots, predicted hit rate and
tokens/s with the resource that bounds it. The predictions come from the planner's cost model
with a uniform prior (no profile): a profile of your prompts raises the hit rate
(`residency plan --profile`). Same as `residency plan --config nemotron-3-super --gpu NAME`.
"""

from __future__ import annotations

import argparse
import importlib.resources

from residency import load_config, plan_residency
from residency.sizes import format_bytes

TARGETS = ["RTX 4090", "H100 SXM", "DGX Spark"]


def super_config():
    """The Nemotron 3 Super config shipped with residency (package data)."""
    data = importlib.resources.files("residency") / "data" / "nemotron-3-super-120b-a12b.config.json"
    with importlib.resources.as_file(data) as path:
        return load_config(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", nargs="+", default=TARGETS, help="GPU names from `residency gpus`")
    parser.add_argument("--context", type=int, default=32768, help="tokens of KV cache to keep room for")
    parser.add_argument("--expert-dtype", default="nvfp4", help="nvfp4 (default), fp8 or bf16")
    args = parser.parse_args(argv)

    config = super_config()
    print(f"model: {config.describe()}")
    plans = []
    for gpu in args.gpus:
        plan = plan_residency(config, gpu, context=args.context, expert_dtype=args.expert_dtype)
        plans.append(plan)
        print()
        show = plan.show().splitlines()
        print("\n".join(show[2:show.index("Per MoE layer:")]))  # target, memory table, host tier, prediction

    print("\nSummary (cost-model predictions, uniform prior):")
    header = f"{'GPU':<14} {'memory':>10} {'experts on GPU':>14} {'of':>6} {'hit rate':>8} {'tokens/s':>9}  bound by"
    print(header)
    print("-" * len(header))
    for plan in plans:
        b, p = plan.budget, plan.predicted
        total = plan.settings.num_moe_layers * plan.num_experts
        on_gpu = b.static_experts + b.dynamic_slots
        print(f"{plan.gpu.name:<14} {format_bytes(b.vram_bytes):>10} {on_gpu:>14} {total:>6} "
              f"{100 * p.hit_rate:>7.1f}% {p.tokens_per_s:>9.1f}  {p.bound}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
