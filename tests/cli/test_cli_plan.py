"""The planning command line: plan / plan show / plan-show, simulate, gpus, calibrate."""

from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest
import torch
from residency.runtime.policy import POLICY_NAMES

import residency.cli as cli
from residency.cli.plan import resolve_config
from residency.errors import ResidencyError
from residency.planning.hardware import lookup_gpu, save_gpu_spec
from residency.planning.plan import Plan
from residency.planning.simulate import synthetic_trace
from residency.sizes import GiB


@pytest.fixture(autouse=True)
def planning_commands(monkeypatch):
    monkeypatch.setattr(cli, "COMMAND_MODULES", ("residency.cli.plan",))


def run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def refused(capsys, *argv):
    """Run a command that must fail: exit status 2, one line on stderr, no traceback; returns that line."""
    code, _, err = run(capsys, *argv)
    assert code == 2, err
    assert "Traceback" not in err and err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith(f"residency {argv[0]}: error: ")
    return err


PLAN = ("plan", "--config", "nemotron-3-super")


@pytest.fixture
def plan_file(tmp_path, capsys):
    path = tmp_path / "plan.json"
    code, out, _ = run(capsys, "plan", "--config", "nemotron-3-super", "--gpu", "4090", "--vram", "22GiB",
                       "--host-memory", "64GiB", "--context", "8192", "--miss-path", "copy", "--out", str(path))
    assert code == 0 and path.is_file()
    return path


def test_plan_writes_a_valid_plan(plan_file, capsys):
    plan = Plan.load(plan_file)
    assert plan.gpu.name == "RTX 4090" and plan.budget.vram_bytes == 22 * GiB
    assert plan.host.memory_bytes == 64 * GiB and plan.host.sources["memory_bytes"] == "user: command line"
    assert plan.settings.context == 8192 and plan.settings.miss_path == "copy"


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
    assert "write it like 20GiB, 64GB or 512MiB" in refused(capsys, *PLAN, "--gpu", "4090", "--vram", "lots")


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
    assert "profile pick counts (99 tokens)" in plan.predicted.method
    assert "estimated from the trace" in plan.predicted.method
    assert set(range(50)) <= set(plan.layers[0].static)


def test_simulate_synthetic_and_json(plan_file, tmp_path, capsys):
    out_json = tmp_path / "sim.json"
    code, out, _ = run(capsys, "simulate", "--plan", str(plan_file), "--synthetic", "200", "--skew", "1.1",
                       "--synthetic-locality", "0.35", "--prefetch-recall", "0.5", "--per-layer", "--json",
                       str(out_json))
    assert code == 0
    assert "synthetic trace: 200 tokens, Zipf skew 1.1, locality 0.35" in out
    for policy in POLICY_NAMES:
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


def test_resolve_config_errors():
    with pytest.raises(ResidencyError, match="not both"):
        resolve_config("a", "b")
    assert resolve_config("nemotron-3-super", None).num_moe_layers == 40
    assert np.isclose(resolve_config("nemotron-3-super", None).routed_scaling_factor, 5.0)


# ---------------------------------------------------------------------- sizes and budgets on the command line


def test_vram_is_printed_as_understood(capsys, tmp_path):
    out_plan = tmp_path / "p.json"
    code, out, _ = run(capsys, *PLAN, "--gpu", "4090", "--vram", "24GB", "--out", str(out_plan))
    assert code == 0 and "Budget: --vram 24GB = 24.00 GB (decimal) = 22.35 GiB" in out
    assert Plan.load(out_plan).budget.vram_bytes == 24 * 10**9
    code, out, _ = run(capsys, *PLAN, "--gpu", "4090", "--vram", "0.8", "--out", str(out_plan))
    assert code == 0
    assert ("Budget: --vram 0.8 = 80 % of RTX 4090's 24.00 GiB (free memory not measured, all of it assumed free) "
            "= 19.20 GiB") in out
    assert Plan.load(out_plan).budget.vram_bytes == int(0.8 * 24 * GiB)
    code, out, _ = run(capsys, *PLAN, "--gpu", "4090")
    assert code == 0 and "Budget:" not in out  # no --vram: the whole GPU, nothing to explain


