"""``residency demo`` and ``residency generate``: run the model end to end."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch


def register(sub: argparse._SubParsersAction) -> None:
    demo = sub.add_parser("demo", help="write the built-in tiny model and generate from it (prints tokens/s)")
    demo.add_argument("--dir", type=Path, default=None, help="where to write the tiny checkpoint (default: a temp dir)")
    demo.add_argument("--prompt", default="The expert cache", help="prompt text")
    demo.add_argument("--max-new-tokens", type=int, default=48)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=run_demo)

    gen = sub.add_parser("generate", help="generate from a checkpoint folder")
    gen.add_argument("--model", type=Path, required=True, help="Hugging Face Nemotron-H folder")
    group = gen.add_mutually_exclusive_group(required=True)
    group.add_argument("--prompt", help="prompt text (needs a tokenizer in the folder)")
    group.add_argument("--ids", help="comma-separated prompt token ids")
    gen.add_argument("--max-new-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    gen.add_argument("--top-p", type=float, default=0.95)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    gen.set_defaults(func=run_generate)


def _report(model, prompt_ids: torch.Tensor, out: torch.Tensor) -> None:
    stats = model.stats()
    new = out[0, prompt_ids.shape[1]:].tolist()
    print(f"generated token ids: {new}")
    if model.tokenizer is not None:
        print(f"generated text: {model.tokenizer.decode(new)!r}")
    rate = stats["decode_tokens_per_s"]
    print(
        f"{stats['new_tokens']} new tokens on {stats['device']}: prefill {stats['prefill_s'] * 1e3:.1f} ms "
        f"({stats['prompt_tokens']} tokens), decode {rate:.1f} tokens/s" if rate else "decode: too few tokens to time"
    )


def run_demo(args: argparse.Namespace) -> int:
    from ..offloaded import OffloadedNemotron
    from ..testing import write_tiny_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        folder = write_tiny_checkpoint(args.dir or Path(tmp) / "tiny-nemotron-h")
        model = OffloadedNemotron.from_pretrained(folder, device="cpu")
        print(f"tiny model: {model.config.describe()} at {folder}")
        print("(random weights: the text is noise; the demo shows the pipeline and its speed)")
        ids = model.encode(args.prompt)
        out = model.generate(ids, max_new_tokens=args.max_new_tokens, temperature=0.8, seed=args.seed,
                             stop_at_eos=False)
        print(f"prompt: {args.prompt!r}")
        _report(model, ids, out)
    return 0


def run_generate(args: argparse.Namespace) -> int:
    from ..offloaded import OffloadedNemotron

    model = OffloadedNemotron.from_pretrained(args.model, device=args.device)
    if args.prompt is not None:
        ids = model.encode(args.prompt)
    else:
        ids = model.encode([int(x) for x in args.ids.split(",") if x.strip()])
    out = model.generate(ids, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                         seed=args.seed)
    _report(model, ids, out)
    return 0
