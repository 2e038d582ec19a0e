"""Control-plane cost of two revisions of the offload runtime, measured against each other in one process.

    python benchmarks/ab_runtime.py BASE [NEW] [--cases 64:cpu,64:prefetch,256:cpu] [--runs 5] [--steps 240]

``BASE`` and ``NEW`` are git revisions (``NEW`` defaults to the working tree). Each is copied into a
package of its own (``residency_ab_base``, ``residency_ab_new``: the sources as installed, with their
absolute ``residency`` imports renamed), both are imported into this process, and for every case
and run each builds its runtime on the same routing. Decode steps then alternate between the two
(which goes first alternates too), so load from elsewhere on a shared machine hits both alike:
on the project's 2-core VM, whose speed changes by about 1.6x for minutes at a time, separate
runs of ``bench_runtime.py`` cannot resolve differences of a few percent, this can.

The work per layer-step is :mod:`bench_runtime`'s with copies inline: a Super-shaped routing
problem (512 experts, top-22, one token per step, 8 MoE layers), tiny expert records, the expert
kernels replaced by stubs that write nothing; the time of submit + collect plus the layer's share
of the step boundary, minus copy waits. Case syntax: ``SLOTS[:prefetch][:cpu]`` (dynamic slots per
layer; look-ahead prefetch on; misses computed on the CPU). Prints, per case, each side's lowest
median over the runs, every run's medians and the ratio new / base.

Revisions from 972897c on (the runtime's constructor and the kernels' module names as there); the
first run of each side compiles its numba functions into the copy's own cache (a minute or two).
"""

from __future__ import annotations

import argparse
import importlib
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch
from bench_runtime import EXPERTS, INNER, LAYERS, TOP_K, WARM_UP, WIDTH, draw_routing, inline_copies, timed_decode_step

ROOT = Path(__file__).resolve().parent.parent
#: the source trees and where they sit in the installed package (pyproject: ``residency`` with ``runtime`` and
#: ``kernels`` inside it)
LAYOUT = (("src/residency", ""), ("src/runtime", "runtime"), ("src/kernels", "kernels"))
_ABSOLUTE = re.compile(r"\b(from|import) residency(?=[. ]|$)", re.MULTILINE)


def rename_imports(text: str, name: str) -> str:
    """``text`` (Python source) with its absolute imports of ``residency`` made imports of package ``name``."""
    return _ABSOLUTE.sub(lambda m: f"{m.group(1)} {name}", text)


