"""The planning command line: plan / plan show / plan-show, simulate, gpus, calibrate."""

from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest
import torch

import residency.cli as cli
from residency.cli.plan import calibrated_spec, resolve_config
from residency.errors import ResidencyError
from residency.planning.hardware import GiB, load_gpu_spec, lookup_gpu, save_gpu_spec
from residency.planning.plan import Plan
from residency.planning.simulate import synthetic_trace


@pytest.fixture(autouse=True)
def planning_commands(monkeypatch):
    monkeypatch.setattr(cli, "COMMAND_MODULES", ("residency.cli.plan",))


def run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def plan_file(tmp_path, capsys):
    path = tmp_path / "plan.json"
    code, out, _ = run(capsys, "plan", "--config", "nemotron-3-super", "--gpu", "4090", "--vram", "22GiB",
                       "--host-memory", "64GiB", "--context", "8192", "--miss-path", "copy", "--out", str(path))
    assert code == 0 and path.is_file()
    return path


def test_plan_writes_a_valid_plan(plan_file, capsys):
    plan = Plan.load(plan_file)
    assert plan.gpu.name == "RTX 4090" and plan.budget["vram_bytes"] == 22 * GiB
    assert plan.host.memory_bytes == 64 * GiB and plan.host.sources["memory_bytes"] == "user: command line"
    assert plan.settings["context"] == 8192 and plan.settings["miss_path"] == "copy"


def test_plan_show_both_spellings(plan_file, capsys):
    code, out, _ = run(capsys, "plan", "show", str(plan_file))
    assert code == 0 and "Predicted: hit rate" in out and "Per MoE layer:" in out
    code, out2, _ = run(capsys, "plan-show", str(plan_file))
    assert code == 0 and out2 == out
    code, _, err = run(capsys, "plan", "display", str(plan_file))
    assert code == 2 and "residency plan show PLAN.json" in err


def test_plan_show_refuses_another_model(plan_file, tmp_path, capsys):
    cfg = resolve_config("nemotron-3-super", None).to_dict()
    cfg["n_routed_experts"] = 384
    other = tmp_path / "other.json"
    other.write_text(json.dumps(cfg))
    code, _, err = run(capsys, "plan-show", str(plan_file), "--config", str(other))
    assert code == 2 and "make a new plan" in err


def test_plan_from_model_dir_and_alias(tmp_path, capsys):
    model = tmp_path / "ckpt"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(resolve_config("nemotron-3-super", None).to_dict()))
    code, out, _ = run(capsys, "plan", "--model", str(model), "--gpu", "H100 PCIe")
    assert code == 0 and "hit rate 100.0 %" in out
    code, out, _ = run(capsys, "plan", "--config", "nemotron-3-super", "--gpu", "spark")
    assert code == 0 and "Unified memory: one copy of every expert" in out


def test_plan_errors_name_the_fix(capsys):
    code, _, err = run(capsys, "plan", "--config", "nemotron-3-super", "--gpu", "4090", "--vram", "12GiB")
    assert code == 2 and "What takes the memory" in err and "--dense-dtype fp8" in err
    code, _, err = run(capsys, "plan", "--config", "nemotron-3-super", "--gpu", "H100")
    assert code == 2 and "ambiguous" in err
    code, _, err = run(capsys, "plan", "--gpu", "4090")
    assert code == 2 and "--config nemotron-3-super" in err
    code, _, err = run(capsys, "plan", "--config", "nemotron-3-super")
    assert code == 2 and "--gpu NAME" in err
    code, _, err = run(capsys, "plan", "--config", "nemotron-3-super", "--gpu", "spark", "--host-memory", "64GiB")
    assert code == 2 and "unified memory" in err
    with pytest.raises(SystemExit):
        cli.main(["plan", "--config", "nemotron-3-super", "--gpu", "4090", "--vram", "lots"])
    assert "20GiB" in capsys.readouterr().err


def test_plan_custom_gpu_and_spec_file(tmp_path, capsys):
    code, out, _ = run(capsys, "plan", "--config", "nemotron-3-super", "--gpu", "custom", "--vram", "40GiB",
                       "--mem-bw", "900", "--h2d", "12")
    assert code == 0 and "Target: custom: 40.0 GiB, 900 GB/s" in out
    spec = tmp_path / "gpu.json"
    save_gpu_spec(spec, lookup_gpu("L40S").replace(h2d_gbps=11.0))
    out_plan = tmp_path / "p.json"
    code, _, _ = run(capsys, "plan", "--config", "nemotron-3-super", "--gpu-spec", str(spec), "--out", str(out_plan))
    assert code == 0 and Plan.load(out_plan).gpu.h2d_gbps == 11.0
    code, _, _ = run(capsys, "plan", "--config", "nemotron-3-super", "--gpu", "4090", "--h2d", "12.6",
                     "--out", str(out_plan))
    assert code == 0 and Plan.load(out_plan).gpu.source_of("h2d_gbps") == "user: command line"


