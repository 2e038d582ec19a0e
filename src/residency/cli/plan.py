"""Command-line planning: ``residency plan``, ``plan show`` / ``plan-show``, ``simulate``, ``gpus``, ``calibrate``.

Everything here runs without weights or a GPU except ``calibrate``, which measures the local GPU.
Sizes and budgets (``--vram``, ``--host-memory``, ``--size``) are read by :mod:`residency.sizes`
inside the commands, so a bad value ends with one line naming it and the fix. Policy, miss-path and
embedding-placement names are checked by the planner and the simulator, which own them; importing
them here would load numba for every ``residency`` command.
"""

from __future__ import annotations

import argparse
import importlib.resources
import json
import sys
import time
from pathlib import Path
from typing import Any

from ..config import DENSE_DTYPES, EXPERT_DTYPES, NemotronHConfig, load_config
from ..errors import ResidencyError
from ..planning.detect import detect_local
from ..planning.hardware import CATALOG, DEFAULT_HOST, GpuSpec, HostSpec, load_gpu_spec, lookup_gpu, save_gpu_spec
from ..planning.memory import KV_DTYPE_BYTES
from ..sizes import Budget, format_bytes, parse_budget, parse_size

__all__ = ["register", "resolve_config", "CONFIG_ALIASES"]

#: Built-in configs usable as ``--config NAME`` (package data).
CONFIG_ALIASES = {
    "nemotron-3-super": "nemotron-3-super-120b-a12b.config.json",
    "nemotron-3-super-120b-a12b": "nemotron-3-super-120b-a12b.config.json",
}
#: The official Super releases: ``--config NAME`` plans with the release's per-module formats
#: (package data ``*.quant.json``, each with a note of how its module list was derived).
QUANT_PRESETS = {
    "nemotron-3-super-bf16": "nemotron-3-super-120b-a12b-bf16.quant.json",
    "nemotron-3-super-fp8": "nemotron-3-super-120b-a12b-fp8.quant.json",
    "nemotron-3-super-nvfp4": "nemotron-3-super-120b-a12b-nvfp4.quant.json",
}
for _name, _preset in list(QUANT_PRESETS.items()):
    CONFIG_ALIASES[_name] = CONFIG_ALIASES["nemotron-3-super"]
    CONFIG_ALIASES[_name.replace("super", "super-120b-a12b")] = CONFIG_ALIASES["nemotron-3-super"]
    QUANT_PRESETS[_name.replace("super", "super-120b-a12b")] = _preset


