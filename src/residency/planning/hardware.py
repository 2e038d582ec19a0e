"""Target hardware: GPU and host specs, a catalog of devices, name lookup, custom specs and local detection.

The planner works for a GPU you do not own, so every figure it uses comes from a :class:`GpuSpec`
and a :class:`HostSpec`. Catalog figures carry a source note per value, one of

- ``spec``: vendor datasheet figure;
- ``measured``: a published or local measurement (copy rates, usable memory);
- ``derived``: arithmetic from other figures (the note says how);
- ``unverified``: a recalled or secondary figure; re-check before relying on it;
- ``user``: given by the user (custom spec file, command-line override, ``residency calibrate``).

Capacities: GDDR and HBM parts are sold in binary sizes, so a "24 GB" card is read as 24 GiB.
Bandwidths are decimal GB/s (1e9 bytes per second) as datasheets quote them.

Local detection (:func:`detect_local`) reads NVML, torch and psutil and handles two known quirks:
GB10 (DGX Spark) and Jetson Thor report ``NVML_ERROR_NOT_SUPPORTED`` for memory info because the
GPU shares host DRAM, so the budget comes from host memory figures; and the current PCIe link
generation drops to Gen1 when the GPU idles, so the link estimate uses the maximum negotiated
generation and width instead.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ResidencyError

__all__ = [
    "SOURCE_KINDS",
    "GiB",
    "GpuSpec",
    "HostSpec",
    "Detection",
    "HardwareError",
    "CATALOG",
    "DEFAULT_HOST",
    "find_gpu",
    "lookup_gpu",
    "load_gpu_spec",
    "save_gpu_spec",
    "detect_local",
    "pcie_practical_gbps",
]

GiB = 1 << 30
SOURCE_KINDS = ("spec", "measured", "derived", "unverified", "user")
GPU_SPEC_FORMAT_VERSION = 1


class HardwareError(ResidencyError, ValueError):
    """An unknown GPU name, a malformed custom spec, or a detection failure."""


def _check_sources(owner: str, sources: Mapping[str, str], fields: set[str]) -> None:
    for name, note in sources.items():
        if name not in fields:
            raise HardwareError(f"{owner}: source note for unknown field {name!r}")
        kind = note.split(":", 1)[0].strip()
        if kind not in SOURCE_KINDS:
            raise HardwareError(f"{owner}: source of {name!r} must start with one of {SOURCE_KINDS}, got {note!r}")


@dataclass(frozen=True)
class HostSpec:
    """The machine around the GPU: RAM for the host expert tier, CPU bandwidth for CPU-computed misses, disk.

    ``cpu_bw_gbps`` is the DRAM read rate a CPU expert kernel reaches (a decode-time expert is a
    matrix-vector product, so it is bandwidth-bound); ``disk_gbps`` the random-read rate of the
    disk tier; ``reserve_bytes`` the RAM kept free for the OS and the process (default: the larger
    of 8 GiB and 10 % of RAM); ``cpu_overhead_us`` the fixed cost of one layer's CPU call
    (activations to the host and back, thread wake-up).
    """

    name: str = "generic host"
    memory_bytes: int = 128 * GiB
    cpu_bw_gbps: float = 60.0
    disk_gbps: float = 5.0
    cpu_cores: int | None = None
    reserve_bytes: int | None = None
    cpu_overhead_us: float = 30.0
    sources: Mapping[str, str] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        for name in ("memory_bytes", "cpu_bw_gbps", "disk_gbps"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise HardwareError(f"host {self.name!r}: {name} must be a positive number, got {value!r}")
        _check_sources(f"host {self.name!r}", self.sources, {f.name for f in dataclasses.fields(self)})

    @property
    def usable_bytes(self) -> int:
        """RAM available to the host expert tier after the OS / process reserve."""
        reserve = self.reserve_bytes if self.reserve_bytes is not None else max(8 * GiB, self.memory_bytes // 10)
        return max(0, int(self.memory_bytes) - int(reserve))

    def replace(self, note: str = "user: override", **changes: Any) -> HostSpec:
        """A copy with ``changes``; each changed figure's source becomes ``note``."""
        sources = dict(self.sources)
        sources.update({k: note for k in changes if k not in ("name", "sources")})
        return dataclasses.replace(self, sources=sources, **changes)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["sources"] = dict(self.sources)
        return out

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], source: str = "host spec") -> HostSpec:
        return _build(cls, raw, source)


