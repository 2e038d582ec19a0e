"""Every GPU check of the project in one command, inside a fixed time budget.

    python benchmarks/gpu_validation.py OUT_DIR [--budget-s 540] [--commit HASH] [--steps NAME,...]
                                        [--bundle FILE.tar.gz]

GPU time is scarce and comes in short leases (15 minutes of device time, the machine's start
included, at most 10 minutes a command), so this runs the checks in order of importance and
gives each step what is left of the budget, recording what ran, how long and how it ended:

1. ``pip install --no-deps --no-build-isolation -e .`` (the machine's own torch and triton stay);
   pytest and hypothesis from wheels in ``.gpu_wheels/`` when pytest is missing and that folder was
   carried (``pip download -d .gpu_wheels pytest hypothesis`` on a machine with network), else the
   pytest steps are skipped with the reason in the summary; ``preflight``: the versions of the
   libraries the steps import (``pip_list.txt`` too), failing with the names of any needed one
   that is missing;
2. at the same time: numba's CPU kernels compiled into its on-disk cache (the bookkeeping, the BF16
   and each quantized format's CPU expert kernel, in turn in one process, since processes compiling
   one function at once race on numba's index: about 90 s on one core, which the offload tests and
   benchmark would otherwise pay) and ``pytest tests/kernels`` compiled on the GPU (fp32 odd shapes
   and the bf16 ``gpu`` tests);
3. ``pytest -m gpu`` over the rest of the suite (the offload runtime on CUDA against the resident
   run, quantized checkpoints, CUDA-graph decode, page-locked embedding rows ...);
4. ``benchmarks/bench_offload.py --device cuda``: per-expert fetch bandwidth against one large pinned
   copy, and offloaded decode tokens/s at several budgets against resident, naive synchronous
   on-demand copying and all misses on the CPU (``offload.{json,md}``);
5. ``benchmarks/bench_quant_kernels.py``: the NVFP4 / FP8 / W4A16 decode kernel against the copy
   floor and the BF16 kernel (``quant_kernels.{json,md}``; each result checked against its
   reference first);
6. ``benchmarks/bench_dense_decode.py``: the decode step of a Super-shaped stack, eager and replayed
   from a CUDA graph, against the memory floor (``dense_decode.{json,md}``; every graph step is
   checked against an eager step first);
7. ``benchmarks/bench_kernels.py`` with the shipped tuning table: every kernel result is checked
   against the torch reference at Super shapes in bf16 before it is timed;
8. ``benchmarks/autotune_moe.py --quick`` into ``OUT_DIR/configs``;
9. ``bench_kernels.py`` again with the table step 8 wrote (skipped when it wrote none).

Correctness on the device comes first, then the measurements the open issues name, then tuning.
``compile_check`` (``python -m residency.kernels.compile_check``: cubins, shared memory, spills)
needs no GPU and is not in the plan; ``--steps compile_check`` runs it. ``--steps`` runs a subset
in the plan's order (``install_pytest`` comes with the pytest steps where it is needed);
``summary.json`` keeps the records of earlier commands' steps into the same ``OUT_DIR`` that this
one did not run.

Writes into ``OUT_DIR``: one ``<step>.log`` per step, the benchmarks' ``.json`` / ``.md`` files,
``configs/*.json``, ``pip_list.txt`` and ``summary.json`` (device, versions, commit, each step's
command, exit status and seconds), the summary rewritten after every step so that a command
stopped at its limit keeps it. ``--bundle`` also packs ``OUT_DIR`` into one ``.tar.gz`` after
every step (a lent machine returns only a few files). SIGTERM, SIGHUP or Ctrl-C end the steps still
running before the runner exits (they run in process groups of their own). The working tree on a
lent machine usually has no ``.git``: pass ``--commit`` so that the results name the commit they
measured.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WHEELS = ROOT / ".gpu_wheels"
#: a step given less than this many seconds of the budget is not started (it could only time out)
MIN_STEP_S = 20.0
#: libraries the steps import besides torch and triton (the install is --no-deps): preflight fails naming any missing
NEEDED = ("numpy", "numba", "llvmlite", "safetensors", "psutil", "pynvml", "tqdm", "pytest", "hypothesis")
#: optional extras some tests use (they skip without them): preflight only reports them
OPTIONAL = ("tokenizers", "jinja2", "transformers")
#: the kernel tests that compile for GPUs without one (compile_check's work, which needs no GPU): not run there
AHEAD_OF_TIME_TESTS = ("tests/kernels/test_moe_gather_gemm.py::test_kernels_compile_for_gpus_without_one",
                       "tests/kernels/test_mamba_step.py::test_kernels_compile_for_hopper_and_ampere")
#: numba's CPU kernels compiled into its cache, in turn in one process (processes compiling overloads of one function
#: at once race on numba's index file and can lose entries): the bookkeeping and the BF16 kernel, then each quantized
#: format's
WARM = ("from residency.runtime import control, cpu_experts\n"
        "from residency.kernels.moe.quant_formats import QuantSpec\n"
        "from residency.runtime.cpu_quant import measure_quant_throughput\n"
        "control.warm_up()\n"
        "cpu_experts.measure_throughput(1, latent=64, intermediate=64, repeats=1)\n"
        "for spec in (QuantSpec('nvfp4'), QuantSpec('fp8'), QuantSpec('w4a16', group_size=128)):\n"
        "    measure_quant_throughput(spec, 1, latent=256, intermediate=256, repeats=1)\n")


@dataclass
class Step:
    """One command of the validation, with the most seconds it may take.

    Consecutive steps of the same ``group`` run at the same time (each within its own limit);
    ``requires``: a path under the output folder that must exist when the step's turn comes, else
    it is skipped (a step that reads what an earlier one wrote).
    """

    name: str
    command: list[str]
    limit_s: float
    env: dict[str, str] = field(default_factory=dict)
    stdout_file: str | None = None  # keep stdout apart from the log (a JSON report)
    skip_reason: str | None = None
    group: str | None = None
    requires: str | None = None


def run_steps(steps: list[Step], out_dir: Path, budget_s: float, clock: Callable[[], float] = time.monotonic,
              on_record: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """Run ``steps`` in order; each gets ``min(limit, what is left of the budget)`` seconds.

    A step that fails or times out does not stop the ones after it (they are independent checks);
    a step that would get under :data:`MIN_STEP_S` is recorded as not run. ``on_record`` is called with
    the records so far after each step ends. Returns one record per step, in the steps' order.
    """
    deadline = clock() + budget_s
    records: list[dict] = []
    i = 0
    while i < len(steps):
        group = [steps[i]]
        while (steps[i].group is not None and i + len(group) < len(steps)
               and steps[i + len(group)].group == steps[i].group):
            group.append(steps[i + len(group)])
        i += len(group)
        running: list = []
        try:
            for step in group:
                record: dict = {"step": step.name, "command": " ".join(step.command)}
                left = deadline - clock()
                if step.skip_reason is not None:
                    record.update(status="skipped", reason=step.skip_reason)
                elif step.requires is not None and not (out_dir / step.requires).exists():
                    record.update(status="skipped", reason=f"{step.requires} was not written by an earlier step")
                elif left < MIN_STEP_S:
                    record.update(status="not run", reason="the time budget was spent")
                else:
                    running.append((step, record, _start(step, out_dir), min(step.limit_s, left)))
                    continue
                _done(records, record, on_record)
        except BaseException:  # (a step that cannot start, an interrupt): the group's started steps end too
            _end_all(running)
            raise
        _finish(running, records, on_record)
    order = {s.name: n for n, s in enumerate(steps)}
    return sorted(records, key=lambda r: order[r["step"]])


def _done(records: list[dict], record: dict, on_record: Callable[[list[dict]], None] | None) -> None:
    records.append(record)
    print(json.dumps(record), flush=True)
    if on_record is not None:
        on_record(records)


def _start(step: Step, out_dir: Path) -> tuple[subprocess.Popen, ExitStack, float]:
    """Start ``step`` in a process group of its own (so a timeout also ends the processes it started)."""
    files = ExitStack()
    log = files.enter_context(open(out_dir / f"{step.name}.log", "w"))
    if step.stdout_file:  # stdout is a report of its own; stderr goes to the log
        stdout, stderr = files.enter_context(open(out_dir / step.stdout_file, "w")), log
    else:
        stdout, stderr = log, subprocess.STDOUT
    proc = subprocess.Popen(step.command, cwd=ROOT, stdout=stdout, stderr=stderr, env={**os.environ, **step.env},
                            start_new_session=True)
    return proc, files, time.monotonic()


def _kill(proc: subprocess.Popen) -> None:
    """End ``proc`` and every process it started (its process group)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _finish(running: list, records: list[dict], on_record: Callable[[list[dict]], None] | None) -> None:
    """Wait for the started steps, ending each that runs past its limit; record each as it ends. If this process is
    interrupted or told to stop meanwhile (see :func:`stop_on_signals`), the steps still running are ended first:
    they run in process groups of their own, which a signal to this one's group does not reach."""
    try:
        while running:
            for entry in list(running):
                step, record, (proc, files, started), limit = entry
                elapsed = time.monotonic() - started
                if proc.poll() is None and elapsed < limit:
                    continue
                if proc.returncode is None:  # past its limit: end it and whatever it started
                    _kill(proc)
                    status, rc = "timed out", None
                else:
                    status, rc = ("ok" if proc.returncode == 0 else "failed"), proc.returncode
                files.close()
                running.remove(entry)
                record.update(status=status, returncode=rc, seconds=round(elapsed, 1), limit_s=round(limit, 1),
                              log=f"{step.name}.log")
                _done(records, record, on_record)
            if running:
                time.sleep(0.05)
    except BaseException:
        _end_all(running)
        raise


