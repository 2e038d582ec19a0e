"""Quick start: load a checkpoint, chat, stream, read the telemetry.

    python examples/quickstart.py [--model DIR] [--vram-budget 16MiB] [--max-new-tokens 32]

Without --model it writes the built-in tiny Nemotron-H checkpoint with its BPE tokenizer and chat
template (random weights: the words are noise, the pipeline is the real one). With --vram-budget
the routed experts are offloaded to host memory and the device keeps what the budget allows.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from residency import OffloadedNemotron
from residency.testing import write_tiny_checkpoint


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="a Nemotron-H checkpoint (default: tiny model)")
    parser.add_argument("--vram-budget", default=None, help="offload experts under this budget, e.g. 16MiB")
    parser.add_argument("--device", default=None, help="cpu, cuda or unified (default: cuda when available)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args(argv)

    # 1. load: any Hugging Face Nemotron-H folder, or the built-in tiny one
    folder = args.model or write_tiny_checkpoint(Path(tempfile.mkdtemp()) / "tiny-nemotron-h", tokenizer="bpe")
    model = OffloadedNemotron.from_pretrained(folder, device=args.device, vram_budget=args.vram_budget)
    print(f"model: {model.config.describe()} on {model.device}")

    # 2. chat: the folder's chat template, the reasoning trace split from the answer
    messages = [{"role": "system", "content": "You are concise."},
                {"role": "user", "content": "What does an expert cache do?"}]
    reply = model.chat(messages, max_new_tokens=args.max_new_tokens, seed=0)
    print(f"reasoning: {reply.reasoning!r}")
    print(f"answer: {reply.content!r}")
    print(f"usage: {reply.prompt_tokens} prompt + {reply.completion_tokens} generated tokens "
          f"(finish: {reply.finish_reason})")

    # 3. stream: pieces arrive as tokens are decoded; thinking off gives the answer directly
    print("streamed: ", end="")
    stream = model.chat("Say hello in one line.", enable_thinking=False, max_new_tokens=args.max_new_tokens,
                        seed=1, stream=True)
    for delta in stream:
        print(delta.content, end="", flush=True)
    print(f"\n({stream.result.completion_tokens} tokens, finish: {stream.result.finish_reason})")

    # 4. plain text, no template, stopped by a stop string or an end token
    text = model.generate("The expert cache", max_new_tokens=args.max_new_tokens, seed=2, stop=["\n\n"])
    print(f"plain continuation: {text!r}")

    # 5. stats: timings of the last call, and for offloaded models the expert traffic
    stats = model.stats()
    rate = stats["decode_tokens_per_s"]
    print(f"last call: {stats['new_tokens']} tokens, prefill {1e3 * stats['prefill_s']:.1f} ms, "
          f"decode {rate:.1f} tokens/s" if rate else "last call: too few tokens to time")
    print(model.telemetry_line())
    if model.runtime is not None:
        model.runtime.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