DEFAULT_HOST = HostSpec(
    name="generic host",
    memory_bytes=128 * GiB,
    cpu_bw_gbps=60.0,
    disk_gbps=5.0,
    sources={
        "memory_bytes": "user: default assumption (128 GiB); pass --host-memory",
        "cpu_bw_gbps": "derived: dual-channel DDR5-5600 peaks near 90 GB/s; a CPU expert kernel is assumed to "
        "reach two thirds (50-100 GB/s is the usual DDR5 range); run on the host to measure",
        "disk_gbps": "unverified: PCIe 4.0 NVMe random read, about 5 GB/s",
        "cpu_overhead_us": "unverified: activation round trip and thread wake-up per layer",
    },
)


@dataclass(frozen=True)
class GpuSpec:
    """One target GPU.

    - ``memory_bytes``: device memory; ``usable_memory_bytes``: what the device can actually hand
      out when that is less (GB10: the OS's MemTotal of the shared DRAM).
    - ``mem_bw_gbps``: peak device-memory bandwidth; ``h2d_gbps``: practical pinned host→device copy
      rate of one stream (None on unified memory, where there is no copy to make).
    - ``unified_memory``: GPU and CPU share one DRAM pool (DGX Spark, Jetson Thor): the planner keeps
      exactly one copy of every expert and never streams host→device; the next tier is disk.
    - ``host``: the host built into integrated systems (Spark, Thor, GH200); None for add-in cards.
    - ``context_bytes``: device memory the CUDA context takes, when measured (``residency calibrate``).
    """

    name: str
    memory_bytes: int
    mem_bw_gbps: float
    h2d_gbps: float | None
    link: str
    unified_memory: bool
    compute_capability: tuple[int, int]
    fp8: bool
    fp4: bool
    bf16_tflops: float | None = None
    usable_memory_bytes: int | None = None
    context_bytes: int | None = None
    aliases: tuple[str, ...] = ()
    host: HostSpec | None = None
    notes: str = ""
    sources: Mapping[str, str] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if not self.name:
            raise HardwareError("a GPU spec needs a name")
        if not isinstance(self.memory_bytes, int) or self.memory_bytes <= 0:
            raise HardwareError(f"GPU {self.name!r}: memory_bytes must be a positive integer")
        if not self.mem_bw_gbps or self.mem_bw_gbps <= 0:
            raise HardwareError(f"GPU {self.name!r}: mem_bw_gbps must be positive")
        if not self.unified_memory and (self.h2d_gbps is None or self.h2d_gbps <= 0):
            raise HardwareError(
                f"GPU {self.name!r}: a discrete GPU needs a positive h2d_gbps (host->device copy rate, GB/s)"
            )
        cc = tuple(self.compute_capability)
        if len(cc) != 2 or not all(isinstance(x, int) for x in cc):
            raise HardwareError(f"GPU {self.name!r}: compute_capability must be (major, minor)")
        object.__setattr__(self, "compute_capability", cc)
        object.__setattr__(self, "aliases", tuple(self.aliases))
        _check_sources(f"GPU {self.name!r}", self.sources, {f.name for f in dataclasses.fields(self)})

    @property
    def usable_bytes(self) -> int:
        """Device memory the planner may budget before reserves."""
        return int(self.usable_memory_bytes if self.usable_memory_bytes is not None else self.memory_bytes)

    def source_of(self, name: str) -> str:
        """The provenance note of one figure ('' if none is recorded)."""
        return self.sources.get(name, "")

    def replace(self, note: str = "user: override", **changes: Any) -> GpuSpec:
        """A copy with ``changes``; each changed figure's source becomes ``note``."""
        sources = dict(self.sources)
        sources.update({k: note for k in changes if k not in ("name", "sources", "aliases", "notes")})
        return dataclasses.replace(self, sources=sources, **changes)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "host":
                value = value.to_dict() if value is not None else None
            elif f.name in ("compute_capability", "aliases"):
                value = list(value)
            elif f.name == "sources":
                value = dict(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], source: str = "GPU spec") -> GpuSpec:
        return _build(cls, raw, source)

    def describe(self) -> str:
        link = "unified memory" if self.unified_memory else f"{self.link}, ~{self.h2d_gbps:g} GB/s H2D"
        return (
            f"{self.name}: {self.usable_bytes / GiB:.1f} GiB, {self.mem_bw_gbps:g} GB/s, {link}, "
            f"sm_{self.compute_capability[0]}{self.compute_capability[1]}"
        )


