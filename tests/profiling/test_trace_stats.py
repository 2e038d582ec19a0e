"""Temporal statistics of routing traces against a plain per-pick loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from residency.profiling.trace import RoutingTrace
from residency.profiling.trace_stats import reuse_distances, temporal_stats


def make_trace(tokens=60, layers=3, experts=12, k=3, offsets=(0, 25, 60), seed=0, decode=None):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(layers)])
                       for _ in range(tokens)])
    is_decode = torch.zeros(tokens, dtype=torch.bool) if decode is None else decode
    return RoutingTrace(ids=ids, weights=torch.rand(tokens, layers, k, generator=g),
                        prompt_offsets=torch.tensor(offsets), is_decode=is_decode,
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


def brute_fractions(trace, layer, tokens):
    """Mean over the given tokens that have a previous token in their prompt of the re-used share of picks."""
    ids = trace.ids[:, layer].tolist()
    starts = {t: s for s, e in zip(trace.prompt_offsets[:-1].tolist(), trace.prompt_offsets[1:].tolist())
              for t in range(s, e)}
    prev, within, n = 0.0, 0.0, 0
    for t in tokens:
        if t == starts[t]:
            continue
        n += 1
        prev += len(set(ids[t]) & set(ids[t - 1])) / len(ids[t])
        window = set(e for u in range(max(starts[t], t - 8), t) for e in ids[u])
        within += len(set(ids[t]) & window) / len(ids[t])
    return prev / n, within / n


def test_histogram_and_fractions():
    trace = make_trace()
    stats = temporal_stats(trace)
    picks = trace.num_tokens * trace.top_k
    assert (stats.histogram.sum(1) == picks).all() and stats.tokens == trace.num_tokens
    for layer in range(3):
        d = brute_distances(trace, layer)
        prev, within = brute_fractions(trace, layer, range(trace.num_tokens))
        assert stats.reused_from_previous[layer] == pytest.approx(prev)
        assert stats.reused_within_8[layer] == pytest.approx(within)
        assert stats.histogram[layer, -1] == (d < 0).sum()
        assert stats.median_distance[layer] == np.median(d[d > 0])
    assert "prev" in stats.table() and stats.to_dict()["histogram"] == stats.histogram.tolist()


def test_decode_phase_counts_decoded_picks_but_looks_back_over_prefill():
    decode = torch.zeros(60, dtype=torch.bool)
    decode[20:25] = True
    decode[50:60] = True
    trace = make_trace(decode=decode)
    stats = temporal_stats(trace, phase="decode")
    decoded = decode.nonzero().flatten().tolist()
    assert stats.tokens == 15 and stats.histogram.sum() == 15 * trace.num_moe_layers * trace.top_k
    for layer in range(3):
        prev, within = brute_fractions(trace, layer, decoded)
        assert stats.reused_from_previous[layer] == pytest.approx(prev)
        assert stats.reused_within_8[layer] == pytest.approx(within)
        d = brute_distances(trace, layer)[decoded]
        assert stats.histogram[layer, -1] == (d < 0).sum()
    prefill = temporal_stats(trace, phase="prefill")
    assert prefill.histogram.sum() + stats.histogram.sum() == temporal_stats(trace).histogram.sum()
    with pytest.raises(ValueError, match="phase"):
        temporal_stats(trace, phase="train")


def test_constant_routing_is_all_previous_token():
    ids = torch.arange(4).repeat(10, 2, 1)  # [10, 2, 4]: every token picks experts 0..3
    trace = RoutingTrace(ids=ids, weights=torch.ones(10, 2, 4), prompt_offsets=torch.tensor([0, 10]),
                         is_decode=torch.zeros(10, dtype=torch.bool), num_experts=8, fingerprint="t")
    stats = temporal_stats(trace)
    assert np.allclose(stats.reused_from_previous, 1.0) and np.allclose(stats.reused_within_8, 1.0)
    assert (stats.histogram[:, 0] == 36).all() and (stats.histogram[:, -1] == 4).all()
    assert np.allclose(stats.median_distance, 1.0)


def test_large_trace():
    tokens, layers, experts, k = 10_000, 40, 512, 22
    ids = torch.rand(tokens, layers, experts).argsort(-1)[..., :k]
    trace = RoutingTrace(ids=ids, weights=torch.rand(tokens, layers, k), prompt_offsets=torch.tensor([0, tokens]),
                         is_decode=torch.zeros(tokens, dtype=torch.bool), num_experts=experts, fingerprint="t")
    stats = temporal_stats(trace)  # about 1 s on a 2-core CPU (vectorised per layer)
    assert (stats.histogram.sum(1) == tokens * k).all()
