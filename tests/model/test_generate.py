"""Generation: sampling rules, seeds, text in and out, telemetry, and input errors."""

from __future__ import annotations

import pytest
import torch

from residency.model.sampling import sample_next


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


def test_bad_sampling_arguments():
    with pytest.raises(ValueError, match="top_p"):
        sample_next(torch.zeros(1, 3), 1.0, 0.0)


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
    with pytest.raises(ValueError, match=r"\[0, 259\)"):
        tiny_model([1, 2, 999])
    with pytest.raises(ValueError, match="non-empty"):
        tiny_model([[]])
