"""Expected-hit model and the allocation of expert slots across MoE layers.

Inputs per MoE layer: the probability ``p[e]`` that a token picks expert ``e`` (from a profile's
counts, smoothed, or the uniform ``top_k / E``; each row sums to top-k) and a locality ``λ``.

**Hit model.** A layer with ``r`` static experts (the ``r`` most probable) and ``s`` dynamic LRU
slots expects, per token,

    hits(r, s) = P(r) + λ·min(m, s / w) + (1 − λ)·m·s / (E − r)

where ``P(r)`` is the pick mass of the static set and ``m = top_k − P(r)`` the mass left to
non-resident experts. Routing is modelled as a mix: a share ``λ`` of picks re-pick an expert used
in the last ``w`` tokens at that layer (temporal locality; an LRU of ``s`` slots covers the most
recent ``s`` of the about ``w·m`` non-resident experts of that window), the rest are fresh draws
from ``p`` (an LRU of ``s`` slots holds ``s`` of the ``E − r`` non-resident experts, and at least
an average share of their mass, since LRU keeps popular experts longer). With ``λ = 0`` dynamic
slots are never better than static ones (independent picks: the best cache is the most probable
set), and the model reduces to the static hit mass ``P(n)``.

``λ`` is estimated per layer from a routing trace (:func:`estimate_locality`: the share of picks
that reuse an expert of the last ``w`` tokens beyond what frequencies alone explain) or assumed.

**Allocation.** For ``n`` slots a layer's value ``V(n)`` is the best split into static and dynamic
(ties go to more static slots). Slots are handed out one by one to the layer with the largest
marginal gain, over *concave* per-layer gains: each gain is the running minimum of ``V``'s
increments, a lower bound of ``V`` that equals it wherever ``V`` is concave (always when
``λ = 0``: sorted probabilities are non-increasing). Greedy on non-increasing gains is exactly
optimal for a separable concave objective under one budget (a fractional knapsack over equal-size
items), and the allocations for growing budgets are nested, so more budget never lowers the
predicted hits. Ties are broken by slot index, then layer index: the result is deterministic.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "DEFAULT_LOCALITY",
    "DEFAULT_WINDOW",
    "PRIOR_ALPHA",
    "pick_probabilities",
    "rank_experts",
    "hit_curves",
    "slot_gains",
    "allocate",
    "estimate_locality",
]

#: Locality assumed without a trace. No published statistic exists for Nemotron 3 Super; a
#: top-8-of-128 model repeats 45 % of its picks on the next token, and top-22-of-512 routing with
#: a shared expert is expected to repeat less, so a modest 0.2 is assumed. Record a trace to replace it.
DEFAULT_LOCALITY = 0.2
#: Look-back window of the locality model, in tokens.
DEFAULT_WINDOW = 4
#: Additive smoothing of profile counts, so experts unseen in a profile keep a small probability.
PRIOR_ALPHA = 0.5


def pick_probabilities(counts: np.ndarray | None, num_layers: int, num_experts: int, top_k: int,
                       alpha: float = PRIOR_ALPHA) -> np.ndarray:
    """Per layer, the probability that a token picks each expert ([layers, experts], rows sum to top_k).

    ``counts`` [layers, experts] are pick counts (None: uniform). Smoothed as
    ``top_k · (c + α) / (Σc + α·E)``, which never exceeds 1 since top_k ≤ E.
    """
    if counts is None:
        return np.full((num_layers, num_experts), top_k / num_experts, dtype=np.float64)
    c = np.asarray(counts, dtype=np.float64)
    if c.shape != (num_layers, num_experts):
        raise ValueError(f"counts have shape {c.shape}, expected {(num_layers, num_experts)}")
    if not np.all(np.isfinite(c)) or (c < 0).any():
        raise ValueError("counts must be finite and non-negative")
    return top_k * (c + alpha) / (c.sum(axis=1, keepdims=True) + alpha * num_experts)


def rank_experts(p: np.ndarray, tiebreak: np.ndarray | None = None) -> np.ndarray:
    """Expert ids per layer, most probable first; ties by ``tiebreak`` (larger first), then by id."""
    num_layers, num_experts = p.shape
    ids = np.broadcast_to(np.arange(num_experts), p.shape)
    tb = np.zeros_like(p) if tiebreak is None else np.asarray(tiebreak, dtype=np.float64)
    order = np.empty(p.shape, dtype=np.int64)
    for layer in range(num_layers):
        order[layer] = np.lexsort((ids[layer], -tb[layer], -p[layer]))
    return order


def hit_curves(p_sorted: np.ndarray, top_k: float, locality: np.ndarray, window: float
               ) -> tuple[np.ndarray, np.ndarray]:
    """Best expected hits per token ``V[l, n]`` with ``n`` slots, and its static count ``R[l, n]``.

    ``p_sorted`` [layers, E] holds each layer's probabilities in decreasing order; ``locality``
    [layers] the λ of each layer. ``V`` and ``R`` have shape [layers, E + 1].
    """
    num_layers, num_experts = p_sorted.shape
    lam = np.asarray(locality, dtype=np.float64).reshape(num_layers, 1)
    cum = np.zeros((num_layers, num_experts + 1))
    np.cumsum(p_sorted, axis=1, out=cum[:, 1:])
    miss = np.maximum(top_k - cum, 0.0)
    tail = num_experts - np.arange(num_experts + 1, dtype=np.float64)
    V = np.zeros((num_layers, num_experts + 1))
    R = np.zeros((num_layers, num_experts + 1), dtype=np.int64)
    tol = 1e-12 * max(top_k, 1.0)
    for n in range(num_experts + 1):
        r = np.arange(n + 1)
        s = (n - r).astype(np.float64)
        m = miss[:, : n + 1]
        fresh = np.divide(m * s, tail[: n + 1], out=np.zeros_like(m), where=tail[: n + 1] > 0)
        vals = cum[:, : n + 1] + lam * np.minimum(m, s / window) + (1.0 - lam) * fresh
        best = vals.max(axis=1, keepdims=True)
        # Largest static count within rounding of the best value: prefer predictable static slots.
        ok = vals >= best - tol
        R[:, n] = n - np.argmax(ok[:, ::-1], axis=1)
        V[:, n] = best[:, 0]
    return V, R


def slot_gains(V: np.ndarray) -> np.ndarray:
    """Non-increasing, non-negative marginal gains per layer: running minimum of ``V``'s increments."""
    gains = np.diff(V, axis=1)
    return np.maximum(np.minimum.accumulate(gains, axis=1), 0.0)


