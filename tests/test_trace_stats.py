"""Temporal statistics of routing traces against a plain per-pick loop."""

from __future__ import annotations

import numpy as np
import torch

from residency.trace import RoutingTrace
from residency.trace_stats import reuse_distances, temporal_stats


def make_trace(tokens=60, layers=3, experts=12, k=3, offsets=(0, 25, 60), seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(layers)])
                       for _ in range(tokens)])
    return RoutingTrace(ids=ids, weights=torch.rand(tokens, layers, k, generator=g),
                        prompt_offsets=torch.tensor(offsets), is_decode=torch.zeros(tokens, dtype=torch.bool),
                        num_experts=experts, fingerprint="test")


def brute_distances(trace, layer):
    ids = trace.ids[:, layer].tolist()
    offsets = trace.prompt_offsets.tolist()
    out = np.full((len(ids), len(ids[0])), -1)
    for p in range(len(offsets) - 1):
        last = {}
        for t in range(offsets[p], offsets[p + 1]):
            for j, e in enumerate(ids[t]):
                if e in last:
                    out[t, j] = t - last[e]
            for e in ids[t]:
                last[e] = t
    return out


def test_reuse_distances_match_brute_force():
    trace = make_trace()
    for layer in range(3):
        assert np.array_equal(reuse_distances(trace, layer), brute_distances(trace, layer))


def test_histogram_and_fractions():
    trace = make_trace()
    stats = temporal_stats(trace)
    picks = trace.num_tokens * trace.top_k
    assert (stats.histogram.sum(1) == picks).all()
    d = brute_distances(trace, 1)
    assert stats.reused_from_previous[1] == (d == 1).sum() / picks
    assert stats.reused_within_8[1] == ((d > 0) & (d <= 8)).sum() / picks
    assert stats.histogram[1, -1] == (d < 0).sum()
    assert "prev" in stats.table()


def test_constant_routing_is_all_previous_token():
    ids = torch.arange(4).repeat(10, 2, 1)  # [10, 2, 4]: every token picks experts 0..3
    trace = RoutingTrace(ids=ids, weights=torch.ones(10, 2, 4), prompt_offsets=torch.tensor([0, 10]),
                         is_decode=torch.zeros(10, dtype=torch.bool), num_experts=8, fingerprint="t")
    stats = temporal_stats(trace)
    assert np.allclose(stats.reused_from_previous, 0.9) and np.allclose(stats.reused_within_8, 0.9)


def test_large_trace():
    tokens, layers, experts, k = 10_000, 40, 512, 22
    ids = torch.rand(tokens, layers, experts).argsort(-1)[..., :k]
    trace = RoutingTrace(ids=ids, weights=torch.rand(tokens, layers, k), prompt_offsets=torch.tensor([0, tokens]),
                         is_decode=torch.zeros(tokens, dtype=torch.bool), num_experts=experts, fingerprint="t")
    stats = temporal_stats(trace)  # about 1 s on a 2-core CPU (vectorised per layer)
    assert (stats.histogram.sum(1) == tokens * k).all()
