"""Generation: sampling rules, seeds, text in and out, telemetry, and input errors."""

from __future__ import annotations

import pytest
import torch

from residency import OffloadedNemotron
from residency.errors import CheckpointError, InputError
from residency.model import tokenizer as tokenizer_module
from residency.model.sampling import sample_next
from residency.model.tokenizer import load_tokenizer, missing_tokenizer_reason


def test_greedy_and_tiny_top_p_pick_argmax():
    logits = torch.randn(4, 50)
    assert torch.equal(sample_next(logits, temperature=0), logits.argmax(-1))
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        assert torch.equal(sample_next(logits, temperature=1.0, top_p=1e-6, generator=gen), logits.argmax(-1))


def test_top_p_never_samples_outside_nucleus():
    logits = torch.tensor([[4.0, 3.0, 0.0, -1.0, -2.0]])
    probs = torch.softmax(logits, -1)[0]
    assert probs[:2].sum() > 0.9 > probs[0]
    gen = torch.Generator().manual_seed(1)
    picks = {int(sample_next(logits, 1.0, 0.9, gen)) for _ in range(200)}
    assert picks == {0, 1}


@pytest.mark.parametrize(
    "temperature, top_p, message",
    [(1.0, 0.0, r"top_p must lie in \(0, 1\]"), (1.0, 1.5, "top_p must lie"), (1.0, float("nan"), "top_p"),
     (-1.0, 0.9, "temperature must be a finite number >= 0"), (float("nan"), 0.9, "temperature"),
     (float("inf"), 0.9, "temperature"), ("hot", 0.9, "temperature must be a number")],
)
def test_bad_sampling_arguments(temperature, top_p, message):
    with pytest.raises(InputError, match=message):
        sample_next(torch.zeros(1, 3), temperature, top_p)


def test_tiny_temperature_is_greedy_not_nan():
    logits = torch.randn(3, 20)
    assert torch.equal(sample_next(logits, 1e-30, 0.95), logits.argmax(-1))


def test_seeded_sampling_is_reproducible(tiny_model):
    a = tiny_model.generate([5, 6, 7], max_new_tokens=12, temperature=0.9, seed=11, stop_at_eos=False)
    b = tiny_model.generate([5, 6, 7], max_new_tokens=12, temperature=0.9, seed=11, stop_at_eos=False)
    c = tiny_model.generate([5, 6, 7], max_new_tokens=12, temperature=0.9, seed=12, stop_at_eos=False)
    assert torch.equal(a, b) and a.shape == (1, 15)
    assert not torch.equal(a, c)


def test_text_in_text_out_and_stats(tiny_model):
    text = tiny_model.generate("Hello", max_new_tokens=6, temperature=0, stop_at_eos=False)
    assert isinstance(text, str)
    stats = tiny_model.stats()
    assert stats["new_tokens"] == 6 and stats["prompt_tokens"] == 6  # bos + 5 bytes
    assert stats["decode_tokens_per_s"] > 0 and stats["device"] == "cpu"


def test_eos_stops_generation(tiny_model):
    prompt = [1, 50, 60]
    greedy = tiny_model.generate(prompt, max_new_tokens=8, temperature=0, stop_at_eos=False)
    first = int(greedy[0, 3])
    eos_before = tiny_model.config.eos_token_id
    object.__setattr__(tiny_model.model.config, "eos_token_id", first)
    try:
        out = tiny_model.generate(prompt, max_new_tokens=8, temperature=0)
    finally:
        object.__setattr__(tiny_model.model.config, "eos_token_id", eos_before)
    assert out.shape == (1, 4) and int(out[0, -1]) == first