def _build(cls: type, raw: Mapping[str, Any], source: str) -> Any:
    """Construct a spec dataclass from a dict, converting size strings and refusing unknown keys."""
    from .memory import parse_size  # local import: memory imports this module

    if not isinstance(raw, Mapping):
        raise HardwareError(f"{source}: expected a JSON object")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise HardwareError(f"{source}: unknown field(s) {unknown}; known fields are {sorted(names)}")
    values = dict(raw)
    for key in ("memory_bytes", "usable_memory_bytes", "context_bytes", "reserve_bytes"):
        if isinstance(values.get(key), str):
            values[key] = parse_size(values[key])
        elif isinstance(values.get(key), float) and float(values[key]).is_integer():
            values[key] = int(values[key])
    if "compute_capability" in values:
        cc = values["compute_capability"]
        try:
            parts = str(cc).split(".") if isinstance(cc, (str, float)) else cc
            values["compute_capability"] = tuple(int(x) for x in parts)
        except (TypeError, ValueError) as exc:
            raise HardwareError(f"{source}: compute_capability must be like [8, 9] or '8.9'") from exc
    if isinstance(values.get("host"), Mapping):
        values["host"] = HostSpec.from_dict(values["host"], f"{source} (host)")
    if "aliases" in values:
        values["aliases"] = tuple(values["aliases"])
    try:
        return cls(**values)
    except TypeError as exc:
        raise HardwareError(f"{source}: {exc}") from exc


# ---------------------------------------------------------------------- catalog

_PCIE4 = "derived: PCIe 4.0 x16 pinned copies measure about 25 GB/s (25.1 GB/s on an A100, 512 MiB-1 GiB buffers)"
_PCIE5 = "unverified: about 50-55 GB/s expected from PCIe 5.0 x16 copy engines; not measured on this part"
_BIN = "spec: datasheet capacity; GDDR/HBM capacities are binary, read as GiB"


def _gpu(
    name: str,
    mem_gib: float,
    bw: float,
    h2d: float | None,
    link: str,
    cc: tuple[int, int],
    fp8: bool,
    fp4: bool,
    tflops: float | None,
    aliases: tuple[str, ...],
    sources: dict[str, str],
    **extra: Any,
) -> GpuSpec:
    base = {
        "memory_bytes": _BIN,
        "mem_bw_gbps": "spec: datasheet",
        "compute_capability": "spec: CUDA compute capability",
        "fp8": "spec: tensor-core formats",
        "fp4": "spec: tensor-core formats",
        "bf16_tflops": "spec: dense, no sparsity",
    }
    if h2d is None:
        base["h2d_gbps"] = "spec: unified memory, no host-to-device copy"
    base.update(sources)
    return GpuSpec(
        name=name, memory_bytes=int(mem_gib * GiB), mem_bw_gbps=bw, h2d_gbps=h2d, link=link,
        unified_memory=extra.pop("unified_memory", False), compute_capability=cc, fp8=fp8, fp4=fp4,
        bf16_tflops=tflops, aliases=aliases, sources=base, **extra,
    )


_GRACE = HostSpec(
    name="Grace (72 Neoverse V2 cores, LPDDR5X)",
    memory_bytes=480 * GiB,
    cpu_bw_gbps=410.0,
    disk_gbps=5.0,
    cpu_cores=72,
    sources={
        "memory_bytes": "spec: up to 480 GB LPDDR5X",
        "cpu_bw_gbps": "derived: 80 % of the <=512 GB/s LPDDR5X spec; not measured",
        "disk_gbps": "unverified: default NVMe figure",
        "cpu_cores": "spec",
    },
)