def _end_all(running: list) -> None:
    for _, _, (proc, files, _), _ in running:
        _kill(proc)
        files.close()


def stop_on_signals() -> None:
    """Turn SIGTERM and SIGHUP (a command's time limit, a closed session) into SystemExit, as Ctrl-C already is a
    KeyboardInterrupt, so that the steps still running are ended on the way out."""
    def stop(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, stop)


def pytest_step(python: str) -> list[Step]:
    """The kernel tests and the other GPU tests, installing pytest from carried wheels first when it is missing.

    Verbose, with the slowest tests and a per-test limit where pytest-timeout is there: a log cut off by the
    step's limit still names the test that was running."""
    # (a test module whose import fails, a missing optional library say, must not stop the session: the others run)
    pytest = [python, "-m", "pytest", "-v", "-rfE", "--durations=15", "-p", "no:cacheprovider",
              "--continue-on-collection-errors"]
    if importlib.util.find_spec("pytest_timeout") is not None:
        pytest.append("--timeout=150")
    # (the MoE kernels' ahead-of-time compile test is compile_check's work, which needs no GPU)
    kernels = Step("pytest_kernels", [*pytest, "tests/kernels",
                                      *(arg for test in AHEAD_OF_TIME_TESTS for arg in ("--deselect", test))],
                   180, group="warm")
    gpu = Step("pytest_gpu", [*pytest, "-m", "gpu", "tests", "--ignore=tests/kernels"], 180)
    steps = []
    if importlib.util.find_spec("pytest") is None:
        if not WHEELS.is_dir():
            reason = "pytest is not installed and no .gpu_wheels/ folder was carried"
            return [Step(s.name, s.command, 0, skip_reason=reason, group=s.group) for s in (kernels, gpu)]
        offline = [python, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-index", "--find-links",
                   str(WHEELS)]
        steps.append(Step("install_pytest", [*offline, "pytest", "hypothesis"], 60))
    return [*steps, kernels, gpu]


