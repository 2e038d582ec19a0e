"""Which Linear modules of a checkpoint are quantized, and how: read from its quantization config.

Two producers are understood, each from its own files:

- NVIDIA ModelOpt: ``hf_quant_config.json`` (``{"producer": ..., "quantization": {"quant_algo": ...}}``)
  and/or ``config.json`` ``quantization_config`` with ``"quant_method": "modelopt"``.
  ``quant_algo`` ``NVFP4`` or ``FP8`` quantizes every Linear except ``exclude_modules`` / ``ignore``
  (shell-style patterns); ``MIXED_PRECISION`` lists each quantized module in ``quantized_layers``
  with its own ``quant_algo`` (``NVFP4`` with ``group_size`` 16, or ``FP8``), the rest stay in the
  checkpoint's float dtype. When both files are present they must agree.
- compressed-tensors: ``config.json`` ``quantization_config`` with ``"quant_method":
  "compressed-tensors"``, format ``pack-quantized``: int4 weights (W4A16), the group size and
  symmetric/asymmetric from each config group's ``weights``; a group's ``targets`` are class names
  (``Linear``), exact module names or ``re:`` regular expressions; ``ignore`` uses the same forms.

Linear modules are the model's projections: Mamba ``in_proj`` / ``out_proj``, attention
``q/k/v/o_proj``, routed experts' and shared experts' ``up_proj`` / ``down_proj``, the latent
projections, dense MLPs and ``lm_head``. The router (``mixer.gate``), convolutions, norms and
embeddings are never quantized. Anything this module cannot represent exactly is refused with a
:class:`~residency.errors.CheckpointError` naming the file, the entry and the fix.
"""

from __future__ import annotations

import fnmatch
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ...errors import CheckpointError
from ...kernels.moe.quant_formats import QuantSpec

__all__ = [
    "HF_QUANT_CONFIG",
    "MODELOPT_ALGOS",
    "QuantScheme",
    "read_scheme",
    "scheme_from_configs",
    "compressed_tensors_config",
    "modelopt_configs",
    "load_preset",
]

HF_QUANT_CONFIG = "hf_quant_config.json"
#: ModelOpt ``quant_algo`` names of one module → our formats
MODELOPT_ALGOS = {"NVFP4": "nvfp4", "FP8": "fp8"}
_MODELOPT_TOP = (*MODELOPT_ALGOS, "MIXED_PRECISION")
_SUPPORTED = ("ModelOpt NVFP4, FP8 (per tensor) and MIXED_PRECISION (hf_quant_config.json or quant_method "
              "'modelopt'), compressed-tensors pack-quantized int4 W4A16")


def _fail(source: str, msg: str) -> CheckpointError:
    return CheckpointError(f"{source}: {msg}")


@dataclass(frozen=True)
class _CtGroup:
    name: str
    targets: tuple[str, ...]
    spec: QuantSpec


