"""``residency generate --prompt`` (chat template, streaming, --raw, --no-thinking) and ``residency chat``."""

from __future__ import annotations

import io
import re

import pytest

from residency import OffloadedNemotron
from residency.cli import main
from residency.testing import write_tiny_checkpoint

pytest.importorskip("tokenizers")


@pytest.fixture(scope="module")
def chat_checkpoint(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("cli-chat") / "ckpt", tokenizer="bpe")


@pytest.fixture(scope="module")
def reference(chat_checkpoint):
    return OffloadedNemotron.from_pretrained(chat_checkpoint, device="cpu")


def one_line_error(capsys, command: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.startswith(f"residency {command}: error: ") and err.count("\n") == 1, err
    return err


def shown(result) -> str:
    """What the terminal shows of a reply: the reasoning between <think> lines, then the answer."""
    if not result.reasoning:
        return result.content + "\n"
    return f"<think>\n{result.reasoning}\n</think>" + (f"\n{result.content}" if result.content else "") + "\n"


def test_generate_streams_through_the_chat_template(chat_checkpoint, reference, capsys):
    assert main(["generate", "--model", str(chat_checkpoint), "--prompt", "Hello there", "--max-new-tokens", "16",
                 "--seed", "4"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[-1] == "experts: all resident"  # ends with the telemetry line
    assert re.match(r"\d+ new tokens on cpu: prefill .* ms \(\d+ tokens\), decode .*; ended by ", lines[-2])
    expected = reference.chat("Hello there", max_new_tokens=16, seed=4)
    assert expected.reasoning  # the template opened the thinking span
    assert out.split(lines[-2])[0] == shown(expected)
    assert f"({expected.prompt_tokens} tokens)" in lines[-2]
    assert lines[-2].startswith(f"{expected.completion_tokens} new")


def test_generate_no_thinking_raw_stop_and_budget(chat_checkpoint, reference, capsys):
    assert main(["generate", "--model", str(chat_checkpoint), "--prompt", "Hi", "--no-thinking", "--max-new-tokens",
                 "10", "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    expected = reference.chat("Hi", max_new_tokens=10, temperature=0, enable_thinking=False)
    assert expected.reasoning == "" and out.startswith(shown(expected))
    assert main(["generate", "--model", str(chat_checkpoint), "--prompt", "Hi", "--raw", "--max-new-tokens", "10",
                 "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(reference.generate("Hi", max_new_tokens=10, temperature=0) + "\n")
    assert main(["generate", "--model", str(chat_checkpoint), "--prompt", "Hi", "--raw", "--max-new-tokens", "8",
                 "--temperature", "0", "--vram-budget", "16MiB", "--no-prefetch"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("residency: cpu device, budget 16.00 MiB:")
    assert lines[-1].startswith("experts: ") and " hits / " in lines[-1]


def test_generate_without_a_template_uses_plain_text(tiny_checkpoint, capsys):
    assert main(["generate", "--model", str(tiny_checkpoint), "--prompt", "Hello", "--max-new-tokens", "4",
                 "--temperature", "0"]) == 0
    captured = capsys.readouterr()
    assert "has no chat template; the prompt is used as plain text" in captured.err
    assert captured.out.splitlines()[-1] == "experts: all resident"


@pytest.mark.parametrize("extra, message", [
    (["--stop", ""], "--stop must hold non-empty strings"),
    (["--temperature", "-1"], "temperature must be a finite number >= 0"),
    (["--top-p", "2"], "top_p must lie in (0, 1]"),
    (["--max-new-tokens", "0"], "max_new_tokens must be a whole number >= 1"),
    (["--max-new-tokens", "9999"], "exceed the model's context of 4096 tokens"),
])
def test_generate_text_option_errors(chat_checkpoint, capsys, extra, message):
    assert main(["generate", "--model", str(chat_checkpoint), "--prompt", "Hi", *extra]) == 2
    assert message in one_line_error(capsys, "generate")


def test_chat_session_keeps_history_and_resets(chat_checkpoint, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello\n\nHello\n/reset\nHello\n"))
    assert main(["chat", "--model", str(chat_checkpoint), "--max-new-tokens", "6", "--seed", "1",
                 "--system", "Be brief."]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"chat with {chat_checkpoint} (thinking on): type a message; /reset clears the history")
    assert "(history cleared)" in out and out.splitlines()[-1] == "experts: all resident"
    prompts = [int(n) for n in re.findall(r"prefill [\d.]+ ms \((\d+) tokens\)", out)]
    assert len(prompts) == 3 and prompts[1] > prompts[0] == prompts[2]  # the 2nd turn saw the 1st; /reset forgot


def test_chat_errors(tiny_checkpoint, chat_checkpoint, capsys, monkeypatch):
    assert main(["chat", "--model", str(tiny_checkpoint)]) == 2
    assert "has no chat template" in one_line_error(capsys, "chat")
    monkeypatch.setattr("sys.stdin", io.StringIO(""))  # Ctrl-D at once
    assert main(["chat", "--model", str(chat_checkpoint), "--no-thinking"]) == 0
    assert "(thinking off)" in capsys.readouterr().out