def preflight_command(python: str) -> list[str]:
    """Print the versions of torch, triton, :data:`NEEDED` and :data:`OPTIONAL` and whether torch sees a GPU; exit 1
    naming the missing needed ones (or saying there is no GPU)."""
    code = ("import importlib.metadata as m, importlib.util as u, json, sys\n"
            f"needed, optional = {NEEDED!r}, {OPTIONAL!r}\n"
            "missing = [n for n in needed if u.find_spec(n) is None]\n"
            "versions = {}\n"
            "for n in ('torch', 'triton', *needed, *optional):\n"
            "    try:\n"
            "        versions[n] = m.version({'pynvml': 'nvidia-ml-py'}.get(n, n))\n"
            "    except m.PackageNotFoundError:\n"
            "        versions[n] = None\n"
            "import torch\n"
            "print(json.dumps({'versions': versions, 'missing': missing,\n"
            "                  'optional_missing': [n for n in optional if u.find_spec(n) is None],\n"
            "                  'cuda': torch.cuda.is_available()}))\n"
            "sys.exit(f'missing: {missing}' if missing else (0 if torch.cuda.is_available() else 'no CUDA device'))\n")
    return [python, "-c", code]


def validation_steps(out_dir: Path, commit: str | None) -> list[Step]:
    """The checks in order of importance, each with its own time limit (``compile_check`` last: not in the plan)."""
    py = sys.executable
    env = {"RESIDENCY_COMMIT": commit} if commit else {}
    tuned = {**env, "RESIDENCY_KERNEL_CONFIGS": str(out_dir / "configs")}
    bench = [py, "benchmarks/bench_kernels.py"]
    tests = pytest_step(py)  # (install_pytest first, where it is needed: before the preflight checks for pytest)
    return [
        Step("install", [py, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
                         "--no-build-isolation", "-e", "."], 90),
        *[s for s in tests if s.name == "install_pytest"],
        Step("preflight", preflight_command(py), 30),
        Step("pip_list", [py, "-m", "pip", "list", "--disable-pip-version-check"], 30, stdout_file="pip_list.txt"),
        Step("warm_numba", [py, "-c", WARM], 240, group="warm"),
        *[s for s in tests if s.name != "install_pytest"],
        Step("bench_offload", [py, "benchmarks/bench_offload.py", "--device", "cuda",
                               "--out", str(out_dir / "offload")], 180, env=env),
        Step("bench_quant_kernels", [py, "benchmarks/bench_quant_kernels.py", "--out", str(out_dir / "quant_kernels")],
             120, env=env),
        Step("bench_dense_decode", [py, "benchmarks/bench_dense_decode.py", "--out", str(out_dir / "dense_decode")],
             180, env=env),
        Step("bench_default_table", [*bench, "--out", str(out_dir / "kernels")], 150, env=env),
        Step("autotune_quick", [py, "benchmarks/autotune_moe.py", "--quick", "--tokens", "1,2,4,8,16,32,64,512,2048",
                                "--out-dir", str(out_dir / "configs")], 150),  # fmt: skip
        Step("bench_tuned_table", [*bench, "--out", str(out_dir / "kernels_tuned")], 150, env=tuned,
             requires="configs"),
        Step("compile_check", [py, "-m", "residency.kernels.compile_check", "--arch", "90"], 120,
             stdout_file="compile_check.json"),
    ]