_SPARK_HOST = HostSpec(
    name="DGX Spark (GB10, shared LPDDR5x)",
    memory_bytes=int(121.7 * GiB),
    cpu_bw_gbps=100.0,
    disk_gbps=5.6,
    cpu_cores=20,
    sources={
        "memory_bytes": "measured: Linux MemTotal about 121.7 GiB of the 128 GB pool",
        "cpu_bw_gbps": "unverified: not used on unified memory (the GPU reads host DRAM directly)",
        "disk_gbps": "measured: NVMe random read 5.6 GB/s on one unit (10.7 GB/s on another)",
        "cpu_cores": "spec: 10 Cortex-X925 + 10 Cortex-A725",
    },
)

_THOR_HOST = HostSpec(
    name="Jetson AGX Thor (shared LPDDR5X)",
    memory_bytes=128 * GiB,
    cpu_bw_gbps=100.0,
    disk_gbps=5.0,
    sources={
        "memory_bytes": "spec: 128 GB LPDDR5X unified; usable share not measured",
        "cpu_bw_gbps": "unverified: not used on unified memory",
        "disk_gbps": "unverified: default NVMe figure",
    },
)

CATALOG: tuple[GpuSpec, ...] = (
    _gpu("RTX 3090", 24, 936, 25.0, "PCIe 4.0 x16", (8, 6), False, False, 71,
         ("rtx3090", "geforce rtx 3090", "3090"),
         {"h2d_gbps": _PCIE4, "bf16_tflops": "unverified: FP32-accumulate rate"}),
    _gpu("RTX 4090", 24, 1008, 25.0, "PCIe 4.0 x16", (8, 9), True, False, 165,
         ("rtx4090", "geforce rtx 4090", "4090"),
         {"h2d_gbps": "measured: about 25.7 GB/s in a host-staged copy test", "bf16_tflops":
          "unverified: FP32-accumulate rate"}),
    _gpu("RTX 5090", 32, 1792, 56.3, "PCIe 5.0 x16", (12, 0), True, True, 209,
         ("rtx5090", "geforce rtx 5090", "5090"),
         {"h2d_gbps": "measured: 56.3 GB/s H2D with copy engines (nvbandwidth)",
          "bf16_tflops": "derived: 838 TFLOPS sparse FP16-accumulate, halved for dense, halved for FP32 accumulate"}),
    _gpu("RTX 6000 Ada", 48, 960, 25.0, "PCIe 4.0 x16", (8, 9), True, False, 364,
         ("rtx6000ada", "rtx 6000 ada generation", "6000 ada"),
         {"h2d_gbps": _PCIE4, "bf16_tflops": "unverified"}),
    _gpu("RTX PRO 6000 Blackwell", 96, 1792, 55.0, "PCIe 5.0 x16", (12, 0), True, True, 500,
         ("rtxpro6000", "rtx pro 6000", "rtx pro 6000 blackwell workstation edition",
          "rtx pro 6000 blackwell server edition", "rtx pro 6000 blackwell max-q workstation edition", "pro6000"),
         {"h2d_gbps": "derived: same PCIe 5.0 x16 link as the RTX 5090 (56.3 GB/s measured there)",
          "bf16_tflops": "derived: from the FP4 rating with the usual FP4->FP8->BF16 halving"}),
    _gpu("L4", 24, 300, 25.0, "PCIe 4.0 x16", (8, 9), True, False, 121, ("l4", "nvidia l4"),
         {"h2d_gbps": _PCIE4}),
    _gpu("L40S", 48, 864, 25.0, "PCIe 4.0 x16", (8, 9), True, False, 362, ("l40s", "nvidia l40s"),
         {"h2d_gbps": _PCIE4}),
    _gpu("A10G", 24, 600, 20.0, "PCIe 4.0 x16", (8, 6), False, False, 70, ("a10g", "nvidia a10g"),
         {"h2d_gbps": "measured: 19.7 GB/s naive single-stream copy on an A10 (same board class)",
          "bf16_tflops": "unverified: A10G is clocked below the A10 (125)"}),
    _gpu("A100 40GB", 40, 1555, 25.1, "PCIe 4.0 x16", (8, 0), False, False, 312,
         ("a100 40gb", "a100-pcie-40gb", "a100-sxm4-40gb", "a100 40gb pcie", "a100 40gb sxm"),
         {"h2d_gbps": "measured: 25.1 GB/s pinned copies, 512 MiB-1 GiB buffers (16.5 GB/s at 20 GiB buffers)"}),
    _gpu("A100 80GB PCIe", 80, 1935, 25.1, "PCIe 4.0 x16", (8, 0), False, False, 312,
         ("a100 80gb pcie", "a100-pcie-80gb", "a100 pcie 80gb"),
         {"h2d_gbps": "measured: 25.1 GB/s pinned copies on an A100, 512 MiB-1 GiB buffers"}),
    _gpu("A100 80GB SXM", 80, 2039, 25.1, "PCIe 4.0 x16", (8, 0), False, False, 312,
         ("a100 80gb sxm", "a100-sxm4-80gb", "a100 sxm 80gb", "a100 sxm"),
         {"h2d_gbps": "measured: 25.1 GB/s pinned copies on an A100, 512 MiB-1 GiB buffers"}),
    _gpu("H100 PCIe", 80, 2000, 50.0, "PCIe 5.0 x16", (9, 0), True, False, 756,
         ("h100 pcie", "h100-pcie", "h100 pcie 80gb", "h100 80gb pcie"),
         {"h2d_gbps": _PCIE5}),
    _gpu("H100 SXM", 80, 3350, 50.0, "PCIe 5.0 x16", (9, 0), True, False, 989,
         ("h100 sxm", "h100 sxm5", "h100 80gb hbm3", "h100-sxm5-80gb"),
         {"h2d_gbps": _PCIE5 + "; SM-kernel copies measured 35 GB/s, so use copy engines"}),
    _gpu("H200", 141, 4800, 50.0, "PCIe 5.0 x16", (9, 0), True, False, 989, ("h200", "h200 sxm", "h200 nvl"),
         {"h2d_gbps": _PCIE5}),
    _gpu("B200", 180, 7700, 50.0, "PCIe 5.0 x16", (10, 0), True, True, 2250, ("b200", "hgx b200"),
         {"h2d_gbps": _PCIE5}),
    _gpu("GH200", 96, 4000, 346.0, "NVLink-C2C", (9, 0), True, False, 989,
         ("gh200", "gh200 96gb", "gh200 480gb", "grace hopper"),
         {"h2d_gbps": "measured: 346 GB/s H2D over NVLink-C2C with copy engines (nvbandwidth)",
          "memory_bytes": "spec: first GH200 version, 96 GB HBM3 (read as GiB)"},
         host=_GRACE, notes="The GPU reads Grace memory coherently: zero-copy reads are an alternative to copies."),
    _gpu("GH200 144GB", 144, 4900, 346.0, "NVLink-C2C", (9, 0), True, False, 989, ("gh200 144gb",),
         {"h2d_gbps": "measured: 346 GB/s H2D over NVLink-C2C with copy engines (nvbandwidth)",
          "memory_bytes": "spec: HBM3e version shipped as 144 GB (read as GiB)",
          "mem_bw_gbps": "spec: about 4.9 TB/s"},
         host=_GRACE),
    _gpu("DGX Spark", 128, 273, None, "unified (C2C)", (12, 1), True, True, None,
         ("dgx spark", "spark", "gb10", "nvidia gb10", "dgxspark"),
         {"memory_bytes": "spec: 128 GB LPDDR5x shared by CPU and GPU",
          "usable_memory_bytes": "measured: Linux MemTotal about 121.7 GiB",
          "mem_bw_gbps": "spec: 273 GB/s; a saturating GPU read kernel measured 231-234 GB/s",
          "bf16_tflops": "unverified: not published"},
         unified_memory=True, usable_memory_bytes=int(121.7 * GiB), host=_SPARK_HOST,
         notes="NVML memory info is unsupported on GB10; budget from host memory (/proc/meminfo)."),
    _gpu("Jetson AGX Thor", 128, 273, None, "unified", (11, 0), True, True, None,
         ("thor", "jetson thor", "agx thor", "jetson agx thor", "t5000"),
         {"memory_bytes": "spec: 128 GB LPDDR5X shared by CPU and GPU",
          "compute_capability": "spec: sm_110 with CUDA >= 13 (reported as 10.1 on CUDA <= 12.9)",
          "bf16_tflops": "unverified: not published"},
         unified_memory=True, host=_THOR_HOST),
)


