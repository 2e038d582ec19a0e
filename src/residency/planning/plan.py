"""Residency plans: which experts live in GPU memory, how many dynamic slots each layer gets, where the
rest live on the host, how misses are served, and what that should achieve on a target GPU.

:func:`plan_residency` needs only a config and a :class:`GpuSpec` (no weights, no GPU); a profile
(pick counts per expert) and a routing trace (temporal locality) make it sharper. Steps:

1. memory accounting (:mod:`residency.planning.memory`) → bytes, hence whole expert slots, for experts;
2. per-layer pick probabilities from the profile or trace counts (uniform without either) and a
   locality per layer (trace estimate or the assumed default), then the slot allocation across
   layers (:mod:`residency.planning.allocate`): greedy on marginal expected hits, exactly optimal on the
   concave per-layer curves, deterministic, and monotone in the budget;
3. per layer, the static set (most probable experts) and the dynamic slot count (LRU-managed);
4. host tier per non-resident expert: pinned RAM by decreasing probability, disk once RAM is full
   (unified memory: there is no second copy, so the next tier is disk);
5. per layer, the miss path: copy to the GPU or compute on the CPU, whichever the cost model
   (:mod:`residency.planning.cost`) says is faster for that layer's expected misses;
6. predictions: hit rate, bytes per token over each link, tokens/s and its bounding resource.

Defaults: NVFP4 experts (the smallest published checkpoint; GPUs without native FP4 dequantise in
the kernel), BF16 non-expert weights, BF16 KV cache, 32768 tokens of context, batch 1, the
profile-seeded hybrid eviction policy, CPU compute of misses allowed.

A plan is a versioned JSON file (:class:`Plan`), validated on load and refused for another model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..config import DENSE_DTYPES, EXPERT_DTYPES, ConfigError, NemotronHConfig
from ..errors import FileFormatError, ModelMismatchError
from ..files import load_json, save_json
from ..profiling.trace import RoutingTrace
from .allocate import (
    DEFAULT_LOCALITY,
    DEFAULT_WINDOW,
    allocate,
    estimate_locality,
    hit_curves,
    pick_probabilities,
    rank_experts,
    slot_gains,
)
from .cost import GPU_BW_EFFICIENCY, MISS_PATHS, CostModel, LayerTraffic, dense_bytes_per_token
from .hardware import DEFAULT_HOST, GpuSpec, HostSpec, lookup_gpu
from .memory import KV_DTYPE_BYTES, MemoryBreakdown, account_memory, format_bytes

__all__ = ["PLAN_FORMAT_VERSION", "LayerPlan", "Plan", "plan_residency", "POLICY_NAMES"]

PLAN_FORMAT_VERSION = 1
POLICY_NAMES = ("static", "lru", "lfu", "hybrid")


@dataclass
class LayerPlan:
    """The plan for one MoE layer.

    ``static``: experts resident for the whole run (slots 0..len-1); ``dynamic_slots``: slots the
    eviction policy manages; ``disk``: experts whose host copy is on disk (every other non-static
    expert sits in pinned RAM; on unified memory, the rest are simply resident in the shared
    pool); ``miss_path``: 'copy', 'cpu', 'disk' or 'none'; ``prior``: picks per token per expert
    that seeded the plan (None when the prior was uniform).
    """

    moe_index: int
    layer: int
    static: list[int]
    dynamic_slots: int
    miss_path: str
    disk: list[int]
    locality: float
    predicted_hits: float
    prior: list[float] | None = None

    @property
    def slots(self) -> int:
        return len(self.static) + self.dynamic_slots

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class Plan:
    """A residency plan and its predictions. See ``docs/planning.md`` for the file schema."""

    fingerprint: str
    model: str
    gpu: GpuSpec
    host: HostSpec
    settings: dict[str, Any]
    budget: dict[str, Any]
    layers: list[LayerPlan]
    predicted: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    format_version: int = PLAN_FORMAT_VERSION

    # ------------------------------------------------------------------ accessors
    @property
    def num_experts(self) -> int:
        return int(self.settings["num_experts"])

    @property
    def top_k(self) -> int:
        return int(self.settings["top_k"])

    @property
    def expert_size(self) -> int:
        return int(self.settings["expert_size"])

    @property
    def hit_rate(self) -> float:
        return float(self.predicted["hit_rate"])

    @property
    def tokens_per_s(self) -> float:
        return float(self.predicted["tokens_per_s"])

    @property
    def breakdown(self) -> MemoryBreakdown:
        return MemoryBreakdown.from_dict(self.budget["breakdown"])

    def priors(self) -> np.ndarray:
        """Picks per token per expert for every layer ([layers, experts]; uniform where none was recorded)."""
        uniform = self.top_k / self.num_experts
        return np.array([lp.prior if lp.prior is not None else [uniform] * self.num_experts for lp in self.layers])

    def planned_device_bytes(self) -> int:
        """Fixed components plus the expert slots the plan uses: never more than ``budget.vram_bytes``."""
        return self.breakdown.fixed_bytes + int(self.budget["expert_bytes_used"])

    # ------------------------------------------------------------------ files
    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "plan",
            "format_version": self.format_version,
            "fingerprint": self.fingerprint,
            "model": self.model,
            "created_by": f"residency {__version__}",
            "target": {"gpu": self.gpu.to_dict(), "host": self.host.to_dict()},
            "settings": self.settings,
            "budget": self.budget,
            "predicted": self.predicted,
            "notes": self.notes,
            "layers": [lp.to_dict() for lp in self.layers],
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "plan") -> Plan:
        """Build and validate; any structural problem raises :class:`FileFormatError`."""
        try:
            plan = cls(
                fingerprint=str(raw["fingerprint"]),
                model=str(raw.get("model", "")),
                gpu=GpuSpec.from_dict(raw["target"]["gpu"], f"{source} target.gpu"),
                host=HostSpec.from_dict(raw["target"]["host"], f"{source} target.host"),
                settings=dict(raw["settings"]),
                budget=dict(raw["budget"]),
                layers=[LayerPlan(**lp) for lp in raw["layers"]],
                predicted=dict(raw["predicted"]),
                notes=list(raw.get("notes", [])),
                format_version=int(raw["format_version"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise FileFormatError(f"{source}: plan is incomplete or malformed ({exc!r}); regenerate it") from exc
        plan.validate(source)
        return plan

    def save(self, path: str | Path) -> Path:
        """Write the plan as JSON (atomic)."""
        self.validate(str(path))
        return save_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path, fingerprint: str | None = None,
             config: NemotronHConfig | None = None) -> Plan:
        """Read and validate a plan; with ``fingerprint`` or ``config``, refuse a plan made for another model."""
        if config is not None:
            fingerprint = config.fingerprint()
        raw = load_json(path, "plan", PLAN_FORMAT_VERSION, fingerprint)
        return cls.from_dict(raw, source=str(path))

    def check_model(self, config: NemotronHConfig) -> None:
        """Raise :class:`ModelMismatchError` unless the plan was made for ``config``'s model."""
        if config.fingerprint() != self.fingerprint:
            raise ModelMismatchError(
                f"this plan was made for model {self.fingerprint!r}, not {config.fingerprint()!r} "
                f"({config.describe()}); make a new plan for this model with `residency plan`"
            )

    def validate(self, source: str = "plan") -> None:
        """Check internal consistency: ids, slot counts, budget arithmetic, predictions."""

        def bad(msg: str) -> FileFormatError:
            return FileFormatError(f"{source}: {msg}; the plan is corrupt or was edited by hand, regenerate it")

        s = self.settings
        for key in ("num_experts", "top_k", "num_moe_layers", "expert_size", "dense_bytes_per_token", "expert_dtype",
                    "dense_dtype", "kv_dtype", "context", "batch", "policy"):
            if key not in s:
                raise bad(f"settings.{key} is missing")
        for key in ("vram_bytes", "expert_bytes", "expert_bytes_used", "expert_slots", "breakdown"):
            if key not in self.budget:
                raise bad(f"budget.{key} is missing")
        for key in ("hit_rate", "tokens_per_s", "bound", "bytes_per_token", "method"):
            if key not in self.predicted:
                raise bad(f"predicted.{key} is missing")
        if s["policy"] not in POLICY_NAMES:
            raise bad(f"unknown policy {s['policy']!r}")
        E = self.num_experts
        if len(self.layers) != int(s["num_moe_layers"]):
            raise bad(f"{len(self.layers)} layer entries for {s['num_moe_layers']} MoE layers")
        used = 0
        for j, lp in enumerate(self.layers):
            if lp.moe_index != j:
                raise bad(f"layer entry {j} has moe_index {lp.moe_index}")
            ids = np.asarray(lp.static + lp.disk, dtype=np.int64)
            if ids.size and (ids.min() < 0 or ids.max() >= E):
                raise bad(f"MoE layer {j} names experts outside [0, {E})")
            if len(set(lp.static)) != len(lp.static) or len(set(lp.disk)) != len(lp.disk):
                raise bad(f"MoE layer {j} repeats an expert")
            if set(lp.static) & set(lp.disk):
                raise bad(f"MoE layer {j} has experts both resident and on disk")
            if lp.dynamic_slots < 0 or lp.slots > E:
                raise bad(f"MoE layer {j} has {lp.slots} slots for {E} experts")
            if lp.miss_path not in MISS_PATHS:
                raise bad(f"MoE layer {j} has unknown miss path {lp.miss_path!r}")
            if lp.prior is not None and len(lp.prior) != E:
                raise bad(f"MoE layer {j} prior has {len(lp.prior)} entries, not {E}")
            if not 0.0 <= lp.predicted_hits <= self.top_k + 1e-6:
                raise bad(f"MoE layer {j} predicts {lp.predicted_hits} hits per token")
            used += lp.slots
        breakdown = MemoryBreakdown.from_dict(self.budget["breakdown"])
        if used * self.expert_size != int(self.budget["expert_bytes_used"]):
            raise bad("budget.expert_bytes_used does not match the layers' slots")
        if int(self.budget["expert_bytes_used"]) > int(self.budget["expert_bytes"]):
            raise bad("the layers use more expert bytes than the budget allows")
        if breakdown.fixed_bytes + int(self.budget["expert_bytes"]) != int(self.budget["vram_bytes"]):
            raise bad("budget breakdown does not add up to budget.vram_bytes")
        if not 0.0 <= float(self.predicted["hit_rate"]) <= 1.0 or not float(self.predicted["tokens_per_s"]) > 0:
            raise bad("predicted hit_rate or tokens_per_s out of range")

    # ------------------------------------------------------------------ display
    def show(self) -> str:
        """A readable summary: target, memory, host tier, predictions and a per-layer table."""
        s, b, p = self.settings, self.budget, self.predicted
        g = self.gpu
        lines = [
            f"Plan for {self.model}",
            f"  model fingerprint {self.fingerprint}",
            f"Target: {g.describe()}" + (f" (budget {format_bytes(b['vram_bytes'])})" if b.get("vram_override")
                                         else ""),
            f"  host: {self.host.name}, {format_bytes(self.host.memory_bytes)} RAM, "
            f"CPU {self.host.cpu_bw_gbps:g} GB/s, disk {self.host.disk_gbps:g} GB/s",
            f"  experts {s['expert_dtype']} ({format_bytes(self.expert_size)} each), non-expert {s['dense_dtype']}, "
            f"KV {s['kv_dtype']}, context {s['context']}, batch {s['batch']}, policy {s['policy']}",
            f"Device memory ({format_bytes(b['vram_bytes'])}):",
            *self.breakdown.lines(),
            f"  used by expert slots: {format_bytes(b['expert_bytes_used'])} "
            f"({b['static_experts']} static + {b['dynamic_slots']} dynamic of "
            f"{s['num_moe_layers'] * self.num_experts} experts)",
        ]
        if not g.unified_memory:
            lines.append(
                f"Host tier: {b['host_ram_experts']} experts in pinned RAM ({format_bytes(b['host_ram_bytes'])} of "
                f"{format_bytes(self.host.usable_bytes)} usable), {b['host_disk_experts']} on disk "
                f"({format_bytes(b['host_disk_bytes'])})"
            )
        else:
            lines.append(f"Unified memory: one copy of every expert; {b['host_disk_experts']} experts read from disk")
        bpt = p["bytes_per_token"]
        lines += [
            f"Predicted: hit rate {100 * p['hit_rate']:.1f} %, {p['tokens_per_s']:.1f} tokens/s "
            f"({p['ms_per_token']:.2f} ms/token), bound by {p['bound']}",
            "  per token: " + ", ".join(f"{k.replace('_', ' ')} {format_bytes(v)}" for k, v in bpt.items()),
            "  busy per token: " + ", ".join(f"{k.replace('_', ' ')} {v:.2f} ms"
                                             for k, v in p["busy_ms_per_token"].items()),
            f"  how: {p['method']}",
            "Per MoE layer:",
            f"  {'moe':>3} {'layer':>5} {'static':>6} {'dynamic':>7} {'ram':>5} {'disk':>5} {'path':>6} "
            f"{'locality':>8} {'hit %':>6} {'ms':>7}",
        ]
        layer_ms = p.get("layer_ms", [0.0] * len(self.layers))
        for lp, ms in zip(self.layers, layer_ms):
            resident = lp.slots >= self.num_experts and lp.dynamic_slots == 0
            ram = 0 if g.unified_memory or resident else self.num_experts - len(lp.static) - len(lp.disk)
            lines.append(
                f"  {lp.moe_index:>3} {lp.layer:>5} {len(lp.static):>6} {lp.dynamic_slots:>7} {ram:>5} "
                f"{len(lp.disk):>5} {lp.miss_path:>6} {lp.locality:>8.3f} "
                f"{100 * lp.predicted_hits / self.top_k:>6.1f} {ms:>7.3f}"
            )
        if self.notes:
            lines.append("Notes:")
            lines += [f"  - {n}" for n in self.notes]
        return "\n".join(lines)