@dataclass
class QuantScheme:
    """The per-module quantization of a checkpoint (see the module docstring).

    ``method``: ``"modelopt"``, ``"compressed-tensors"`` or ``"none"`` (a float release's preset);
    ``algo``: ``NVFP4``, ``FP8``, ``MIXED_PRECISION``, ``W4A16`` or ``BF16``; ``source``: the file(s)
    it was read from; ``kv_cache``: the declared KV-cache quantization (informational: residency
    keeps its KV cache in the model dtype).
    """

    method: str
    algo: str
    source: str
    layers: dict[str, QuantSpec] | None = None  # MIXED_PRECISION: module -> spec
    default: QuantSpec | None = None  # uniform ModelOpt algos
    exclude: tuple[str, ...] = ()
    groups: tuple[_CtGroup, ...] = ()  # compressed-tensors
    kv_cache: str | None = None
    producer: str | None = None
    derivation: str = ""  # presets: how the module list was obtained (the preset's summary)
    _cache: dict[str, QuantSpec | None] = field(default_factory=dict, repr=False, compare=False)

    # ------------------------------------------------------------------ queries
    def spec_of(self, module: str) -> QuantSpec | None:
        """The format of Linear ``module`` (e.g. ``backbone.layers.0.mixer.in_proj``), None when unquantized."""
        if module in self._cache:
            return self._cache[module]
        spec = self._resolve(module)
        self._cache[module] = spec
        return spec

    def _resolve(self, module: str) -> QuantSpec | None:
        if self.method == "none":
            return None
        if self.method == "modelopt":
            if self._excluded(module):
                return None
            if self.layers is not None:
                return self.layers.get(module)
            return self.default
        if any(_ct_match(module, target) for target in self.exclude):
            return None
        best: tuple[int, QuantSpec] | None = None
        for group in self.groups:
            for target in group.targets:
                rank = _ct_rank(module, target)
                if rank and (best is None or rank > best[0]):
                    best = (rank, group.spec)
        return None if best is None else best[1]

    def _excluded(self, module: str) -> bool:
        return any(fnmatch.fnmatchcase(module, pattern) for pattern in self.exclude)

    def listed_modules(self) -> Iterable[str]:
        """Modules the config names one by one as quantized (MIXED_PRECISION's ``quantized_layers``)."""
        return self.layers.keys() if self.layers is not None else ()

    def formats(self, modules: Iterable[str]) -> dict[str, int]:
        """How many of ``modules`` have each format (``"bf16"`` for unquantized)."""
        out: dict[str, int] = {}
        for m in modules:
            spec = self.spec_of(m)
            key = "bf16" if spec is None else spec.format
            out[key] = out.get(key, 0) + 1
        return out

    def describe(self) -> str:
        if self.method == "none":
            return "no quantization (BF16)"
        if self.method == "compressed-tensors":
            specs = sorted({g.spec.describe() for g in self.groups})
            return f"compressed-tensors pack-quantized ({'; '.join(specs)})"
        extra = f", {len(self.layers)} modules listed" if self.layers is not None else ""
        return f"ModelOpt {self.algo}{extra}"

    def with_scale_dtype(self, dtype: torch.dtype) -> QuantScheme:
        """The scheme with its W4A16 group-scale dtype set (known only from the safetensors headers)."""
        if self.method != "compressed-tensors":
            return self
        groups = tuple(replace(g, spec=replace(g.spec, scale_dtype=dtype)) for g in self.groups)
        return replace(self, groups=groups, _cache={})


# ---------------------------------------------------------------------- compressed-tensors matching


def _ct_rank(module: str, target: str) -> int:
    """How specifically ``target`` names ``module``: 3 exact name, 2 regex, 1 class name (Linear), 0 no match."""
    if target.startswith("re:"):
        return 2 if re.match(target[3:], module) else 0
    if target == module:
        return 3
    return 1 if target == "Linear" else 0


def _ct_match(module: str, target: str) -> bool:
    return _ct_rank(module, target) > 0


# ---------------------------------------------------------------------- reading


def read_scheme(folder: str | Path, raw_config: dict[str, Any] | None = None) -> QuantScheme | None:
    """The quantization scheme of a checkpoint folder, or None when it declares none.

    Reads ``config.json``'s ``quantization_config`` (``raw_config`` when given: the parsed
    config.json) and ``hf_quant_config.json``; no weights are read.
    """
    folder = Path(folder)
    if raw_config is None:
        path = folder / "config.json"
        try:
            raw_config = json.loads(path.read_text()) if path.is_file() else {}
        except json.JSONDecodeError as exc:
            raise _fail(str(path), f"not valid JSON ({exc}); re-download it") from exc
    hf_path = folder / HF_QUANT_CONFIG
    hf = None
    if hf_path.is_file():
        try:
            hf = json.loads(hf_path.read_text())
        except json.JSONDecodeError as exc:
            raise _fail(str(hf_path), f"not valid JSON ({exc}); re-download it") from exc
    return scheme_from_configs(raw_config.get("quantization_config") if isinstance(raw_config, dict) else None, hf,
                               config_source=str(folder / "config.json"), hf_source=str(hf_path))