def _norm(name: str) -> str:
    s = name.lower()
    for word in ("nvidia", "geforce", "generation"):
        s = s.replace(word, "")
    return re.sub(r"[^a-z0-9]", "", s)


def _keys(spec: GpuSpec) -> set[str]:
    return {_norm(spec.name)} | {_norm(a) for a in spec.aliases}


def find_gpu(name: str, catalog: tuple[GpuSpec, ...] = CATALOG) -> GpuSpec | None:
    """Catalog entry for ``name`` or None. Accepts catalog names, aliases and NVML device names.

    Matching, in order: exact (case, spaces, dashes and the words NVIDIA/GeForce ignored); a
    query that is part of exactly one entry's name or alias ("4090", "spark"); the longest alias
    contained in the query (long NVML names such as "NVIDIA RTX PRO 6000 Blackwell Workstation
    Edition"). Ambiguous or unknown names return None; :func:`lookup_gpu` explains why.
    """
    return _match(name, catalog)[0]


def _match(name: str, catalog: tuple[GpuSpec, ...]) -> tuple[GpuSpec | None, list[GpuSpec]]:
    q = _norm(name)
    if not q:
        return None, []
    exact = [g for g in catalog if q in _keys(g)]
    if len(exact) == 1:
        return exact[0], exact
    partial = [g for g in catalog if any(q in k for k in _keys(g))]
    if len(partial) == 1:
        return partial[0], partial
    contained = [(len(k), g) for g in catalog for k in _keys(g) if len(k) >= 3 and k in q]
    if contained:
        best = max(n for n, _ in contained)
        winners = list(dict.fromkeys(g for n, g in contained if n == best))
        if len(winners) == 1:
            return winners[0], winners
    return None, partial


