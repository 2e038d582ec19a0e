"""The GPU validation runner (``benchmarks/gpu_validation.py``): budget, statuses, reports."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch


@pytest.fixture
def gv(load_benchmark):
    return load_benchmark("gpu_validation")


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def assert_ends(pid: int, within_s: float = 20.0) -> None:
    """Process ``pid`` is gone, or a zombie (ended, not yet reaped by whoever adopted it), within ``within_s``
    (a SIGKILL sent to its group may take a moment to act)."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/status").read_text()
        except FileNotFoundError:
            return
        if "(zombie)" in state:
            return
        time.sleep(0.05)
    raise AssertionError(f"process {pid} still runs: {state}")


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
    warm = ["warm_numba"]
    # correctness on the device first, then the open issues' measurements, then tuning; compile_check (no GPU
    # needed) last, outside the default plan
    assert names == ["install", "preflight", "pip_list", *warm, "pytest_kernels", "pytest_gpu", "bench_offload",
                     "bench_quant_kernels", "bench_dense_decode", "bench_default_table", "autotune_quick",
                     "bench_tuned_table", "compile_check"]  # fmt: skip
    by_name = {s.name: s for s in steps}
    # numba's CPU kernels compile while the kernel tests run on the GPU
    assert {by_name[n].group for n in [*warm, "pytest_kernels"]} == {"warm"} and by_name["pytest_gpu"].group is None
    assert "--device" in by_name["bench_offload"].command
    assert "pytest is not installed" in by_name["pytest_kernels"].skip_reason
    assert "pytest is not installed" in by_name["pytest_gpu"].skip_reason
    assert by_name["bench_default_table"].env == {"RESIDENCY_COMMIT": "abc123"}
    assert by_name["bench_tuned_table"].env["RESIDENCY_KERNEL_CONFIGS"] == str(tmp_path / "configs")
    assert by_name["bench_tuned_table"].requires == "configs"  # not the shipped table measured twice
    assert str(tmp_path / "configs") in by_name["autotune_quick"].command
    assert "--quick" in by_name["autotune_quick"].command
    # carried wheels: pytest (and hypothesis, which test modules import) installed from them, offline, right after
    # the install: before the preflight checks for them, and not between the warm-up and the kernel tests it overlaps
    (tmp_path / "wheels").mkdir()
    monkeypatch.setattr(gv, "WHEELS", tmp_path / "wheels")
    steps = gv.validation_steps(tmp_path, None)
    names = [s.name for s in steps]
    assert names[:6] == ["install", "install_pytest", "preflight", "pip_list", "warm_numba", "pytest_kernels"]
    assert "--no-index" in steps[1].command and {"pytest", "hypothesis"} <= set(steps[1].command)
    gpu = {s.name: s for s in steps}["pytest_gpu"].command  # every test marked gpu outside tests/kernels
    assert gpu[gpu.index("gpu") - 1] == "-m" and "--ignore=tests/kernels" in gpu
    assert "-v" in gpu and "--durations=15" in gpu  # a log cut off at the limit still names the running test
    assert "--continue-on-collection-errors" in gpu  # a module that cannot be imported does not stop the rest