def test_plan_with_trace_and_profile(tmp_path, capsys, monkeypatch):
    config = resolve_config("nemotron-3-super", None)
    trace_path = synthetic_trace(config, 120, locality=0.5, seed=3).save(tmp_path / "t.safetensors")

    class Profile:  # stand-in for residency.profiling.profile.Profile (another module of the project)
        def __init__(self, counts):
            self.counts, self.gate_mass, self.saliency = counts, counts, counts
            self.tokens, self.fingerprint = 99, config.fingerprint()

        @classmethod
        def load(cls, path, fingerprint=None):
            assert fingerprint == config.fingerprint()
            counts = torch.ones(40, 512, dtype=torch.float64)
            counts[:, :50] = 100.0
            return cls(counts)

    monkeypatch.setitem(sys.modules, "residency.profiling.profile", types.SimpleNamespace(Profile=Profile))
    out_plan = tmp_path / "p.json"
    code, out, _ = run(capsys, "plan", "--config", "nemotron-3-super", "--gpu", "4090", "--profile", "x",
                       "--trace", str(trace_path), "--out", str(out_plan))
    assert code == 0
    plan = Plan.load(out_plan)
    assert "profile pick counts (99 tokens)" in plan.predicted["method"]
    assert "estimated from the trace" in plan.predicted["method"]
    assert set(range(50)) <= set(plan.layers[0].static)


def test_simulate_synthetic_and_json(plan_file, tmp_path, capsys):
    out_json = tmp_path / "sim.json"
    code, out, _ = run(capsys, "simulate", "--plan", str(plan_file), "--synthetic", "200", "--skew", "1.1",
                       "--synthetic-locality", "0.35", "--prefetch-recall", "0.5", "--per-layer", "--json",
                       str(out_json))
    assert code == 0
    assert "synthetic trace: 200 tokens, Zipf skew 1.1, locality 0.35" in out
    for policy in ("static", "lru", "lfu", "hybrid"):
        assert f"\n{policy} " in out
    assert "per layer, hybrid:" in out
    data = json.loads(out_json.read_text())
    assert data["kind"] == "simulation" and len(data["results"]) == 4
    assert data["results"][0]["trace"]["skew"] == 1.1


def test_simulate_recorded_trace_and_refusals(plan_file, tmp_path, capsys):
    config = resolve_config("nemotron-3-super", None)
    good = synthetic_trace(config, 50, seed=1).save(tmp_path / "good.safetensors")
    code, out, _ = run(capsys, "simulate", "--plan", str(plan_file), "--trace", str(good), "--policy", "lru")
    assert code == 0 and "recorded trace" not in out and "lru " in out  # synthetic meta travels with the file
    other = synthetic_trace((40, 512, 22), 50, fingerprint="nemotron_h-ffffffffffffffff").save(tmp_path / "o.st")
    code, _, err = run(capsys, "simulate", "--plan", str(plan_file), "--trace", str(other))
    assert code == 2 and "made for model" in err
    code, _, err = run(capsys, "simulate", "--plan", str(plan_file))
    assert code == 2 and "--synthetic" in err


def test_gpus_lists_the_catalog(capsys):
    code, out, _ = run(capsys, "gpus")
    assert code == 0
    for name in ("RTX 3090", "RTX 4090", "H100 PCIe", "DGX Spark", "Jetson AGX Thor", "GH200"):
        assert name in out
    code, out, _ = run(capsys, "gpus", "--sources")
    assert "h2d_gbps: measured: 56.3 GB/s" in out
    code, out, _ = run(capsys, "gpus", "--json")
    assert {g["name"] for g in json.loads(out)} >= {"L4", "B200"}


def test_calibrate_without_cuda_exits_with_a_message(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, _, err = run(capsys, "calibrate", "--out", str(tmp_path / "g.json"))
    assert code == 2 and "no CUDA device" in err and "residency gpus" in err
    assert not (tmp_path / "g.json").exists()


def test_calibrated_spec_is_usable_as_gpu_spec(tmp_path):
    spec = calibrated_spec(lookup_gpu("RTX 4090"), h2d_gbps=21.37, device_copy_gbps=870.0, context_bytes=512 << 20)
    assert spec.h2d_gbps == 21.37 and spec.context_bytes == 512 << 20 and spec.mem_bw_gbps == 1008
    assert spec.source_of("h2d_gbps").startswith("measured") and "870 GB/s" in spec.notes
    path = save_gpu_spec(tmp_path / "cal.json", spec)
    assert load_gpu_spec(path) == spec
    unknown = calibrated_spec(spec.replace(note="unverified: guess", mem_bw_gbps=1.0), 20.0, 800.0, 0)
    assert unknown.mem_bw_gbps == 1000.0 and unknown.source_of("mem_bw_gbps").startswith("derived")
    config = resolve_config("nemotron-3-super", None)
    from residency.planning.plan import plan_residency

    plan = plan_residency(config, load_gpu_spec(path))
    assert plan.breakdown.get("cuda_context") == 512 << 20


def test_resolve_config_errors():
    with pytest.raises(ResidencyError, match="not both"):
        resolve_config("a", "b")
    assert resolve_config("nemotron-3-super", None).num_moe_layers == 40
    assert np.isclose(resolve_config("nemotron-3-super", None).routed_scaling_factor, 5.0)