def test_vram_fraction_of_detected_free_memory(capsys, monkeypatch):
    from residency.planning.detect import Detection
    from residency.planning.hardware import DEFAULT_HOST

    gpu = lookup_gpu("RTX 4090")
    monkeypatch.setattr("residency.cli.plan.detect_local", lambda: Detection(gpu, DEFAULT_HOST, 20 * GiB, ()))
    code, out, _ = run(capsys, *PLAN, "--gpu", "local", "--vram", "0.9")
    assert code == 0 and "Budget: --vram 0.9 = 90 % of 20.00 GiB free = 18.00 GiB" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--gpu", "4090", "--vram", "24"), "--vram '24' is a bare number: a bare number is a fraction of free device "
                                            "memory in (0, 1], such as 0.8; for a size write 24GiB or 24GB"),
        (("--gpu", "4090", "--vram", "100GiB"), "--vram '100GiB' (100.00 GiB) is more than RTX 4090 has (24.00 GiB)"),
        (("--gpu", "4090", "--vram", "0GiB"), "--vram '0GiB' is 0 bytes"),
        (("--gpu", "4090", "--vram", "20 gigs"), "unknown unit 'gigs'"),
        (("--gpu", "4090", "--host-memory", "64"), "--host-memory '64' has no unit (64 bytes is never meant); write "
                                                   "64GiB or 64GB"),
        (("--gpu", "custom", "--vram", "0.8", "--mem-bw", "900", "--h2d", "12"),
         "--vram '0.8' is a fraction of free device memory, but a custom GPU's memory is not known; give a size"),
        (("--gpu", "custom", "--vram", "40", "--mem-bw", "900", "--h2d", "12"), "for a size write 40GiB or 40GB"),
        (("--gpu", "4090", "--policy", "mru"), "unknown policy 'mru'; use one of ('static', 'lru', 'lfu', 'hybrid')"),
        (("--gpu", "4090", "--miss-path", "teleport"), "miss path must be one of ('auto', 'copy', 'cpu')"),
    ],
)
def test_plan_refusals_are_one_line(capsys, args, message):
    assert message in refused(capsys, *PLAN, *args)


def test_calibrate_refuses_a_bare_size(capsys, tmp_path):
    err = refused(capsys, "calibrate", "--out", str(tmp_path / "g.json"), "--size", "256")
    assert "--size '256' has no unit (256 bytes is never meant); write 256GiB or 256GB" in err


# ---------------------------------------------------------------------- GPU spec errors


def test_gpu_and_gpu_spec_together_are_refused(capsys, tmp_path):
    spec = save_gpu_spec(tmp_path / "gpu.json", lookup_gpu("L40S"))
    err = refused(capsys, *PLAN, "--gpu", "4090", "--gpu-spec", str(spec))
    assert f"--gpu 4090 and --gpu-spec {spec} both name the target GPU: use one of them" in err


def test_gpu_spec_missing_fields_is_one_line(capsys, tmp_path):
    spec = tmp_path / "lab.json"
    spec.write_text(json.dumps({"name": "lab card", "memory_bytes": "20GiB", "mem_bw_gbps": 800, "fp8": True}))
    err = refused(capsys, *PLAN, "--gpu-spec", str(spec))
    assert f"{spec}: missing field(s) h2d_gbps, link, unified_memory, compute_capability, fp4; " in err
    assert '"base": "RTX 4090"' in err
    spec.write_text(json.dumps({"base": "RTX 4090", "memory_bytes": "20"}))
    assert "memory_bytes '20' has no unit" in refused(capsys, *PLAN, "--gpu-spec", str(spec))


# ---------------------------------------------------------------------- files of the wrong kind


