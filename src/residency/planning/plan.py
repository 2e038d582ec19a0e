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
   where the embedding table lives (:func:`choose_embeddings`): in host memory on a discrete GPU
   that cannot hold every expert (it frees 1 GiB of Super's device memory for expert slots; each
   token copies its 8 KiB row), else on the device;
5. per layer, the miss path: copy to the GPU or compute on the CPU, whichever the cost model
   (:mod:`residency.planning.cost`) says is faster for that layer's expected misses;
6. predictions: hit rate, bytes per token over each link, tokens/s and its bounding resource.

Defaults: the formats of the config's attached quantization scheme (``residency plan --model DIR``
reads a checkpoint's; the ``nemotron-3-super-fp8`` / ``-nvfp4`` presets carry the releases'): its
expert format and every dense module in its own format (``mixed``); without one, NVFP4 experts (the
smallest published checkpoint; GPUs without native FP4 dequantise in the kernel) and BF16
non-expert weights. BF16 KV cache, 32768 tokens of context, batch 1, the profile-seeded hybrid
eviction policy, CPU compute of misses allowed.

A plan is a versioned JSON file (:class:`Plan`), validated on load and refused for another model.
Format 2 added ``settings.embeddings_on_host``; format 1 files (without it) load with the table on
the device, which is what they were planned with.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import __version__
from ..config import DENSE_DTYPES, EXPERT_DTYPES, ConfigError, NemotronHConfig
from ..errors import BudgetError, FileFormatError, ModelMismatchError
from ..files import load_json, save_json
from ..runtime.policy import POLICY_NAMES
from ..sizes import Budget, format_bytes, parse_budget
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
from .cost import (
    GPU_BW_EFFICIENCY,
    MISS_PATH_CHOICES,
    MISS_PATHS,
    CostModel,
    LayerTraffic,
    dense_bytes_per_token,
)
from .hardware import DEFAULT_HOST, GpuSpec, HostSpec, lookup_gpu
from .memory import KV_DTYPE_BYTES, MemoryBreakdown, MemoryComponent, account_memory, embedding_table_bytes

if TYPE_CHECKING:  # a trace is only read when one is given: planning from a config alone needs no torch
    from ..profiling.trace import RoutingTrace

__all__ = [
    "PLAN_FORMAT_VERSION",
    "DEFAULT_POLICY",
    "EMBEDDINGS_CHOICES",
    "POLICY_NAMES",
    "LayerPlan",
    "PlanSettings",
    "PlanBudget",
    "PlanPrediction",
    "Plan",
    "plan_residency",
    "choose_embeddings",
]

#: 2: ``settings.embeddings_on_host`` (format 1 files load with the table on the device).
PLAN_FORMAT_VERSION = 2
#: Where the embedding table may be asked to live: let the planner choose, the device, or host memory.
EMBEDDINGS_CHOICES = ("auto", "device", "host")
#: The eviction policy a plan uses unless told otherwise (one of :data:`POLICY_NAMES`).
DEFAULT_POLICY = "hybrid"


# ---------------------------------------------------------------------- reading plan files


def _bad(source: str, msg: str) -> FileFormatError:
    return FileFormatError(f"{source}: {msg}; the plan is corrupt or was edited by hand, regenerate it")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