def lookup_gpu(name: str, catalog: tuple[GpuSpec, ...] = CATALOG) -> GpuSpec:
    """Like :func:`find_gpu` but raises :class:`HardwareError` naming candidates or close matches."""
    spec, candidates = _match(name, catalog)
    if spec is not None:
        return spec
    if len(candidates) > 1:
        names = ", ".join(repr(g.name) for g in candidates)
        raise HardwareError(f"GPU name {name!r} is ambiguous: it matches {names}; give the full name")
    by_key = {k: g.name for g in catalog for k in _keys(g)}
    close = difflib.get_close_matches(_norm(name), list(by_key), n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(by_key[c]) for c in dict.fromkeys(close))}?" if close else ""
    raise HardwareError(
        f"unknown GPU {name!r}.{hint} Run `residency gpus` for the catalog, or describe the GPU with "
        "--gpu-spec FILE (see `residency calibrate`) or --vram/--mem-bw/--h2d."
    )


# ---------------------------------------------------------------------- custom spec files


def load_gpu_spec(path: str | Path) -> GpuSpec:
    """Read a custom GPU spec from JSON.

    Either a full spec (every required field) or ``{"base": "RTX 4090", ...}`` overriding some
    figures of a catalog entry. Sizes may be strings ("23.5GiB"). Figures without a source note
    are marked ``user``. A ``host`` object describes the host too.
    """
    path = Path(path)
    if not path.is_file():
        raise HardwareError(f"{path}: no such GPU spec file")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise HardwareError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(raw, dict):
        raise HardwareError(f"{path}: expected a JSON object")
    raw = dict(raw)
    if raw.pop("kind", "gpu_spec") != "gpu_spec":
        raise HardwareError(f"{path}: not a GPU spec file (kind must be 'gpu_spec')")
    version = raw.pop("format_version", GPU_SPEC_FORMAT_VERSION)
    if not isinstance(version, int) or version > GPU_SPEC_FORMAT_VERSION:
        raise HardwareError(f"{path}: GPU spec format {version!r} is newer than this residency reads; upgrade")
    base_name = raw.pop("base", None)
    sources = dict(raw.pop("sources", {}))
    given = [k for k in raw if k not in ("name", "aliases", "notes", "host", "link", "unified_memory")]
    if base_name is not None:
        base = lookup_gpu(str(base_name)).to_dict()
        sources = {**base["sources"], **{k: f"user: {path.name}" for k in given}, **sources}
        base.update(raw)
        raw = base
    for key in given:
        sources.setdefault(key, f"user: {path.name}")
    raw["sources"] = sources
    return GpuSpec.from_dict(raw, source=str(path))


