"""``residency demo``, ``residency generate`` and ``residency chat``: run the model end to end.

``generate --prompt TEXT`` sends the prompt through the folder's chat template as one user message
(``--raw``: as plain text) and streams the reply to the terminal, the reasoning trace between
``<think>`` and ``</think>`` lines (dimmed on a terminal) and then the answer; it ends with a
timing line and the telemetry line. ``chat`` is the same as an interactive session that keeps the
history (``/reset`` clears it, Ctrl-D ends it).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import NemotronHConfig
from ..errors import InputError

if TYPE_CHECKING:  # torch is imported where a command runs, so `residency --help` and planning start fast
    import torch


def register(sub: argparse._SubParsersAction) -> None:
    demo = sub.add_parser("demo", help="write the built-in tiny model and generate from it (prints tokens/s)")
    demo.add_argument("--dir", type=Path, default=None, help="where to write the tiny checkpoint (default: a temp dir)")
    demo.add_argument("--prompt", default="The expert cache", help="prompt text")
    demo.add_argument("--max-new-tokens", type=int, default=48)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--share", type=float, default=0.25,
                      help="share of the experts the offloaded run's budget leaves room for (default 0.25)")
    demo.set_defaults(func=run_demo)

    gen = sub.add_parser("generate", help="generate from a checkpoint folder (chat template applied; --raw for none)")
    gen.add_argument("--model", type=Path, required=True, help="Hugging Face Nemotron-H folder")
    group = gen.add_mutually_exclusive_group(required=True)
    group.add_argument("--prompt", help="prompt text (needs a tokenizer in the folder); sent as a user message "
                       "through the chat template unless --raw")
    group.add_argument("--ids", help="comma-separated prompt token ids")
    gen.add_argument("--raw", action="store_true", help="use --prompt as plain text, without the chat template")
    _add_text_options(gen, max_new_help="tokens to generate (default: 32 with --ids; with --prompt until an end "
                      "token or the context is full)")
    _add_load_options(gen)
    gen.set_defaults(func=run_generate)

    chat = sub.add_parser("chat", help="interactive chat with a checkpoint folder (/reset clears, Ctrl-D ends)")
    chat.add_argument("--model", type=Path, required=True, help="Hugging Face Nemotron-H folder with a chat template")
    _add_text_options(chat, max_new_help="tokens per reply (default: until an end token or the context is full)")
    _add_load_options(chat)
    chat.set_defaults(func=run_chat)


def _add_text_options(p: argparse.ArgumentParser, *, max_new_help: str) -> None:
    p.add_argument("--system", default=None, help="a system message put first")
    p.add_argument("--no-thinking", action="store_true",
                   help="chat template with enable_thinking=False (no reasoning trace)")
    p.add_argument("--low-effort", action="store_true", help="chat template with low_effort=True (shorter reasoning)")
    p.add_argument("--max-new-tokens", type=int, default=None, help=max_new_help)
    p.add_argument("--temperature", type=float, default=None,
                   help="0 = greedy (default: the folder's generation_config.json, else 1.0)")
    p.add_argument("--top-p", type=float, default=None,
                   help="nucleus sampling (default: the folder's generation_config.json, else 0.95)")
    p.add_argument("--seed", type=int, default=None, help="the same seed gives the same text")
    p.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="stop when this text appears (repeatable; not printed)")


def _add_load_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None,
                   help="cpu, cuda, cuda:N or unified (default: cuda when available)")
    p.add_argument("--vram-budget", default=None,
                   help="offload experts: device memory the library may use, e.g. 20GiB, 24GB or 0.8 (of free)")
    p.add_argument("--plan", type=Path, default=None, help="a plan file from `residency plan` (offloads experts)")
    p.add_argument("--profile", type=Path, default=None, help="a profile to plan the expert slots from")
    p.add_argument("--policy", default=None, help="eviction policy: static, lru, lfu or hybrid")
    p.add_argument("--no-prefetch", action="store_true", help="no look-ahead copies")
    p.add_argument("--cpu-experts", choices=("auto", "always", "never"), default="auto",
                   help="compute missed experts on the CPU: where cheaper (auto), always or never")
    p.add_argument("--context", type=int, default=None,
                   help="offloaded: tokens of KV cache the budget keeps room for (default: the plan's, else 8192)")
    p.add_argument("--prefill-chunk", type=int, default=None, help="prompt tokens per forward call")
    p.add_argument("--embeddings", choices=("auto", "host", "device"), default="auto",
                   help="offloaded: where the embedding table lives (auto: the plan's, else host memory on a "
                        "discrete GPU that cannot hold every expert)")


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
            # the chat tokenizer (BPE + chat template) when `tokenizers` is installed, else UTF-8 bytes
            chat = importlib.util.find_spec("tokenizers") is not None
            folder = write_tiny_checkpoint(target, tokenizer="bpe" if chat else "bytes")
        except OSError as exc:
            raise InputError(f"--dir {target}: cannot write the tiny checkpoint there ({exc.strerror or exc}); "
                             "pick a folder you can write to") from None
        model = OffloadedNemotron.from_pretrained(folder, device="cpu")
        print(f"tiny model: {model.config.describe()} at {folder}")
        print("(random weights: the text is noise; the demo shows the pipeline and its speed)")
        ids = model.encode(args.prompt)
        sampling = dict(max_new_tokens=args.max_new_tokens, temperature=0.8, seed=args.seed, stop_at_eos=False)
        # a short run first, so the timed one does not include first-call set-up (lazy imports, allocator)
        model.generate(ids, **{**sampling, "max_new_tokens": min(4, args.max_new_tokens)})
        out = model.generate(ids, **sampling)
        print(f"prompt: {args.prompt!r}")
        print("== every expert resident")
        _report(model, ids, out)
        run_offloaded_demo(model, folder, ids, out, sampling, args.share)
        if args.dir is not None and chat:
            print(f"the tiny checkpoint stays in {folder}: try `residency chat --model {folder}` or "
                  f"`residency serve --model {folder}`")
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
        import torch

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


def _check_text_options(args: argparse.Namespace) -> None:
    """Sampling and length flags checked before the (possibly minutes-long) load."""
    from ..model.detokenize import check_stop
    from ..model.sampling import check_max_new_tokens, check_sampling, check_seed

    check_sampling(1.0 if args.temperature is None else args.temperature, 0.95 if args.top_p is None else args.top_p)
    if args.max_new_tokens is not None:
        check_max_new_tokens(args.max_new_tokens)
    check_seed(args.seed)
    try:
        check_stop(args.stop)
    except InputError as exc:
        raise InputError(f"--{exc}") from None


def _load(args: argparse.Namespace, config: NemotronHConfig, device: torch.device):
    """The model with the load flags (device, offload budget, plan, profile, policy, prefetch, CPU experts)."""
    from ..offloaded import OffloadedNemotron

    plan = profile = None
    if args.plan is not None:
        from ..planning.plan import Plan

        plan = Plan.load(args.plan, config=config)
    if args.profile is not None:
        from ..profiling.profile import Profile

        profile = Profile.load(args.profile, fingerprint=config.fingerprint())
    cpu = {"auto": "auto", "always": True, "never": False}[args.cpu_experts]
    return OffloadedNemotron.from_pretrained(
        args.model, device="unified" if args.device == "unified" else device, vram_budget=args.vram_budget,
        plan=plan, profile=profile, policy=args.policy, prefetch=not args.no_prefetch, cpu_experts=cpu,
        context=args.context, prefill_chunk=args.prefill_chunk,
        embeddings=None if args.embeddings == "auto" else args.embeddings,
    )


def run_generate(args: argparse.Namespace) -> int:
    from ..model.tokenizer import as_token_ids, missing_tokenizer_reason

    prompt_ids = parse_ids(args.ids) if args.ids is not None else None
    _check_text_options(args)
    config, has_tokenizer, device = preflight(args.model, args.device)
    if prompt_ids is not None:
        try:
            as_token_ids(prompt_ids, config.vocab_size)
        except InputError as exc:
            raise InputError(f"--ids: {exc}") from None
    elif not has_tokenizer:
        raise InputError(f"--prompt needs a tokenizer, but {args.model} {missing_tokenizer_reason(args.model)}: "
                         "pass token ids with --ids, or add the model's tokenizer.json to the folder")

    model = _load(args, config, device)
    sampling = dict(temperature=args.temperature, top_p=args.top_p, seed=args.seed, stop=args.stop)
    if prompt_ids is not None:
        ids = model.encode(prompt_ids)
        out = model.generate(ids, max_new_tokens=args.max_new_tokens or 32, **sampling)
        _report(model, ids, out)
        return 0
    if args.raw or model.tokenizer.chat_template is None:
        if not args.raw:
            print(f"residency generate: note: {args.model} has no chat template; the prompt is used as plain text",
                  file=sys.stderr)
        ids = model.encode(args.prompt)
        max_new = args.max_new_tokens or max(1, model.context_length - ids.shape[1])
        stream = model.generate(args.prompt, max_new_tokens=max_new, stream=True, **sampling)
        for piece in stream:
            _write(piece)
        result = stream.result
    else:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        messages.append({"role": "user", "content": args.prompt})
        result = _stream_reply(model, messages, args, sampling)
    _write("\n")
    _print_turn_stats(model, result)
    print(model.telemetry_line())
    return 0


def run_chat(args: argparse.Namespace) -> int:
    from ..model.tokenizer import missing_tokenizer_reason

    _check_text_options(args)
    config, has_tokenizer, device = preflight(args.model, args.device)
    if not has_tokenizer:
        raise InputError(f"chat needs a tokenizer, but {args.model} {missing_tokenizer_reason(args.model)}; "
                         "add the model's tokenizer.json and chat template to the folder")
    model = _load(args, config, device)
    if model.tokenizer.chat_template is None:
        raise InputError(f"{args.model} has no chat template (chat_template.jinja, or chat_template in "
                         "tokenizer_config.json); add the model's template, or use `residency generate --raw`")
    sampling = dict(temperature=args.temperature, top_p=args.top_p, seed=args.seed, stop=args.stop)
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict] = []
    interactive = sys.stdin.isatty()
    print(f"chat with {args.model} ({'thinking off' if args.no_thinking else 'thinking on'}): type a message; "
          "/reset clears the history, Ctrl-D ends")
    while True:
        try:
            line = input(">>> " if interactive else "")
        except EOFError:
            break
        except KeyboardInterrupt:
            print()
            break
        text = line.strip()
        if not text:
            continue
        if text == "/reset":
            history.clear()
            print("(history cleared)")
            continue
        if text in ("/exit", "/quit"):
            break
        history.append({"role": "user", "content": line})
        try:
            result = _stream_reply(model, system + history, args, sampling)
        except KeyboardInterrupt:
            history.pop()
            print("\n(stopped; the message was dropped)")
            continue
        except InputError as exc:
            history.pop()
            print(f"error: {exc}", file=sys.stderr)
            continue
        _write("\n")
        history.append(result.message)
        _print_turn_stats(model, result)
    print()
    print(model.telemetry_line())
    return 0


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _stream_reply(model, messages: list[dict], args: argparse.Namespace, sampling: dict):
    """Stream one chat reply to stdout: ``<think>`` reasoning ``</think>`` (dimmed on a terminal), then the answer."""
    dim, plain = ("\033[2m", "\033[0m") if sys.stdout.isatty() else ("", "")
    stream = model.chat(messages, enable_thinking=not args.no_thinking, low_effort=args.low_effort,
                        max_new_tokens=args.max_new_tokens, stream=True, **sampling)
    state = "start"
    try:
        for delta in stream:
            if delta.reasoning:
                if state == "start":
                    _write(f"{dim}<think>\n")
                    state = "reasoning"
                _write(delta.reasoning)
            else:
                if state == "reasoning":
                    _write(f"\n</think>{plain}\n")
                state = "content"
                _write(delta.content)
        if state == "reasoning":
            _write("\n</think>")
    finally:
        stream.close()
        if state in ("reasoning", "start"):
            _write(plain)
    return stream.result


def _print_turn_stats(model, result) -> None:
    stats = model.stats()
    rate = stats.get("decode_tokens_per_s")
    speed = f"decode {rate:.1f} tokens/s" if rate else "decode: too few tokens to time"
    why = {"stop": "an end token or stop string", "length": "the token limit", "cancelled": "cancelled"}
    print(f"{result.completion_tokens} new tokens on {stats['device']}: prefill {stats['prefill_s'] * 1e3:.1f} ms "
          f"({result.prompt_tokens} tokens), {speed}; ended by {why.get(result.finish_reason, result.finish_reason)}")
