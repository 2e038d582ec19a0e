"""The GPU validation runner (``benchmarks/gpu_validation.py``): budget, statuses, reports."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.fixture
def gv(load_benchmark):
    return load_benchmark("gpu_validation")


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_steps_run_in_order_and_failures_do_not_stop_the_rest(gv, tmp_path):
    steps = [
        gv.Step("ok", python("print('fine')"), 30),
        gv.Step("fails", python("import sys; print('broken', file=sys.stderr); sys.exit(3)"), 30),
        gv.Step("slow", python("import time; time.sleep(30)"), 0.5),
        gv.Step("skipped", python("raise SystemExit(9)"), 30, skip_reason="no pytest"),
        gv.Step("report", python("import sys; print('{\"a\": 1}'); print('noise', file=sys.stderr)"), 30,
                stdout_file="report.json"),  # fmt: skip
    ]
    records = gv.run_steps(steps, tmp_path, budget_s=120)
    assert [r["status"] for r in records] == ["ok", "failed", "timed out", "skipped", "ok"]
    assert records[1]["returncode"] == 3 and records[2]["returncode"] is None
    assert records[3]["reason"] == "no pytest"
    assert (tmp_path / "ok.log").read_text() == "fine\n"
    assert "broken" in (tmp_path / "fails.log").read_text()
    # a report on stdout stays clean JSON; stderr goes to the step's log
    assert json.loads((tmp_path / "report.json").read_text()) == {"a": 1}
    assert (tmp_path / "report.log").read_text() == "noise\n"


def test_each_step_gets_what_is_left_of_the_budget(gv, tmp_path):
    # a clock that says 100 s passed between steps: the second step gets the 20 s left, the third none
    times = iter([0.0, 0.0, 100.0, 200.0])
    steps = [gv.Step(name, python("pass"), 500) for name in ("first", "second", "third")]
    records = gv.run_steps(steps, tmp_path, budget_s=120, clock=lambda: next(times))
    assert [r["status"] for r in records] == ["ok", "ok", "not run"]
    assert records[0]["limit_s"] == 120 and records[1]["limit_s"] == 20
    assert records[2]["reason"] == "the time budget was spent"


def test_the_plan_checks_correctness_before_tuning_and_names_the_commit(gv, tmp_path, monkeypatch):
    monkeypatch.setattr(gv, "WHEELS", tmp_path / "absent")
    monkeypatch.setattr(gv.importlib.util, "find_spec", lambda name: None)
    steps = gv.validation_steps(tmp_path, "abc123")
    names = [s.name for s in steps]
    # correctness on the device first, then the open issues' measurements, then tuning
    assert names == ["install", "compile_check", "pytest_kernels", "pytest_gpu", "bench_offload", "bench_quant_kernels",
                     "bench_dense_decode", "bench_default_table", "autotune_quick", "bench_tuned_table"]  # fmt: skip
    assert "--device" in {s.name: s for s in steps}["bench_offload"].command
    by_name = {s.name: s for s in steps}
    assert "pytest is not installed" in by_name["pytest_kernels"].skip_reason
    assert "pytest is not installed" in by_name["pytest_gpu"].skip_reason
    assert by_name["bench_default_table"].env == {"RESIDENCY_COMMIT": "abc123"}
    assert by_name["bench_tuned_table"].env["RESIDENCY_KERNEL_CONFIGS"] == str(tmp_path / "configs")
    assert str(tmp_path / "configs") in by_name["autotune_quick"].command
    assert "--quick" in by_name["autotune_quick"].command
    # carried wheels: pytest is installed from them, offline, first
    (tmp_path / "wheels").mkdir()
    monkeypatch.setattr(gv, "WHEELS", tmp_path / "wheels")
    names = [s.name for s in gv.validation_steps(tmp_path, None)]
    assert names[2:5] == ["install_pytest", "pytest_kernels", "pytest_gpu"]
    assert "--no-index" in gv.validation_steps(tmp_path, None)[2].command
    gpu = gv.validation_steps(tmp_path, None)[4].command  # every test marked gpu outside tests/kernels
    assert gpu[gpu.index("gpu") - 1] == "-m" and "--ignore=tests/kernels" in gpu


def test_steps_runs_a_subset_in_the_plans_order_and_refuses_unknown_names(gv, tmp_path, monkeypatch, capsys):
    ran = []

    def run(steps, out_dir, budget_s):
        ran[:] = [s.name for s in steps]
        return [{"step": s.name, "status": "ok"} for s in steps]

    monkeypatch.setattr(gv, "run_steps", run)
    out = tmp_path / "out"
    assert gv.main([str(out), "--steps", "bench_offload, install"]) == 0
    assert ran == ["install", "bench_offload"]
    # a second command into the same folder: the summary keeps the first one's records of other steps
    assert gv.main([str(out), "--steps", "install,bench_quant_kernels"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [r["step"] for r in summary["steps"]] == ["bench_offload", "install", "bench_quant_kernels"]
    # where pytest is missing and wheels were carried, the pytest steps bring their installation along
    (tmp_path / "wheels").mkdir()
    monkeypatch.setattr(gv, "WHEELS", tmp_path / "wheels")
    monkeypatch.setattr(gv.importlib.util, "find_spec", lambda name: None)
    assert gv.main([str(out), "--steps", "pytest_gpu"]) == 0
    assert ran == ["install_pytest", "pytest_gpu"]
    with pytest.raises(SystemExit) as exit_info:
        gv.main([str(tmp_path / "out"), "--steps", "install,bench_ofload"])
    assert exit_info.value.code == 2 and "unknown step(s) bench_ofload; choose from install," in capsys.readouterr().err
    # the MoE compile test is the compile_check step's work: the kernel tests do not run it again
    kernels = next(s for s in gv.validation_steps(tmp_path, None) if s.name == "pytest_kernels").command
    assert kernels[kernels.index("--deselect") + 1].endswith("::test_kernels_compile_for_gpus_without_one")


def test_benchmark_names_the_commit_given_when_there_is_no_git(monkeypatch, load_benchmark):
    bench = load_benchmark("bench_kernels")
    machine = sys.modules[bench.git_commit.__module__]  # the shared benchmarks/_machine.py

    def no_git(*args, **kwargs):
        raise subprocess.CalledProcessError(128, args[0])

    monkeypatch.setattr(machine.subprocess, "run", no_git)
    monkeypatch.setattr(bench.torch.cuda, "get_device_name", lambda: "Some GPU")
    monkeypatch.setenv("RESIDENCY_COMMIT", "abc123")
    env = bench.environment()
    assert env["commit"] == "abc123" and env["device"] == "Some GPU"
    monkeypatch.delenv("RESIDENCY_COMMIT")
    assert machine.git_commit() == "unknown"
