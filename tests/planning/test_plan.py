"""Planning for real targets from the Super config alone, profiles and traces, the plan file and its checks."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from residency.cli.plan import resolve_config
from residency.errors import BudgetError, FileFormatError, ModelMismatchError, SizeError
from residency.planning.hardware import DEFAULT_HOST, lookup_gpu
from residency.planning.plan import LayerPlan, Plan, PlanBudget, PlanPrediction, PlanSettings, plan_residency
from residency.planning.simulate import synthetic_trace
from residency.sizes import GiB


@pytest.fixture(scope="module")
def super_config():
    """The real Nemotron 3 Super config.json (package data, transcribed from the reference)."""
    return resolve_config("nemotron-3-super", None)


@dataclass
class StandInProfile:
    """What the planner reads from residency.profiling.profile.Profile."""

    counts: torch.Tensor
    gate_mass: torch.Tensor
    saliency: torch.Tensor
    tokens: int
    fingerprint: str


def skewed_profile(config, tokens=4000, seed=0, skew=1.2):
    """Counts with Zipf-like popularity; later layers more skewed than early ones."""
    rng = np.random.default_rng(seed)
    L, E, k = config.num_moe_layers, config.n_routed_experts, config.num_experts_per_tok
    counts = np.zeros((L, E))
    for j in range(L):
        w = 1.0 / np.arange(1, E + 1) ** (skew * (0.3 + j / L))
        counts[j, rng.permutation(E)] = w / w.sum() * tokens * k
    t = torch.tensor(counts, dtype=torch.float64)
    return StandInProfile(t, t * 0.2, t * 0.01, tokens, config.fingerprint())


# ---------------------------------------------------------------------- the three reference targets


@pytest.mark.parametrize("gpu", ["RTX 4090", "H100 PCIe", "DGX Spark"])
def test_super_plans_without_weights_or_gpu(super_config, gpu):
    # how long this takes is measured by benchmarks/bench_plan.py (docs/benchmarks/planning.md)
    plan = plan_residency(super_config, gpu)
    assert plan.fingerprint == super_config.fingerprint()
    assert plan.planned_device_bytes() <= plan.budget.vram_bytes == lookup_gpu(gpu).usable_bytes
    assert 0 < plan.hit_rate <= 1 and plan.tokens_per_s > 0
    plan.validate()


def test_rtx_4090_cannot_hold_all_experts(super_config):
    plan = plan_residency(super_config, "RTX 4090")
    b = plan.budget
    # the embedding table is kept in host memory (1 GiB: 346 more slots than with it on the device)
    assert plan.settings.embeddings_on_host
    assert b.expert_slots == plan.breakdown.expert_slots and 2600 < b.expert_slots < 2900
    assert b.expert_bytes_used == b.expert_slots * plan.expert_size <= b.expert_bytes
    assert 0.05 < plan.hit_rate < 0.5
    assert b.host_ram_experts + b.static_experts == 40 * 512  # every non-static expert has one host copy
    assert plan.predicted.bytes_per_token["cpu_dram"] + plan.predicted.bytes_per_token["host_to_device"] > 0
    # uniform prior: identical layers get equal shares (round robin), within one slot
    slots = [lp.slots for lp in plan.layers]
    assert max(slots) - min(slots) <= 1


def test_h100_pcie_holds_all_nvfp4_experts(super_config):
    plan = plan_residency(super_config, "H100 PCIe")
    assert plan.hit_rate == 1.0
    assert all(len(lp.static) == 512 and lp.dynamic_slots == 0 and lp.miss_path == "none" for lp in plan.layers)
    assert plan.breakdown.get("staging_buffers") == 0
    assert plan.budget.host_ram_experts == 0
    assert plan.predicted.bound == "gpu_memory"
    assert plan.predicted.bytes_per_token["host_to_device"] == 0


def test_dgx_spark_is_unified_one_copy(super_config):
    plan = plan_residency(super_config, "spark")
    assert plan.gpu.unified_memory and plan.hit_rate == 1.0
    assert plan.breakdown.get("os_reserve") > 0
    assert any("one copy of every expert" in n for n in plan.notes)
    # FP8 experts (105 GiB) do not fit with the dense weights: the next tier is disk, never host RAM
    fp8 = plan_residency(super_config, "spark", expert_dtype="fp8")
    assert 0.5 < fp8.hit_rate < 1.0
    assert {lp.miss_path for lp in fp8.layers} <= {"disk", "none"}
    assert fp8.budget.host_ram_experts == 0 and fp8.budget.host_disk_experts > 0
    assert fp8.predicted.bytes_per_token["host_to_device"] == 0 and fp8.predicted.bound == "disk"


def test_spark_speed_is_near_published_figures(super_config):
    """Sanity check against measured decode speeds of Super NVFP4 on one Spark (about 16 tok/s): the
    cost model is a ceiling, BF16 dense weights give the low end, FP8 dense weights the high end."""
    low = plan_residency(super_config, "spark", dense_dtype="bf16").tokens_per_s
    high = plan_residency(super_config, "spark", dense_dtype="fp8").tokens_per_s
    assert 10 < low < 16 < high < 25


# ---------------------------------------------------------------------- inputs


def test_plan_is_deterministic(super_config):
    prof = skewed_profile(super_config)
    a = plan_residency(super_config, "RTX 5090", profile=prof).to_dict()
    b = plan_residency(super_config, "RTX 5090", profile=prof).to_dict()
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def test_profile_shapes_the_plan(super_config):
    prof = skewed_profile(super_config)
    uniform = plan_residency(super_config, "RTX 4090")
    profiled = plan_residency(super_config, "RTX 4090", profile=prof)
    assert profiled.hit_rate > uniform.hit_rate + 0.1
    slots = [lp.slots for lp in profiled.layers]
    assert max(slots) > 1.5 * min(slots)  # layers are not given equal shares when the profile says otherwise
    counts = prof.counts.numpy()
    for lp in profiled.layers:
        top = np.argsort(-counts[lp.moe_index], kind="stable")[: len(lp.static)]
        assert set(lp.static) == set(top.tolist())
        assert lp.prior is not None and abs(sum(lp.prior) - 22) < 1e-3
    assert "profile pick counts (4000 tokens)" in profiled.predicted.method


def test_profile_or_trace_of_another_model_is_refused(super_config):
    prof = skewed_profile(super_config)
    prof.fingerprint = "nemotron_h-0000000000000000"
    with pytest.raises(ModelMismatchError, match="profile"):
        plan_residency(super_config, "RTX 4090", profile=prof)
    bad_shape = skewed_profile(super_config)
    bad_shape.counts = bad_shape.counts[:, :256]
    with pytest.raises(ModelMismatchError, match="shape"):
        plan_residency(super_config, "RTX 4090", profile=bad_shape)
    trace = synthetic_trace((40, 512, 22), 50, fingerprint="other-model")
    with pytest.raises(ModelMismatchError, match="trace"):
        plan_residency(super_config, "RTX 4090", trace=trace)


def test_trace_gives_locality_and_counts(super_config):
    trace = synthetic_trace(super_config, 600, skew=1.0, locality=0.5, seed=2)
    plan = plan_residency(super_config, "RTX 4090", trace=trace, miss_path="copy")
    lam = np.array([lp.locality for lp in plan.layers])
    assert np.all(np.abs(lam - 0.5) < 0.08)
    assert "estimated from the trace" in plan.predicted.method
    assert "trace pick counts (600 tokens)" in plan.predicted.method
    assert plan.budget.dynamic_slots > 0  # strong locality makes LRU slots worth their bytes
    no_loc = plan_residency(super_config, "RTX 4090", trace=trace, miss_path="copy", locality=0.0)
    assert no_loc.budget.dynamic_slots == 0 and no_loc.hit_rate < plan.hit_rate


def test_miss_path_follows_the_cost_model(super_config):
    fast_cpu = plan_residency(super_config, "RTX 4090")  # 60 GB/s CPU vs 25 GB/s link
    assert {lp.miss_path for lp in fast_cpu.layers} == {"cpu"}
    assert fast_cpu.budget.dynamic_slots == 0  # CPU-path layers hold static experts only
    slow_cpu = plan_residency(super_config, "RTX 4090", host=DEFAULT_HOST.replace(cpu_bw_gbps=10.0))
    assert {lp.miss_path for lp in slow_cpu.layers} == {"copy"}
    assert slow_cpu.budget.dynamic_slots > 0
    forced = plan_residency(super_config, "RTX 4090", miss_path="copy")
    assert forced.predicted.bound == "host_link"


def test_short_host_ram_sends_least_used_experts_to_disk(super_config):
    prof = skewed_profile(super_config)
    host = DEFAULT_HOST.replace(memory_bytes=96 * GiB)
    plan = plan_residency(super_config, "RTX 4090", profile=prof, expert_dtype="bf16", host=host)
    b = plan.budget
    assert b.host_disk_experts > 0 and b.host_ram_bytes <= host.usable_bytes
    counts = prof.counts.numpy()
    lp = plan.layers[10]
    ram = set(range(512)) - set(lp.static) - set(lp.disk)
    assert min(counts[10, sorted(ram)]) >= max(counts[10, lp.disk])  # disk holds the least used
    assert plan.predicted.bytes_per_token["disk"] > 0
    assert any("host RAM" in n for n in plan.notes)


def test_vram_override_and_budget_refusal(super_config):
    plan = plan_residency(super_config, "RTX 4090", vram=20 * GiB)
    assert plan.budget.vram_bytes == 20 * GiB and plan.budget.vram_override
    assert plan.planned_device_bytes() <= 20 * GiB
    fix = "a larger --vram, up to the 24.00 GiB of RTX 4090"
    with pytest.raises(BudgetError, match=f"(?s)What takes the memory.*{fix}"):
        plan_residency(super_config, "RTX 4090", vram=14 * GiB)


@pytest.mark.parametrize(
    ("vram", "expected"),
    [("20GiB", 20 * GiB), ("21.5 gib", int(21.5 * GiB)), ("24GB", 24 * 10**9), (0.9, int(0.9 * 24 * GiB)),
     ("0.9", int(0.9 * 24 * GiB)), (20 * GiB, 20 * GiB)],
)
def test_vram_accepts_sizes_and_fractions(super_config, vram, expected):
    plan = plan_residency(super_config, "RTX 4090", vram=vram)  # "20GiB" used to fail with a raw int() error
    assert plan.budget.vram_bytes == expected and plan.budget.vram_override


@pytest.mark.parametrize(
    ("vram", "message"),
    [("24", "vram '24' is a bare number.*write 24GiB or 24GB"), ("100GiB", "more than RTX 4090 has"),
     (1.5, "vram 1.5 is a bare number"), (24, "vram=24 would be 24 bytes"), ("20 gigs", "unknown unit")],
)
def test_vram_refusals(super_config, vram, message):
    with pytest.raises(SizeError, match=message):
        plan_residency(super_config, "RTX 4090", vram=vram)


def test_plan_parts_are_typed_and_frozen(super_config):
    import dataclasses

    plan = plan_residency(super_config, "RTX 4090", miss_path="copy")
    assert isinstance(plan.settings, PlanSettings) and isinstance(plan.budget, PlanBudget)
    assert isinstance(plan.predicted, PlanPrediction) and isinstance(plan.layers[0], LayerPlan)
    assert plan.settings.policy == plan.policy == "hybrid" and plan.settings.miss_path == "copy"
    assert plan.budget.breakdown is plan.breakdown and plan.predicted.bound == "host_link"
    for part in (plan.settings, plan.budget, plan.predicted, plan.layers[0]):
        with pytest.raises(dataclasses.FrozenInstanceError):
            part.__setattr__(next(iter(part.__dataclass_fields__)), None)
    # what the offload runtime reads: per-layer slot counts, static sets and miss paths
    assert plan.layer_slots == tuple(lp.slots for lp in plan.layers)
    assert sum(plan.layer_slots) * plan.expert_size == plan.budget.expert_bytes_used
    lp = plan.layers[0]
    assert isinstance(lp.static, tuple) and lp.num_static == len(lp.static)
    assert lp.slots == lp.num_static + lp.dynamic_slots and lp.miss_path == "copy"


def test_plan_json_layout_is_unchanged(super_config, tmp_path):
    """The typed parts serialise to the format_version 2 layout (docs/planning.md section 5): format 1's
    plus ``settings.embeddings_on_host``."""
    raw = json.loads(plan_residency(super_config, "RTX 4090").save(tmp_path / "p.json").read_text())
    assert list(raw) == ["kind", "format_version", "fingerprint", "model", "created_by", "target", "settings",
                         "budget", "predicted", "notes", "layers"]
    assert list(raw["settings"]) == [
        "expert_dtype", "dense_dtype", "kv_dtype", "context", "batch", "policy", "prior_tokens", "window",
        "miss_path", "num_moe_layers", "num_experts", "top_k", "moe_layers", "expert_size", "dense_bytes_per_token",
        "prior_source", "locality_source", "embeddings_on_host"]
    assert list(raw["budget"]) == [
        "vram_bytes", "vram_override", "expert_bytes", "expert_bytes_used", "expert_slots", "static_experts",
        "dynamic_slots", "host_ram_experts", "host_ram_bytes", "host_disk_experts", "host_disk_bytes", "breakdown"]
    assert list(raw["budget"]["breakdown"]) == ["device_bytes", "components", "expert_bytes", "expert_size",
                                                "staging_slots", "unified"]
    assert list(raw["predicted"]) == ["hit_rate", "tokens_per_s", "bound", "ms_per_token", "dense_ms_per_token",
                                      "busy_ms_per_token", "bytes_per_token", "layer_ms", "method"]
    assert list(raw["layers"][0]) == ["moe_index", "layer", "static", "dynamic_slots", "miss_path", "disk",
                                      "locality", "predicted_hits", "prior"]
    assert isinstance(raw["settings"]["moe_layers"], list) and isinstance(raw["layers"][0]["static"], list)


# ---------------------------------------------------------------------- the plan file


def test_plan_file_round_trip_and_required_keys(super_config, tmp_path):
    plan = plan_residency(super_config, "RTX 4090", profile=skewed_profile(super_config))
    path = plan.save(tmp_path / "plan.json")
    raw = json.loads(path.read_text())
    assert raw["kind"] == "plan" and raw["format_version"] == 2 and raw["fingerprint"] == plan.fingerprint
    assert raw["settings"]["embeddings_on_host"] is True  # a discrete GPU that cannot hold every expert
    for section, key in [("predicted", "hit_rate"), ("predicted", "tokens_per_s"), ("budget", "expert_bytes"),
                         ("budget", "vram_bytes"), ("predicted", "bound"), ("predicted", "bytes_per_token")]:
        assert key in raw[section]
    assert raw["target"]["gpu"]["name"] == "RTX 4090" and len(raw["layers"]) == 40
    loaded = Plan.load(path, config=super_config)
    assert loaded.to_dict() == plan.to_dict()


def test_plan_for_another_model_is_refused(super_config, tmp_path):
    path = plan_residency(super_config, "L40S").save(tmp_path / "plan.json")
    other = super_config.replace(n_routed_experts=384)
    with pytest.raises(ModelMismatchError, match="make a new plan"):
        Plan.load(path, config=other)
    plan = Plan.load(path)
    with pytest.raises(ModelMismatchError):
        plan.check_model(other)


def _tamper(tmp_path, plan, edit):
    raw = copy.deepcopy(plan.to_dict())
    edit(raw)
    path = tmp_path / "tampered.json"
    path.write_text(json.dumps(raw))
    return path


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda r: r["layers"][3]["static"].append(999), "outside"),
        (lambda r: r["layers"][3].update(dynamic_slots=600), "slots for 512"),
        (lambda r: r["budget"].update(expert_bytes_used=1), "expert_bytes_used"),
        (lambda r: r["budget"].update(vram_bytes=1), "add up"),
        (lambda r: r["predicted"].update(hit_rate=1.5), "out of range"),
        (lambda r: r["predicted"].pop("tokens_per_s"), "tokens_per_s"),
        (lambda r: r["layers"].pop(), "layer entries"),
        (lambda r: r["layers"][0].update(miss_path="teleport"), "miss path"),
        (lambda r: r.pop("target"), "target is missing"),
        (lambda r: r["settings"].pop("context"), r"settings\.context is missing"),
        (lambda r: r["settings"].update(context="8k"), r"settings\.context must be an integer, got '8k'"),
        (lambda r: r["settings"].update(batch=True), r"settings\.batch must be an integer, got True"),
        (lambda r: r["settings"].update(policy="mru"), r"unknown policy 'mru' in settings\.policy"),
        (lambda r: r["settings"].update(expert_dtype="int3"), r"unknown expert dtype 'int3'"),
        (lambda r: r["settings"].update(contxt=8192), r"settings has unknown field\(s\) \['contxt'\]"),
        (lambda r: r["budget"].update(vram_override="yes"), r"budget\.vram_override must be true or false"),
        (lambda r: r["budget"]["breakdown"]["components"][0].pop("bytes"),
         r"budget\.breakdown\.components\[0\]\.bytes is missing"),
        (lambda r: r["budget"].update(breakdown=[]), r"budget\.breakdown must be an object"),
        (lambda r: r["predicted"].update(bytes_per_token={"disk": "lots"}),
         r"predicted\.bytes_per_token must be an object of integers"),
        (lambda r: r["predicted"].update(layer_ms=[1.0]), r"predicted\.layer_ms has 1 entries"),
        (lambda r: r["layers"][2].update(static="0-9"), r"layers\[2\]\.static must be a list of integers"),
        (lambda r: r["layers"][2].update(prior=[0.1, "x"]), r"layers\[2\]\.prior must be a list of numbers or null"),
        (lambda r: r["layers"][2].pop("locality"), r"layers\[2\]\.locality is missing"),
        (lambda r: r["target"]["gpu"].pop("mem_bw_gbps"), r"target\.gpu: missing field\(s\) mem_bw_gbps"),
        (lambda r: r.update(notes="none"), "notes must be a list of strings"),
        (lambda r: r.update(extra=1), r"the plan has unknown field\(s\) \['extra'\]"),
    ],
)
def test_tampered_plans_are_refused(super_config, tmp_path, edit, message):
    plan = plan_residency(super_config, "RTX 4090")
    with pytest.raises(FileFormatError, match=message) as err:
        Plan.load(_tamper(tmp_path, plan, edit))
    assert "\n" not in str(err.value) and "regenerate it" in str(err.value)


def test_plan_file_kind_and_version_checked(super_config, tmp_path):
    plan = plan_residency(super_config, "RTX 4090")
    with pytest.raises(FileFormatError, match="is a residency profile .*not a 'plan' file.*pass it as --profile"):
        Plan.load(_tamper(tmp_path, plan, lambda r: r.update(kind="profile")))
    with pytest.raises(FileFormatError, match="has no residency 'kind' field; pass a file written by `residency plan"):
        Plan.load(_tamper(tmp_path, plan, lambda r: r.pop("kind")))
    with pytest.raises(FileFormatError, match=r"is a 'weird' file, not a 'plan' file \(residency plan\); pass a file"):
        Plan.load(_tamper(tmp_path, plan, lambda r: r.update(kind="weird")))
    with pytest.raises(FileFormatError, match="upgrade residency"):
        Plan.load(_tamper(tmp_path, plan, lambda r: r.update(format_version=99)))
    broken = tmp_path / "broken.json"
    broken.write_text('{"kind": "plan", ')
    with pytest.raises(FileFormatError, match="not valid JSON"):
        Plan.load(broken)


def test_show_is_a_readable_table(super_config):
    text = plan_residency(super_config, "RTX 4090", profile=skewed_profile(super_config)).show()
    for part in ("Plan for Nemotron-H", "Target: RTX 4090", "Device memory (24.00 GiB)", "non_expert_weights",
                 "Host tier:", "Predicted: hit rate", "bound by", "Per MoE layer:", "how:"):
        assert part in text, part
    assert len([line for line in text.splitlines() if line.strip().startswith(("0 ", "39 "))]) == 2