DEFAULT_PLAN_EXCLUDES = ("compile_check",)


def device_name() -> str | None:
    """The GPU's name, read in another process (this one opens no CUDA context: the steps' processes need the GPU)."""
    for command in ([sys.executable, "-c", "import torch; print(torch.cuda.get_device_name())"],  # (the visible GPU)
                    ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"]):
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if done.returncode == 0 and done.stdout.strip():
            return done.stdout.strip().splitlines()[0]
    return None


def environment(commit: str | None) -> dict:
    """Device, versions and commit of this run (what can be read without failing)."""
    info: dict = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "python": sys.version.split()[0], "commit": commit}  # fmt: skip
    for module in ("torch", "triton", "numpy", "numba"):
        try:
            info[module] = __import__(module).__version__
        except ImportError:
            info[module] = None
    try:
        import torch

        info["cuda"] = torch.version.cuda
    except ImportError:
        info["cuda"] = None
    info["device"] = device_name()
    return info


def earlier_records(path: Path, replaced: set[str]) -> list[dict]:
    """The step records of an earlier command's ``summary.json`` in the same folder, but for the steps run again."""
    try:
        earlier = json.loads(path.read_text())["steps"]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    return [r for r in earlier if isinstance(r, dict) and r.get("step") not in replaced]


def bundle(out_dir: Path, target: Path) -> None:
    """Pack ``out_dir`` into the gzipped tar ``target`` (written aside, then moved into place)."""
    partial = target.with_name(target.name + ".partial")
    with tarfile.open(partial, "w:gz") as tar:
        for path in sorted(out_dir.rglob("*")):
            if path.is_file() and path.resolve() not in (target.resolve(), partial.resolve()):
                tar.add(path, arcname=str(Path(out_dir.name) / path.relative_to(out_dir)))
    partial.replace(target)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", help="folder for logs, results and summary.json")
    parser.add_argument("--budget-s", type=float, default=540, help="seconds for all steps together")
    parser.add_argument("--commit", default=None, help="commit of the working tree (a lent machine has no .git)")
    parser.add_argument("--steps", default=None,
                        help="comma-separated names of the steps to run (default: the plan, all but compile_check)")
    parser.add_argument("--bundle", type=Path, default=None, help="also pack OUT_DIR into this .tar.gz after each step")
    args = parser.parse_args(argv)
    out_dir = Path(args.out_dir).resolve()
    steps = validation_steps(out_dir, args.commit)
    if args.steps is not None:
        wanted = [name.strip() for name in args.steps.split(",") if name.strip()]
        known = [s.name for s in steps]
        unknown = [name for name in wanted if name not in known]
        if unknown or not wanted:
            parser.error(f"--steps: unknown step(s) {', '.join(unknown) or '(none given)'}; choose from "
                         f"{', '.join(known)}")
        if any(name.startswith("pytest_") for name in wanted):
            wanted.append("install_pytest")  # (a step only where pytest is missing)
        steps = [s for s in steps if s.name in wanted]
    else:
        steps = [s for s in steps if s.name not in DEFAULT_PLAN_EXCLUDES]
    out_dir.mkdir(parents=True, exist_ok=True)
    summary_path = out_dir / "summary.json"
    earlier = earlier_records(summary_path, {s.name for s in steps})
    summary = {"environment": environment(args.commit), "budget_s": args.budget_s}

    def save(records: list[dict]) -> None:
        summary["steps"] = earlier + records
        summary_path.write_text(json.dumps(summary, indent=2) + "\n")
        if args.bundle is not None:
            bundle(out_dir, args.bundle.resolve())

    save([])
    stop_on_signals()
    records = run_steps(steps, out_dir, args.budget_s, on_record=save)
    save(records)
    failed = [r["step"] for r in records if r["status"] not in ("ok", "skipped")]
    print(f"wrote {summary_path}; " + (f"not ok in this command: {', '.join(failed)}" if failed else "all steps ok"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