def sources(rev: str | None, into: Path) -> Path:
    """The ``src`` tree of git revision ``rev`` (None: the working tree) under ``into``; returns the repository root
    it belongs to."""
    if rev is None:
        return ROOT
    into.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "src"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def make_package(root: Path, name: str, into: Path) -> Path:
    """Copy the package of the repository at ``root`` to ``into/name`` as installed, its absolute imports renamed."""
    target = into / name
    shutil.rmtree(target, ignore_errors=True)
    for src, sub in LAYOUT:
        shutil.copytree(root / src, target / sub, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for path in target.rglob("*.py"):
        text = path.read_text()
        renamed = rename_imports(text, name)
        if renamed != text:
            path.write_text(renamed)
    return target


def load(name: str) -> SimpleNamespace:
    """The modules of package ``name`` the harness drives."""
    mods = ("backend", "control", "copies", "cpu_experts", "ledger", "store")
    return SimpleNamespace(**{m: importlib.import_module(f"{name}.runtime.{m}") for m in mods})


def build(ns: SimpleNamespace, slots: int, prefetch: bool, cpu: bool, seed: int, steps: int):
    """One side's runtime for one case and run; returns ``(step, close)``: ``step(i, times)`` runs decode step ``i``
    of every layer and appends each layer-step's bookkeeping seconds to ``times``."""
    layout = ns.store.ExpertLayout(INNER, WIDTH, torch.float32)
    store = ns.store.HostExpertStore(layout, LAYERS, EXPERTS)
    for buf in store.buffers:
        buf.normal_()
    total = steps + WARM_UP
    routes, predictions = draw_routing(seed, total)
    now = [0]
    routers = [lambda hidden, j=j: (predictions[now[0]][j], None, None) for j in range(LAYERS)]
    plans = [ns.backend.LayerSlotPlan((), slots, "copy") for _ in range(LAYERS)]
    options = ns.backend.RuntimeOptions(mode="cpu", prefetch=prefetch, cpu_experts=cpu, staging_slots=2 * TOP_K)
    runtime = ns.backend.OffloadRuntime(store, plans, ns.ledger.DeviceLedger(torch.device("cpu"), None), options,
                                        routers, TOP_K)
    runtime.copies.close()
    runtime.copies = inline_copies(ns.copies, ns.control.copy_rows)()
    x, weights = torch.randn(1, WIDTH), torch.rand(1, TOP_K)

    def step(i: int, times: list[float]) -> None:
        now[0] = i
        timed_decode_step(runtime, routes[i], weights, x, times if i >= WARM_UP else None)

    return step, runtime.close


def parse_case(text: str) -> tuple[int, bool, bool]:
    """``SLOTS[:prefetch][:cpu]`` as (slots, prefetch, cpu)."""
    head, *flags = text.strip().split(":")
    unknown = set(flags) - {"prefetch", "cpu"}
    if not head.isdigit() or unknown:
        raise SystemExit(f"ab_runtime: a case is SLOTS[:prefetch][:cpu], got {text!r}")
    return int(head), "prefetch" in flags, "cpu" in flags


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("base", help="git revision of the baseline")
    parser.add_argument("new", nargs="?", default=None, help="git revision to compare (default: the working tree)")
    parser.add_argument("--cases", default="64:cpu,64:prefetch,256:cpu,0")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--steps", type=int, default=240)
    args = parser.parse_args(argv)
    cases = [parse_case(c) for c in args.cases.split(",")]
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="residency-ab-") as tmp:
        tmp_path = Path(tmp)
        names = {"base": "residency_ab_base", "new": "residency_ab_new"}
        for side, rev in (("base", args.base), ("new", args.new)):
            make_package(sources(rev, tmp_path / f"src-{side}"), names[side], tmp_path / "pkg")
        sys.path.insert(0, str(tmp_path / "pkg"))
        sides = {side: load(name) for side, name in names.items()}
        for ns in sides.values():  # (the runtime looks both up at call time)
            ns.backend.moe_gather_gemm = lambda x, *a, out=None, **k: torch.empty_like(x) if out is None else out
            ns.cpu_experts._cpu_moe_kernel = lambda *a: None
        label = f"{args.base} -> {args.new or 'working tree'}"
        print(f"control plane, {label}: per MoE layer per decode step, us (lowest median of {args.runs} runs; "
              f"each run's medians)")
        for slots, prefetch, cpu in cases:
            medians: dict[str, list[float]] = {"base": [], "new": []}
            for run in range(args.runs):
                built = {side: build(ns, slots, prefetch, cpu, run, args.steps) for side, ns in sides.items()}
                times: dict[str, list[float]] = {"base": [], "new": []}
                try:
                    for i in range(args.steps + WARM_UP):
                        for side in (("base", "new") if i % 2 else ("new", "base")):
                            built[side][0](i, times[side])
                finally:
                    for step_close in built.values():
                        step_close[1]()
                for side in medians:
                    medians[side].append(statistics.median(times[side]) * 1e6)
            b, n = min(medians["base"]), min(medians["new"])
            what = f"{slots} slots" + (", prefetch" if prefetch else "") + (", CPU misses" if cpu else "")
            print(f"{what}: base {b:.1f} new {n:.1f} (new / base {n / b:.3f}); runs base "
                  f"{[round(v, 1) for v in medians['base']]} new {[round(v, 1) for v in medians['new']]}")


if __name__ == "__main__":
    main()