class _Fields:
    """Typed reads from one JSON object of a plan file; a problem names the field (``settings.context``)."""

    def __init__(self, raw: Any, where: str, source: str) -> None:
        if not isinstance(raw, Mapping):
            raise _bad(source, f"{where or 'the plan'} must be an object, got {_short(raw)}")
        self.raw, self.where, self.source = raw, where, source
        self.seen: set[str] = set()

    def _get(self, name: str) -> Any:
        self.seen.add(name)
        if name not in self.raw:
            raise _bad(self.source, f"{self._path(name)} is missing")
        return self.raw[name]

    def _wrong(self, name: str, words: str, value: Any) -> FileFormatError:
        return _bad(self.source, f"{self._path(name)} must be {words}, got {_short(value)}")

    def int(self, name: str) -> int:
        value = self._get(name)
        if not isinstance(value, int) or isinstance(value, bool):
            raise self._wrong(name, "an integer", value)
        return value

    def number(self, name: str) -> float:
        value = self._get(name)
        if not _is_number(value):
            raise self._wrong(name, "a number", value)
        return float(value)

    def text(self, name: str) -> str:
        value = self._get(name)
        if not isinstance(value, str):
            raise self._wrong(name, "a string", value)
        return value

    def flag(self, name: str) -> bool:
        value = self._get(name)
        if not isinstance(value, bool):
            raise self._wrong(name, "true or false", value)
        return value

    def ints(self, name: str) -> tuple[int, ...]:
        value = self._get(name)
        if not isinstance(value, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in value):
            raise self._wrong(name, "a list of integers", value)
        return tuple(value)

    def numbers(self, name: str, *, optional: bool = False) -> tuple[float, ...] | None:
        value = self._get(name)
        if value is None and optional:
            return None
        if not isinstance(value, list) or not all(_is_number(x) for x in value):
            raise self._wrong(name, "a list of numbers" + (" or null" if optional else ""), value)
        return tuple(float(x) for x in value)

    def texts(self, name: str) -> list[str]:
        value = self._get(name)
        if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
            raise self._wrong(name, "a list of strings", value)
        return list(value)

    def table(self, name: str, cast: type) -> dict[str, Any]:
        """An object of numbers (``cast`` int or float) keyed by resource name."""
        value = self._get(name)
        ok = isinstance(value, Mapping) and all(
            isinstance(k, str) and (_is_number(v) if cast is float else isinstance(v, int) and not isinstance(v, bool))
            for k, v in value.items())
        if not ok:
            raise self._wrong(name, f"an object of {'numbers' if cast is float else 'integers'}", value)
        return {k: cast(v) for k, v in value.items()}

    def _path(self, name: str) -> str:
        return f"{self.where}.{name}" if self.where else name

    def obj(self, name: str) -> _Fields:
        return _Fields(self._get(name), self._path(name), self.source)

    def items(self, name: str) -> list[_Fields]:
        value = self._get(name)
        if not isinstance(value, list):
            raise self._wrong(name, "a list", value)
        return [_Fields(x, f"{self._path(name)}[{i}]", self.source) for i, x in enumerate(value)]

    def done(self) -> None:
        extra = sorted(set(self.raw) - self.seen)
        if extra:
            raise _bad(self.source, f"{self.where or 'the plan'} has unknown field(s) {extra}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ---------------------------------------------------------------------- the plan's parts


@dataclass(frozen=True)
class LayerPlan:
    """The plan for one MoE layer: what the runtime allocates and how it serves misses there.

    ``static``: experts resident for the whole run (slots ``0..len(static)-1``); ``dynamic_slots``:
    slots the eviction policy manages (so the layer's slot bank holds :attr:`slots` experts);
    ``disk``: experts whose host copy is on disk (every other non-static expert sits in pinned RAM;
    on unified memory, the rest are simply resident in the shared pool); ``miss_path``: 'copy',
    'cpu', 'disk' or 'none' (:data:`~residency.planning.cost.MISS_PATHS`); ``locality``: the λ
    planned with; ``predicted_hits``: expected hits per token; ``prior``: picks per token per
    expert that seeded the plan (None when the prior was uniform).
    """

    moe_index: int
    layer: int
    static: tuple[int, ...]
    dynamic_slots: int
    miss_path: str
    disk: tuple[int, ...]
    locality: float
    predicted_hits: float
    prior: tuple[float, ...] | None = None

    @property
    def num_static(self) -> int:
        return len(self.static)

    @property
    def slots(self) -> int:
        """Expert slots this layer holds on the device: static plus dynamic."""
        return len(self.static) + self.dynamic_slots

    def to_dict(self) -> dict[str, Any]:
        return {
            "moe_index": self.moe_index, "layer": self.layer, "static": list(self.static),
            "dynamic_slots": self.dynamic_slots, "miss_path": self.miss_path, "disk": list(self.disk),
            "locality": self.locality, "predicted_hits": self.predicted_hits,
            "prior": list(self.prior) if self.prior is not None else None,
        }

    @classmethod
    def _read(cls, f: _Fields) -> LayerPlan:
        out = cls(
            moe_index=f.int("moe_index"), layer=f.int("layer"), static=f.ints("static"),
            dynamic_slots=f.int("dynamic_slots"), miss_path=f.text("miss_path"), disk=f.ints("disk"),
            locality=f.number("locality"), predicted_hits=f.number("predicted_hits"),
            prior=f.numbers("prior", optional=True),
        )
        f.done()
        return out


@dataclass(frozen=True)
class PlanSettings:
    """What the plan was made for and with: dtypes, context, batch, policy, model shape, prior and locality.

    ``policy`` is one of :data:`POLICY_NAMES`; ``miss_path`` the request ('auto', 'copy' or 'cpu';
    each layer's :attr:`LayerPlan.miss_path` is the outcome); ``expert_size`` the bytes of one
    routed expert in ``expert_dtype``; ``dense_bytes_per_token`` what the GPU reads per token
    besides routed experts; ``prior_tokens`` the weight of the profile prior in the hybrid policy;
    ``embeddings_on_host``: the embedding table stays in host memory (not counted on the device;
    the runtime copies each step's rows), else it is a device tensor like the other dense weights.
    """

    expert_dtype: str
    dense_dtype: str
    kv_dtype: str
    context: int
    batch: int
    policy: str
    prior_tokens: float
    window: int
    miss_path: str
    num_moe_layers: int
    num_experts: int
    top_k: int
    moe_layers: tuple[int, ...]
    expert_size: int
    dense_bytes_per_token: int
    prior_source: str
    locality_source: str
    embeddings_on_host: bool = False

    def to_dict(self) -> dict[str, Any]:
        out = {name: getattr(self, name) for name in self.__dataclass_fields__}
        out["moe_layers"] = list(self.moe_layers)
        return out

    @classmethod
    def _read(cls, f: _Fields, version: int = PLAN_FORMAT_VERSION) -> PlanSettings:
        out = cls(
            expert_dtype=f.text("expert_dtype"), dense_dtype=f.text("dense_dtype"), kv_dtype=f.text("kv_dtype"),
            context=f.int("context"), batch=f.int("batch"), policy=f.text("policy"),
            prior_tokens=f.number("prior_tokens"), window=f.int("window"), miss_path=f.text("miss_path"),
            num_moe_layers=f.int("num_moe_layers"), num_experts=f.int("num_experts"), top_k=f.int("top_k"),
            moe_layers=f.ints("moe_layers"), expert_size=f.int("expert_size"),
            dense_bytes_per_token=f.int("dense_bytes_per_token"), prior_source=f.text("prior_source"),
            locality_source=f.text("locality_source"),
            # format 1 had no such field: the table was always planned on the device
            embeddings_on_host=f.flag("embeddings_on_host") if version >= 2 else False,
        )
        f.done()
        return out


@dataclass(frozen=True)
class PlanBudget:
    """Device and host memory of the plan, in bytes and expert counts.

    ``vram_bytes``: device memory the plan may occupy (``vram_override``: it came from ``--vram``
    rather than the GPU's size); ``expert_bytes``: what the fixed components leave for experts;
    ``expert_bytes_used``: what the layers' slots take (never more); ``expert_slots``: whole experts
    that fit ``expert_bytes``; ``static_experts`` and ``dynamic_slots``: totals over layers; host
    tier: experts and bytes in pinned RAM and on disk; ``breakdown``: the device memory accounting.
    """

    vram_bytes: int
    vram_override: bool
    expert_bytes: int
    expert_bytes_used: int
    expert_slots: int
    static_experts: int
    dynamic_slots: int
    host_ram_experts: int
    host_ram_bytes: int
    host_disk_experts: int
    host_disk_bytes: int
    breakdown: MemoryBreakdown

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {name: getattr(self, name) for name in self.__dataclass_fields__}
        out["breakdown"] = self.breakdown.to_dict()
        return out

    @classmethod
    def _read(cls, f: _Fields) -> PlanBudget:
        ints = {name: f.int(name) for name in cls.__dataclass_fields__ if name not in ("vram_override", "breakdown")}
        out = cls(**ints, vram_override=f.flag("vram_override"), breakdown=_read_breakdown(f.obj("breakdown")))
        f.done()
        return out


def _read_breakdown(f: _Fields) -> MemoryBreakdown:
    components = []
    for c in f.items("components"):
        components.append(MemoryComponent(c.text("name"), c.int("bytes"), c.text("note")))
        c.done()
    out = MemoryBreakdown(
        device_bytes=f.int("device_bytes"), components=tuple(components), expert_bytes=f.int("expert_bytes"),
        expert_size=f.int("expert_size"), staging_slots=f.int("staging_slots"), unified=f.flag("unified"),
    )
    f.done()
    return out


@dataclass(frozen=True)
class PlanPrediction:
    """What the plan should achieve, from the cost model (:mod:`residency.planning.cost`).

    ``bound``: the resource that sets the time per token; ``busy_ms_per_token`` and
    ``bytes_per_token``: per resource (gpu_memory, host_link / host_to_device, cpu / cpu_dram,
    disk); ``layer_ms``: time of each MoE layer; ``method``: how the figures were obtained.
    """

    hit_rate: float
    tokens_per_s: float
    bound: str
    ms_per_token: float
    dense_ms_per_token: float
    busy_ms_per_token: Mapping[str, float]
    bytes_per_token: Mapping[str, int]
    layer_ms: tuple[float, ...]
    method: str

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {name: getattr(self, name) for name in self.__dataclass_fields__}
        out["busy_ms_per_token"] = dict(self.busy_ms_per_token)
        out["bytes_per_token"] = dict(self.bytes_per_token)
        out["layer_ms"] = list(self.layer_ms)
        return out

    @classmethod
    def _read(cls, f: _Fields) -> PlanPrediction:
        out = cls(
            hit_rate=f.number("hit_rate"), tokens_per_s=f.number("tokens_per_s"), bound=f.text("bound"),
            ms_per_token=f.number("ms_per_token"), dense_ms_per_token=f.number("dense_ms_per_token"),
            busy_ms_per_token=f.table("busy_ms_per_token", float), bytes_per_token=f.table("bytes_per_token", int),
            layer_ms=f.numbers("layer_ms"), method=f.text("method"),
        )
        f.done()
        return out


# ---------------------------------------------------------------------- the plan


@dataclass
class Plan:
    """A residency plan and its predictions. See ``docs/planning.md`` for the file schema.

    What a runtime reads: ``settings`` (:class:`PlanSettings`: dtypes, policy, context),
    ``budget`` (:class:`PlanBudget`: bytes on the device and the host), ``layers`` (one
    :class:`LayerPlan` per MoE layer: static experts, dynamic slots, miss path, disk tier) and
    :attr:`layer_slots`.
    """

    fingerprint: str
    model: str
    gpu: GpuSpec
    host: HostSpec
    settings: PlanSettings
    budget: PlanBudget
    layers: tuple[LayerPlan, ...]
    predicted: PlanPrediction
    notes: list[str] = field(default_factory=list)
    #: the format the plan was read from (files are always written in :data:`PLAN_FORMAT_VERSION`)
    format_version: int = PLAN_FORMAT_VERSION

    def __post_init__(self) -> None:
        self.layers = tuple(self.layers)

    # ------------------------------------------------------------------ accessors
    @property
    def num_experts(self) -> int:
        return self.settings.num_experts

    @property
    def top_k(self) -> int:
        return self.settings.top_k

    @property
    def expert_size(self) -> int:
        return self.settings.expert_size

    @property
    def policy(self) -> str:
        return self.settings.policy

    @property
    def hit_rate(self) -> float:
        return self.predicted.hit_rate

    @property
    def tokens_per_s(self) -> float:
        return self.predicted.tokens_per_s

    @property
    def breakdown(self) -> MemoryBreakdown:
        return self.budget.breakdown

    @property
    def layer_slots(self) -> tuple[int, ...]:
        """Device expert slots per MoE layer (static + dynamic), in MoE-layer order."""
        return tuple(lp.slots for lp in self.layers)

    def priors(self) -> np.ndarray:
        """Picks per token per expert for every layer ([layers, experts]; uniform where none was recorded)."""
        uniform = self.top_k / self.num_experts
        return np.array([lp.prior if lp.prior is not None else [uniform] * self.num_experts for lp in self.layers])

    def planned_device_bytes(self) -> int:
        """Fixed components plus the expert slots the plan uses: never more than ``budget.vram_bytes``."""
        return self.breakdown.fixed_bytes + self.budget.expert_bytes_used

    # ------------------------------------------------------------------ files
    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "plan",
            "format_version": PLAN_FORMAT_VERSION,
            "fingerprint": self.fingerprint,
            "model": self.model,
            "created_by": f"residency {__version__}",
            "target": {"gpu": self.gpu.to_dict(), "host": self.host.to_dict()},
            "settings": self.settings.to_dict(),
            "budget": self.budget.to_dict(),
            "predicted": self.predicted.to_dict(),
            "notes": list(self.notes),
            "layers": [lp.to_dict() for lp in self.layers],
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "plan") -> Plan:
        """Build and validate; a missing or mistyped field, or an inconsistent plan, raises :class:`FileFormatError`."""
        f = _Fields(raw, "", source)
        for name in ("kind", "created_by"):
            f.seen.add(name)
        target = f.obj("target")
        try:
            gpu = GpuSpec.from_dict(target._get("gpu"), f"{source} target.gpu")
            host = HostSpec.from_dict(target._get("host"), f"{source} target.host")
        except ValueError as exc:  # HardwareError
            raise FileFormatError(f"{exc}; the plan is corrupt or was edited by hand, regenerate it") from exc
        target.done()
        version = f.int("format_version")
        plan = cls(
            fingerprint=f.text("fingerprint"),
            model=f.text("model"),
            gpu=gpu,
            host=host,
            settings=PlanSettings._read(f.obj("settings"), version),
            budget=PlanBudget._read(f.obj("budget")),
            layers=tuple(LayerPlan._read(x) for x in f.items("layers")),
            predicted=PlanPrediction._read(f.obj("predicted")),
            notes=f.texts("notes"),
            format_version=version,
        )
        f.done()
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
        """Check internal consistency: choices, ids, slot counts, budget arithmetic, predictions."""

        def bad(msg: str) -> FileFormatError:
            return _bad(source, msg)

        s, b, p = self.settings, self.budget, self.predicted
        for name, value, choices in (
            ("policy", s.policy, POLICY_NAMES), ("expert_dtype", s.expert_dtype, EXPERT_DTYPES),
            ("dense_dtype", s.dense_dtype, DENSE_DTYPES), ("kv_dtype", s.kv_dtype, tuple(KV_DTYPE_BYTES)),
            ("miss_path", s.miss_path, MISS_PATH_CHOICES),
        ):
            if value not in choices:
                raise bad(f"unknown {name.replace('_', ' ')} {value!r} in settings.{name} (one of {choices})")
        for name in ("context", "batch", "window", "num_experts", "top_k", "expert_size"):
            if getattr(s, name) < 1:
                raise bad(f"settings.{name} must be at least 1, got {getattr(s, name)}")
        if s.top_k > s.num_experts or len(s.moe_layers) != s.num_moe_layers:
            raise bad("settings.top_k or settings.moe_layers do not fit the model shape")
        if s.embeddings_on_host and b.breakdown.unified:
            raise bad("settings.embeddings_on_host is true for a unified-memory device")
        E = self.num_experts
        if len(self.layers) != s.num_moe_layers:
            raise bad(f"{len(self.layers)} layer entries for {s.num_moe_layers} MoE layers")
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
        if used * self.expert_size != b.expert_bytes_used:
            raise bad("budget.expert_bytes_used does not match the layers' slots")
        if b.expert_bytes_used > b.expert_bytes:
            raise bad("the layers use more expert bytes than the budget allows")
        if b.breakdown.fixed_bytes + b.expert_bytes != b.vram_bytes:
            raise bad("budget breakdown does not add up to budget.vram_bytes")
        if not 0.0 <= p.hit_rate <= 1.0 or not p.tokens_per_s > 0:
            raise bad("predicted hit_rate or tokens_per_s out of range")
        if len(p.layer_ms) != len(self.layers):
            raise bad(f"predicted.layer_ms has {len(p.layer_ms)} entries for {len(self.layers)} MoE layers")

    # ------------------------------------------------------------------ display
    def show(self) -> str:
        """A readable summary: target, memory, host tier, predictions and a per-layer table."""
        s, b, p = self.settings, self.budget, self.predicted
        g = self.gpu
        lines = [
            f"Plan for {self.model}",
            f"  model fingerprint {self.fingerprint}",
            f"Target: {g.describe()}" + (f" (budget {format_bytes(b.vram_bytes)})" if b.vram_override else ""),
            f"  host: {self.host.name}, {format_bytes(self.host.memory_bytes)} RAM, "
            f"CPU {self.host.cpu_bw_gbps:g} GB/s, disk {self.host.disk_gbps:g} GB/s",
            f"  experts {s.expert_dtype} ({format_bytes(self.expert_size)} each), non-expert {s.dense_dtype}, "
            f"KV {s.kv_dtype}, context {s.context}, batch {s.batch}, policy {s.policy}",
            f"Device memory ({format_bytes(b.vram_bytes)}):",
            *self.breakdown.lines(),
            f"  used by expert slots: {format_bytes(b.expert_bytes_used)} "
            f"({b.static_experts} static + {b.dynamic_slots} dynamic of "
            f"{s.num_moe_layers * self.num_experts} experts)",
        ]
        if not g.unified_memory:
            lines.append(
                f"Host tier: {b.host_ram_experts} experts in pinned RAM ({format_bytes(b.host_ram_bytes)} of "
                f"{format_bytes(self.host.usable_bytes)} usable), {b.host_disk_experts} on disk "
                f"({format_bytes(b.host_disk_bytes)})"
            )
        else:
            lines.append(f"Unified memory: one copy of every expert; {b.host_disk_experts} experts read from disk")
        lines += [
            f"Predicted: hit rate {100 * p.hit_rate:.1f} %, {p.tokens_per_s:.1f} tokens/s "
            f"({p.ms_per_token:.2f} ms/token), bound by {p.bound}",
            "  per token: " + ", ".join(f"{k.replace('_', ' ')} {format_bytes(v)}"
                                        for k, v in p.bytes_per_token.items()),
            "  busy per token: " + ", ".join(f"{k.replace('_', ' ')} {v:.2f} ms"
                                             for k, v in p.busy_ms_per_token.items()),
            f"  how: {p.method}",
            "Per MoE layer:",
            f"  {'moe':>3} {'layer':>5} {'static':>6} {'dynamic':>7} {'ram':>5} {'disk':>5} {'path':>6} "
            f"{'locality':>8} {'hit %':>6} {'ms':>7}",
        ]
        for lp, ms in zip(self.layers, p.layer_ms):
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
    vram: int | str | float | Budget | None = None,
    host: HostSpec | None = None,
    expert_dtype: str | None = None,
    dense_dtype: str | None = None,
    kv_dtype: str = "bf16",
    context: int = 32768,
    batch: int = 1,
    locality: float | None = None,
    window: int = DEFAULT_WINDOW,
    policy: str = DEFAULT_POLICY,
    prior_tokens: float = 64.0,
    miss_path: str = "auto",
    cuda_context_bytes: int | None = None,
    embeddings: str = "auto",
) -> Plan:
    """Plan expert residency of ``config``'s model on ``gpu``; see the module docstring.

    ``profile``: an object with ``counts`` [moe_layers, experts] (and optionally ``gate_mass`` as a
    tie-break), ``tokens`` and ``fingerprint`` (a :class:`residency.profiling.profile.Profile`). ``trace``: a
    :class:`RoutingTrace`; gives counts when there is no profile and the per-layer locality.
    ``vram`` is the device memory the plan may use (default: all of the GPU's): an int byte count, a
    size string ("20GiB" binary, "24GB" decimal), a fraction in (0, 1] of the GPU's memory, or a
    :class:`~residency.sizes.Budget` (read by :func:`residency.sizes.parse_budget`; a bare "24" or
    a budget above the GPU's memory raises :class:`~residency.errors.SizeError`). ``host`` is the
    host (default: the GPU's built-in host for integrated systems, else a generic 128 GiB host).
    ``locality`` overrides the trace estimate / default assumption. ``miss_path``: 'auto' (cost
    model), 'copy' or 'cpu'. ``embeddings``: where the embedding table lives, 'auto'
    (:func:`choose_embeddings`), 'device' or 'host'.
    Raises :class:`BudgetError` if the non-expert part does not fit and :class:`ModelMismatchError`
    for a profile or trace of another model.
    """
    if isinstance(gpu, str):
        gpu = lookup_gpu(gpu)
    expert_dtype, dense_dtype, weight_notes = _weight_formats(config, expert_dtype, dense_dtype)
    if expert_dtype not in EXPERT_DTYPES:
        raise ConfigError(f"unknown expert dtype {expert_dtype!r}; use one of {EXPERT_DTYPES}")
    if dense_dtype not in DENSE_DTYPES:
        raise ConfigError(f"unknown non-expert dtype {dense_dtype!r}; use one of {DENSE_DTYPES}")
    if kv_dtype not in KV_DTYPE_BYTES:
        raise ConfigError(f"unknown KV dtype {kv_dtype!r}; use one of {tuple(KV_DTYPE_BYTES)}")
    if policy not in POLICY_NAMES:
        raise ConfigError(f"unknown policy {policy!r}; use one of {POLICY_NAMES}")
    if miss_path not in MISS_PATH_CHOICES:
        raise ConfigError(f"miss path must be one of {MISS_PATH_CHOICES}, got {miss_path!r}")
    if window < 1:
        raise ConfigError(f"locality window must be at least 1 token, got {window}")
    if locality is not None and not 0.0 <= locality <= 1.0:
        raise ConfigError(f"locality must lie in [0, 1], got {locality}")
    if embeddings not in EMBEDDINGS_CHOICES:
        raise ConfigError(f"embeddings must be one of {EMBEDDINGS_CHOICES}, got {embeddings!r}")
    if embeddings == "host":
        _check_host_embeddings(config, gpu)
    host = host or gpu.host or DEFAULT_HOST
    if vram is not None:
        vram = parse_budget(vram, total_bytes=gpu.usable_bytes, device_name=gpu.name, what="vram").bytes
    fp = config.fingerprint()
    L, E, k = config.num_moe_layers, config.n_routed_experts, config.num_experts_per_tok
    if L == 0:
        raise ConfigError("this config has no MoE layers; there is nothing to plan")
    notes: list[str] = list(weight_notes)
    p, order, lam, prior_source, locality_source, profiled = _routing_inputs(
        config, profile, trace, locality, window, notes)
    p_sorted = np.take_along_axis(p, order, axis=1)

    # ---- memory
    device_bytes = int(vram) if vram is not None else gpu.usable_bytes
    eb = config.expert_bytes(expert_dtype)
    ctx_bytes = cuda_context_bytes if cuda_context_bytes is not None else gpu.context_bytes
    account = dict(expert_dtype=expert_dtype, dense_dtype=dense_dtype, context=context, batch=batch,
                   kv_dtype=kv_dtype, unified=gpu.unified_memory, cuda_context_bytes=ctx_bytes,
                   target=gpu.name, device_memory=gpu.usable_bytes)

    def breakdown_for(on_host: bool) -> MemoryBreakdown:
        out = account_memory(config, device_bytes, embeddings_on_host=on_host, **account)
        if out.expert_bytes + out.get("staging_buffers") >= L * E * eb:  # all resident: no staging
            out = account_memory(config, device_bytes, staging_slots=0, embeddings_on_host=on_host, **account)
        return out

    embeddings_on_host, why = choose_embeddings(config, gpu, breakdown_for, L * E, embeddings)
    breakdown = breakdown_for(embeddings_on_host)
    all_resident = breakdown.expert_slots >= L * E
    if why:
        notes.append(why)

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

    # ---- host tier (the embedding table, when it is on the host, takes its share of host RAM first)
    host_ram = host.usable_bytes - (embedding_table_bytes(config) if embeddings_on_host else 0)
    disk_sets = _host_tier(p, order, r, 0 if gpu.unified_memory else max(0, host_ram) // eb)
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
            moe_index=j, layer=config.moe_layers[j], static=tuple(int(e) for e in order[j, : r[j]]),
            dynamic_slots=int(n[j] - r[j]), miss_path=paths[j], disk=tuple(sorted(disk_sets[j])),
            locality=round(float(lam[j]), 6), predicted_hits=round(float(hits[j]), 6),
            prior=tuple(float(f"{x:.6g}") for x in p[j]) if profiled else None,
        ))
    static_total, slots_total = int(r.sum()), int(n.sum())
    ram_experts = 0 if gpu.unified_memory else n_non_static - n_disk
    budget = PlanBudget(
        vram_bytes=device_bytes,
        vram_override=vram is not None,
        expert_bytes=breakdown.expert_bytes,
        expert_bytes_used=slots_total * eb,
        expert_slots=breakdown.expert_slots,
        static_experts=static_total,
        dynamic_slots=slots_total - static_total,
        host_ram_experts=ram_experts,
        host_ram_bytes=ram_experts * eb,
        host_disk_experts=n_disk,
        host_disk_bytes=n_disk * eb,
        breakdown=breakdown,
    )
    method = (
        f"expected hits from {prior_source}; {locality_source}, window {window} tokens; hit model: static pick "
        "mass + LRU slots catching recent re-picks and an average share of fresh picks (docs/planning.md); "
        "cost model: decode at batch 1 and full context, copy/CPU/compute overlap within a layer, no prefetch, "
        f"{GPU_BW_EFFICIENCY:.0%} of peak memory bandwidth"
    )
    predicted = PlanPrediction(
        hit_rate=round(float(hits.sum() / (L * k)), 6),
        **report.to_dict(),
        layer_ms=tuple(round(float(x), 4) for x in report.layer_ms),
        method=method,
    )
    settings = PlanSettings(
        expert_dtype=expert_dtype, dense_dtype=dense_dtype, kv_dtype=kv_dtype, context=int(context),
        batch=int(batch), policy=policy, prior_tokens=float(prior_tokens), window=int(window),
        miss_path=miss_path, num_moe_layers=L, num_experts=E, top_k=k,
        moe_layers=tuple(config.moe_layers), expert_size=eb,
        dense_bytes_per_token=cost.dense_bytes, prior_source=prior_source, locality_source=locality_source,
        embeddings_on_host=embeddings_on_host,
    )
    return Plan(fingerprint=fp, model=config.describe(), gpu=gpu, host=host, settings=settings, budget=budget,
                layers=layers, predicted=predicted, notes=notes)


