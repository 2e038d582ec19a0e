"""Chat and streaming on the tiny model with its real BPE tokenizer: seeds reproduce, streamed equals
non-streamed, offloaded (``vram_budget``) equals resident, and a stream can be cancelled."""

from __future__ import annotations

import pytest
import torch

from residency import OffloadedNemotron
from residency.testing import write_tiny_checkpoint

pytest.importorskip("tokenizers")


@pytest.fixture(scope="module")
def chat_checkpoint(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-chat") / "ckpt", tokenizer="bpe")


@pytest.fixture(scope="module")
def chat_model(chat_checkpoint):
    return OffloadedNemotron.from_pretrained(chat_checkpoint, device="cpu")


def test_tiny_chat_checkpoint_layout(chat_checkpoint, chat_model):
    names = {p.name for p in chat_checkpoint.iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json", "config.json"} <= names
    assert "residency_tokenizer.json" not in names
    assert chat_model.config.vocab_size == chat_model.tokenizer.vocab_size == 512
    assert chat_model.end_token_ids() == (2, 11)
    d = chat_model.generation_defaults
    assert (d.temperature, d.top_p) == (1.0, 0.95)  # the folder says nothing: the model card's defaults
    again = write_tiny_checkpoint(chat_checkpoint.parent / "again", tokenizer="bpe")
    assert (again / "tokenizer.json").read_bytes() == (chat_checkpoint / "tokenizer.json").read_bytes()


def test_seeds_reproduce_and_stream_equals_non_stream(chat_model):
    messages = [{"role": "user", "content": "Hello, who are you?"}]
    a = chat_model.chat(messages, max_new_tokens=24, seed=5)
    b = chat_model.chat(messages, max_new_tokens=24, seed=5)
    c = chat_model.chat(messages, max_new_tokens=24, seed=6)
    assert a == b and a.token_ids != c.token_ids
    stream = chat_model.chat(messages, max_new_tokens=24, seed=5, stream=True)
    deltas = list(stream)
    assert "".join(d.reasoning for d in deltas) == a.reasoning and "".join(d.content for d in deltas) == a.content
    assert stream.result == a and a.prompt_tokens == chat_model.stats()["prompt_tokens"]
    assert a.completion_tokens == chat_model.stats()["new_tokens"]

    text = chat_model.generate("The expert cache", max_new_tokens=20, seed=3)
    pieces = list(chat_model.generate("The expert cache", max_new_tokens=20, seed=3, stream=True))
    assert "".join(pieces) == text and len(pieces) > 1
    assert all(not p.endswith("\ufffd") for p in pieces[:-1])
    # text in and ids in sample the same tokens for the same seed
    ids = chat_model.encode("The expert cache")
    out = chat_model.generate(ids, max_new_tokens=20, seed=3, stop_at_eos=False)
    assert chat_model.tokenizer.decode(out[0, ids.shape[1]:].tolist()).startswith(text)


def test_greedy_stop_string_from_the_models_own_text(chat_model):
    full = chat_model.generate("Hello", max_new_tokens=30, temperature=0, stop_at_eos=False)
    visible = full.strip()
    assert len(visible) > 6
    stop = visible[3:6]
    cut = chat_model.generate("Hello", max_new_tokens=30, temperature=0, stop_at_eos=False, stop=stop)
    assert cut == full[:full.index(stop)]
    stream = chat_model.generate("Hello", max_new_tokens=30, temperature=0, stop_at_eos=False, stop=stop, stream=True)
    assert "".join(stream) == cut and stream.result.finish_reason == "stop" and stream.result.stopped_by == stop


def test_offloaded_chat_equals_resident(chat_checkpoint, chat_model):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why offload experts?"}]
    resident = chat_model.chat(messages, max_new_tokens=12, seed=1, enable_thinking=False)
    off = OffloadedNemotron.from_pretrained(chat_checkpoint, device="cpu", vram_budget="16MiB", quiet=True)
    try:
        got = off.chat(messages, max_new_tokens=12, seed=1, enable_thinking=False, stream=True)
        content = "".join(d.content for d in got)
        assert got.result.token_ids == resident.token_ids and content == resident.content
        assert off.telemetry_line().startswith("experts: ")
        assert off.stats()["experts"]["hits"] + off.stats()["experts"]["misses"] > 0
    finally:
        off.runtime.close()


def test_cancel_and_close_stop_generation(chat_model):
    stream = chat_model.chat("Tell me a long story.", max_new_tokens=400, temperature=1.0, seed=0, stream=True)
    for i, _ in enumerate(stream):
        if i == 2:
            stream.cancel()
    assert stream.result.finish_reason == "cancelled" and stream.result.completion_tokens < 20
    stream = chat_model.generate("Once", max_new_tokens=400, seed=0, stream=True, stop_at_eos=False)
    next(stream)
    stream.close()
    assert stream.result.finish_reason == "cancelled" and stream.result.completion_tokens < 10
    assert chat_model.stats()["new_tokens"] == stream.result.completion_tokens
    untouched = chat_model.generate("Once", max_new_tokens=400, stream=True)
    assert untouched.result is None  # nothing runs until it is read
    untouched.close()


def test_history_round_trip(chat_model):
    first = chat_model.chat("Hi", max_new_tokens=8, seed=0)
    history = [{"role": "user", "content": "Hi"}, first.message, {"role": "user", "content": "More?"}]
    prompt = chat_model.apply_chat_template(history)
    assert f"<|im_start|>assistant\n<think></think>{first.content}<|im_end|>" in prompt
    assert prompt.endswith("<|im_start|>user\nMore?<|im_end|>\n<|im_start|>assistant\n<think>\n")
    second = chat_model.chat(history, max_new_tokens=8, seed=0)
    assert second.prompt_tokens == chat_model.encode_prompt(prompt).shape[1]
    assert torch.is_tensor(chat_model.encode_prompt(prompt))
