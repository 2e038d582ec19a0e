"""Property tests of the planner: budget safety, monotonicity in the budget, and optimality against brute force."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from residency.cli.plan import resolve_config
from residency.config import NemotronHConfig
from residency.errors import BudgetError, SizeError
from residency.planning.allocate import allocate, hit_curves, pick_probabilities, slot_gains
from residency.planning.hardware import GpuSpec, lookup_gpu
from residency.planning.memory import account_memory
from residency.planning.plan import plan_residency
from residency.sizes import GiB

SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def tiny_config(experts: int = 4, top_k: int = 2) -> NemotronHConfig:
    """Three MoE layers with a handful of experts: small enough to enumerate every allocation."""
    return NemotronHConfig(
        vocab_size=128, hidden_size=64, pattern="MEM*EME", num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, mamba_num_heads=4, mamba_head_dim=16, ssm_state_size=16, n_groups=2,
        n_routed_experts=experts, num_experts_per_tok=top_k, moe_intermediate_size=32, moe_latent_size=16,
        moe_shared_expert_intermediate_size=32, intermediate_size=32,
    )


@pytest.fixture(scope="module")
def super_config():
    return resolve_config("nemotron-3-super", None)


@dataclass
class Counts:
    counts: np.ndarray
    tokens: int
    fingerprint: str
    gate_mass: np.ndarray | None = None


def counts_strategy(layers: int, experts: int):
    return st.lists(st.integers(0, 50), min_size=layers * experts, max_size=layers * experts).map(
        lambda v: np.array(v, dtype=float).reshape(layers, experts))


def roomy(name: str, vram: int) -> GpuSpec:
    """The catalog GPU with at least ``vram`` of memory, so any budget the strategies draw is allowed
    (a budget above the device's memory is refused; the plan for a given budget does not depend on the size)."""
    gpu = lookup_gpu(name)
    return gpu.replace(usable_memory_bytes=max(gpu.usable_bytes, vram))


def slots_vram(config: NemotronHConfig, slots: int, **kw) -> int:
    """A device size that leaves room for exactly ``slots`` experts (with the default staging, and the
    embedding table in host memory, where the planner keeps it on a GPU that cannot hold every expert)."""
    kw.setdefault("embeddings_on_host", True)
    big = account_memory(config, 1 << 40, **kw)
    fixed = (1 << 40) - big.expert_bytes
    return fixed + slots * big.expert_size + big.expert_size // 2


# ---------------------------------------------------------------------- budget safety and monotonicity


@SETTINGS
@given(
    vram_gib=st.floats(14.0, 200.0),
    context=st.sampled_from([1024, 8192, 32768, 131072]),
    batch=st.integers(1, 4),
    expert_dtype=st.sampled_from(["bf16", "fp8", "nvfp4"]),
    dense_dtype=st.sampled_from(["bf16", "fp8"]),
    gpu=st.sampled_from(["RTX 4090", "H100 PCIe", "DGX Spark", "GH200"]),
    locality=st.one_of(st.none(), st.floats(0.0, 1.0)),
)
def test_planned_bytes_never_exceed_the_budget(super_config, vram_gib, context, batch, expert_dtype, dense_dtype,
                                               gpu, locality):
    vram = int(vram_gib * GiB)
    try:
        plan = plan_residency(super_config, roomy(gpu, vram), vram=vram, context=context, batch=batch,
                              expert_dtype=expert_dtype, dense_dtype=dense_dtype, locality=locality)
    except BudgetError:
        return
    assert plan.planned_device_bytes() <= vram
    assert plan.budget.expert_bytes_used <= plan.budget.expert_bytes
    assert sum(lp.slots for lp in plan.layers) * plan.expert_size == plan.budget.expert_bytes_used
    assert all(lp.slots <= 512 for lp in plan.layers)


@SETTINGS
@given(
    a=st.integers(0, 12), b=st.integers(0, 12), counts=counts_strategy(3, 4),
    locality=st.floats(0.0, 1.0), window=st.integers(1, 6), profiled=st.booleans(),
)
def test_more_budget_never_predicts_a_lower_hit_rate_tiny(a, b, counts, locality, window, profiled):
    config = tiny_config()
    prof = Counts(counts, 100, config.fingerprint()) if profiled else None
    lo, hi = sorted((a, b))
    common = dict(profile=prof, locality=locality, window=window, host=None)
    p_lo = plan_residency(config, "RTX 4090", vram=slots_vram(config, lo), **common)
    p_hi = plan_residency(config, "RTX 4090", vram=slots_vram(config, hi), **common)
    assert p_lo.hit_rate <= p_hi.hit_rate + 1e-12
    for x, y in zip(p_lo.layers, p_hi.layers):  # allocations are nested
        assert x.slots <= y.slots


@settings(max_examples=15, deadline=None)
@given(v1=st.floats(17.5, 90.0), v2=st.floats(17.5, 90.0), locality=st.one_of(st.none(), st.floats(0.0, 0.6)),
       gpu=st.sampled_from(["RTX 4090", "H100 PCIe"]), miss_path=st.sampled_from(["auto", "copy"]))
def test_more_budget_never_predicts_a_lower_hit_rate_super(super_config, v1, v2, locality, gpu, miss_path):
    lo, hi = sorted((int(v1 * GiB), int(v2 * GiB)))
    p_lo = plan_residency(super_config, roomy(gpu, hi), vram=lo, locality=locality, miss_path=miss_path)
    p_hi = plan_residency(super_config, roomy(gpu, hi), vram=hi, locality=locality, miss_path=miss_path)
    assert p_lo.hit_rate <= p_hi.hit_rate + 1e-12


def test_a_budget_above_the_device_is_refused(super_config):
    with pytest.raises(SizeError, match="more than RTX 4090 has"):
        plan_residency(super_config, "RTX 4090", vram=90 * GiB)


# ---------------------------------------------------------------------- optimality against brute force


def plain_layer_value(p_sorted: np.ndarray, k: float, lam: float, w: float, n: int) -> float:
    """The hit model written out directly, maximised over every static/dynamic split of n slots."""
    E = len(p_sorted)
    best = 0.0
    for r in range(n + 1):
        s = n - r
        static = float(p_sorted[:r].sum())
        m = max(k - static, 0.0)
        fresh = m * s / (E - r) if E - r > 0 else 0.0
        best = max(best, static + lam * min(m, s / w) + (1 - lam) * fresh)
    return best


@SETTINGS
@given(counts=counts_strategy(2, 6), lam=st.floats(0.0, 1.0), w=st.integers(1, 8))
def test_layer_curve_equals_brute_force_over_splits(counts, lam, w):
    p = pick_probabilities(counts, 2, 6, 3)
    ps = -np.sort(-p, axis=1)
    V, R = hit_curves(ps, 3, np.full(2, lam), w)
    for layer in range(2):
        for n in range(7):
            assert V[layer, n] == pytest.approx(plain_layer_value(ps[layer], 3, lam, w, n), abs=1e-12)
            r = R[layer, n]
            s = n - r
            m = 3 - ps[layer, :r].sum()
            fresh = m * s / (6 - r) if r < 6 else 0.0
            assert ps[layer, :r].sum() + lam * min(m, s / w) + (1 - lam) * fresh == pytest.approx(V[layer, n])


@SETTINGS
@given(counts=counts_strategy(3, 4), lam=st.floats(0.0, 1.0), w=st.integers(1, 6), total=st.integers(0, 12))
def test_allocation_equals_brute_force_optimum(counts, lam, w, total):
    p = pick_probabilities(counts, 3, 4, 2)
    ps = -np.sort(-p, axis=1)
    V, _ = hit_curves(ps, 2, np.full(3, lam), w)
    gains = slot_gains(V)
    W = np.concatenate([np.zeros((3, 1)), np.cumsum(gains, axis=1)], axis=1)  # the concave curves planned on
    n = allocate(gains, total)
    assert n.sum() == min(total, 12)
    greedy = sum(W[j, n[j]] for j in range(3))
    brute = max(sum(W[j, c[j]] for j in range(3))
                for c in itertools.product(range(5), repeat=3) if sum(c) <= total)
    assert greedy == pytest.approx(brute, abs=1e-12)
    assert np.all(W <= V + 1e-12)  # the planning curve never promises more than the model
    if lam == 0.0:  # static only: the curve is exactly concave, nothing is lost
        assert np.allclose(W, V)


@SETTINGS
@given(counts=counts_strategy(3, 4), slots=st.integers(0, 12))
def test_static_sets_equal_the_best_subset(counts, slots):
    """Fractional knapsack on equal-size items: the planned static experts carry the most pick mass of
    any set of that many (layer, expert) pairs, found here by enumerating every subset."""
    config = tiny_config(experts=4, top_k=2)
    plan = plan_residency(config, "RTX 4090", vram=slots_vram(config, slots),
                          profile=Counts(counts, 100, config.fingerprint()), locality=0.0)
    p = pick_probabilities(counts, 3, 4, 2)
    chosen = [(lp.moe_index, e) for lp in plan.layers for e in lp.static]
    # When the staging buffers (2 x top-k slots) would complete the set, every expert becomes resident.
    expected = 12 if slots + 4 >= 12 else slots
    assert len(chosen) == expected and all(lp.dynamic_slots == 0 for lp in plan.layers)
    slots = expected
    planned = sum(p[j, e] for j, e in chosen)
    items = [(j, e) for j in range(3) for e in range(4)]
    best = max(sum(p[j, e] for j, e in subset) for subset in itertools.combinations(items, slots))
    assert planned == pytest.approx(best, abs=1e-12)
    assert plan.hit_rate == pytest.approx(planned / 6, abs=1e-6)


def test_allocations_are_nested():
    rng = np.random.default_rng(1)
    p = pick_probabilities(rng.integers(0, 40, size=(5, 16)).astype(float), 5, 16, 4)
    V, _ = hit_curves(-np.sort(-p, axis=1), 4, np.full(5, 0.3), 4)
    gains = slot_gains(V)
    prev = allocate(gains, 0)
    for total in range(1, 81):
        cur = allocate(gains, total)
        assert np.all(cur >= prev) and cur.sum() == total
        prev = cur