def test_the_warm_up_and_preflight_commands_run(gv):
    """What the plan runs before the tests: each numba warm-up compiles (or loads) its kernels; the preflight names
    the versions and, without a GPU, fails saying so."""
    done = subprocess.run([sys.executable, "-c", gv.WARM], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    done = subprocess.run(gv.preflight_command(sys.executable), capture_output=True, text=True, timeout=120)
    report = json.loads(done.stdout)
    assert report["missing"] == [] and report["versions"]["numba"] and report["versions"]["torch"]
    assert report["versions"]["pynvml"]  # (read under its distribution's name, nvidia-ml-py)
    assert (done.returncode == 0) == report["cuda"]


def test_steps_of_a_group_run_at_the_same_time(gv, tmp_path):
    """Each of the two steps waits for a file the other writes: they only both finish if they run together."""
    def waits_for(mine: str, other: str) -> list[str]:
        return python(f"import pathlib, time; pathlib.Path({str(tmp_path / mine)!r}).touch(); "
                      f"t = time.monotonic()\n"
                      f"while not pathlib.Path({str(tmp_path / other)!r}).exists():\n"
                      f"    assert time.monotonic() - t < 20; time.sleep(0.01)")

    steps = [gv.Step("a", waits_for("a.flag", "b.flag"), 60, group="g"),
             gv.Step("b", waits_for("b.flag", "a.flag"), 60, group="g"),
             gv.Step("after", python(f"assert __import__('os').path.exists({str(tmp_path / 'b.flag')!r})"), 60)]
    seen = []
    records = gv.run_steps(steps, tmp_path, budget_s=120, on_record=lambda rs: seen.append([r["step"] for r in rs]))
    assert [r["step"] for r in records] == ["a", "b", "after"]  # in the plan's order, whichever ended first
    assert [r["status"] for r in records] == ["ok", "ok", "ok"]
    assert seen[-1][-1] == "after" and len(seen) == 3  # told after each step


def test_a_step_past_its_limit_is_ended_with_what_it_started(gv, tmp_path):
    child = tmp_path / "child.pid"
    code = ("import subprocess, sys, time\n"
            "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
            f"open({str(child)!r}, 'w').write(str(p.pid)); time.sleep(60)")
    records = gv.run_steps([gv.Step("hangs", python(code), 3)], tmp_path, budget_s=120)
    assert records[0]["status"] == "timed out"
    assert_ends(int(child.read_text()))


def test_stopping_the_runner_ends_the_steps_it_runs(gv, tmp_path):
    """SIGTERM to the runner (a command's time limit) ends the running steps too: they are in process groups of their
    own, which the signal to the runner's group does not reach."""
    child = tmp_path / "step.pid"
    step = f"import os, time; open({str(child)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    runner = tmp_path / "runner.py"
    runner.write_text(f"import sys\nsys.path.insert(0, {str(gv.ROOT / 'benchmarks')!r})\n"
                      "import gpu_validation as gv\n"
                      "gv.stop_on_signals()\n"
                      f"step = gv.Step('long', [sys.executable, '-c', {step!r}], 120)\n"
                      f"gv.run_steps([step], gv.Path({str(tmp_path)!r}), budget_s=120)\n")
    proc = subprocess.Popen([sys.executable, str(runner)])
    deadline = time.monotonic() + 60
    while not child.exists() or not child.read_text():
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.terminate()
    assert proc.wait(timeout=30) == 128 + 15
    assert_ends(int(child.read_text()))


def test_a_group_whose_step_cannot_start_ends_the_steps_it_started(gv, tmp_path):
    child = tmp_path / "a.pid"
    steps = [gv.Step("a", python(f"import os, time; open({str(child)!r}, 'w').write(str(os.getpid())); "
                                 "time.sleep(60)"), 60, group="g"),
             gv.Step("b", [str(tmp_path / "no-such-program")], 60, group="g")]
    with pytest.raises(FileNotFoundError):
        gv.run_steps(steps, tmp_path, budget_s=120)
    time.sleep(1.0)  # long enough for "a" to have written its pid, had it been left running
    if child.exists() and child.read_text():
        assert_ends(int(child.read_text()))


def test_a_step_skips_when_its_input_is_missing_and_none_starts_with_too_little_time(gv, tmp_path):
    steps = [gv.Step("needs", python("pass"), 30, requires="configs"),
             gv.Step("makes", python(f"import os; os.mkdir({str(tmp_path / 'configs')!r})"), 30),
             gv.Step("needs_again", python("pass"), 30, requires="configs"),
             gv.Step("short", python("pass"), 30)]
    times = iter([0.0, 0.0, 0.0, 0.0, 100.0 - gv.MIN_STEP_S + 1])
    records = gv.run_steps(steps, tmp_path, budget_s=100, clock=lambda: next(times))
    assert [r["status"] for r in records] == ["skipped", "ok", "ok", "not run"]
    assert "configs was not written" in records[0]["reason"]


def test_steps_runs_a_subset_in_the_plans_order_and_refuses_unknown_names(gv, tmp_path, monkeypatch, capsys):
    ran = []

    def run(steps, out_dir, budget_s, on_record=None):
        ran[:] = [s.name for s in steps]
        return [{"step": s.name, "status": "ok"} for s in steps]

    monkeypatch.setattr(gv, "run_steps", run)
    monkeypatch.setattr(gv, "device_name", lambda: "Some GPU")
    out = tmp_path / "out"
    assert gv.main([str(out), "--steps", "bench_offload, install"]) == 0
    assert ran == ["install", "bench_offload"]
    # a second command into the same folder: the summary keeps the first one's records of other steps
    assert gv.main([str(out), "--steps", "install,bench_quant_kernels"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [r["step"] for r in summary["steps"]] == ["bench_offload", "install", "bench_quant_kernels"]
    assert summary["environment"]["device"] == "Some GPU"
    # the default plan leaves out compile_check, which needs no GPU
    assert gv.main([str(out)]) == 0
    assert "compile_check" not in ran and ran[:3] == ["install", "preflight", "pip_list"]
    # where pytest is missing and wheels were carried, the pytest steps bring their installation along
    (tmp_path / "wheels").mkdir()
    monkeypatch.setattr(gv, "WHEELS", tmp_path / "wheels")
    monkeypatch.setattr(gv.importlib.util, "find_spec", lambda name: None)
    assert gv.main([str(out), "--steps", "pytest_gpu"]) == 0
    assert ran == ["install_pytest", "pytest_gpu"]
    with pytest.raises(SystemExit) as exit_info:
        gv.main([str(tmp_path / "out"), "--steps", "install,bench_ofload"])
    assert exit_info.value.code == 2 and "unknown step(s) bench_ofload; choose from install," in capsys.readouterr().err
    # the ahead-of-time compile tests are compile_check's work: the kernel tests on the GPU do not run them
    kernels = next(s for s in gv.validation_steps(tmp_path, None) if s.name == "pytest_kernels").command
    deselected = [kernels[i + 1] for i, arg in enumerate(kernels) if arg == "--deselect"]
    assert set(deselected) == set(gv.AHEAD_OF_TIME_TESTS)
    assert any(t.endswith("::test_kernels_compile_for_gpus_without_one") for t in deselected)


def test_the_summary_and_bundle_are_written_after_every_step_and_only_this_commands_failures_count(
        gv, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    earlier = {"steps": [{"step": "old", "status": "failed"}]}
    (out / "summary.json").write_text(json.dumps(earlier))
    summary = str(out / "summary.json")
    steps = [gv.Step("first", python("print('one')"), 30),
             # the summary on disk already holds the first step while the second runs
             gv.Step("second", python(f"import json; s = json.load(open({summary!r})); "
                                      "assert [r['step'] for r in s['steps']] == ['old', 'first'], s"), 30)]
    monkeypatch.setattr(gv, "validation_steps", lambda out_dir, commit: steps)
    monkeypatch.setattr(gv, "device_name", lambda: None)
    target = tmp_path / "bundle.tar.gz"
    assert gv.main([str(out), "--bundle", str(target)]) == 0  # the earlier command's failure is not this one's
    with tarfile.open(target) as tar:
        names = set(tar.getnames())
    assert {"out/summary.json", "out/first.log", "out/second.log"} <= names
    final = json.loads((out / "summary.json").read_text())
    assert [(r["step"], r["status"]) for r in final["steps"]] == [("old", "failed"), ("first", "ok"), ("second", "ok")]
    steps[1] = gv.Step("second", python("raise SystemExit(4)"), 30)
    assert gv.main([str(out)]) == 1


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


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_queued_timing_keeps_the_hosts_launch_work_out(load_benchmark):
    """``cuda_time_queued`` times what the GPU does: a call whose host part (2 ms) dwarfs its kernel measures the
    kernel; timing it one call at a time between two events would measure the host."""
    bench = load_benchmark("bench_kernels")
    x = torch.zeros(1 << 20, device="cuda")

    def call():
        time.sleep(0.002)
        x.add_(1.0)

    timed = bench.cuda_time_queued([call, call], 1, 3)
    assert timed["host_ms"] >= 2.0 and timed["ms"] < 0.5 and timed["rounds_with_gaps"] == 0, timed
    assert bench.cuda_time(call, 1, 3) >= 1.5  # (the one-call timing counts the host's 2 ms)