# ---------------------------------------------------------------------- planning


def _numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def plan_residency(
    config: NemotronHConfig,
    gpu: GpuSpec | str,
    *,
    profile: Any = None,
    trace: RoutingTrace | None = None,
    vram: int | None = None,
    host: HostSpec | None = None,
    expert_dtype: str = "nvfp4",
    dense_dtype: str = "bf16",
    kv_dtype: str = "bf16",
    context: int = 32768,
    batch: int = 1,
    locality: float | None = None,
    window: int = DEFAULT_WINDOW,
    policy: str = "hybrid",
    prior_tokens: float = 64.0,
    miss_path: str = "auto",
    cuda_context_bytes: int | None = None,
) -> Plan:
    """Plan expert residency of ``config``'s model on ``gpu``; see the module docstring.

    ``profile``: an object with ``counts`` [moe_layers, experts] (and optionally ``gate_mass`` as a
    tie-break), ``tokens`` and ``fingerprint`` (a :class:`residency.profiling.profile.Profile`). ``trace``: a
    :class:`RoutingTrace`; gives counts when there is no profile and the per-layer locality.
    ``vram`` overrides the device memory the plan may use; ``host`` the host (default: the GPU's
    built-in host for integrated systems, else a generic 128 GiB host). ``locality`` overrides the
    trace estimate / default assumption. ``miss_path``: 'auto' (cost model), 'copy' or 'cpu'.
    Raises :class:`BudgetError` if the non-expert part does not fit and :class:`ModelMismatchError`
    for a profile or trace of another model.
    """
    if isinstance(gpu, str):
        gpu = lookup_gpu(gpu)
    if expert_dtype not in EXPERT_DTYPES:
        raise ConfigError(f"unknown expert dtype {expert_dtype!r}; use one of {EXPERT_DTYPES}")
    if dense_dtype not in DENSE_DTYPES:
        raise ConfigError(f"unknown non-expert dtype {dense_dtype!r}; use one of {DENSE_DTYPES}")
    if kv_dtype not in KV_DTYPE_BYTES:
        raise ConfigError(f"unknown KV dtype {kv_dtype!r}; use one of {tuple(KV_DTYPE_BYTES)}")
    if policy not in POLICY_NAMES:
        raise ConfigError(f"unknown policy {policy!r}; use one of {POLICY_NAMES}")
    if miss_path not in ("auto", "copy", "cpu"):
        raise ConfigError(f"miss path must be 'auto', 'copy' or 'cpu', got {miss_path!r}")
    if window < 1:
        raise ConfigError(f"locality window must be at least 1 token, got {window}")
    if locality is not None and not 0.0 <= locality <= 1.0:
        raise ConfigError(f"locality must lie in [0, 1], got {locality}")
    host = host or gpu.host or DEFAULT_HOST
    fp = config.fingerprint()
    L, E, k = config.num_moe_layers, config.n_routed_experts, config.num_experts_per_tok
    if L == 0:
        raise ConfigError("this config has no MoE layers; there is nothing to plan")
    notes: list[str] = []
    p, order, lam, prior_source, locality_source, profiled = _routing_inputs(
        config, profile, trace, locality, window, notes)
    p_sorted = np.take_along_axis(p, order, axis=1)

    # ---- memory
    device_bytes = int(vram) if vram is not None else gpu.usable_bytes
    eb = config.expert_bytes(expert_dtype)
    ctx_bytes = cuda_context_bytes if cuda_context_bytes is not None else gpu.context_bytes
    account = dict(expert_dtype=expert_dtype, dense_dtype=dense_dtype, context=context, batch=batch,
                   kv_dtype=kv_dtype, unified=gpu.unified_memory, cuda_context_bytes=ctx_bytes,
                   target=gpu.name)
    breakdown = account_memory(config, device_bytes, **account)
    if breakdown.expert_bytes + breakdown.get("staging_buffers") >= L * E * eb:
        breakdown = account_memory(config, device_bytes, staging_slots=0, **account)  # all resident
    all_resident = breakdown.expert_slots >= L * E

    # ---- miss path: copy misses to the GPU, or compute them on the CPU from host memory
    cost = CostModel.from_specs(gpu, host, eb, dense_bytes_per_token(config, dense_dtype, context, kv_dtype))
    if gpu.unified_memory:
        path = "disk"
    elif miss_path == "auto":
        # One miss: link copy vs CPU compute (the per-layer CPU overhead spread over top-k misses).
        t_copy, t_cpu = cost.miss_time("copy"), cost.miss_time("cpu", top_k=k)
        path = "cpu" if t_cpu < t_copy else "copy"
    else:
        path = miss_path
    if path == "cpu":
        # CPU-path layers never copy misses, so they have no dynamic slots: plan them static-only.
        lam_plan = np.zeros(L)
    else:
        lam_plan = lam

    # ---- allocation
    V, R = hit_curves(p_sorted, k, lam_plan, window)
    n = allocate(slot_gains(V), breakdown.expert_slots)
    r = R[np.arange(L), n]
    hits = V[np.arange(L), n]
    misses = np.maximum(k - hits, 0.0)

    # ---- host tier
    disk_sets = _host_tier(p, order, r, 0 if gpu.unified_memory else host.usable_bytes // eb)
    n_non_static = L * E - int(r.sum())
    n_disk = sum(len(d) for d in disk_sets)
    if n_disk and not gpu.unified_memory:
        notes.append(
            f"host RAM ({format_bytes(host.usable_bytes)} usable) holds {n_non_static - n_disk} of {n_non_static} "
            "non-resident experts; the least used are read from disk. Add RAM or use --host-memory."
        )
    disk_share = np.array([
        p[j, disk_sets[j]].sum() / max(p[j, order[j, r[j]:]].sum(), 1e-30) if disk_sets[j] else 0.0
        for j in range(L)
    ])

    # ---- predicted traffic
    traffic = LayerTraffic.zeros(L)
    traffic.hits[:] = hits
    paths = ["none" if (n[j] >= E or misses[j] <= 1e-12) else path for j in range(L)]
    for j, pj in enumerate(paths):
        if pj == "copy":
            traffic.copies[j] = misses[j]
        elif pj == "cpu":
            traffic.cpu[j] = misses[j]
        if pj != "none":
            traffic.disk[j] = misses[j] if pj == "disk" else misses[j] * disk_share[j]
    report = cost.evaluate(traffic)

    # ---- notes on the target
    if expert_dtype == "nvfp4" and not gpu.fp4:
        notes.append(f"{gpu.name} has no native FP4: NVFP4 experts are dequantised inside the expert kernel")
    if expert_dtype == "fp8" and not gpu.fp8:
        notes.append(f"{gpu.name} has no native FP8: FP8 experts are dequantised inside the expert kernel")
    if gpu.unified_memory:
        notes.append("unified memory: one copy of every expert, no host-to-device streaming; the next tier is disk")
    if all_resident:
        notes.append("every routed expert fits in device memory: hit rate 1.0, no host tier needed")
    if "cpu" in paths:
        notes.append(
            f"misses are computed on the CPU from host memory (one expert: {1e6 * cost.miss_time('cpu', top_k=k):.0f}"
            f" us on the CPU vs {1e6 * cost.miss_time('copy'):.0f} us to copy); those layers hold static experts only"
        )
    if batch > 1:
        notes.append("memory is accounted for the batch; speed predictions are for one sequence decoding alone")

    layers = []
    for j in range(L):
        layers.append(LayerPlan(
            moe_index=j, layer=config.moe_layers[j], static=[int(e) for e in order[j, : r[j]]],
            dynamic_slots=int(n[j] - r[j]), miss_path=paths[j], disk=sorted(disk_sets[j]),
            locality=round(float(lam[j]), 6), predicted_hits=round(float(hits[j]), 6),
            prior=[float(f"{x:.6g}") for x in p[j]] if profiled else None,
        ))
    static_total, slots_total = int(r.sum()), int(n.sum())
    ram_experts = 0 if gpu.unified_memory else n_non_static - n_disk
    budget = {
        "vram_bytes": device_bytes,
        "vram_override": vram is not None,
        "expert_bytes": breakdown.expert_bytes,
        "expert_bytes_used": slots_total * eb,
        "expert_slots": breakdown.expert_slots,
        "static_experts": static_total,
        "dynamic_slots": slots_total - static_total,
        "host_ram_experts": ram_experts,
        "host_ram_bytes": ram_experts * eb,
        "host_disk_experts": n_disk,
        "host_disk_bytes": n_disk * eb,
        "breakdown": breakdown.to_dict(),
    }
    method = (
        f"expected hits from {prior_source}; {locality_source}, window {window} tokens; hit model: static pick "
        "mass + LRU slots catching recent re-picks and an average share of fresh picks (docs/planning.md); "
        "cost model: decode at batch 1 and full context, copy/CPU/compute overlap within a layer, no prefetch, "
        f"{GPU_BW_EFFICIENCY:.0%} of peak memory bandwidth"
    )
    predicted = {
        "hit_rate": round(float(hits.sum() / (L * k)), 6),
        **report.to_dict(),
        "layer_ms": [round(float(x), 4) for x in report.layer_ms],
        "method": method,
    }
    settings = {
        "expert_dtype": expert_dtype, "dense_dtype": dense_dtype, "kv_dtype": kv_dtype, "context": int(context),
        "batch": int(batch), "policy": policy, "prior_tokens": float(prior_tokens), "window": int(window),
        "miss_path": miss_path, "num_moe_layers": L, "num_experts": E, "top_k": k,
        "moe_layers": list(config.moe_layers), "expert_size": eb,
        "dense_bytes_per_token": cost.dense_bytes, "prior_source": prior_source, "locality_source": locality_source,
    }
    return Plan(fingerprint=fp, model=config.describe(), gpu=gpu, host=host, settings=settings, budget=budget,
                layers=layers, predicted=predicted, notes=notes)


def _routing_inputs(
    config: NemotronHConfig, profile: Any, trace: RoutingTrace | None, locality: float | None, window: int,
    notes: list[str],
) -> tuple[np.ndarray, np.ndarray, np.ndarray, str, str, bool]:
    """Pick probabilities [L, E], experts ranked per layer, locality per layer, how each was obtained,
    and whether the probabilities came from data (profile or trace) rather than the uniform prior."""
    fp = config.fingerprint()
    L, E, k = config.num_moe_layers, config.n_routed_experts, config.num_experts_per_tok
    counts = tiebreak = None
    prior_source = "uniform prior (no profile or trace): static sets are arbitrary, plan from a profile"
    if profile is not None:
        if getattr(profile, "fingerprint", fp) != fp:
            raise ModelMismatchError(
                f"the profile was recorded for model {profile.fingerprint!r}, not {fp!r}; profile this model"
            )
        counts = _numpy(profile.counts)
        if counts.shape != (L, E):
            raise ModelMismatchError(f"profile counts have shape {counts.shape}, this model needs {(L, E)}")
        if getattr(profile, "gate_mass", None) is not None:
            tiebreak = _numpy(profile.gate_mass)
        prior_source = f"profile pick counts ({int(getattr(profile, 'tokens', 0))} tokens)"
    trace_ids = None
    if trace is not None:
        if trace.fingerprint != fp:
            raise ModelMismatchError(f"the trace was recorded for model {trace.fingerprint!r}, not {fp!r}")
        if (trace.num_moe_layers, trace.num_experts, trace.top_k) != (L, E, k):
            raise ModelMismatchError(
                f"trace shape ({trace.num_moe_layers} layers, {trace.num_experts} experts, top-{trace.top_k}) "
                f"does not match the model ({L}, {E}, top-{k})"
            )
        trace_ids = _decode_ids(trace)
        if counts is None:
            counts = np.stack([np.bincount(trace_ids[:, j].reshape(-1), minlength=E) for j in range(L)]).astype(float)
            prior_source = f"trace pick counts ({trace_ids.shape[0]} tokens)"
    p = pick_probabilities(counts, L, E, k)
    order = rank_experts(p, tiebreak)
    if locality is not None:
        lam = np.full(L, float(locality))
        locality_source = f"locality {locality:g} given"
    elif trace_ids is not None:
        lam = estimate_locality(trace_ids, E, window)
        if np.isnan(lam).any():
            lam = np.where(np.isnan(lam), DEFAULT_LOCALITY, lam)
            notes.append(f"trace too short to estimate locality; assumed {DEFAULT_LOCALITY}")
        locality_source = f"locality per layer estimated from the trace (mean {lam.mean():.3f})"
    else:
        lam = np.full(L, DEFAULT_LOCALITY)
        locality_source = f"locality {DEFAULT_LOCALITY} assumed (no trace; record one to measure it)"
    return p, order, lam, prior_source, locality_source, counts is not None


def _host_tier(p: np.ndarray, order: np.ndarray, static_counts: np.ndarray, ram_capacity: int) -> list[list[int]]:
    """Per layer, the non-static experts whose host copy goes to disk: RAM takes the most probable
    non-static experts of all layers (ties by layer, then id) until ``ram_capacity`` experts."""
    L = p.shape[0]
    disk: list[list[int]] = [[] for _ in range(L)]
    non_static = [(j, int(e)) for j in range(L) for e in order[j, static_counts[j]:]]
    if len(non_static) > ram_capacity:
        ranked = sorted(non_static, key=lambda le: (-p[le[0], le[1]], le[0], le[1]))
        for j, e in ranked[ram_capacity:]:
            disk[j].append(e)
    return disk


def _decode_ids(trace: RoutingTrace) -> np.ndarray:
    """The trace's picks as int64 [tokens, layers, top_k], decode tokens only when it has any."""
    ids = np.asarray(trace.ids.numpy() if hasattr(trace.ids, "numpy") else trace.ids, dtype=np.int64)
    decode = np.asarray(trace.is_decode, dtype=bool)
    if decode.any() and not decode.all():
        ids = ids[decode]
    return ids

