"""Next-token choice from fp32 logits: greedy at temperature 0, else temperature + nucleus (top-p) sampling."""

from __future__ import annotations

import math

import torch

from ..errors import InputError


def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:  # numpy scalars and 0-d tensors
            value = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise InputError(f"{name} must be a number, got {value!r}") from None
    return float(value)


def check_sampling(temperature: float, top_p: float) -> tuple[float, float]:
    """``(temperature, top_p)`` as floats, or :class:`~residency.errors.InputError` naming the allowed range."""
    t, p = _number("temperature", temperature), _number("top_p", top_p)
    if not (math.isfinite(t) and t >= 0):
        raise InputError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if not 0 < p <= 1:
        raise InputError(f"top_p must lie in (0, 1] (1 = no nucleus cut), got {top_p!r}")
    return t, p


def check_max_new_tokens(max_new_tokens: int) -> int:
    """``max_new_tokens`` if it is a whole number >= 1, else :class:`~residency.errors.InputError`."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be a whole number >= 1, got {max_new_tokens!r}")
    return max_new_tokens


def check_seed(seed: int | None) -> int | None:
    """``seed`` if it is None or an integer ``torch.Generator.manual_seed`` takes, else :class:`InputError`."""
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not -(2**63) <= seed < 2**64):
        raise InputError(f"seed must be an integer that fits in 64 bits (or None for a random seed), got {seed!r}")
    return seed


def sample_next(
    logits: torch.Tensor, temperature: float = 1.0, top_p: float = 0.95, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Pick one token per row of ``logits [B, V]``; returns ``[B]`` int64.

    ``top_p`` keeps the smallest set of most likely tokens whose probability reaches ``top_p``
    (the most likely token is always kept), renormalises and samples from it. Bad settings raise
    :class:`~residency.errors.InputError` (a ``ValueError``).
    """
    temperature, top_p = check_sampling(temperature, top_p)
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float()
    # shift by the row maximum before dividing, so a tiny temperature gives -inf (probability 0), never nan
    probs = torch.softmax((logits - logits.amax(dim=-1, keepdim=True)) / temperature, dim=-1)
    if top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(-1) - sorted_probs  # mass strictly before each token
        sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    device_gen = generator if generator is None or generator.device == probs.device else None
    return torch.multinomial(probs, 1, generator=device_gen).squeeze(-1)