def scheme_from_configs(quantization_config: Any, hf_quant_config: Any, *, config_source: str = "config.json",
                        hf_source: str = HF_QUANT_CONFIG) -> QuantScheme | None:
    """A scheme from a parsed ``quantization_config`` and/or ``hf_quant_config.json`` (either may be None)."""
    from_config = None
    if quantization_config is not None:
        if not isinstance(quantization_config, dict):
            raise _fail(config_source, "quantization_config must be an object")
        method = str(quantization_config.get("quant_method", "")).lower()
        if method == "modelopt":
            body = quantization_config.get("quantization", quantization_config)
            from_config = _modelopt(body, f"{config_source} quantization_config", quantization_config)
        elif method == "compressed-tensors":
            from_config = _compressed_tensors(quantization_config, f"{config_source} quantization_config")
        else:
            raise _fail(config_source, f"quantization_config has quant_method {method or None!r}, which residency "
                                       f"cannot load; supported: {_SUPPORTED}")
    from_hf = None
    if hf_quant_config is not None:
        if not isinstance(hf_quant_config, dict) or not isinstance(hf_quant_config.get("quantization"), dict):
            raise _fail(hf_source, 'expected {"producer": ..., "quantization": {"quant_algo": ...}}')
        from_hf = _modelopt(hf_quant_config["quantization"], hf_source, hf_quant_config)
    if from_config is not None and from_hf is not None:
        if from_config.method != "modelopt":
            raise _fail(hf_source, f"ModelOpt {HF_QUANT_CONFIG} next to a {from_config.method} quantization_config "
                                   f"in {config_source}; keep the one that describes the weights")
        mine, theirs = _comparable(from_hf), _comparable(from_config)
        if mine != theirs:
            raise _fail(hf_source, f"disagrees with {config_source} quantization_config ({from_hf.describe()} vs "
                                   f"{from_config.describe()}); re-export the checkpoint or remove the stale file")
        from_hf.source = f"{hf_source} and {config_source}"
        return from_hf
    return from_hf or from_config


def _comparable(s: QuantScheme) -> tuple:
    layers = None if s.layers is None else {k: v.format for k, v in s.layers.items()}
    return (s.algo, None if s.default is None else s.default.format, layers, tuple(sorted(s.exclude)))


def _modelopt(body: dict[str, Any], source: str, whole: dict[str, Any]) -> QuantScheme:
    algo = body.get("quant_algo")
    if not isinstance(algo, str):
        raise _fail(source, "no quant_algo; expected NVFP4, FP8 or MIXED_PRECISION")
    algo_u = algo.upper()
    if algo_u not in _MODELOPT_TOP:
        raise _fail(source, f"unknown quant_algo {algo!r}; residency loads {', '.join(_MODELOPT_TOP)} "
                            f"(supported: {_SUPPORTED})")
    exclude = body.get("exclude_modules", body.get("ignore", [])) or []
    if not isinstance(exclude, list) or not all(isinstance(x, str) for x in exclude):
        raise _fail(source, "exclude_modules / ignore must be a list of module names or patterns")
    kv = body.get("kv_cache_quant_algo")
    if kv is None and isinstance(body.get("kv_cache_scheme"), dict):
        kv = f"{body['kv_cache_scheme'].get('type', '?')}{body['kv_cache_scheme'].get('num_bits', '')}"
    producer = whole.get("producer", {}).get("name") if isinstance(whole.get("producer"), dict) else None
    if algo_u == "MIXED_PRECISION":
        listed = body.get("quantized_layers")
        if not isinstance(listed, dict) or not listed:
            raise _fail(source, "quant_algo MIXED_PRECISION needs a non-empty quantized_layers object")
        layers = {}
        for module, entry in listed.items():
            if not isinstance(entry, dict):
                raise _fail(source, f"quantized_layers[{module!r}] must be an object with quant_algo")
            layers[module] = _modelopt_spec(entry.get("quant_algo"), entry.get("group_size"), source, module)
        return QuantScheme("modelopt", "MIXED_PRECISION", source, layers=layers, exclude=tuple(exclude),
                           kv_cache=kv, producer=producer)
    group = body.get("group_size")
    if group is None and isinstance(body.get("config_groups"), dict):
        for g in body["config_groups"].values():
            if isinstance(g, dict) and isinstance(g.get("weights"), dict) and g["weights"].get("group_size"):
                group = g["weights"]["group_size"]
    spec = _modelopt_spec(algo_u, group, source, None)
    return QuantScheme("modelopt", algo_u, source, default=spec, exclude=tuple(exclude), kv_cache=kv,
                       producer=producer)


