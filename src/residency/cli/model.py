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
    demo.add_argument("--share", type=float, default=0.25,
                      help="share of the experts the offloaded run's budget leaves room for (default 0.25)")
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
    gen.add_argument("--device", default=None,
                     help="cpu, cuda, cuda:N or unified (default: cuda when available)")
    gen.add_argument("--vram-budget", default=None,
                     help="offload experts: device memory the library may use, e.g. 20GiB, 24GB or 0.8 (of free)")
    gen.add_argument("--plan", type=Path, default=None, help="a plan file from `residency plan` (offloads experts)")
    gen.add_argument("--profile", type=Path, default=None, help="a profile to plan the expert slots from")
    gen.add_argument("--policy", default=None, help="eviction policy: static, lru, lfu or hybrid")
    gen.add_argument("--no-prefetch", action="store_true", help="no look-ahead copies")
    gen.add_argument("--cpu-experts", choices=("auto", "always", "never"), default="auto",
                     help="compute missed experts on the CPU: where cheaper (auto), always or never")
    gen.set_defaults(func=run_generate)


def _report(model, prompt_ids: torch.Tensor, out: torch.Tensor, *, tokens: bool = True) -> None:
    stats = model.stats()
    new = out[0, prompt_ids.shape[1]:].tolist()
    if tokens:
        print(f"generated token ids: {new}")
        if model.tokenizer is not None:
            print(f"generated text: {model.tokenizer.decode(new)!r}")
    rate = stats["decode_tokens_per_s"]
    print(
        f"{stats['new_tokens']} new tokens on {stats['device']}: prefill {stats['prefill_s'] * 1e3:.1f} ms "
        f"({stats['prompt_tokens']} tokens), decode {rate:.1f} tokens/s" if rate else "decode: too few tokens to time"
    )
    if model.runtime is not None:
        print(model.telemetry_line())


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
        sampling = dict(max_new_tokens=args.max_new_tokens, temperature=0.8, seed=args.seed, stop_at_eos=False)
        out = model.generate(ids, **sampling)
        print(f"prompt: {args.prompt!r}")
        print("== every expert resident")
        _report(model, ids, out)
        run_offloaded_demo(model, folder, ids, out, sampling, args.share)
    return 0


DEMO_PROMPTS = [
    "The expert cache keeps the hottest experts on the GPU.",
    "Offloading moves the rest to pinned host memory.",
    "Prefetching guesses the next layer's experts one layer ahead.",
]


def run_offloaded_demo(resident, folder: Path, ids: torch.Tensor, expected: torch.Tensor, sampling: dict,
                       share: float) -> None:
    """Profile, plan a budget with room for ``share`` of the experts, generate offloaded, compare."""
    from ..offload import DEFAULT_CONTEXT, fixed_bytes
    from ..offloaded import OffloadedNemotron
    from ..sizes import format_bytes

    if not 0 <= share <= 1:
        raise InputError(f"--share must lie in [0, 1], got {share}")
    c = resident.config
    profile = resident.profile(DEMO_PROMPTS, decode_tokens=16)
    fixed = fixed_bytes(c, resident.model.lm_head.weight.dtype, context=DEFAULT_CONTEXT)
    slots = int(share * c.num_moe_layers * c.n_routed_experts)
    budget = fixed.total + slots * fixed.layout.record_bytes
    print(f"== offloaded: profiled {len(DEMO_PROMPTS)} prompts, budget {format_bytes(budget)} "
          f"({slots} of {c.num_moe_layers * c.n_routed_experts} experts fit besides {format_bytes(fixed.total)} "
          "of dense weights, staging and caches)")
    model = OffloadedNemotron.from_pretrained(folder, device="cpu", vram_budget=f"{budget}B", profile=profile)
    try:
        out = model.generate(ids, **sampling)
        _report(model, ids, out, tokens=False)
        decode = model.stats()["experts"]["by_phase"]["decode"]
        looked = decode["hits"] + decode["misses"]
        measured = f"{100 * decode['hits'] / looked:.1f} %" if looked else "n/a"
        predicted = model.slots.predicted_hit_rate
        print(f"decode hit rate: measured {measured}, predicted by the plan "
              f"{'n/a' if predicted is None else f'{100 * predicted:.1f} %'}")
        same = torch.equal(out, expected)
        print(f"same tokens as the resident run: {'yes' if same else 'NO'}")
        if not same:
            raise RuntimeError("the offloaded run produced other tokens than the resident one")
    finally:
        model.runtime.close()


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

    dev = resolve_device(None if device == "unified" else device)
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

    plan = profile = None
    if args.plan is not None:
        from ..planning.plan import Plan

        plan = Plan.load(args.plan, config=config)
    if args.profile is not None:
        from ..profiling.profile import Profile

        profile = Profile.load(args.profile, fingerprint=config.fingerprint())
    cpu = {"auto": "auto", "always": True, "never": False}[args.cpu_experts]
    model = OffloadedNemotron.from_pretrained(
        args.model, device="unified" if args.device == "unified" else device, vram_budget=args.vram_budget,
        plan=plan, profile=profile, policy=args.policy, prefetch=not args.no_prefetch, cpu_experts=cpu,
    )
    ids = model.encode(args.prompt if prompt_ids is None else prompt_ids)
    out = model.generate(ids, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                         seed=args.seed)
    _report(model, ids, out)
    return 0
