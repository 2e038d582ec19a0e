"""Every GPU check of the kernels in one run, inside a fixed time budget.

    python benchmarks/gpu_validation.py OUT_DIR [--budget-s 540] [--commit HASH] [--steps NAME,...]

GPU time is scarce and comes in short leases, so this runs the checks in order of importance and
gives each step what is left of the budget, recording what ran, how long and how it ended:

1. ``pip install --no-deps --no-build-isolation -e .`` (the machine's own torch and triton stay);
2. ``python -m residency.kernels.compile_check`` (cubins, shared memory, spills);
3. ``pytest tests/kernels`` compiled on the GPU (fp32 odd shapes and the bf16 ``gpu`` tests), when
   pytest can be imported; otherwise from wheels in ``.gpu_wheels/`` when that folder was carried
   (``pip download -d .gpu_wheels pytest`` on a machine with network, then carried), else skipped
   with the reason in the summary; then ``pytest -m gpu`` over the rest of the suite (the offload
   runtime on CUDA against the resident run, CUDA-graph decode, page-locked embedding rows ...);
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
9. ``bench_kernels.py`` again with the table step 8 wrote.

Correctness on the device comes first, then the measurements the open issues name, then tuning.
The steps' own limits add up to more than one command's budget: ``--steps`` runs a subset (in the
order above; ``install_pytest`` comes with the pytest steps where it is needed), so that a lease
can split the plan over two commands into the same ``OUT_DIR``, e.g. ``--steps
install,compile_check,pytest_kernels,pytest_gpu,bench_offload`` and then ``--steps
install,bench_quant_kernels,bench_dense_decode,bench_default_table,autotune_quick,bench_tuned_table``:
``summary.json`` keeps the records of earlier commands' steps that this one did not run.

Writes into ``OUT_DIR``: one ``<step>.log`` per step, ``kernels.{json,md}`` and
``kernels_tuned.{json,md}`` from the benchmarks, ``configs/*.json``, ``compile_check.json``, and
``summary.json`` (device, versions, commit, each step's command, exit status and seconds). The
working tree on a lent machine usually has no ``.git``: pass ``--commit`` so that the results
name the commit they measured.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import subprocess
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WHEELS = ROOT / ".gpu_wheels"


@dataclass
class Step:
    """One command of the validation, with the most seconds it may take."""

    name: str
    command: list[str]
    limit_s: float
    env: dict[str, str] = field(default_factory=dict)
    stdout_file: str | None = None  # keep stdout apart from the log (a JSON report)
    skip_reason: str | None = None


def run_steps(steps: list[Step], out_dir: Path, budget_s: float, clock=time.monotonic) -> list[dict]:
    """Run ``steps`` in order; each gets ``min(limit, what is left of the budget)`` seconds.

    A step that fails or times out does not stop the ones after it (they are independent checks);
    a step that would get under one second is recorded as not run. Returns one record per step.
    """
    deadline = clock() + budget_s
    records = []
    for step in steps:
        record: dict = {"step": step.name, "command": " ".join(step.command)}
        left = deadline - clock()
        if step.skip_reason is not None:
            record.update(status="skipped", reason=step.skip_reason)
        elif left < 1:
            record.update(status="not run", reason="the time budget was spent")
        else:
            record.update(_run(step, out_dir, min(step.limit_s, left)))
        records.append(record)
        print(json.dumps(record), flush=True)
    return records


def _run(step: Step, out_dir: Path, timeout: float) -> dict:
    log = out_dir / f"{step.name}.log"
    start = time.monotonic()
    with ExitStack() as files:
        if step.stdout_file:  # stdout is a report of its own; stderr goes to the log
            stdout = files.enter_context(open(out_dir / step.stdout_file, "w"))
            stderr = files.enter_context(open(log, "w"))
        else:
            stdout, stderr = files.enter_context(open(log, "w")), subprocess.STDOUT
        try:
            proc = subprocess.run(step.command, cwd=ROOT, stdout=stdout, stderr=stderr,
                                  env={**os.environ, **step.env}, timeout=timeout)  # fmt: skip
            status, rc = ("ok" if proc.returncode == 0 else "failed"), proc.returncode
        except subprocess.TimeoutExpired:
            status, rc = "timed out", None
    return {"status": status, "returncode": rc, "seconds": round(time.monotonic() - start, 1),
            "limit_s": round(timeout, 1), "log": log.name}  # fmt: skip


def pytest_step(python: str) -> list[Step]:
    """The kernel tests, installing pytest from carried wheels first when it is missing."""
    pytest = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    # (the MoE kernels' ahead-of-time compile test is the compile_check step: not run twice)
    kernels = Step("pytest_kernels", [*pytest, "tests/kernels", "--deselect",
                                      "tests/kernels/test_moe_gather_gemm.py::test_kernels_compile_for_gpus_without_one"],
                   180)
    gpu = Step("pytest_gpu", [*pytest, "-m", "gpu", "tests", "--ignore=tests/kernels"], 150)
    steps = []
    if importlib.util.find_spec("pytest") is None:
        if not WHEELS.is_dir():
            reason = "pytest is not installed and no .gpu_wheels/ folder was carried"
            return [Step(s.name, s.command, 0, skip_reason=reason) for s in (kernels, gpu)]
        offline = [python, "-m", "pip", "install", "-q", "--no-index", "--find-links", str(WHEELS)]
        steps.append(Step("install_pytest", [*offline, "pytest"], 60))
    return [*steps, kernels, gpu]


def validation_steps(out_dir: Path, commit: str | None) -> list[Step]:
    """The checks in order of importance, each with its own time limit."""
    py = sys.executable
    env = {"RESIDENCY_COMMIT": commit} if commit else {}
    tuned = {**env, "RESIDENCY_KERNEL_CONFIGS": str(out_dir / "configs")}
    bench = [py, "benchmarks/bench_kernels.py"]
    return [
        Step("install", [py, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "-e", "."], 120),
        Step("compile_check", [py, "-m", "residency.kernels.compile_check"], 90, stdout_file="compile_check.json"),
        *pytest_step(py),
        Step("bench_offload", [py, "benchmarks/bench_offload.py", "--device", "cuda",
                               "--out", str(out_dir / "offload")], 180, env=env),
        Step("bench_quant_kernels", [py, "benchmarks/bench_quant_kernels.py", "--out", str(out_dir / "quant_kernels")],
             120, env=env),
        Step("bench_dense_decode", [py, "benchmarks/bench_dense_decode.py", "--out", str(out_dir / "dense_decode")],
             180, env=env),
        Step("bench_default_table", [*bench, "--out", str(out_dir / "kernels")], 150, env=env),
        Step("autotune_quick", [py, "benchmarks/autotune_moe.py", "--quick", "--tokens", "1,2,4,8,16,32,64,512,2048",
                                "--out-dir", str(out_dir / "configs")], 150),  # fmt: skip
        Step("bench_tuned_table", [*bench, "--out", str(out_dir / "kernels_tuned")], 150, env=tuned),
    ]


def environment(commit: str | None) -> dict:
    """Device, versions and commit of this run (what can be read without failing)."""
    info: dict = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "python": sys.version.split()[0], "commit": commit}  # fmt: skip
    for module in ("torch", "triton", "numpy"):
        try:
            info[module] = __import__(module).__version__
        except ImportError:
            info[module] = None
    try:
        import torch

        info["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
        info["cuda"] = torch.version.cuda
    except ImportError:
        info["device"] = None
    return info


def earlier_records(path: Path, replaced: set[str]) -> list[dict]:
    """The step records of an earlier command's ``summary.json`` in the same folder, but for the steps run again."""
    try:
        earlier = json.loads(path.read_text())["steps"]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    return [r for r in earlier if isinstance(r, dict) and r.get("step") not in replaced]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", help="folder for logs, results and summary.json")
    parser.add_argument("--budget-s", type=float, default=540, help="seconds for all steps together")
    parser.add_argument("--commit", default=None, help="commit of the working tree (a lent machine has no .git)")
    parser.add_argument("--steps", default=None, help="comma-separated names of the steps to run (default: all)")
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
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = {"environment": environment(args.commit), "budget_s": args.budget_s}
    records = run_steps(steps, out_dir, args.budget_s)
    summary["steps"] = earlier_records(out_dir / "summary.json", {r["step"] for r in records}) + records
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    failed = [r["step"] for r in summary["steps"] if r["status"] not in ("ok", "skipped")]
    print(f"wrote {out_dir / 'summary.json'}; " + (f"not ok: {', '.join(failed)}" if failed else "all steps ok"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