def allocate(gains: np.ndarray, total_slots: int) -> np.ndarray:
    """Slots per layer maximising the summed gains under ``total_slots`` (greedy; exact for non-increasing gains).

    Orders every (layer, slot) by gain, then slot index, then layer, and takes the first
    ``total_slots``: within a layer that is always a prefix, and layers with equal gains are
    served round-robin (identical layers get equal shares).
    """
    num_layers, num_experts = gains.shape
    total = int(min(max(total_slots, 0), num_layers * num_experts))
    layer_idx = np.repeat(np.arange(num_layers), num_experts)
    slot_idx = np.tile(np.arange(num_experts), num_layers)
    order = np.lexsort((layer_idx, slot_idx, -gains.reshape(-1)))
    chosen = layer_idx[order[:total]]
    return np.bincount(chosen, minlength=num_layers).astype(np.int64)


def estimate_locality(ids: np.ndarray, num_experts: int, window: int = DEFAULT_WINDOW) -> np.ndarray:
    """Per layer, the locality λ of the hit model from a trace's picks ``ids`` [tokens, layers, top_k].

    ``f`` = share of picks (from token ``window`` on) whose expert was picked at the same layer in
    the previous ``window`` tokens; ``f0`` = that share if tokens were independent draws from the
    trace's own frequencies, ``Σ (p/k)(1 − (1 − p)^w)``; λ = (f − f0) / (1 − f0), clipped to [0, 1].
    Returns NaN for layers of a trace too short to tell (``tokens <= window``).
    """
    ids = np.asarray(ids)
    n_tokens, num_layers, top_k = ids.shape
    out = np.full(num_layers, np.nan)
    if n_tokens <= window:
        return out
    rows = np.repeat(np.arange(n_tokens, dtype=np.int64), top_k)
    counted = rows >= window
    for layer in range(num_layers):
        picks = ids[:, layer, :].reshape(-1).astype(np.int64)
        # Sort picks by (expert, token): consecutive entries of one expert give the gap to its previous pick.
        order = np.argsort(picks * n_tokens + rows)
        gap = np.diff(rows[order])
        recent = np.zeros(picks.size, dtype=bool)
        recent[order[1:]] = (np.diff(picks[order]) == 0) & (gap <= window)
        f = float(recent[counted].mean())
        p = np.bincount(picks, minlength=num_experts) / n_tokens
        f0 = float(np.sum(p / top_k * (1.0 - (1.0 - np.minimum(p, 1.0)) ** window)))
        out[layer] = 0.0 if f0 >= 1.0 else float(np.clip((f - f0) / (1.0 - f0), 0.0, 1.0))
    return out