def _modelopt_spec(algo: Any, group: Any, source: str, module: str | None) -> QuantSpec:
    where = f"module {module!r}" if module else "quant_algo"
    if not isinstance(algo, str) or algo.upper() not in MODELOPT_ALGOS:
        raise _fail(source, f"{where} has unknown quant_algo {algo!r}; per-module formats residency loads: "
                            f"{', '.join(MODELOPT_ALGOS)} (supported: {_SUPPORTED})")
    fmt = MODELOPT_ALGOS[algo.upper()]
    if fmt == "nvfp4" and group is not None and group != 16:
        raise _fail(source, f"{where}: NVFP4 group_size must be 16, got {group!r}")
    return QuantSpec(fmt)


def _compressed_tensors(qc: dict[str, Any], source: str) -> QuantScheme:
    fmt = qc.get("format")
    status = qc.get("quantization_status", "compressed")
    if status != "compressed":
        raise _fail(source, f"quantization_status is {status!r}: the weights are not packed; load the compressed "
                            "checkpoint that compressed-tensors saves")
    if qc.get("sparsity_config"):
        raise _fail(source, "sparse compressed-tensors checkpoints are not supported; use a dense one")
    groups_raw = qc.get("config_groups")
    if not isinstance(groups_raw, dict) or not groups_raw:
        raise _fail(source, "compressed-tensors quantization_config needs config_groups")
    groups = []
    for name, g in groups_raw.items():
        where = f"config_groups[{name!r}]"
        if not isinstance(g, dict):
            raise _fail(source, f"{where} must be an object")
        gfmt = g.get("format", fmt)
        if gfmt != "pack-quantized":
            raise _fail(source, f"{where} has format {gfmt!r}; residency loads compressed-tensors 'pack-quantized' "
                                f"int4 only (supported: {_SUPPORTED})")
        if g.get("input_activations") or g.get("output_activations"):
            raise _fail(source, f"{where} quantizes activations too; residency computes weight-only W4A16 only "
                                f"(supported: {_SUPPORTED})")
        w = g.get("weights")
        if not isinstance(w, dict):
            raise _fail(source, f"{where} has no weights scheme")
        if w.get("num_bits") != 4 or w.get("type", "int") != "int":
            raise _fail(source, f"{where}: weights are {w.get('num_bits')}-bit {w.get('type')}; residency loads "
                                "4-bit int (W4A16)")
        if w.get("dynamic"):
            raise _fail(source, f"{where}: dynamic weight quantization is not a stored format")
        if w.get("actorder") == "group":
            raise _fail(source, f"{where}: activation reordering with g_idx (actorder 'group') is not supported; "
                                "re-quantize with actorder 'weight' or none")
        strategy = w.get("strategy", "group")
        if strategy == "group":
            group = w.get("group_size")
            if not isinstance(group, int) or group < 1:
                raise _fail(source, f"{where}: group strategy needs a positive group_size, got {group!r}")
        elif strategy == "channel":
            group = None
        else:
            raise _fail(source, f"{where}: weight strategy {strategy!r} is not supported (group or channel)")
        targets = g.get("targets")
        if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets) or not targets:
            raise _fail(source, f"{where}: targets must be a non-empty list of names")
        # the scale dtype is the checkpoint's float dtype; Checkpoint reads it from the safetensors headers
        spec = QuantSpec("w4a16", group_size=group, symmetric=bool(w.get("symmetric", True)))
        groups.append(_CtGroup(name, tuple(targets), spec))
    ignore = qc.get("ignore", []) or []
    if not isinstance(ignore, list) or not all(isinstance(x, str) for x in ignore):
        raise _fail(source, "ignore must be a list of module names or 're:' patterns")
    kv = qc.get("kv_cache_scheme")
    return QuantScheme("compressed-tensors", "W4A16", source, groups=tuple(groups), exclude=tuple(ignore),
                       kv_cache=None if not kv else str(kv))


def compressed_tensors_config(spec: QuantSpec, ignore: list[str]) -> dict[str, Any]:
    """A ``quantization_config`` for ``config.json`` describing W4A16 ``spec`` on every Linear but ``ignore``."""
    weights = {"num_bits": 4, "type": "int", "symmetric": spec.symmetric,
               "strategy": "channel" if spec.group_size is None else "group", "group_size": spec.group_size,
               "dynamic": False, "actorder": None, "observer": "minmax"}
    return {
        "quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                      "output_activations": None, "format": "pack-quantized"}},
        "ignore": sorted(ignore), "kv_cache_scheme": None, "sparsity_config": {},
    }


