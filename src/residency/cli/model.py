"""``residency demo`` and ``residency generate``: run the model end to end."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from ..config import NemotronHConfig
from ..errors import InputError


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
    gen.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
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
    from ..model.sampling import check_max_new_tokens, check_seed
    from ..offloaded import OffloadedNemotron
    from ..testing import write_tiny_checkpoint

    check_max_new_tokens(args.max_new_tokens)
    check_seed(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        target = args.dir or Path(tmp) / "tiny-nemotron-h"
        try:
            folder = write_tiny_checkpoint(target)
        except OSError as exc:
            raise InputError(f"--dir {target}: cannot write the tiny checkpoint there ({exc.strerror or exc}); "
                             "pick a folder you can write to") from None
        model = OffloadedNemotron.from_pretrained(folder, device="cpu")
        print(f"tiny model: {model.config.describe()} at {folder}")
        print("(random weights: the text is noise; the demo shows the pipeline and its speed)")
        ids = model.encode(args.prompt)
        out = model.generate(ids, max_new_tokens=args.max_new_tokens, temperature=0.8, seed=args.seed,
                             stop_at_eos=False)
        print(f"prompt: {args.prompt!r}")
        _report(model, ids, out)
    return 0


def parse_ids(text: str) -> list[int]:
    """``--ids 1,40,41`` → ``[1, 40, 41]``; anything else raises :class:`InputError` naming the flag."""
    items = [x.strip() for x in text.split(",")]
    if not any(items):
        raise InputError("--ids is empty; pass comma-separated token ids such as --ids 1,40,41")
    ids = []
    for item in items:
        if not item:
            continue
        try:
            ids.append(int(item))
        except ValueError:
            raise InputError(f"--ids: {item!r} is not a whole number; pass comma-separated token ids such as "
                             "--ids 1,40,41 (or --prompt TEXT)") from None
    return ids


def preflight(folder: Path, device: str | None) -> tuple[NemotronHConfig, bool, torch.device]:
    """Checks that need no weights, done before the (possibly minutes-long) load: the device, the
    folder and its config; returns the config, whether the folder has a usable tokenizer, and the device."""
    from ..devices import resolve_device
    from ..model.checkpoint import Checkpoint
    from ..model.tokenizer import load_tokenizer

    dev = resolve_device(device)
    config = Checkpoint(folder).config
    return config, load_tokenizer(folder) is not None, dev


def run_generate(args: argparse.Namespace) -> int:
    from ..model.sampling import check_max_new_tokens, check_sampling, check_seed
    from ..model.tokenizer import as_token_ids, missing_tokenizer_reason
    from ..offloaded import OffloadedNemotron

    prompt_ids = parse_ids(args.ids) if args.ids is not None else None
    check_sampling(args.temperature, args.top_p)
    check_max_new_tokens(args.max_new_tokens)
    check_seed(args.seed)
    config, has_tokenizer, device = preflight(args.model, args.device)
    if prompt_ids is not None:
        try:
            as_token_ids(prompt_ids, config.vocab_size)
        except InputError as exc:
            raise InputError(f"--ids: {exc}") from None
    elif not has_tokenizer:
        raise InputError(f"--prompt needs a tokenizer, but {args.model} {missing_tokenizer_reason(args.model)}: "
                         "pass token ids with --ids, or add the model's tokenizer.json to the folder")

    model = OffloadedNemotron.from_pretrained(args.model, device=device)
    ids = model.encode(args.prompt if prompt_ids is None else prompt_ids)
    out = model.generate(ids, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                         seed=args.seed)
    _report(model, ids, out)
    return 0