def save_gpu_spec(path: str | Path, spec: GpuSpec) -> Path:
    """Write ``spec`` as a custom GPU spec file (atomic)."""
    from ..files import save_json

    obj = {"kind": "gpu_spec", "format_version": GPU_SPEC_FORMAT_VERSION, **spec.to_dict()}
    return save_json(path, obj)


# ---------------------------------------------------------------------- detection

# GB/s per lane per direction after line coding, by PCIe generation.
_PCIE_LANE_GBPS = {1: 0.25, 2: 0.5, 3: 0.985, 4: 1.969, 5: 3.938, 6: 7.563}
# Practical pinned H2D rate as a share of the rated link: 25.1 of 31.5 GB/s on Gen4, 56.3 of 63 on Gen5.
_PCIE_PRACTICAL = 0.8
_INTEGRATED_TAGS = ("gb10", "thor", "orin", "jetson", "tegra")


def pcie_practical_gbps(generation: int, width: int) -> float:
    """Expected pinned H2D copy rate of a PCIe link (derived: 80 % of the rated per-direction rate)."""
    return _PCIE_LANE_GBPS.get(int(generation), 0.0) * int(width) * _PCIE_PRACTICAL


@dataclass(frozen=True)
class Detection:
    """What :func:`detect_local` found: the GPU (None without one), the host, free memory and notes."""

    gpu: GpuSpec | None
    host: HostSpec
    free_bytes: int | None
    notes: tuple[str, ...]

    def describe(self) -> str:
        lines = [self.gpu.describe() if self.gpu else "no NVIDIA GPU detected"]
        lines.append(f"host: {self.host.memory_bytes / GiB:.1f} GiB RAM, {self.host.cpu_cores or '?'} cores")
        if self.free_bytes is not None:
            lines.append(f"free device memory now: {self.free_bytes / GiB:.2f} GiB")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def detect_local(
    index: int = 0,
    *,
    nvml: Any = None,
    torch_module: Any = None,
    psutil_module: Any = None,
) -> Detection:
    """Describe this machine's GPU ``index`` and host from NVML, torch and psutil.

    The modules can be injected (tests pass fakes). Discrete GPUs: memory from NVML, host link from
    the *maximum* negotiated PCIe generation and width (the current link drops to Gen1 at idle),
    capped by the catalog figure. Unified-memory parts (GB10, Thor): NVML memory info is
    unsupported or equals host RAM, so memory comes from the host (MemTotal, MemAvailable) and the
    PCIe figures (a fake Gen1 x1 on GB10) are ignored.
    """
    notes: list[str] = []
    if psutil_module is None:
        import psutil as psutil_module
    vm = psutil_module.virtual_memory()
    cores = psutil_module.cpu_count(logical=False)
    host = DEFAULT_HOST.replace(
        note="measured: psutil on this machine", name="this machine", memory_bytes=int(vm.total),
        cpu_cores=cores,
    )
    if nvml is None:
        try:
            import pynvml as nvml
        except ImportError:
            return Detection(None, host, None, ("nvidia-ml-py is not installed; no GPU detection",))
    nvml_error = getattr(nvml, "NVMLError", Exception)

    def call(fn: str, *args: Any) -> Any:
        try:
            return getattr(nvml, fn)(*args)
        except (nvml_error, AttributeError):
            return None

    try:
        nvml.nvmlInit()
    except nvml_error as exc:
        return Detection(None, host, None, (f"NVML unavailable ({exc}); no NVIDIA driver or GPU",))
    try:
        count = call("nvmlDeviceGetCount") or 0
        if index >= count:
            return Detection(None, host, None, (f"GPU index {index} not present ({count} GPU(s) found)",))
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        name = _text(call("nvmlDeviceGetName", handle) or f"GPU {index}")
        base = find_gpu(name)
        cc = call("nvmlDeviceGetCudaComputeCapability", handle)
        cc = tuple(int(x) for x in cc) if cc else (base.compute_capability if base else (0, 0))
        mem = call("nvmlDeviceGetMemoryInfo", handle)
        integrated = any(tag in name.lower() for tag in _INTEGRATED_TAGS) or _torch_integrated(torch_module, index)
        unified = integrated and (mem is None or int(mem.total) >= 0.9 * int(vm.total))
        sources: dict[str, str] = {}
        if unified:
            total, free = int(vm.total), int(vm.available)
            notes.append(
                f"{name}: unified memory; "
                + ("NVML memory info is not supported, " if mem is None else "NVML reports host-sized memory, ")
                + "so the budget comes from host memory (MemTotal / MemAvailable); PCIe link figures are ignored"
            )
            sources["usable_memory_bytes"] = "measured: host MemTotal (psutil)"
            h2d, link = None, "unified"
        else:
            if mem is None:
                notes.append(
                    f"{name}: NVML memory info unsupported on a discrete GPU (MIG slice, vGPU or driver mismatch?); "
                    "falling back to torch.cuda.mem_get_info"
                )
                total, free = _torch_mem(torch_module, index) or (base.memory_bytes if base else 0, None)
            else:
                total, free = int(mem.total), int(mem.free)
            sources["usable_memory_bytes"] = "measured: NVML memory total"
            gen = call("nvmlDeviceGetMaxPcieLinkGeneration", handle)
            width = call("nvmlDeviceGetMaxPcieLinkWidth", handle)
            link = base.link if base else "PCIe"
            h2d = base.h2d_gbps if base else None
            if gen and width:
                practical = pcie_practical_gbps(gen, width)
                link = f"PCIe {gen}.0 x{width}"
                notes.append(
                    f"host link from the maximum negotiated PCIe Gen{gen} x{width} (~{practical:.1f} GB/s practical); "
                    "the current link generation drops when idle and is not used"
                )
                if h2d is None or practical < h2d:
                    h2d = practical
                    sources["h2d_gbps"] = f"derived: 80 % of rated PCIe Gen{gen} x{width} (NVML maximum link)"
            if h2d is None:
                h2d = 25.0
                sources["h2d_gbps"] = "unverified: PCIe link unknown; assumed Gen4 x16; run `residency calibrate`"
        bw = base.mem_bw_gbps if base else _nvml_bandwidth(call, nvml, handle)
        if not total:
            raise HardwareError(f"{name}: could not read the device memory size; pass --vram")
        if base is not None:
            spec = dataclasses.replace(
                base, usable_memory_bytes=total, h2d_gbps=h2d, link=link, sources={**base.sources, **sources}
            )
        else:
            notes.append(f"{name} is not in the catalog; figures come from NVML and are rough")
            spec = GpuSpec(
                name=name, memory_bytes=total, mem_bw_gbps=bw or 500.0, h2d_gbps=h2d, link=link,
                unified_memory=unified, compute_capability=cc, fp8=cc >= (8, 9), fp4=cc[0] >= 10,
                sources={
                    "memory_bytes": "measured: local detection",
                    "mem_bw_gbps": "derived: 2 x max memory clock x bus width" if bw else "unverified: placeholder",
                    "fp8": "derived: compute capability >= 8.9", "fp4": "derived: compute capability >= 10.0",
                    **sources,
                },
            )
            if unified:
                spec = dataclasses.replace(spec, host=host)
        if unified and base is not None and base.host is not None:
            host = base.host.replace(note="measured: psutil on this machine", memory_bytes=int(vm.total))
        return Detection(spec, host, free, tuple(notes))
    finally:
        call("nvmlShutdown")


def _nvml_bandwidth(call: Any, nvml: Any, handle: Any) -> float | None:
    width = call("nvmlDeviceGetMemoryBusWidth", handle)
    clock = call("nvmlDeviceGetMaxClockInfo", handle, getattr(nvml, "NVML_CLOCK_MEM", 2))
    if width and clock:
        return 2.0 * float(clock) * 1e6 * float(width) / 8 / 1e9
    return None


def _torch_integrated(torch_module: Any, index: int) -> bool:
    try:
        if torch_module is None:
            import torch as torch_module
        if not torch_module.cuda.is_available():
            return False
        return bool(getattr(torch_module.cuda.get_device_properties(index), "is_integrated", False))
    except Exception:  # detection must never fail because torch lacks CUDA
        return False


def _torch_mem(torch_module: Any, index: int) -> tuple[int, int] | None:
    try:
        if torch_module is None:
            import torch as torch_module
        free, total = torch_module.cuda.mem_get_info(index)
        return int(total), int(free)
    except Exception:  # no CUDA torch: caller falls back to the catalog
        return None