def _positive(kind: type) -> Any:
    def conv(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from exc
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
        return value

    return conv


def resolve_config(config: str | None, model: str | None) -> NemotronHConfig:
    """``--config`` (a path or a built-in alias such as 'nemotron-3-super') or ``--model DIR``."""
    if config and model:
        raise ResidencyError("give --config or --model, not both")
    if model:
        return _with_quantization(model)
    if not config:
        raise ResidencyError(
            "no model given: pass --config config.json, --model CHECKPOINT_DIR, or --config nemotron-3-super "
            "for the built-in Nemotron 3 Super config (nemotron-3-super-fp8 / -nvfp4: the quantized releases)"
        )
    if config in CONFIG_ALIASES and not Path(config).exists():
        data = importlib.resources.files("residency") / "data"
        with importlib.resources.as_file(data / CONFIG_ALIASES[config]) as p:
            loaded = load_config(p)
        preset = QUANT_PRESETS.get(config)
        if preset is None:
            return loaded
        from ..model.quant.scheme import load_preset

        with importlib.resources.as_file(data / preset) as p:
            return loaded.with_quantization(load_preset(p, loaded))
    return _with_quantization(config)


def _with_quantization(path: str) -> NemotronHConfig:
    """The config at ``path`` (folder or config.json) with the checkpoint's quantization attached: its
    config.json ``quantization_config`` and a ``hf_quant_config.json`` beside it (no weights are read)."""
    from ..model.quant.scheme import read_scheme

    config = load_config(path)
    p = Path(path)
    folder = p if p.is_dir() else p.parent
    raw = json.loads((p / "config.json" if p.is_dir() else p).read_text())
    return config.with_quantization(read_scheme(folder, raw))


def _resolve_gpu(args: argparse.Namespace) -> tuple[GpuSpec, HostSpec | None, list[str], int | None]:
    """The target GPU, its built-in or detected host, detection notes and free device memory (when measured)."""
    notes: list[str] = []
    host: HostSpec | None = None
    free: int | None = None
    if args.gpu and args.gpu_spec:
        raise ResidencyError(
            f"--gpu {args.gpu} and --gpu-spec {args.gpu_spec} both name the target GPU: use one of them "
            '(a spec file can start from a catalog entry with "base": NAME)'
        )
    if args.gpu_spec:
        gpu = load_gpu_spec(args.gpu_spec)
        host = gpu.host
    elif not args.gpu:
        raise ResidencyError("no target GPU: pass --gpu NAME (see `residency gpus`), --gpu local, or --gpu-spec FILE")
    elif args.gpu.lower() == "local":
        det = detect_local()
        if det.gpu is None:
            raise ResidencyError(f"--gpu local: {'; '.join(det.notes) or 'no GPU found'}; name a GPU instead")
        gpu, host, notes, free = det.gpu, det.host, list(det.notes), det.free_bytes
    elif args.gpu.lower() == "custom":
        if args.vram is None or args.mem_bw is None or (args.h2d is None and not args.unified):
            raise ResidencyError("--gpu custom needs --vram, --mem-bw and --h2d (or --unified)")
        gpu = GpuSpec(
            name="custom",
            memory_bytes=parse_budget(args.vram, total_bytes=None, device_name="a custom GPU", what="--vram").bytes,
            mem_bw_gbps=args.mem_bw, h2d_gbps=None if args.unified else args.h2d,
            link="unified" if args.unified else "PCIe", unified_memory=bool(args.unified), compute_capability=(0, 0),
            fp8=True, fp4=False,
            sources={"memory_bytes": "user: --vram", "mem_bw_gbps": "user: --mem-bw", "h2d_gbps": "user: --h2d",
                     "fp8": "unverified: assumed", "fp4": "unverified: assumed"},
        )
    else:
        gpu = lookup_gpu(args.gpu)
    changes: dict[str, Any] = {}
    if args.mem_bw is not None and gpu.name != "custom":
        changes["mem_bw_gbps"] = args.mem_bw
    if args.h2d is not None and gpu.name != "custom":
        if gpu.unified_memory:
            raise ResidencyError(f"{gpu.name} has unified memory: there is no host-to-device link to set with --h2d")
        changes["h2d_gbps"] = args.h2d
    if changes:
        gpu = gpu.replace(note="user: command line", **changes)
    return gpu, host, notes, free


def _resolve_budget(args: argparse.Namespace, gpu: GpuSpec, free: int | None) -> Budget | None:
    """``--vram`` read against the target: a size, or a fraction of free (or, unmeasured, all) device memory."""
    if args.vram is None:
        return None
    return parse_budget(args.vram, total_bytes=gpu.usable_bytes, free_bytes=free, device_name=gpu.name,
                        what="--vram")


def _resolve_host(args: argparse.Namespace, gpu: GpuSpec, host: HostSpec | None) -> HostSpec:
    host = host or gpu.host or DEFAULT_HOST
    changes: dict[str, Any] = {}
    if args.host_memory is not None:
        if gpu.unified_memory:
            raise ResidencyError(
                f"{gpu.name} has unified memory: host and GPU share one pool; set its size with --vram"
            )
        changes["memory_bytes"] = parse_size(args.host_memory, what="--host-memory")
    if args.host_cpu_bw is not None:
        changes["cpu_bw_gbps"] = args.host_cpu_bw
    if args.disk_bw is not None:
        changes["disk_gbps"] = args.disk_bw
    return host.replace(note="user: command line", **changes) if changes else host


# ---------------------------------------------------------------------- plan


def _cmd_plan(args: argparse.Namespace) -> int:
    if args.words:
        if args.words[0] != "show" or len(args.words) != 2:
            raise ResidencyError(
                f"unexpected arguments {args.words}: use `residency plan show PLAN.json` to print a plan, or "
                "`residency plan --config ... --gpu ... --out PLAN.json` to make one"
            )
        return _show(args.words[1], getattr(args, "config", None))
    from ..planning.plan import plan_residency

    config = resolve_config(args.config, args.model)
    gpu, host, detect_notes, free = _resolve_gpu(args)
    budget = _resolve_budget(args, gpu, free)
    host = _resolve_host(args, gpu, host)
    profile = trace = None
    if args.profile:
        try:
            from ..profiling.profile import Profile
        except ImportError as exc:
            raise ResidencyError(f"--profile needs residency.profiling, which failed to import ({exc})") from exc
        profile = Profile.load(args.profile, fingerprint=config.fingerprint())
    if args.trace:
        from ..profiling.trace import RoutingTrace

        trace = RoutingTrace.load(args.trace, fingerprint=config.fingerprint())
    # checked by the planner, which owns the names
    chosen = {"policy": args.policy, "miss_path": args.miss_path, "embeddings": args.embeddings}
    if budget is not None:
        print(f"Budget: --vram {budget.understood}")
    started = time.perf_counter()
    plan = plan_residency(
        config, gpu, profile=profile, trace=trace, vram=budget, host=host, expert_dtype=args.expert_dtype,
        dense_dtype=args.dense_dtype, kv_dtype=args.kv_dtype, context=args.context, batch=args.batch,
        locality=args.locality, window=args.window, **{k: v for k, v in chosen.items() if v is not None},
    )
    elapsed = time.perf_counter() - started
    plan.notes.extend(detect_notes)
    print(plan.show())
    print(f"(planned in {elapsed:.2f} s)")
    if args.out:
        plan.save(args.out)
        print(f"wrote {args.out}")
    return 0


def _show(path: str, config_arg: str | None) -> int:
    from ..planning.plan import Plan

    config = resolve_config(config_arg, None) if config_arg else None
    plan = Plan.load(path, config=config)
    print(plan.show())
    return 0


def _cmd_plan_show(args: argparse.Namespace) -> int:
    return _show(args.plan, args.config)


# ---------------------------------------------------------------------- simulate


def _cmd_simulate(args: argparse.Namespace) -> int:
    from ..planning.plan import Plan
    from ..planning.simulate import compare_policies, format_comparison, format_layers, synthetic_trace
    from ..profiling.trace import RoutingTrace

    plan = Plan.load(args.plan)
    if args.trace and args.synthetic:
        raise ResidencyError("give --trace or --synthetic, not both")
    if args.trace:
        trace = RoutingTrace.load(args.trace, fingerprint=plan.fingerprint)
    elif args.synthetic:
        trace = synthetic_trace(plan, args.synthetic, skew=args.skew, locality=args.synthetic_locality,
                                window=args.synthetic_window, seed=args.seed)
    else:
        raise ResidencyError("no routing to replay: pass --trace TRACE (from `residency profile`) or --synthetic N")
    from ..runtime.policy import POLICY_NAMES

    if args.policy not in (*POLICY_NAMES, "all"):
        raise ResidencyError(f"unknown policy {args.policy!r}; choose one of {POLICY_NAMES} or 'all'")
    policies = POLICY_NAMES if args.policy == "all" else (args.policy,)
    started = time.perf_counter()
    results = compare_policies(plan, trace, policies, prefetch_recall=args.prefetch_recall,
                               prefetch_extra=args.prefetch_extra, decode_only=args.decode_only, seed=args.seed)
    elapsed = time.perf_counter() - started
    print(f"plan: {plan.gpu.name}, {plan.settings.expert_dtype} experts; predicted hit rate "
          f"{100 * plan.hit_rate:.1f} %, {plan.tokens_per_s:.1f} tokens/s ({plan.settings.policy})")
    print(format_comparison(results))
    if plan.budget.dynamic_slots == 0:
        print("note: this plan has no dynamic slots, so every policy serves the same static sets; "
              "plan with --miss-path copy (or a trace with locality) to compare eviction policies")
    if args.prefetch_recall or args.prefetch_extra:
        print(f"prefetch model: recall {args.prefetch_recall} of copy-path misses, {args.prefetch_extra} wrong "
              "guesses per layer and token")
    if args.per_layer:
        for r in results:
            print(f"\nper layer, {r.policy}:")
            print(format_layers(r, plan))
    print(f"(simulated {len(results)} polic{'y' if len(results) == 1 else 'ies'} over {results[0].tokens} tokens "
          f"in {elapsed:.2f} s)")
    if args.json:
        from ..files import save_json

        save_json(args.json, {"kind": "simulation", "format_version": 1, "fingerprint": plan.fingerprint,
                              "plan": str(args.plan), "results": [r.to_dict() for r in results]})
        print(f"wrote {args.json}")
    return 0


# ---------------------------------------------------------------------- gpus


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _cmd_gpus(args: argparse.Namespace) -> int:
    if args.detect:
        det = detect_local()
        print(det.describe())
        if args.json:
            print(json.dumps({"gpu": det.gpu.to_dict() if det.gpu else None, "host": det.host.to_dict(),
                              "free_bytes": det.free_bytes, "notes": list(det.notes)}, indent=2))
        return 0
    if args.json:
        print(json.dumps([g.to_dict() for g in CATALOG], indent=2))
        return 0
    print(f"{'GPU':<24} {'memory':>10} {'mem BW':>8} {'H2D':>7}  {'link':<22} {'CC':>5} {'FP8':>4} {'FP4':>4} "
          f"{'BF16 TF':>7}  unified")
    for g in CATALOG:
        h2d = f"{g.h2d_gbps:g}" if g.h2d_gbps else "-"
        tf = f"{g.bf16_tflops:g}" if g.bf16_tflops else "-"
        cc = f"{g.compute_capability[0]}.{g.compute_capability[1]}"
        print(f"{g.name:<24} {format_bytes(g.usable_bytes):>10} {g.mem_bw_gbps:>8g} {h2d:>7}  {g.link:<22} "
              f"{cc:>5} {_yes(g.fp8):>4} {_yes(g.fp4):>4} {tf:>7}  {_yes(g.unified_memory)}")
        if args.sources:
            for field, note in g.sources.items():
                print(f"    {field}: {note}")
    print("Bandwidths in GB/s (1e9 B/s); H2D = practical pinned host-to-device copy rate. "
          "`residency gpus --sources` shows where each figure comes from.")
    return 0


# ---------------------------------------------------------------------- calibrate


def _cmd_calibrate(args: argparse.Namespace) -> int:
    import torch

    from ..planning.calibrate import calibrate

    size = parse_size(args.size, what="--size")
    if not torch.cuda.is_available():
        print(
            "residency calibrate: error: no CUDA device is visible (torch.cuda.is_available() is False). "
            "Run calibrate on the machine with the GPU; elsewhere plan with a catalog name (`residency gpus`) "
            "or write a spec file by hand (see docs/planning.md).",
            file=sys.stderr,
        )
        return 2
    spec, result = calibrate(args.device, size, args.repeats)
    save_gpu_spec(args.out, spec)
    print(f"{spec.name}: pinned H2D {result.h2d_gbps:.1f} GB/s, device copy {result.device_copy_gbps:.0f} GB/s "
          f"(read + write), CUDA context and other processes {format_bytes(result.context_bytes)}")
    print(f"wrote {args.out}; plan with `residency plan --gpu-spec {args.out} ...`")
    return 0


# ---------------------------------------------------------------------- registration


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="config.json, a checkpoint folder, or a built-in Super release: "
                                    "'nemotron-3-super' (= -bf16), 'nemotron-3-super-fp8', 'nemotron-3-super-nvfp4'")
    p.add_argument("--model", help="checkpoint folder (its config.json and quantization config are read; weights are "
                                   "not)")


