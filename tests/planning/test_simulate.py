"""Trace replay: agreement with a plain reference replay, synthetic traces, prefetch and cost, speed."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from residency.runtime.policy import COUNTERS, POLICIES, POLICY_NAMES, replay_layer

from residency.cli.plan import resolve_config
from residency.errors import ModelMismatchError, ResidencyError
from residency.planning.allocate import estimate_locality
from residency.planning.hardware import DEFAULT_HOST
from residency.planning.plan import plan_residency
from residency.planning.simulate import (
    compare_policies,
    format_comparison,
    format_layers,
    reference_replay,
    simulate,
    synthetic_trace,
)


@pytest.fixture(scope="module")
def super_config():
    return resolve_config("nemotron-3-super", None)


@pytest.fixture(scope="module")
def trace(super_config):
    return synthetic_trace(super_config, 400, skew=1.0, locality=0.4, seed=11)


@pytest.fixture(scope="module")
def copy_plan(super_config, trace):
    """A plan with static and dynamic slots (copy path, locality from the trace)."""
    plan = plan_residency(super_config, "RTX 4090", trace=trace, miss_path="copy")
    assert plan.budget.dynamic_slots > 0 and plan.budget.static_experts > 0
    return plan


# ---------------------------------------------------------------------- agreement with the reference replay


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 10_000), experts=st.integers(4, 24), top_k=st.integers(1, 4), tokens=st.integers(1, 120),
    n_static=st.integers(0, 6), n_dynamic=st.integers(0, 10), policy=st.sampled_from(sorted(POLICIES)),
)
def test_fast_replay_equals_reference_replay(seed, experts, top_k, tokens, n_static, n_dynamic, policy):
    rng = np.random.default_rng(seed)
    top_k = min(top_k, experts)
    n_static = min(n_static, experts)
    ids = np.stack([rng.choice(experts, top_k, replace=False) for _ in range(tokens)]).astype(np.int64)
    static = rng.choice(experts, n_static, replace=False).astype(np.int64)
    slots = min(n_static + n_dynamic, experts)
    prior = rng.random(experts)
    fast = replay_layer(POLICIES[policy].kind, ids, static, slots, experts, prior, 8.0,
                        np.zeros(experts, dtype=np.bool_), 0.0, 0, 0)
    ref = reference_replay(ids, static.tolist(), slots, policy, prior, 8.0)
    assert {k: int(v) for k, v in zip(COUNTERS, fast) if k in ref} == ref


@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_simulate_counts_equal_reference_on_a_plan(copy_plan, trace, policy):
    from residency.planning.simulate import static_set_for

    result = simulate(copy_plan, trace, policy=policy)
    ids = trace.ids.numpy()
    priors = copy_plan.priors()
    with_dynamic = [j for j, lp in enumerate(copy_plan.layers) if lp.dynamic_slots > 0]
    without = [j for j, lp in enumerate(copy_plan.layers) if lp.dynamic_slots == 0]
    for j in with_dynamic[:2] + without[:1]:
        lp = copy_plan.layers[j]
        ref = reference_replay(ids[:, j, :], static_set_for(copy_plan, j, policy).tolist(), lp.slots, policy,
                               priors[j], copy_plan.settings.prior_tokens)
        assert {k: int(result.counters[k][j]) for k in ref} == ref
    assert result.tokens == 400
    assert int(result.counters["hits"].sum() + result.counters["misses"].sum()) == 400 * 40 * 22


def test_static_policy_gets_the_same_bytes(copy_plan, trace):
    from residency.planning.simulate import static_set_for

    for j, lp in enumerate(copy_plan.layers):
        static = static_set_for(copy_plan, j, "static")
        assert len(static) == lp.slots and len(set(static.tolist())) == lp.slots
        assert tuple(static[: len(lp.static)].tolist()) == lp.static


# ---------------------------------------------------------------------- predictions vs replay


def test_planner_prediction_matches_replay_of_its_own_trace(super_config):
    trace = synthetic_trace(super_config, 1500, skew=1.0, locality=0.3, seed=4)
    plan = plan_residency(super_config, "RTX 4090", trace=trace, miss_path="copy", policy="lru")
    simulated = simulate(plan, trace, policy="lru").hit_rate
    assert abs(plan.hit_rate - simulated) < 0.05, (plan.hit_rate, simulated)
    static_plan = plan_residency(super_config, "RTX 4090", trace=trace, locality=0.0)
    assert abs(static_plan.hit_rate - simulate(static_plan, trace, policy="static").hit_rate) < 0.05


def test_results_compare_policies_and_state_the_trace(copy_plan, trace):
    results = compare_policies(copy_plan, trace)
    assert [r.policy for r in results] == list(POLICY_NAMES) == ["static", "lru", "lfu", "hybrid"]
    assert results[1].hit_rate > results[0].hit_rate  # locality 0.4: recency beats a static set of equal size
    table = format_comparison(results)
    assert "synthetic trace: 400 tokens, Zipf skew 1.0, locality 0.4 (window 4 tokens), seed 11" in table
    for r in results:
        d = json.loads(json.dumps(r.to_dict()))
        assert d["trace"]["locality"] == 0.4 and d["trace"]["skew"] == 1.0 and d["trace"]["generator"] == "synthetic"
        assert 0 <= d["hit_rate"] <= 1 and d["cost"]["tokens_per_s"] > 0
    assert len(format_layers(results[1], copy_plan).splitlines()) == 41


# ---------------------------------------------------------------------- prefetch, paths and cost


def test_prefetch_counters_and_effect(copy_plan, trace):
    base = simulate(copy_plan, trace, policy="lru")
    full = simulate(copy_plan, trace, policy="lru", prefetch_recall=1.0)
    wasteful = simulate(copy_plan, trace, policy="lru", prefetch_recall=1.0, prefetch_extra=5)
    assert base.per_token("prefetch_used") == 0
    assert full.counters["prefetch_used"][0] == 0  # nothing predicts the first MoE layer
    assert np.array_equal(full.counters["prefetch_used"][1:], full.counters["misses"][1:])
    assert np.array_equal(full.counters["misses"], base.counters["misses"])  # prefetch never changes routing
    assert wasteful.counters["prefetch_wasted"][1:].tolist() == [5 * 400] * 39
    assert full.cost.token_ms <= base.cost.token_ms
    assert wasteful.cost.bytes_per_token["host_to_device"] > full.cost.bytes_per_token["host_to_device"]


def test_cpu_path_plan_moves_no_bytes_over_the_link(super_config, trace):
    plan = plan_residency(super_config, "RTX 4090", trace=trace)  # fast host CPU: misses on the CPU
    assert {lp.miss_path for lp in plan.layers} == {"cpu"}
    r = simulate(plan, trace, policy="lru")
    assert r.cost.bytes_per_token["host_to_device"] == 0 and r.cost.bytes_per_token["cpu_dram"] > 0


def test_unified_memory_misses_are_disk_reads(super_config):
    trace = synthetic_trace(super_config, 200, seed=1)
    plan = plan_residency(super_config, "DGX Spark", expert_dtype="bf16", trace=trace)
    r = simulate(plan, trace)
    assert r.cost.bytes_per_token["host_to_device"] == 0
    assert r.cost.bytes_per_token["disk"] == pytest.approx(r.per_token("misses") * plan.expert_size)
    assert r.cost.bound == "disk"


def test_disk_tier_misses_are_counted(super_config, trace):
    host = DEFAULT_HOST.replace(memory_bytes=48 * 2**30)
    plan = plan_residency(super_config, "RTX 4090", trace=trace, host=host, expert_dtype="bf16", miss_path="copy")
    r = simulate(plan, trace, policy="lru")
    assert r.per_token("disk_reads") > 0 and r.cost.bytes_per_token["disk"] > 0


def test_mismatched_traces_are_refused(copy_plan):
    other = synthetic_trace((40, 512, 22), 10, fingerprint="someone-else")
    with pytest.raises(ModelMismatchError, match="recorded for model"):
        simulate(copy_plan, other)
    wrong_shape = synthetic_trace((40, 384, 22), 10, fingerprint=copy_plan.fingerprint)
    with pytest.raises(ModelMismatchError, match="384 experts"):
        simulate(copy_plan, wrong_shape)
    with pytest.raises(ResidencyError, match="unknown policy"):
        simulate(copy_plan, synthetic_trace(copy_plan, 5), policy="fifo")


def test_decode_only_skips_prefill_tokens(copy_plan, trace):
    import dataclasses

    half = trace.is_decode.clone()
    half[:100] = False
    r = simulate(copy_plan, dataclasses.replace(trace, is_decode=half), decode_only=True)
    assert r.tokens == 300


def test_cost_model_arithmetic():
    from residency.planning.cost import CostModel, LayerTraffic

    cm = CostModel(expert_bytes=10**6, dense_bytes=10**9, gpu_bw=1e12, h2d_bw=1e10, cpu_bw=5e10, disk_bw=1e9,
                   cpu_overhead_s=1e-5)
    t = LayerTraffic.zeros(2)
    t.hits[:] = [20, 10]
    t.copies[:] = [2, 0]
    t.cpu[:] = [0, 12]
    r = cm.evaluate(t)
    # layer 0: GPU 22 experts = 22 us, copies 2 x 100 us = 200 us; layer 1: CPU 12 x 20 us + 10 us = 250 us
    assert r.layer_ms.tolist() == pytest.approx([0.2, 0.25])
    assert r.dense_ms == pytest.approx(1.0) and r.token_ms == pytest.approx(1.45)
    assert r.bound == "gpu_memory"  # 1 ms of dense weights dominates the 0.2 / 0.25 ms layers
    assert r.bytes_per_token == {"gpu_memory": 1.032e9, "host_to_device": 2e6, "cpu_dram": 12e6, "disk": 0.0}
    t.background[:] = [0, 300]  # 300 background copies = 30 ms of link time: the link bounds the token
    r = cm.evaluate(t)
    assert r.bound == "host_link" and r.token_ms == pytest.approx(30.2)
    assert cm.miss_time("copy") == pytest.approx(1e-4) and cm.miss_time("cpu", top_k=10) == pytest.approx(2.1e-5)


# ---------------------------------------------------------------------- synthetic traces


def test_synthetic_trace_is_reproducible_and_valid(super_config):
    a = synthetic_trace(super_config, 300, skew=1.2, locality=0.3, seed=5, prompts=3)
    b = synthetic_trace(super_config, 300, skew=1.2, locality=0.3, seed=5, prompts=3)
    c = synthetic_trace(super_config, 300, skew=1.2, locality=0.3, seed=6, prompts=3)
    assert np.array_equal(a.ids.numpy(), b.ids.numpy()) and not np.array_equal(a.ids.numpy(), c.ids.numpy())
    ids = a.ids.numpy()
    assert ids.shape == (300, 40, 22) and a.num_prompts == 3
    assert all(len(set(row)) == 22 for row in ids.reshape(-1, 22).tolist())  # distinct picks per token
    assert a.meta == {"generator": "synthetic", "skew": 1.2, "locality": 0.3, "window": 4, "seed": 5}
    assert a.fingerprint == super_config.fingerprint()
    assert np.allclose(a.weights.sum(-1).numpy(), 5.0, atol=1e-4)  # routed_scaling_factor


def test_synthetic_skew_and_locality_are_what_they_say():
    flat = synthetic_trace((2, 256, 8), 3000, skew=0.0, locality=0.0, seed=1).ids.numpy()
    steep = synthetic_trace((2, 256, 8), 3000, skew=1.5, locality=0.0, seed=1).ids.numpy()

    def top10_share(ids):
        counts = np.bincount(ids[:, 0, :].reshape(-1), minlength=256)
        return np.sort(counts)[::-1][:26].sum() / counts.sum()

    assert top10_share(flat) < 0.2 < 0.6 < top10_share(steep)
    for lam in (0.0, 0.3, 0.6):
        ids = synthetic_trace((3, 256, 8), 3000, skew=1.0, locality=lam, seed=2).ids.numpy()
        assert np.allclose(estimate_locality(ids, 256, 4), lam, atol=0.05)


def test_synthetic_trace_rejects_bad_parameters():
    with pytest.raises(ResidencyError):
        synthetic_trace((2, 8, 9), 10)
    with pytest.raises(ResidencyError):
        synthetic_trace((2, 8, 2), 10, locality=1.5)


# ---------------------------------------------------------------------- speed


@pytest.mark.slow
def test_ten_thousand_tokens_over_forty_layers_replay_completely(super_config):
    # the speed of this replay is measured by benchmarks/bench_simulate.py (docs/benchmarks/simulator.md)
    trace = synthetic_trace(super_config, 10_000, skew=1.0, locality=0.3, seed=0)
    plan = plan_residency(super_config, "RTX 4090", trace=trace, miss_path="copy")
    result = simulate(plan, trace, policy="lru")
    assert int(result.counters["hits"].sum() + result.counters["misses"].sum()) == 10_000 * 40 * 22
