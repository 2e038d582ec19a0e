"""Next-token choice from fp32 logits: greedy at temperature 0, else temperature + nucleus (top-p) sampling."""

from __future__ import annotations

import torch


def sample_next(
    logits: torch.Tensor, temperature: float = 1.0, top_p: float = 0.95, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Pick one token per row of ``logits [B, V]``; returns ``[B]`` int64.

    ``top_p`` keeps the smallest set of most likely tokens whose probability reaches ``top_p``
    (the most likely token is always kept), renormalises and samples from it.
    """
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(-1) - sorted_probs  # mass strictly before each token
        sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    device_gen = generator if generator is None or generator.device == probs.device else None
    return torch.multinomial(probs, 1, generator=device_gen).squeeze(-1)