def _check_host_embeddings(config: NemotronHConfig, gpu: GpuSpec) -> None:
    """Refuse a host embedding table where it cannot help: tied embeddings or unified memory."""
    if config.tie_word_embeddings:
        raise ConfigError(
            "this model ties its word embeddings to lm_head (tie_word_embeddings), which reads the whole table "
            "every token: the table must stay on the device; plan with --embeddings device (or auto)"
        )
    if gpu.unified_memory:
        raise ConfigError(
            f"{gpu.name} has unified memory: host and GPU share one pool, so keeping the embedding table "
            "'on the host' frees nothing; plan with --embeddings device (or auto)"
        )


def choose_embeddings(config: NemotronHConfig, gpu: GpuSpec, breakdown_for: Any, total_experts: int,
                      choice: str = "auto") -> tuple[bool, str]:
    """Where the embedding table lives: (in host memory, a note saying why, or '' for nothing to say).

    'auto' keeps it on the device on unified memory (one pool: moving it frees nothing), for tied
    embeddings (lm_head reads the whole table every token) and when every expert fits on the device
    with it (nothing to gain, and no per-token row copy); otherwise, on a discrete GPU that offloads
    experts, it goes to host memory: that frees the table's bytes (1 GiB for Super) for expert slots
    at the cost of one row (hidden x 2 bytes, 8 KiB) copied to the device per token.
    ``breakdown_for(on_host)`` is the :class:`MemoryBreakdown` of either choice.
    """
    table = format_bytes(embedding_table_bytes(config))
    if choice == "device":
        return False, ""
    if choice == "host":
        _check_host_embeddings(config, gpu)
        return True, f"embedding table ({table}) in host memory as asked; each token copies its row to the device"
    if gpu.unified_memory or config.tie_word_embeddings:
        return False, ""
    try:
        on_device = breakdown_for(False).expert_slots
    except BudgetError:  # the table does not even fit on the device: it must go to the host
        on_device = None
    if on_device is not None and on_device >= total_experts:
        return False, ""
    host = breakdown_for(True)
    gain = "room for the fixed part" if on_device is None else f"{host.expert_slots - on_device} more expert slots"
    return True, (f"embedding table ({table}) kept in host memory: {gain} on the device, one "
                  f"{format_bytes(2 * config.hidden_size)} row copied per token (--embeddings device keeps it there)")