def register(subparsers: Any) -> None:
    """Add ``plan``, ``plan-show``, ``simulate``, ``gpus`` and ``calibrate`` to the ``residency`` CLI."""
    p = subparsers.add_parser(
        "plan", help="plan expert residency for a target GPU (no weights or GPU needed)",
        description="Plan which experts stay in GPU memory for a target GPU, or print a plan: "
                    "`residency plan show PLAN.json`.",
    )
    p.add_argument("words", nargs="*", metavar="show PLAN", help="print an existing plan instead of making one")
    _add_model_args(p)
    p.add_argument("--gpu", help="catalog name ('RTX 4090', '4090', 'H100 PCIe', 'spark'), 'local' or 'custom'")
    p.add_argument("--gpu-spec", help="custom GPU spec JSON (written by `residency calibrate` or by hand)")
    p.add_argument("--vram", help="device memory the plan may use: 20GiB (binary), 24GB (decimal), or a fraction "
                                  "of free device memory such as 0.8 (default: all of the GPU's)")
    p.add_argument("--mem-bw", type=_positive(float), help="device memory bandwidth, GB/s")
    p.add_argument("--h2d", type=_positive(float), help="practical pinned host-to-device rate, GB/s")
    p.add_argument("--unified", action="store_true", help="with --gpu custom: CPU and GPU share one memory pool")
    p.add_argument("--expert-dtype", choices=EXPERT_DTYPES, default=None,
                   help="routed experts (default: the checkpoint's or preset's format, else nvfp4)")
    p.add_argument("--dense-dtype", choices=DENSE_DTYPES, default=None,
                   help="non-expert weights; 'mixed' = each module's format from the quantization config "
                        "(default: mixed for a quantized checkpoint or preset, else bf16)")
    p.add_argument("--kv-dtype", choices=tuple(KV_DTYPE_BYTES), default="bf16")
    p.add_argument("--host-memory", help="host RAM, e.g. 64GiB or 64GB (default 128 GiB)")
    p.add_argument("--host-cpu-bw", type=_positive(float), help="DRAM bandwidth a CPU expert kernel reaches, GB/s")
    p.add_argument("--disk-bw", type=_positive(float), help="disk random-read rate, GB/s")
    p.add_argument("--context", type=_positive(int), default=32768, help="tokens of context (KV cache)")
    p.add_argument("--batch", type=_positive(int), default=1, help="sequences decoded together")
    p.add_argument("--profile", help="profile from `residency profile` (pick counts per expert)")
    p.add_argument("--trace", help="routing trace (measures locality; gives counts without a profile)")
    p.add_argument("--locality", type=float, help="override the locality λ in [0, 1] (default: from the trace, "
                                                   "else 0.2)")
    p.add_argument("--window", type=_positive(int), default=4, help="locality window in tokens")
    p.add_argument("--policy", help="eviction policy for dynamic slots (docs/planning.md section 6; default: the "
                                    "profile-seeded hybrid)")
    p.add_argument("--miss-path", help="serve misses by copying ('copy') or on the CPU ('cpu'); default 'auto': the "
                                       "cost model chooses")
    p.add_argument("--embeddings", help="where the embedding table lives: 'device' or 'host' (host memory, one row "
                                        "copied per token); default 'auto': host on a discrete GPU that cannot hold "
                                        "every expert, else device")
    p.add_argument("--out", help="write the plan JSON here")
    p.set_defaults(func=_cmd_plan)

    ps = subparsers.add_parser("plan-show", help="print a plan file as a table")
    ps.add_argument("plan")
    ps.add_argument("--config", help="refuse the plan unless it was made for this model")
    ps.set_defaults(func=_cmd_plan_show)

    s = subparsers.add_parser("simulate", help="replay a routing trace through a plan's caches and cost model")
    s.add_argument("--plan", required=True)
    s.add_argument("--trace", help="routing trace (safetensors) recorded for the plan's model")
    s.add_argument("--synthetic", type=_positive(int), metavar="TOKENS", help="replay a synthetic trace instead")
    s.add_argument("--skew", type=float, default=1.0, help="synthetic: Zipf exponent of expert popularity")
    s.add_argument("--synthetic-locality", type=float, default=0.2,
                   help="synthetic: probability a pick reuses an expert of the last --synthetic-window tokens")
    s.add_argument("--synthetic-window", type=_positive(int), default=4)
    s.add_argument("--policy", default="all", help="one eviction policy, or 'all' to compare them")
    s.add_argument("--prefetch-recall", type=float, default=0.0,
                   help="share of copy-path misses a look-ahead prefetch would have fetched early")
    s.add_argument("--prefetch-extra", type=int, default=0, help="wrong prefetch guesses per layer and token")
    s.add_argument("--decode-only", action="store_true", help="skip prefill tokens of a recorded trace")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--per-layer", action="store_true", help="also print per-layer figures")
    s.add_argument("--json", help="write the results as JSON here")
    s.set_defaults(func=_cmd_simulate)

    g = subparsers.add_parser("gpus", help="list the GPU catalog, or detect this machine's GPU")
    g.add_argument("--detect", action="store_true", help="describe this machine's GPU and host")
    g.add_argument("--sources", action="store_true", help="show the source of every figure")
    g.add_argument("--json", action="store_true")
    g.set_defaults(func=_cmd_gpus)

    c = subparsers.add_parser("calibrate", help="measure this GPU's host link and memory; write a GPU spec file")
    c.add_argument("--out", required=True, help="GPU spec JSON to write")
    c.add_argument("--device", type=int, default=0)
    c.add_argument("--size", default="256MiB", help="bytes per copy, a size such as 256MiB (default)")
    c.add_argument("--repeats", type=_positive(int), default=20)
    c.set_defaults(func=_cmd_calibrate)
