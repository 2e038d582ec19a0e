"""Where the embedding table lives: chosen by the planner, counted (or not) on the device, kept in the plan
file, and plans written before the setting existed (format 1) still load, with the table on the device."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from residency.cli.plan import resolve_config
from residency.config import ConfigError
from residency.errors import BudgetError, FileFormatError
from residency.planning.hardware import HostSpec, lookup_gpu
from residency.planning.memory import account_memory, embedding_table_bytes
from residency.planning.plan import PLAN_FORMAT_VERSION, Plan, plan_residency
from residency.sizes import GiB

DATA = Path(__file__).parent / "data"
#: written by `residency plan --config nemotron-3-super --gpu 4090 --vram 18GiB --out ...` at commit f7599d6,
#: before plans said where the embedding table lives (format 1)
V1_PLAN = DATA / "plan-v1-rtx4090-18gib.json"


@pytest.fixture(scope="module")
def super_config():
    return resolve_config("nemotron-3-super", None)


def test_super_s_table_is_one_gib_and_one_row_is_eight_kib(super_config):
    assert embedding_table_bytes(super_config) == 131072 * 4096 * 2 == 1 * GiB
    assert embedding_table_bytes(super_config) // super_config.vocab_size == 8192


# ---------------------------------------------------------------------- memory accounting


def test_the_table_on_the_host_is_not_counted_on_the_device(super_config):
    device = account_memory(super_config, 24 * GiB)
    host = account_memory(super_config, 24 * GiB, embeddings_on_host=True)
    table = embedding_table_bytes(super_config)
    assert device.get("non_expert_weights") - host.get("non_expert_weights") == table
    assert host.expert_bytes - device.expert_bytes == table
    assert host.expert_slots - device.expert_slots == 346  # 1 GiB / 2.95 MiB NVFP4 experts
    others = [c for c in device.components if c.name != "non_expert_weights"]
    assert others == [c for c in host.components if c.name != "non_expert_weights"]
    dense = {c.name: c.note for c in host.components}["non_expert_weights"]
    assert "embedding table (1.00 GiB) in host memory" in dense and not dense.startswith("bf16: embeddings")
    assert {c.name: c.note for c in device.components}["non_expert_weights"].startswith("bf16: embeddings, lm_head")


def test_a_budget_that_fits_only_with_the_table_on_the_host_says_so(super_config):
    with pytest.raises(BudgetError) as err:
        account_memory(super_config, int(16.9 * GiB), target="RTX 4090", device_memory=24 * GiB)
    assert "--embeddings host (the 1.00 GiB embedding table stays in host memory, one row copied per token; fits)" \
        in str(err.value)
    account_memory(super_config, int(16.9 * GiB), embeddings_on_host=True)  # the fix really fits
    with pytest.raises(BudgetError) as err:  # unified memory: one pool, moving the table is no fix
        account_memory(super_config, 20 * GiB, unified=True)
    assert "--embeddings host" not in str(err.value)


# ---------------------------------------------------------------------- the planner's choice


def test_a_discrete_gpu_that_offloads_keeps_the_table_in_host_memory(super_config):
    plan = plan_residency(super_config, "RTX 4090")
    device = plan_residency(super_config, "RTX 4090", embeddings="device")
    assert plan.settings.embeddings_on_host and not device.settings.embeddings_on_host
    table = embedding_table_bytes(super_config)
    assert device.breakdown.get("non_expert_weights") - plan.breakdown.get("non_expert_weights") == table
    assert (plan.budget.expert_slots, device.budget.expert_slots) == (2751, 2405)
    assert plan.hit_rate > device.hit_rate and plan.tokens_per_s > device.tokens_per_s
    # one row per token was already counted in the GPU's bytes per token, wherever the table lives
    assert plan.settings.dense_bytes_per_token == device.settings.dense_bytes_per_token
    assert any("embedding table (1.00 GiB) kept in host memory: 346 more expert slots" in n for n in plan.notes)
    assert "in host memory" in plan.show() and "in host memory" not in device.show()


def test_all_resident_unified_and_tied_keep_the_table_on_the_device(super_config):
    assert not plan_residency(super_config, "H100 PCIe").settings.embeddings_on_host  # every expert fits
    spark = plan_residency(super_config, "spark")
    assert not spark.settings.embeddings_on_host  # unified memory: one pool, nothing to free
    assert not plan_residency(super_config, "spark", expert_dtype="fp8").settings.embeddings_on_host
    tied = super_config.replace(tie_word_embeddings=True)
    plan = plan_residency(tied, "RTX 4090")
    assert not plan.settings.embeddings_on_host  # lm_head reads the whole table every token
    with pytest.raises(ConfigError, match="ties its word embeddings to lm_head"):
        plan_residency(tied, "RTX 4090", embeddings="host")
    with pytest.raises(ConfigError, match="unified memory: host and GPU share one pool"):
        plan_residency(super_config, "spark", embeddings="host")
    with pytest.raises(ConfigError, match=r"embeddings must be one of \('auto', 'device', 'host'\)"):
        plan_residency(super_config, "RTX 4090", embeddings="gpu")


def test_the_table_moves_to_the_host_when_that_is_what_makes_everything_resident(super_config):
    """A budget just short of holding every NVFP4 expert with the table on the device holds them all with
    the table in host memory: the planner takes that."""
    gpu = lookup_gpu("H100 PCIe")
    full = plan_residency(super_config, gpu, embeddings="device")
    short = full.budget.vram_bytes - (full.budget.expert_bytes - full.budget.expert_bytes_used) - 100 * 2**20
    device = plan_residency(super_config, gpu, vram=short, embeddings="device")
    auto = plan_residency(super_config, gpu, vram=short)
    assert device.hit_rate < 1.0 and auto.settings.embeddings_on_host and auto.hit_rate == 1.0


def test_a_budget_too_small_for_the_table_on_the_device_plans_it_on_the_host(super_config):
    plan = plan_residency(super_config, "RTX 4090", vram=int(16.9 * GiB))
    assert plan.settings.embeddings_on_host
    assert any("room for the fixed part" in n for n in plan.notes)
    with pytest.raises(BudgetError, match="--embeddings host"):
        plan_residency(super_config, "RTX 4090", vram=int(16.9 * GiB), embeddings="device")


def test_the_table_takes_its_share_of_host_ram_first(super_config):
    host = HostSpec(name="small host", memory_bytes=48 * GiB)  # 40 GiB usable: some experts go to disk
    on_host = plan_residency(super_config, "RTX 4090", host=host)
    on_device = plan_residency(super_config, "RTX 4090", host=host, embeddings="device")
    eb = on_host.expert_size
    assert on_host.budget.host_ram_experts == (host.usable_bytes - embedding_table_bytes(super_config)) // eb
    assert on_device.budget.host_ram_experts == host.usable_bytes // eb
    assert on_host.budget.host_disk_experts > 0


# ---------------------------------------------------------------------- the plan file


def test_the_setting_round_trips_through_the_plan_file(super_config, tmp_path):
    for embeddings, expected in (("auto", True), ("device", False), ("host", True)):
        plan = plan_residency(super_config, "RTX 4090", embeddings=embeddings)
        path = plan.save(tmp_path / f"{embeddings}.json")
        raw = json.loads(path.read_text())
        assert raw["format_version"] == PLAN_FORMAT_VERSION == 2
        assert raw["settings"]["embeddings_on_host"] is expected
        loaded = Plan.load(path, config=super_config)
        assert loaded.settings.embeddings_on_host is expected and loaded.to_dict() == plan.to_dict()


def test_a_format_1_plan_loads_with_the_table_on_the_device(super_config, tmp_path):
    raw = json.loads(V1_PLAN.read_text())
    assert raw["format_version"] == 1 and "embeddings_on_host" not in raw["settings"]
    old = Plan.load(V1_PLAN, config=super_config)
    assert old.format_version == 1 and not old.settings.embeddings_on_host
    # exactly what the planner makes today with the table on the device, field for field
    again = plan_residency(super_config, "RTX 4090", vram="18GiB", embeddings="device")
    assert old.to_dict() == again.to_dict()
    assert old.show() == again.show()
    # saved again, it is written in the current format, with the placement it was planned with
    resaved = json.loads(old.save(tmp_path / "resaved.json").read_text())
    assert resaved["format_version"] == 2 and resaved["settings"]["embeddings_on_host"] is False
    assert {k: v for k, v in resaved["settings"].items() if k != "embeddings_on_host"} == raw["settings"]


def _edited(tmp_path, raw, edit):
    raw = copy.deepcopy(raw)
    edit(raw)
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(raw))
    return path


def test_the_setting_is_checked_like_every_other_field(super_config, tmp_path):
    new = plan_residency(super_config, "RTX 4090").to_dict()
    old = json.loads(V1_PLAN.read_text())
    cases = [
        (new, lambda r: r["settings"].pop("embeddings_on_host"), r"settings\.embeddings_on_host is missing"),
        (new, lambda r: r["settings"].update(embeddings_on_host="yes"),
         r"settings\.embeddings_on_host must be true or false, got 'yes'"),
        # format 1 never had the field: a file that claims format 1 and has it was edited
        (old, lambda r: r["settings"].update(embeddings_on_host=True),
         r"settings has unknown field\(s\) \['embeddings_on_host'\]"),
    ]
    for raw, edit, message in cases:
        with pytest.raises(FileFormatError, match=message):
            Plan.load(_edited(tmp_path, raw, edit))
    spark = plan_residency(super_config, "spark").to_dict()
    with pytest.raises(FileFormatError, match="embeddings_on_host is true for a unified-memory device"):
        Plan.load(_edited(tmp_path, spark, lambda r: r["settings"].update(embeddings_on_host=True)))
    with pytest.raises(FileFormatError, match="format version 3 is newer than this residency reads"):
        Plan.load(_edited(tmp_path, new, lambda r: r.update(format_version=3)))