def _weight_formats(config: NemotronHConfig, expert_dtype: str | None,
                    dense_dtype: str | None) -> tuple[str, str, list[str]]:
    """Expert and non-expert formats to plan with: the ones asked for, else the attached quantization
    scheme's (a checkpoint's or a preset's: its expert format and ``mixed``), else NVFP4 experts and
    BF16 dense weights; and notes saying where the per-module formats came from."""
    scheme = config.quantization
    if scheme is None:
        return expert_dtype or "nvfp4", dense_dtype or "bf16", []
    dense = [(name, group, n, k) for name, group, n, k in config.dense_linears() if name != "lm_head"]
    quantized: dict[str, int] = {}
    for name, _, _, _ in dense:
        spec = scheme.spec_of(name)
        if spec is not None:
            quantized[spec.format] = quantized.get(spec.format, 0) + 1
    expert_dtype = expert_dtype or config.expert_format
    dense_dtype = dense_dtype or ("mixed" if quantized else "bf16")
    formats = ", ".join(f"{n} {f}" for f, n in sorted(quantized.items())) or "none"
    notes = [f"weights: {scheme.describe()} from {scheme.source}; experts {config.expert_format}, quantized dense "
             f"modules: {formats} of {len(dense)}" + (" (counted in their formats: --dense-dtype mixed)"
                                                       if dense_dtype == "mixed" else "")]
    derivation = getattr(scheme, "derivation", "")
    if derivation:
        notes.append(f"module list: {derivation}")
    if dense_dtype == "mixed" and scheme.spec_of("lm_head") is not None:
        notes.append("lm_head is quantized in the checkpoint but dequantized at load: counted in bf16")
    return expert_dtype, dense_dtype, notes


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