def modelopt_configs(assign: dict[str, QuantSpec | None]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(hf_quant_config.json, config.json quantization_config)`` for ModelOpt formats over the Linear
    modules of ``assign`` (module -> spec, None = unquantized): one ``quant_algo`` with the unquantized
    modules excluded when every quantized module has the same format, else ``MIXED_PRECISION``."""
    formats = {s.format for s in assign.values() if s is not None}
    if not formats or not formats <= set(MODELOPT_ALGOS.values()):
        raise ValueError(f"ModelOpt configs describe NVFP4 and FP8 modules, got {sorted(formats)}")
    producer = {"name": "modelopt", "version": "written by residency quantize"}
    if len(formats) == 1:
        (fmt,) = formats
        body: dict[str, Any] = {"quant_algo": {v: k for k, v in MODELOPT_ALGOS.items()}[fmt],
                                "kv_cache_quant_algo": None}
        if fmt == "nvfp4":
            body["group_size"] = 16
        body["exclude_modules"] = sorted(m for m, s in assign.items() if s is None)
    else:
        layers = {m: ({"quant_algo": "NVFP4", "group_size": 16} if s.format == "nvfp4" else {"quant_algo": "FP8"})
                  for m, s in assign.items() if s is not None}
        body = {"quant_algo": "MIXED_PRECISION", "kv_cache_quant_algo": None, "quantized_layers": layers}
    hf = {"producer": producer, "quantization": body}
    qc: dict[str, Any] = {"quant_method": "modelopt", "producer": producer}
    qc.update({("ignore" if k == "exclude_modules" else k): v for k, v in body.items()})
    return hf, qc


# ---------------------------------------------------------------------- presets (planning without a checkpoint)


def load_preset(path: str | Path, config: Any) -> QuantScheme:
    """A :class:`QuantScheme` from a quantization preset file (``residency/data/*.quant.json``) for ``config``.

    A preset describes a published checkpoint's per-module formats compactly: ``quant_algo`` with
    ``exclude_modules`` (uniform ModelOpt algorithms), or ``MIXED_PRECISION`` with ``routed_experts``
    (the experts' algorithm) and ``layers`` (algorithm → module leaf → model layer indices). Its
    ``derivation`` says where the list comes from.
    """
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise _fail(str(path), f"unreadable quantization preset ({exc})") from exc
    if not isinstance(raw, dict) or raw.get("kind") != "quantization_preset":
        raise _fail(str(path), "not a quantization preset (kind 'quantization_preset')")
    source = f"preset {path.name} ({raw.get('model', '?')})"
    if raw.get("quant_algo") is None:  # a float release: every module unquantized
        scheme = QuantScheme("none", "BF16", source)
        scheme.derivation = str(raw.get("summary") or raw.get("derivation", ""))
        return scheme
    algo = str(raw.get("quant_algo", "")).upper()
    if algo != "MIXED_PRECISION":
        body = {"quant_algo": algo, "exclude_modules": raw.get("exclude_modules", []),
                "kv_cache_quant_algo": raw.get("kv_cache_quant_algo")}
        scheme = _modelopt(body, source, raw)
    else:
        listed: dict[str, dict[str, Any]] = {}
        experts = raw.get("routed_experts")
        if experts:
            for layer in config.moe_layers:
                for e in range(config.n_routed_experts):
                    for proj in ("up_proj", "down_proj"):
                        listed[f"backbone.layers.{layer}.mixer.experts.{e}.{proj}"] = {"quant_algo": experts}
        for module_algo, leaves in (raw.get("layers") or {}).items():
            for leaf, layers in leaves.items():
                for layer in layers:
                    listed[f"backbone.layers.{layer}.mixer.{leaf}"] = {"quant_algo": module_algo}
        body = {"quant_algo": algo, "quantized_layers": listed, "kv_cache_quant_algo": raw.get("kv_cache_quant_algo")}
        scheme = _modelopt(body, source, raw)
    scheme.derivation = str(raw.get("summary") or raw.get("derivation", ""))
    return scheme
