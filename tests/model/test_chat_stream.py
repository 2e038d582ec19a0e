"""Streaming text: incremental detokenization (never half a UTF-8 character), stop strings, end tokens,
the reasoning split, and streamed == non-streamed. A scripted model emits chosen tokens through the
real generation loop, with the tiny checkpoint's real BPE tokenizer and chat template."""

from __future__ import annotations

import random
import threading
from types import SimpleNamespace

import pytest
import torch

from residency import OffloadedNemotron
from residency.errors import InputError
from residency.model.detokenize import IncrementalDecoder, StopMatcher
from residency.model.reasoning import ReasoningSplitter, split_reasoning
from residency.model.streaming import TextStream
from residency.model.tokenizer import load_tokenizer

pytest.importorskip("tokenizers")


@pytest.fixture(scope="module")
def chat_folder(tmp_path_factory):
    from residency.model.tiny_tokenizer import write_chat_tokenizer

    return write_chat_tokenizer(tmp_path_factory.mktemp("chat-tokenizer"))


@pytest.fixture(scope="module")
def tok(chat_folder):
    return load_tokenizer(chat_folder)


def _byte_symbols() -> dict[int, str]:
    """GPT-2's byte-to-unicode table, which byte-level BPE vocabularies use for the 256 bytes."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, n = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + n)
            n += 1
    return table


def byte_ids(tok, text: str) -> list[int]:
    """One token per UTF-8 byte, so a character spans several tokens."""
    table = _byte_symbols()
    return [tok.token_id(table[b]) for b in text.encode("utf-8")]


# ---------------------------------------------------------------------- units


def test_incremental_decoding_never_splits_a_character(tok):
    text = "naïve café — 日本語 🙂🚀 ok"
    ids = byte_ids(tok, text)
    assert len(ids) == len(text.encode("utf-8")) and tok.decode(ids) == text
    dec = IncrementalDecoder(tok.decode)
    pieces = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert "" in pieces  # the decoder did hold back partial characters


def test_incremental_decoding_equals_full_decoding_on_random_tokens(tok):
    rng = random.Random(0)
    vocab = tok.vocab_size
    for _ in range(200):
        ids = [rng.randrange(vocab) for _ in range(rng.randrange(1, 30))]
        dec = IncrementalDecoder(tok.decode)
        pieces = [dec.push(i) for i in ids]
        joined = "".join(pieces) + dec.flush()
        assert joined == tok.decode(ids)
        assert all(not p.endswith("\ufffd") for p in pieces)  # only the final flush may end in U+FFFD
    # bytes that never complete a character come out at the end as U+FFFD, as a full decode gives them
    dangling = byte_ids(tok, "日")[:2]
    dec = IncrementalDecoder(tok.decode)
    assert [dec.push(i) for i in dangling] == ["", ""] and dec.flush() == tok.decode(dangling) == "\ufffd"


def _cut(text: str, stops: list[str]) -> tuple[str, bool]:
    hits = [i for s in stops if (i := text.find(s)) >= 0]
    return (text[:min(hits)], True) if hits else (text, False)


def test_stop_strings_in_any_split():
    rng = random.Random(1)
    alphabet = "ab<>/ \n"
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 25)))
        stops = ["".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 4))) for _ in range(rng.randrange(1, 3))]
        m = StopMatcher(stops)
        out, stopped, i = [], False, 0
        while i < len(text) and not stopped:
            j = i + rng.randrange(1, 4)
            piece, stopped = m.feed(text[i:j])
            out.append(piece)
            i = j
        if not stopped:
            out.append(m.flush())
        assert ("".join(out), stopped) == _cut(text, stops)
        for k in range(len(out) - 1):  # no emitted text ever holds a whole stop string
            assert not any(s in "".join(out[:k + 1]) for s in stops)


def test_reasoning_split_in_any_split():
    rng = random.Random(2)
    cases = [("I think.\n</think>\n\nAnswer!", True, ("I think.\n", "Answer!")),
             ("Answer only", False, ("", "Answer only")),
             ("  <think>hmm</think>  yes", False, ("hmm", "yes")),
             ("never closed <th", True, ("never closed <th", "")),
             ("<thinking is not the marker", False, ("", "<thinking is not the marker")),
             ("</think>", True, ("", "")),
             ("a</think>b</think>c", True, ("a", "b</think>c")),
             ("", False, ("", ""))]
    for text, inside, expected in cases:
        assert split_reasoning(text, inside) == expected, text
        for _ in range(30):
            s = ReasoningSplitter(inside)
            parts, i = [], 0
            while i < len(text):
                j = i + rng.randrange(1, 4)
                parts += s.feed(text[i:j])
                i = j
            parts += s.finish()
            got = ("".join(t for k, t in parts if k == "reasoning"), "".join(t for k, t in parts if k == "content"))
            assert got == expected, (text, parts)


def test_text_stream_cancel_from_another_thread():
    started = threading.Event()

    def tokens(cancel):
        for i in range(10_000):
            if cancel.is_set():
                return
            started.set()
            yield 65 + i % 26

    stream = TextStream(tokens, lambda ids: "".join(chr(i) for i in ids), prompt_tokens=3)
    first = next(stream)
    threading.Timer(0.01, stream.cancel).start()
    rest = list(stream)
    assert started.is_set() and stream.result.finish_reason == "cancelled"
    assert stream.result.text == first + "".join(rest) and stream.result.completion_tokens < 10_000


# ---------------------------------------------------------------------- a scripted model through the real loop


class Scripted(torch.nn.Module):
    """Emits ``script`` token by token (then ``filler``) through OffloadedNemotron's generation loop."""

    def __init__(self, vocab: int, script: list[int], filler: int):
        super().__init__()
        self.config = SimpleNamespace(vocab_size=vocab, eos_token_id=2, pad_token_id=0, max_position_embeddings=4096)
        self.lm_head = torch.nn.Linear(1, 1)
        self.script, self.filler = script, filler
        self.calls = 0

    def new_cache(self, batch: int):
        return SimpleNamespace(step=0)

    def forward(self, ids, cache=None, last_only=False, prefill=False):
        i = cache.step
        cache.step += 1
        self.calls += 1
        nxt = self.script[i] if i < len(self.script) else self.filler
        logits = torch.full((ids.shape[0], 1 if last_only else ids.shape[1], self.config.vocab_size), -1e4)
        logits[..., nxt] = 0.0
        return logits


