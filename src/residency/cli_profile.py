"""``residency profile``: profile prompts on a checkpoint, or show a saved profile."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .errors import FileFormatError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "profile",
        help="profile which experts prompts route to (or: profile show PROFILE)",
        description="residency profile --model DIR --prompts FILE.jsonl --out PROFILE [--trace TRACE] "
        "[--plot DIR]  |  residency profile show PROFILE",
    )
    p.add_argument("action", nargs="*", help="'show PROFILE' to print a saved profile")
    p.add_argument("--model", type=Path, help="Hugging Face Nemotron-H folder")
    p.add_argument("--prompts", type=Path, help="JSONL: one object per line with 'text' (or 'prompt' or "
                   "'input_ids') and an optional 'id'")
    p.add_argument("--out", type=Path, help="where to write the profile (.safetensors)")
    p.add_argument("--trace", type=Path, help="also write the routing trace here")
    p.add_argument("--plot", type=Path, help="write PNG plots into this folder (needs matplotlib)")
    p.add_argument("--decode-tokens", type=int, default=0, help="greedily decode N tokens per prompt too")
    p.add_argument("--co-activation", type=int, default=0, help="keep the top-N co-selected pairs per layer")
    p.add_argument("--top", type=int, default=5, help="hottest experts shown per layer")
    p.add_argument("--device", default=None)
    p.set_defaults(func=run_profile)


def read_prompts(path: Path) -> list[dict]:
    """Read a JSONL prompt file; every line must be an object with text, prompt or input_ids."""
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
        if not isinstance(item, dict) or not ({"text", "prompt", "input_ids"} & set(item)):
            raise FileFormatError(f"{path}:{n}: each line needs a 'text', 'prompt' or 'input_ids' field")
        item.setdefault("id", f"{path.stem}-{n}")
        prompts.append(item)
    if not prompts:
        raise FileFormatError(f"{path}: no prompts in the file")
    return prompts


def run_profile(args: argparse.Namespace) -> int:
    from .profile import Profile

    if args.action:
        if args.action[0] != "show" or len(args.action) != 2:
            print("usage: residency profile show PROFILE  |  residency profile --model DIR --prompts F --out P")
            return 2
        profile = Profile.load(args.action[1])
        print(profile.summary(top=args.top))
        if args.plot:
            _plots(profile, args.plot)
        return 0
    missing = [name for name in ("model", "prompts", "out") if getattr(args, name) is None]
    if missing:
        print(f"residency profile: missing --{', --'.join(missing)}")
        return 2
    from .offloaded import OffloadedNemotron
    from .trace_stats import temporal_stats

    prompts = read_prompts(args.prompts)
    model = OffloadedNemotron.from_pretrained(args.model, device=args.device)
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


def _plots(profile, folder: Path) -> None:
    from .plots import save_all

    for path in save_all(profile, folder):
        print(f"wrote {path}")
