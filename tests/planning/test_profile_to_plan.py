"""A real profile and routing trace of the tiny model feed the planner and the simulator."""

from __future__ import annotations

import pytest

from residency.errors import ModelMismatchError
from residency.planning.plan import plan_residency
from residency.planning.simulate import simulate
from residency.profiling.profile import Profile

PROMPTS = [[1] + list(range(40, 80)), [1] + list(range(100, 130)), [1, 7, 8, 9, 10, 11, 12]]


def test_plan_from_profile_and_trace(tiny_model):
    profile, trace = tiny_model.profile(PROMPTS, decode_tokens=4, trace=True)
    cfg = tiny_model.config
    loose = plan_residency(cfg, "H100 PCIe", profile=profile, trace=trace, expert_dtype="bf16", dense_dtype="bf16")
    assert loose.hit_rate == pytest.approx(1.0)  # the tiny model fits an H100 many times over
    # a budget that holds about half the experts: the profile's hottest experts are kept
    need = loose.budget.vram_bytes - loose.budget.expert_bytes
    half = need + cfg.num_experts_total * cfg.expert_bytes("bf16") // 2
    plan = plan_residency(cfg, "H100 PCIe", profile=profile, trace=trace, vram=half, expert_dtype="bf16",
                          miss_path="copy")
    assert 0.5 < plan.hit_rate < 1.0
    assert plan.budget.expert_bytes <= half - need + cfg.expert_bytes("bf16")
    result = simulate(plan, trace)
    assert abs(result.hit_rate - plan.hit_rate) < 0.15
    counts = profile.counts
    checked = 0
    for m, layer in enumerate(plan.layers):
        static = set(layer.static)
        dropped = [e for e in range(cfg.n_routed_experts) if e not in static]
        if static and dropped:
            # a static set from a profile holds the most-picked experts (up to ties)
            assert counts[m, sorted(static)].min() >= counts[m, dropped].max()
            checked += 1
    assert checked > 0


def test_profile_of_another_model_is_refused(tiny_model, tmp_path):
    profile = tiny_model.profile(PROMPTS[:1])
    path = profile.save(tmp_path / "p.safetensors")
    other = tiny_model.config.replace(n_routed_experts=64)
    with pytest.raises(ModelMismatchError):
        plan_residency(other, "H100 PCIe", profile=Profile.load(path))