def scripted(chat_folder, tok, text: str, *, end: str | None = None, raw_ids: list[int] | None = None):
    ids = list(raw_ids) if raw_ids is not None else tok.encode(text, add_special_tokens=False)
    if end is not None:
        ids.append(tok.token_id(end))
    filler = tok.encode(" x", add_special_tokens=False)[0]
    return OffloadedNemotron(Scripted(tok.vocab_size, ids, filler), tok, chat_folder)


def run_both(model, messages, **kwargs):
    """The chat reply non-streamed and streamed (joined), with the streamed deltas."""
    result = model.chat(messages, **kwargs)
    stream = model.chat(messages, stream=True, **kwargs)
    deltas = list(stream)
    joined = ("".join(d.reasoning for d in deltas), "".join(d.content for d in deltas))
    assert joined == (stream.result.reasoning, stream.result.content)
    assert all(bool(d.reasoning) != bool(d.content) for d in deltas)
    assert stream.result == result
    return result, deltas


def test_reasoning_and_content_when_the_template_opens_thinking(chat_folder, tok):
    model = scripted(chat_folder, tok, "First, 2 + 2.\nIt is 4.\n</think>\n\nThe answer is 4.", end="<|im_end|>")
    result, deltas = run_both(model, [{"role": "user", "content": "2 + 2?"}], max_new_tokens=64, seed=0)
    assert result.prompt.endswith("<|im_start|>assistant\n<think>\n")
    assert result.reasoning == "First, 2 + 2.\nIt is 4.\n" and result.content == "The answer is 4."
    assert result.finish_reason == "stop" and result.stopped_by == 11
    assert result.completion_tokens == len(tok.encode("First, 2 + 2.\nIt is 4.\n</think>\n\nThe answer is 4.",
                                                      add_special_tokens=False)) + 1  # the end token counts
    assert result.text == "First, 2 + 2.\nIt is 4.\n</think>\n\nThe answer is 4."
    assert result.prompt_tokens == len(tok.encode(result.prompt, add_special_tokens=False))
    assert result.message == {"role": "assistant", "content": "The answer is 4.",
                              "reasoning_content": "First, 2 + 2.\nIt is 4.\n"}
    kinds = [("r" if d.reasoning else "c") for d in deltas]
    assert kinds == sorted(kinds, reverse=True)  # all reasoning first, then content


def test_thinking_off_gives_content_only(chat_folder, tok):
    model = scripted(chat_folder, tok, "Plain answer.", end="</s>")
    result, _ = run_both(model, "hi", enable_thinking=False, max_new_tokens=32)
    assert result.prompt.endswith("<think></think>")
    assert (result.reasoning, result.content, result.finish_reason) == ("", "Plain answer.", "stop")
    # a model that opens the span itself is split the same way
    model = scripted(chat_folder, tok, "<think>hidden</think>shown", end="<|im_end|>")
    result, _ = run_both(model, "hi", enable_thinking=False, max_new_tokens=32)
    assert (result.reasoning, result.content) == ("hidden", "shown")


