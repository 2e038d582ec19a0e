"""Target hardware: GPU and host specs, the catalog of known devices, name lookup and custom spec files.

The planner works for a GPU you do not own, so every figure it uses comes from a :class:`GpuSpec`
and a :class:`HostSpec`. Catalog figures carry a source note per value, one of

- ``spec``: vendor datasheet figure;
- ``measured``: a published or local measurement (copy rates, usable memory);
- ``derived``: arithmetic from other figures (the note says how);
- ``unverified``: a recalled or secondary figure; re-check before relying on it;
- ``user``: given by the user (custom spec file, command-line override, ``residency calibrate``).

The catalog itself is data: ``residency/data/gpus.json`` (figures, aliases and source notes), read
once at import. Capacities: GDDR and HBM parts are sold in binary sizes, so a "24 GB" card is read
as 24 GiB. Bandwidths are decimal GB/s (1e9 bytes per second) as datasheets quote them. Sizes in
the catalog and in spec files are read by :func:`residency.sizes.parse_size`.

Local detection lives in :mod:`residency.planning.detect`, measurement in
:mod:`residency.planning.calibrate`; both build on this module, which imports neither.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.resources
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ResidencyError, SizeError
from ..files import guess_kind, save_json, sniff_kind, wrong_kind_message
from ..sizes import GiB, parse_size

__all__ = [
    "SOURCE_KINDS",
    "GiB",
    "GpuSpec",
    "HostSpec",
    "HardwareError",
    "CATALOG",
    "DEFAULT_HOST",
    "load_catalog",
    "find_gpu",
    "lookup_gpu",
    "load_gpu_spec",
    "save_gpu_spec",
]

SOURCE_KINDS = ("spec", "measured", "derived", "unverified", "user")
GPU_SPEC_FORMAT_VERSION = 1
CATALOG_FORMAT_VERSION = 1


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


_SIZE_FIELDS = ("memory_bytes", "usable_memory_bytes", "context_bytes", "reserve_bytes")
#: What each spec field holds, by its annotation: (accepted types, words for the message).
_NUMBER = ((int, float), "a number")
_FIELD_TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    "str": ((str,), "a string"),
    "int": ((int,), "an integer"),
    "float": _NUMBER,
    "bool": ((bool,), "true or false"),
    "int | None": ((int, type(None)), "an integer or null"),
    "float | None": ((int, float, type(None)), "a number or null"),
    "tuple[str, ...]": ((list, tuple), "a list of names"),
    "Mapping[str, str]": ((Mapping,), "an object of source notes"),
}


def _check_types(cls: type, values: Mapping[str, Any], source: str) -> None:
    for f in dataclasses.fields(cls):
        if f.name not in values or f.type not in _FIELD_TYPES:
            continue
        value = values[f.name]
        kinds, words = _FIELD_TYPES[f.type]
        wrong = not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds)
        if f.type == "tuple[str, ...]" and not wrong:
            wrong = not all(isinstance(a, str) for a in value)
        if f.type == "Mapping[str, str]" and not wrong:
            wrong = not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())
        if wrong:
            raise HardwareError(f"{source}: {f.name} must be {words}, got {value!r}; fix the spec file")


def _build(cls: type, raw: Mapping[str, Any], source: str) -> Any:
    """Construct a spec dataclass from a dict: size strings converted, unknown, missing and mistyped fields refused."""
    if not isinstance(raw, Mapping):
        raise HardwareError(f"{source}: expected a JSON object")
    fields = dataclasses.fields(cls)
    names = {f.name for f in fields}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise HardwareError(f"{source}: unknown field(s) {unknown}; known fields are {sorted(names)}")
    required = [f.name for f in fields
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [name for name in required if name not in raw]
    if missing:
        raise HardwareError(
            f"{source}: missing field(s) {', '.join(missing)}; give every one of them, or start from a catalog "
            'entry with "base" (e.g. {"base": "RTX 4090", "h2d_gbps": 12.6}) and give only the figures that differ'
        )
    values = dict(raw)
    for key in _SIZE_FIELDS:
        value = values.get(key)
        if isinstance(value, float) and value.is_integer() and value >= 0:
            values[key] = int(value)
        elif value is not None and key in names:
            try:
                values[key] = parse_size(value, what=f"{source}: {key}")
            except SizeError as exc:
                raise HardwareError(str(exc)) from exc
        if key in ("memory_bytes", "usable_memory_bytes") and isinstance(values.get(key), int) \
                and not isinstance(values[key], bool) and 0 < values[key] < 1 << 20:
            raise HardwareError(
                f"{source}: {key} {values[key]} would be {values[key]} bytes; write a size such as "
                f'"{values[key]}GiB" or "{values[key]}GB"'
            )
    if "compute_capability" in values:
        cc = values["compute_capability"]
        try:
            parts = str(cc).split(".") if isinstance(cc, (str, float)) else cc
            values["compute_capability"] = tuple(int(x) for x in parts)
        except (TypeError, ValueError) as exc:
            raise HardwareError(f"{source}: compute_capability must be like [8, 9] or '8.9', got {cc!r}") from exc
    if isinstance(values.get("host"), Mapping):
        values["host"] = HostSpec.from_dict(values["host"], f"{source} (host)")
    elif values.get("host") is not None and not isinstance(values["host"], HostSpec):
        raise HardwareError(f"{source}: host must be an object describing the host, got {values['host']!r}")
    _check_types(cls, values, source)
    if "aliases" in values:
        values["aliases"] = tuple(values["aliases"])
    try:
        return cls(**values)
    except TypeError as exc:
        raise HardwareError(f"{source}: {exc}") from exc


# ---------------------------------------------------------------------- catalog


def load_catalog(path: str | Path | None = None) -> tuple[tuple[GpuSpec, ...], HostSpec]:
    """The GPU catalog and the default host from ``path`` (default: the package's ``data/gpus.json``).

    The file holds ``default_host``, named ``hosts`` (the built-in hosts of integrated systems,
    referenced by name from a GPU's ``host``) and ``gpus``; every figure has a source note.
    """
    if path is None:
        resource = importlib.resources.files("residency") / "data" / "gpus.json"
        source, text = "residency/data/gpus.json", resource.read_text(encoding="utf-8")
    else:
        source, text = str(path), Path(path).read_text(encoding="utf-8")
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise HardwareError(f"{source}: the GPU catalog is not valid JSON ({exc}); reinstall residency") from exc
    if not isinstance(raw, dict) or raw.get("kind") != "gpu_catalog":
        raise HardwareError(f"{source}: not a GPU catalog (kind must be 'gpu_catalog')")
    if raw.get("format_version") != CATALOG_FORMAT_VERSION:
        raise HardwareError(f"{source}: GPU catalog format {raw.get('format_version')!r} is not "
                            f"{CATALOG_FORMAT_VERSION}; reinstall residency")
    default_host = HostSpec.from_dict(raw["default_host"], f"{source} default_host")
    hosts = {key: HostSpec.from_dict(h, f"{source} hosts.{key}") for key, h in raw.get("hosts", {}).items()}
    gpus = []
    for i, entry in enumerate(raw["gpus"]):
        entry = dict(entry)
        where = f"{source} gpus[{i}] ({entry.get('name', '?')})"
        if isinstance(entry.get("host"), str):
            if entry["host"] not in hosts:
                raise HardwareError(f"{where}: host {entry['host']!r} is not in hosts {sorted(hosts)}")
            entry["host"] = hosts[entry["host"]]
        gpus.append(GpuSpec.from_dict(entry, where))
    names = [g.name for g in gpus]
    if len(set(names)) != len(names):
        raise HardwareError(f"{source}: GPU names repeat: {sorted(n for n in set(names) if names.count(n) > 1)}")
    return tuple(gpus), default_host


CATALOG: tuple[GpuSpec, ...]
DEFAULT_HOST: HostSpec
CATALOG, DEFAULT_HOST = load_catalog()


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
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        found = sniff_kind(path)
        if found is not None and found != "gpu_spec":
            raise HardwareError(wrong_kind_message(path, found, "gpu_spec")) from exc
        raise HardwareError(f"{path}: not valid JSON ({exc}); fix the spec file or write it again") from exc
    if not isinstance(raw, dict):
        raise HardwareError(f"{path}: expected a JSON object describing one GPU")
    raw = dict(raw)
    kind = guess_kind(raw) if "kind" in raw else guess_kind(raw) or "gpu_spec"
    raw.pop("kind", None)
    if kind != "gpu_spec":
        raise HardwareError(wrong_kind_message(path, kind, "gpu_spec"))
    version = raw.pop("format_version", GPU_SPEC_FORMAT_VERSION)
    if not isinstance(version, int) or version > GPU_SPEC_FORMAT_VERSION:
        raise HardwareError(f"{path}: GPU spec format {version!r} is newer than this residency reads; upgrade")
    base_name = raw.pop("base", None)
    sources = dict(raw.pop("sources", {}))
    given = [k for k in raw if k not in ("name", "aliases", "notes", "host", "link", "unified_memory")]
    if base_name is not None:
        try:
            base = lookup_gpu(str(base_name)).to_dict()
        except HardwareError as exc:
            raise HardwareError(f"{path}: base: {exc}") from exc
        sources = {**base["sources"], **{k: f"user: {path.name}" for k in given}, **sources}
        base.update(raw)
        raw = base
    for key in given:
        sources.setdefault(key, f"user: {path.name}")
    raw["sources"] = sources
    return GpuSpec.from_dict(raw, source=str(path))


def save_gpu_spec(path: str | Path, spec: GpuSpec) -> Path:
    """Write ``spec`` as a custom GPU spec file (atomic)."""
    obj = {"kind": "gpu_spec", "format_version": GPU_SPEC_FORMAT_VERSION, **spec.to_dict()}
    return save_json(path, obj)