def test_files_of_the_wrong_kind_say_what_they_are(plan_file, tmp_path, capsys):
    trace = synthetic_trace(resolve_config("nemotron-3-super", None), 20).save(tmp_path / "t.safetensors")
    err = refused(capsys, *PLAN, "--gpu", "4090", "--profile", str(plan_file))
    assert (f"{plan_file} is a residency plan ('plan' file, not a 'profile' file): use it with `residency simulate "
            "--plan` or `residency plan show`; for a residency profile, pass a file written by `residency profile "
            "--out`") in err
    err = refused(capsys, *PLAN, "--gpu", "4090", "--profile", str(trace))
    assert f"{trace} is a routing trace ('trace' file, not a 'profile' file): pass it as --trace" in err
    err = refused(capsys, *PLAN, "--gpu", "4090", "--trace", str(plan_file))
    assert "is a residency plan" in err
    assert "for a routing trace, pass a trace written by `residency profile --trace`" in err
    err = refused(capsys, "simulate", "--plan", str(trace), "--synthetic", "10")
    assert f"{trace} is a routing trace" in err
    assert "for a residency plan, pass a file written by `residency plan --out`" in err
    err = refused(capsys, "plan-show", str(trace))
    assert "is a routing trace" in err
    err = refused(capsys, *PLAN, "--gpu-spec", str(plan_file))
    assert "is a residency plan" in err and "for a GPU spec, pass a file written by `residency calibrate --out`" in err
    err = refused(capsys, "simulate", "--plan", str(plan_file), "--trace", str(plan_file))
    assert "is a residency plan" in err and "for a routing trace" in err
    spec = save_gpu_spec(tmp_path / "gpu.json", lookup_gpu("L4"))
    err = refused(capsys, "plan", "show", str(spec))
    assert "is a GPU spec ('gpu_spec' file, not a 'plan' file): pass it as --gpu-spec" in err


def test_simulate_refuses_an_unknown_policy(plan_file, capsys):
    err = refused(capsys, "simulate", "--plan", str(plan_file), "--synthetic", "10", "--policy", "mru")
    assert "unknown policy 'mru'; choose one of ('static', 'lru', 'lfu', 'hybrid') or 'all'" in err


def test_plan_embeddings_flag(tmp_path, capsys):
    """--embeddings overrides where the planner keeps the embedding table; the choice lands in the plan file."""
    chosen = {}
    for flag in ((), ("--embeddings", "device"), ("--embeddings", "host"), ("--embeddings", "auto")):
        out_plan = tmp_path / f"plan{len(chosen)}.json"
        code, out, _ = run(capsys, *PLAN, "--gpu", "4090", *flag, "--out", str(out_plan))
        assert code == 0
        plan = Plan.load(out_plan)
        chosen[flag[1] if flag else "default"] = plan.settings.embeddings_on_host
        table = "embedding table (1.00 GiB) in host memory" in out
        assert table == plan.settings.embeddings_on_host
    assert chosen == {"default": True, "device": False, "host": True, "auto": True}
    err = refused(capsys, *PLAN, "--gpu", "4090", "--embeddings", "gpu")
    assert "embeddings must be one of ('auto', 'device', 'host'), got 'gpu'" in err
    err = refused(capsys, *PLAN, "--gpu", "spark", "--embeddings", "host")
    assert "unified memory: host and GPU share one pool" in err


def test_help_and_planning_from_a_config_do_not_load_torch(tmp_path):
    """`residency --help` and planning for a GPU from a config alone start in a fraction of a second: torch
    (over a second to import) is only loaded by commands that run a model or read tensors."""
    import subprocess

    argv = ["plan", "--config", "nemotron-3-super", "--gpu", "RTX 4090", "--out", str(tmp_path / "p.json")]
    script = ("import sys\n"
              "import residency.cli as cli\n"
              "cli.build_parser()\n"
              f"assert cli.main({argv!r}) == 0\n"
              "print('torch' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "False"
