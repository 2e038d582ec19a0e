"""Which experts do code prompts need, compared with prose? Runs on the built-in tiny model.

    python examples/prompt_conditioned_experts.py [--out DIR]

Writes the tiny checkpoint, profiles two prompt sets (prefill plus a few decoded tokens each),
prints each profile's summary and how much their hot sets overlap, records a routing trace with
its re-use statistics, and saves plots (heatmap, coverage curves, per-prompt Jaccard) as PNGs.
On the tiny model the weights are random, so the differences are small; the same script on a
real checkpoint (pass --model DIR) shows real prompt-conditioned structure.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from residency import OffloadedNemotron, Profile
from residency.cli.profile import read_prompts
from residency.profiling.trace_stats import temporal_stats
from residency.testing import write_tiny_checkpoint

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: a temp dir)")
    parser.add_argument("--model", type=Path, default=None, help="a Nemotron-H checkpoint (default: tiny model)")
    parser.add_argument("--decode-tokens", type=int, default=4)
    args = parser.parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="residency-example-"))
    out.mkdir(parents=True, exist_ok=True)

    folder = args.model or write_tiny_checkpoint(out / "tiny-nemotron-h")
    model = OffloadedNemotron.from_pretrained(folder, device="cpu")
    code = read_prompts(HERE / "prompts" / "code.jsonl")
    prose = read_prompts(HERE / "prompts" / "prose.jsonl")

    code_profile, code_trace = model.profile(code, decode_tokens=args.decode_tokens, trace=True)
    prose_profile = model.profile(prose, decode_tokens=args.decode_tokens)
    code_profile.save(out / "code.safetensors")
    prose_profile.save(out / "prose.safetensors")
    code_trace.save(out / "code_trace.safetensors")

    print("== code prompts ==")
    print(code_profile.summary(top=3))
    print("== prose prompts ==")
    print(prose_profile.summary(top=3))

    cmp = code_profile.compare(prose_profile)
    print(f"\ntop-{cmp['top_n']} Jaccard per MoE layer, code vs prose: "
          + ", ".join(f"{j:.2f}" for j in cmp["jaccard"]) + f" (mean {cmp['mean_jaccard']:.2f})")
    print("share of code's gate mass on prose's top experts, per layer: "
          + ", ".join(f"{100 * s:.0f}%" for s in cmp["self_mass_in_other_top"]))

    both = Profile.merge([code_profile, prose_profile])
    print(f"merged: {both.num_prompts} prompts, {both.tokens} tokens")
    print("\nre-use of experts across tokens in the code trace:")
    print(temporal_stats(code_trace).table())
    print("the same for decoded tokens only (what a decode-time expert cache sees):")
    print(temporal_stats(code_trace, phase="decode").table())

    try:
        from residency.profiling import plots
    except ImportError:
        print("matplotlib missing: skipping plots")
        return 0
    import matplotlib

    matplotlib.use("Agg")
    written = plots.save_all(both, out / "plots")
    fig = plots.coverage_curves([code_profile, prose_profile], ["code", "prose"])
    fig.savefig(out / "plots" / "coverage_code_vs_prose.png", dpi=110)
    written.append(out / "plots" / "coverage_code_vs_prose.png")
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
