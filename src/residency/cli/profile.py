"""``residency profile``: profile prompts on a checkpoint, show a saved profile, or compare two.

    residency profile --model DIR --prompts FILE.jsonl --out PROFILE [--trace TRACE] [--plot DIR]
    residency profile show PROFILE [--trace TRACE] [--phase decode] [--plot DIR]
    residency profile compare A B [--top-n N]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import FileFormatError, InputError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "profile",
        help="profile which experts prompts route to (or: profile show PROFILE, profile compare A B)",
        description="residency profile --model DIR --prompts FILE.jsonl --out PROFILE [--trace TRACE] "
        "[--plot DIR]  |  residency profile show PROFILE [--trace TRACE]  |  residency profile compare A B",
    )
    p.add_argument("action", nargs="*", help="'show PROFILE' to print a saved profile; 'compare A B' to compare two")
    p.add_argument("--model", type=Path, help="Hugging Face Nemotron-H folder")
    p.add_argument("--prompts", type=Path, help="JSONL: one object per line with 'text' (or 'prompt' or "
                   "'input_ids') and an optional 'id'")
    p.add_argument("--out", type=Path, help="where to write the profile (.safetensors)")
    p.add_argument("--trace", type=Path, help="also write the routing trace here (with show: read it and print "
                   "its re-use statistics)")
    p.add_argument("--plot", type=Path, help="write PNG plots into this folder (needs matplotlib)")
    p.add_argument("--decode-tokens", type=int, default=0, help="greedily decode N tokens per prompt too")
    p.add_argument("--co-activation", type=int, default=0, help="keep the top-N co-selected pairs per layer")
    p.add_argument("--top", type=int, default=5, help="hottest experts shown per layer")
    p.add_argument("--phase", choices=("all", "prefill", "decode"), default="all",
                   help="show: restrict the summary and trace statistics to prefill or decoded tokens")
    p.add_argument("--top-n", type=int, default=None, help="compare: size of the top sets (default: top-k)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    p.set_defaults(func=run_profile)


def read_prompts(path: Path) -> list[dict]:
    """Read a JSONL prompt file; every line must be an object with text, prompt or input_ids."""
    from ..profiling.profile import PROMPT_KEYS

    if not path.is_file():
        raise FileFormatError(f"{path}: no such prompt file")
    prompts = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise FileFormatError(f"{path}:{n}: not valid JSON ({exc}); one JSON object per line") from exc
        if isinstance(item, str):
            item = {"text": item}
        if not isinstance(item, dict) or not (set(PROMPT_KEYS) & set(item)):
            raise FileFormatError(f"{path}:{n}: each line needs one of the fields {', '.join(map(repr, PROMPT_KEYS))}")
        item.setdefault("id", f"{path.stem}-{n}")
        prompts.append(item)
    if not prompts:
        raise FileFormatError(f"{path}: no prompts in the file")
    return prompts


USAGE = ("usage: residency profile --model DIR --prompts FILE.jsonl --out PROFILE  |  "
         "residency profile show PROFILE  |  residency profile compare A B")


def _usage_error(message: str) -> int:
    print(f"residency profile: error: {message}\n{USAGE}", file=sys.stderr)
    return 2


def _check_counts(args: argparse.Namespace) -> None:
    for flag, value, low in (("--top", args.top, 0), ("--decode-tokens", args.decode_tokens, 0),
                             ("--co-activation", args.co_activation, 0), ("--top-n", args.top_n, 1)):
        if value is not None and value < low:
            raise InputError(f"{flag} must be a whole number >= {low}, got {value}")
    if args.plot is not None:
        import importlib.util

        if importlib.util.find_spec("matplotlib") is None:
            raise InputError("--plot needs matplotlib: pip install 'residency[plot]' (or leave out --plot)")


def run_profile(args: argparse.Namespace) -> int:
    _check_counts(args)
    if args.action:
        action, files = args.action[0], args.action[1:]
        if action == "show" and len(files) == 1:
            return _show(args, Path(files[0]))
        if action == "compare" and len(files) == 2:
            return _compare(args, Path(files[0]), Path(files[1]))
        return _usage_error(f"unknown or incomplete action {' '.join(args.action)!r}")
    missing = [name for name in ("model", "prompts", "out") if getattr(args, name) is None]
    if missing:
        return _usage_error(f"missing --{', --'.join(missing)}")
    from ..offloaded import OffloadedNemotron, check_prompts
    from ..profiling.trace_stats import temporal_stats
    from .model import preflight

    prompts = read_prompts(args.prompts)
    config, has_tokenizer, device = preflight(args.model, args.device)
    try:
        check_prompts(prompts, vocab_size=config.vocab_size, has_tokenizer=has_tokenizer, path=args.model)
    except InputError as exc:
        raise InputError(f"{args.prompts}: {exc}") from None
    model = OffloadedNemotron.from_pretrained(args.model, device=device)
    result = model.profile(prompts, decode_tokens=args.decode_tokens, trace=args.trace is not None,
                           co_activation=args.co_activation)
    profile, trace = result if args.trace is not None else (result, None)
    profile.save(args.out)
    print(profile.summary(top=args.top))
    print(f"wrote {args.out}")
    if trace is not None:
        trace.save(args.trace)
        print("re-use of experts across tokens (fraction of picks by reuse distance in tokens):")
        print(temporal_stats(trace).table())
        print(f"wrote {args.trace}")
    if args.plot:
        _plots(profile, args.plot)
    return 0


def _show(args: argparse.Namespace, path: Path) -> int:
    from ..profiling.profile import Profile

    profile = Profile.load(path)
    if args.phase != "all":
        print(f"({args.phase} tokens only)")
        profile = profile.phase(args.phase)
    print(profile.summary(top=args.top))
    if args.trace is not None:
        from ..profiling.trace import RoutingTrace
        from ..profiling.trace_stats import temporal_stats

        trace = RoutingTrace.load(args.trace, fingerprint=profile.fingerprint)
        print(f"re-use of experts across tokens ({args.phase} tokens; fraction of picks by reuse distance in tokens):")
        print(temporal_stats(trace, phase=args.phase).table())
    if args.plot:
        _plots(profile, args.plot)
    return 0


def _compare(args: argparse.Namespace, path_a: Path, path_b: Path) -> int:
    from ..profiling.profile import Profile

    a = Profile.load(path_a)
    b = Profile.load(path_b, fingerprint=a.fingerprint)
    if args.top_n is not None and args.top_n > a.num_experts:
        raise InputError(f"--top-n {args.top_n} exceeds the {a.num_experts} experts per layer; pick at most "
                         f"{a.num_experts}")
    cmp = a.compare(b, top_n=args.top_n)
    na, nb = path_a.stem, path_b.stem
    print(f"A = {path_a} ({a.num_prompts} prompts, {a.tokens} tokens); B = {path_b} ({b.num_prompts} prompts, "
          f"{b.tokens} tokens)")
    print(f"top-{cmp['top_n']} experts by gate mass; coverage = experts for 50/80/90/95 % of gate mass")
    print(f"{'moe':>4} {'layer':>5} {'jaccard':>7} {'A mass in B top':>15} {'B mass in A top':>15}  "
          f"{'coverage A':<16} {'coverage B':<16}")
    for m in range(a.num_moe_layers):
        ca = "/".join(str(x) for x in cmp["coverage_self"][m])
        cb = "/".join(str(x) for x in cmp["coverage_other"][m])
        print(f"{m:>4} {a.moe_layers[m]:>5} {cmp['jaccard'][m]:>7.3f} {100 * cmp['self_mass_in_other_top'][m]:>14.1f}% "
              f"{100 * cmp['other_mass_in_self_top'][m]:>14.1f}%  {ca:<16} {cb:<16}")

    def mean(key: str) -> float:
        return 100 * sum(cmp[key]) / len(cmp[key])

    print(f"mean Jaccard {cmp['mean_jaccard']:.3f}; {na} mass on {nb}'s top-{cmp['top_n']}: "
          f"{mean('self_mass_in_other_top'):.1f} %, {nb} mass on {na}'s: {mean('other_mass_in_self_top'):.1f} %")
    return 0


def _plots(profile, folder: Path) -> None:
    from ..profiling.plots import save_all

    for path in save_all(profile, folder):
        print(f"wrote {path}")