def test_unclosed_thinking_and_force_nonempty_content(chat_folder, tok):
    model = scripted(chat_folder, tok, "still thinking about it")
    result, _ = run_both(model, "q", max_new_tokens=5)
    assert result.finish_reason == "length" and result.completion_tokens == 5
    assert result.content == "" and result.reasoning == tok.decode(tok.encode("still thinking about it",
                                                                              add_special_tokens=False)[:5])
    forced, deltas = run_both(model, "q", max_new_tokens=5, force_nonempty_content=True)
    assert forced.content == forced.reasoning == result.reasoning and deltas[-1].content == result.reasoning
    assert "force_nonempty_content" not in model.apply_chat_template([{"role": "user", "content": "q"}])


def test_end_tokens_and_stop_strings_stop(chat_folder, tok):
    model = scripted(chat_folder, tok, "</think>alpha beta STOP gamma", end="<|im_end|>")
    result, deltas = run_both(model, "q", stop=["STOP", "never"], max_new_tokens=64)
    assert result.content == "alpha beta " and result.finish_reason == "stop" and result.stopped_by == "STOP"
    assert not any("ST" in d.content for d in deltas)  # held back until it was clear it was the stop string
    ids = tok.encode("</think>alpha beta STOP gamma", add_special_tokens=False)
    first = next(k for k in range(len(ids)) if "STOP" in tok.decode(ids[:k + 1]))
    assert result.completion_tokens == first + 1 < len(ids)  # no token generated past the stop string
    # a stop string split over tokens, in plain generation
    model = scripted(chat_folder, tok, "", raw_ids=byte_ids(tok, "one two<END>three"))
    text = model.generate("x", max_new_tokens=40, stop="<END>")
    pieces = list(model.generate("x", max_new_tokens=40, stop="<END>", stream=True))
    assert text == "".join(pieces) == "one two"
    # end tokens: the folder's generation_config.json says 2 and 11; the end token is not in the text
    assert model.end_token_ids() == (2, 11)
    model = scripted(chat_folder, tok, "done", end="</s>")
    assert model.generate("x", max_new_tokens=20) == "done"
    ids = model.generate([5, 6], max_new_tokens=20)
    assert ids[0, -1].item() == 2 and ids.shape[1] == 2 + len(tok.encode("done", add_special_tokens=False)) + 1
    stream = model.generate("x", max_new_tokens=20, stream=True, stop_at_eos=False)
    assert "".join(stream).startswith("done x") and stream.result.finish_reason == "length"


def test_streamed_utf8_through_the_model(chat_folder, tok):
    text = "</think>Grüße 日本 🙂"
    model = scripted(chat_folder, tok, "", raw_ids=tok.encode("</think>", add_special_tokens=False)
                     + byte_ids(tok, "Grüße 日本 🙂") + [tok.token_id("<|im_end|>")])
    result, deltas = run_both(model, "q", max_new_tokens=64)
    assert result.content == "Grüße 日本 🙂" and result.text == text
    assert all("\ufffd" not in d.content for d in deltas) and len(deltas) > 3


def test_chat_input_errors(chat_folder, tok, tiny_model):
    model = scripted(chat_folder, tok, "x")
    for kwargs, message in [({"temperature": -1}, "temperature must be"), ({"top_p": 0}, "top_p must lie"),
                            ({"max_new_tokens": 0}, "max_new_tokens must be"), ({"seed": "s"}, "seed must be"),
                            ({"stop": [""]}, "stop must hold non-empty strings"), ({"stop": 3}, "stop must be a"),
                            ({"max_new_tokens": 5000}, "exceed the model's context of 4096 tokens"),
                            ({"chat_template_kwargs": ["x"]}, "chat_template_kwargs must be a dict")]:
        with pytest.raises(InputError, match=message):
            model.chat("q", **kwargs)
    with pytest.raises(InputError, match="unknown role 'robot'"):
        model.chat([{"role": "robot", "content": "x"}])
    with pytest.raises(InputError, match="has no chat template .* pass plain text to generate"):
        tiny_model.chat("hello")  # the byte-tokenizer checkpoint has none
    with pytest.raises(InputError, match="take one prompt, got a batch of 2"):
        tiny_model.generate([[1, 2], [3, 4]], stream=True)