def test_input_errors(tiny_model):
    with pytest.raises(InputError, match=r"token id 999 at position 2 is outside the vocabulary.*\[0, 259\)"):
        tiny_model([1, 2, 999])
    with pytest.raises(InputError, match="row 1, position 0"):
        tiny_model.encode([[1, 2], [-1, 3]])
    for empty in ([], [[]], torch.zeros(1, 0, dtype=torch.long)):
        with pytest.raises(InputError, match="no token ids"):
            tiny_model.encode(empty)
    with pytest.raises(InputError, match="must be integers"):
        tiny_model.encode([1.5, 2.0])
    with pytest.raises(InputError, match="must be integers"):
        tiny_model.encode(torch.ones(1, 3))
    with pytest.raises(InputError, match="equal-length lists"):
        tiny_model.encode([[1, 2], [3]])
    with pytest.raises(InputError, match=r"\[batch, seq\]"):
        tiny_model.encode(torch.ones(1, 2, 3, dtype=torch.long))
    assert isinstance(InputError("x"), ValueError)  # callers catching ValueError keep working


@pytest.mark.parametrize(
    "kwargs, message",
    [({"temperature": -1}, "temperature must be"), ({"top_p": 0}, "top_p must lie"),
     ({"top_p": 1.01}, "top_p must lie"), ({"max_new_tokens": 0}, "max_new_tokens must be a whole number >= 1"),
     ({"max_new_tokens": -2}, "max_new_tokens"), ({"max_new_tokens": 2.5}, "max_new_tokens"),
     ({"seed": "x"}, "seed must be an integer"), ({"seed": 2**70}, "fits in 64 bits")],
)
def test_generate_refuses_bad_settings(tiny_model, kwargs, message):
    with pytest.raises(InputError, match=message):
        tiny_model.generate([1, 5, 6], **kwargs)


def test_text_without_tokenizer(tiny_model, tmp_path):
    bare = OffloadedNemotron(tiny_model.model, None, tmp_path)
    with pytest.raises(InputError, match="has no tokenizer.*pass token ids instead, or add .*tokenizer.json"):
        bare.encode("hello")
    with pytest.raises(InputError, match="has no tokenizer"):
        bare.generate("hello", max_new_tokens=2)
    assert bare.generate([1, 5], max_new_tokens=2, temperature=0).shape == (1, 4)


def test_tokenizer_files_unreadable_or_without_transformers(tmp_path, monkeypatch):
    (tmp_path / "tokenizer.json").write_text("{")
    pytest.importorskip("transformers")
    with pytest.raises(CheckpointError, match="tokenizer files could not be read"):
        load_tokenizer(tmp_path)

    class NoTransformers:
        def __init__(self, folder):
            raise ImportError("no transformers")

    monkeypatch.setattr(tokenizer_module, "HFTokenizer", NoTransformers)
    assert load_tokenizer(tmp_path) is None
    assert "transformers package" in missing_tokenizer_reason(tmp_path)
    assert "no tokenizer.json" in missing_tokenizer_reason(tmp_path / "other")


def test_profile_checks_prompts_and_options(tiny_model, tiny_checkpoint, tmp_path):
    with pytest.raises(InputError, match="prompt 1: token id 999"):
        tiny_model.profile([[1, 2], [1, 999]])
    with pytest.raises(InputError, match="prompt 'x': no token ids"):
        tiny_model.profile([{"id": "x", "input_ids": []}])
    with pytest.raises(InputError, match="flat list"):
        tiny_model.profile([[[1, 2]]])
    with pytest.raises(InputError, match="has none of the keys"):
        tiny_model.profile([{"id": "x"}])
    with pytest.raises(InputError, match="no prompts"):
        tiny_model.profile([])
    with pytest.raises(InputError, match="decode_tokens must be a whole number >= 0"):
        tiny_model.profile([[1, 2]], decode_tokens=-1)
    with pytest.raises(InputError, match="co_activation"):
        tiny_model.profile([[1, 2]], co_activation=-3)
    bare = OffloadedNemotron(tiny_model.model, None, tiny_checkpoint)
    with pytest.raises(InputError, match="prompt 0 is text, but .* has no tokenizer"):
        bare.profile(["hello"])
