"""Hugging Face Nemotron-H checkpoint folders: index, lazy safetensors access, validation before loading.

A folder holds ``config.json`` and either one ``model.safetensors`` or shards listed by
``model.safetensors.index.json``. Headers are parsed directly (a safetensors header is a JSON
object after an 8-byte length), which lists every tensor's name, dtype and shape and the byte range
it occupies without reading any weights. Validation runs on those headers before any heavy work:
missing, unexpected (other than ``mtp.*``), wrong-shape and wrong-dtype tensors are all reported
in one error; truncated shards, missing shards and index entries that point outside the folder are
refused. Tensors are then read one at a time, either from memory-mapped files (:meth:`Checkpoint.get`)
or straight into their destination with plain file reads (:meth:`Checkpoint.read_into`), which
keeps no file pages mapped into the process and goes through a bounded staging buffer when the
destination has another dtype or lives on another device.

Quantized checkpoints (ModelOpt NVFP4 / FP8 / MIXED_PRECISION, compressed-tensors W4A16; see
:mod:`residency.model.quant.scheme`) are read with their quantization config: :meth:`Checkpoint.validate`
checks every quantized module's tensor names, shapes and dtypes against its format from the headers,
:meth:`Checkpoint.read_into` copies stored tensors byte for byte into destinations of their own dtype
(packed codes, E4M3 scales), and a quantized module's logical weight name (``<module>.weight``) read
into a floating destination of the logical ``[out, in]`` shape is dequantized on the way
(:meth:`Checkpoint.read_dequantized`, row blocks through the staging bound).
"""

from __future__ import annotations

import json
import math
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import NemotronHConfig, load_config
from ..errors import CheckpointError

#: positioned reads (several threads may read one shard at once) where the platform has them
_HAVE_PREADV = hasattr(os, "preadv")

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
FLOAT_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
#: every dtype a tensor may be stored in: floats, and the packed/scale dtypes of quantized modules
STORED_DTYPES = {**FLOAT_DTYPES, "F8_E4M3": torch.float8_e4m3fn, "U8": torch.uint8, "I8": torch.int8,
                 "I32": torch.int32, "I64": torch.int64}
_HEADER_LIMIT = 512 * 1024 * 1024
STAGING_BYTES = 64 * 1024 * 1024  # bound on the temporary buffer of a converting read


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors spelling: BF16, F32, ...
    shape: tuple[int, ...]
    shard: str
    nbytes: int
    offset: int = 0  # absolute byte offset of the data in the shard file


def expected_tensors(config: NemotronHConfig) -> dict[str, tuple[int, ...]]:
    """Every backbone tensor name of ``config`` in the Hugging Face layout, with its shape."""
    c = config
    d = c.hidden_size
    out: dict[str, tuple[int, ...]] = {
        "backbone.embeddings.weight": (c.vocab_size, d),
        "backbone.norm_f.weight": (d,),
    }
    if not c.tie_word_embeddings:
        out["lm_head.weight"] = (c.vocab_size, d)
    for i, kind in enumerate(c.layer_kinds):
        p = f"backbone.layers.{i}."
        out[p + "norm.weight"] = (d,)
        m = p + "mixer."
        if kind == "mamba":
            out[m + "in_proj.weight"] = (c.mamba_in_proj_size, d)
            out[m + "conv1d.weight"] = (c.mamba_conv_dim, 1, c.conv_kernel)
            if c.use_conv_bias:
                out[m + "conv1d.bias"] = (c.mamba_conv_dim,)
            for name in ("dt_bias", "A_log", "D"):
                out[m + name] = (c.mamba_num_heads,)
            out[m + "norm.weight"] = (c.mamba_inner,)
            out[m + "out_proj.weight"] = (d, c.mamba_inner)
            if c.use_bias:
                out[m + "in_proj.bias"] = (c.mamba_in_proj_size,)
                out[m + "out_proj.bias"] = (d,)
        elif kind == "attention":
            q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
            for name, shape in (("q_proj", (q, d)), ("k_proj", (kv, d)), ("v_proj", (kv, d)), ("o_proj", (d, q))):
                out[m + name + ".weight"] = shape
                if c.attention_bias:
                    out[m + name + ".bias"] = (shape[0],)
        elif kind == "moe":
            out[m + "gate.weight"] = (c.n_routed_experts, d)
            out[m + "gate.e_score_correction_bias"] = (c.n_routed_experts,)
            width, inner = c.expert_input_size, c.moe_intermediate_size
            for e in range(c.n_routed_experts):
                out[f"{m}experts.{e}.up_proj.weight"] = (inner, width)
                out[f"{m}experts.{e}.down_proj.weight"] = (width, inner)
            if c.n_shared_experts:
                s = c.moe_shared_expert_intermediate_size
                out[m + "shared_experts.up_proj.weight"] = (s, d)
                out[m + "shared_experts.down_proj.weight"] = (d, s)
            if c.moe_latent_size is not None:
                out[m + "fc1_latent_proj.weight"] = (c.moe_latent_size, d)
                out[m + "fc2_latent_proj.weight"] = (d, c.moe_latent_size)
        else:
            out[m + "up_proj.weight"] = (c.intermediate_size, d)
            out[m + "down_proj.weight"] = (d, c.intermediate_size)
    return out


_LINEAR_LEAVES = ("in_proj", "out_proj", "q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj",
                  "fc1_latent_proj", "fc2_latent_proj")


def linear_modules(config: NemotronHConfig) -> dict[str, tuple[int, int]]:
    """Every Linear module of the backbone (the ones a quantization config may quantize): name → (out, in).

    Mamba in/out projections, attention q/k/v/o, routed and shared experts' up/down, the latent
    projections, dense MLPs and ``lm_head``; not the router, convolutions, norms or embeddings.
    """
    out: dict[str, tuple[int, int]] = {}
    for name, shape in expected_tensors(config).items():
        module, _, leaf = name.rpartition(".")
        if leaf != "weight" or len(shape) != 2:
            continue
        if module == "lm_head" or module.rpartition(".")[2] in _LINEAR_LEAVES:
            out[module] = (shape[0], shape[1])
    return out


def expert_module(config: NemotronHConfig, layer: int, expert: int, proj: str) -> str:
    """Name of a routed expert's projection module: ``backbone.layers.{layer}.mixer.experts.{expert}.{proj}_proj``."""
    return f"backbone.layers.{layer}.mixer.experts.{expert}.{proj}_proj"


_SCALAR = ((), (1,))


def quantized_tensors(spec, out_f: int, in_f: int) -> dict[str, tuple[tuple[tuple[int, ...], ...], tuple[str, ...],
                                                                    bool, str]]:
    """Tensors one quantized Linear stores: leaf → (allowed shapes, allowed dtypes, required, meaning)."""
    if spec.format == "nvfp4":
        return {
            "weight": (((out_f, -(-in_f // 2)),), ("U8",), True, "two E2M1 codes per byte"),
            "weight_scale": (((out_f, -(-in_f // 16)),), ("F8_E4M3",), True, "E4M3 scale per 16 inputs"),
            "weight_scale_2": (_SCALAR, ("F32",), True, "fp32 per-tensor scale"),
            "input_scale": (_SCALAR, ("F32",), False, "activation scale, unused"),
        }
    if spec.format == "fp8":
        return {
            "weight": (((out_f, in_f),), ("F8_E4M3",), True, "E4M3 weights"),
            "weight_scale": (_SCALAR, ("F32",), True, "fp32 per-tensor scale"),
            "input_scale": (_SCALAR, ("F32",), False, "activation scale, unused"),
        }
    groups = spec.groups(in_f)
    out = {
        "weight_packed": (((out_f, -(-in_f // 8)),), ("I32",), True, "eight int4 codes per int32"),
        "weight_scale": (((out_f, groups),), tuple(FLOAT_DTYPES), True, f"scale per group of {spec.group_of(in_f)}"),
        "weight_shape": (((2,),), ("I32", "I64"), True, "the unpacked [out, in]"),
    }
    if not spec.symmetric:
        out["weight_zero_point"] = (((-(-out_f // 8), groups),), ("I32",), True, "int4 zero points packed along out")
    return out


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Names, dtypes and shapes of a safetensors file; refuses truncated or malformed files."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            prefix = fh.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{path}: file is truncated (no header); re-download it")
            (n,) = struct.unpack("<Q", prefix)
            if n > min(size - 8, _HEADER_LIMIT):
                raise CheckpointError(f"{path}: header length {n} exceeds the file; the file is truncated or corrupt")
            header = json.loads(fh.read(n))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable safetensors header ({exc}); re-download the shard") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: malformed safetensors header")
    infos: dict[str, TensorInfo] = {}
    data_end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            start, end = entry["data_offsets"]
            infos[name] = TensorInfo(name, entry["dtype"], tuple(int(s) for s in entry["shape"]), path.name,
                                     int(end) - int(start), 8 + n + int(start))
            data_end = max(data_end, int(end))
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: malformed header entry for {name!r}") from exc
    if 8 + n + data_end > size:
        raise CheckpointError(
            f"{path}: file is truncated ({size} bytes, header promises {8 + n + data_end}); re-download the shard"
        )
    return infos


class Checkpoint:
    """A Nemotron-H checkpoint folder, opened lazily. Call :meth:`validate` before loading."""

    def __init__(self, folder: str | Path, config: NemotronHConfig | None = None) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise CheckpointError(f"{self.folder}: not a folder; pass the checkpoint directory")
        self.config = config or load_config(self.folder)
        self.shards = self._shard_map()
        self.tensors: dict[str, TensorInfo] = {}
        for shard in sorted(set(self.shards.values())):
            for name, info in read_safetensors_header(self.folder / shard).items():
                if name in self.tensors:
                    raise CheckpointError(f"{self.folder}: tensor {name!r} appears in two shards")
                self.tensors[name] = info
        for name, shard in self.shards.items():
            info = self.tensors.get(name)
            if info is not None and info.shard != shard:
                raise CheckpointError(f"{self.folder}: index says {name!r} is in {shard}, but it is in {info.shard}")
        self._handles: dict[str, object] = {}
        self._files: dict[str, object] = {}
        self._files_lock = threading.Lock()  # reads may come from several threads (the disk tier's readers)
        from .quant.scheme import read_scheme

        scheme = read_scheme(self.folder)
        if scheme is not None and scheme.method == "compressed-tensors":
            # the group-scale dtype is the checkpoint's float dtype, which only the headers tell
            dtypes = {i.dtype for n, i in self.tensors.items() if n.endswith(".weight_scale")}
            if len(dtypes) == 1 and next(iter(dtypes)) in FLOAT_DTYPES:
                scheme = scheme.with_scale_dtype(FLOAT_DTYPES[next(iter(dtypes))])
        #: the quantization scheme from config.json / hf_quant_config.json, None for a float checkpoint
        self.quant = scheme
        self._linears: dict[str, tuple[int, int]] | None = None

    @property
    def linears(self) -> dict[str, tuple[int, int]]:
        """The model's Linear modules: name → (out, in)."""
        if self._linears is None:
            self._linears = linear_modules(self.config)
        return self._linears

    def module_spec(self, module: str):
        """The :class:`~residency.kernels.moe.quant_formats.QuantSpec` of Linear ``module``, None when unquantized."""
        if self.quant is None or module not in self.linears:
            return None
        return self.quant.spec_of(module)

    def expert_spec(self, layer: int):
        """The one format of MoE layer ``layer``'s routed experts (up and down), None when unquantized.

        Raises :class:`CheckpointError` when the layer's experts or projections mix formats.
        """
        specs = {self.module_spec(expert_module(self.config, layer, e, p))
                 for e in range(self.config.n_routed_experts) for p in ("up", "down")}
        if len(specs) > 1:
            names = sorted("bf16" if s is None else s.describe() for s in specs)
            raise CheckpointError(
                f"{self.folder}: the routed experts of layer {layer} mix formats ({'; '.join(names)}); residency "
                "needs one format for all experts of a layer: re-quantize them alike"
            )
        return next(iter(specs))

    def _shard_map(self) -> dict[str, str]:
        """tensor name → shard file name (from the index, or the single file's header)."""
        index = self.folder / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                if not isinstance(weight_map, dict):
                    raise TypeError("weight_map is not an object")
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{index}: malformed index ({exc}); re-download it") from exc
            root = self.folder.resolve()
            missing: set[str] = set()
            for name, shard in weight_map.items():
                target = (self.folder / shard).resolve()
                if Path(shard).is_absolute() or target.parent != root:
                    raise CheckpointError(
                        f"{index}: entry {name!r} points to {shard!r}, outside the checkpoint folder; "
                        "the index is corrupt or malicious, refusing to read it"
                    )
                if not target.is_file():
                    missing.add(shard)
            if missing:
                raise CheckpointError(
                    f"{self.folder}: missing shard(s) {sorted(missing)} listed in {INDEX_NAME}; download them"
                )
            return dict(weight_map)
        single = self.folder / SINGLE_NAME
        if single.is_file():
            return {name: SINGLE_NAME for name in read_safetensors_header(single)}
        raise CheckpointError(f"{self.folder}: no {SINGLE_NAME} or {INDEX_NAME}; is this a Hugging Face checkpoint?")

    @property
    def total_bytes(self) -> int:
        return sum(i.nbytes for i in self.tensors.values())

    @property
    def ties_embeddings(self) -> bool:
        """``lm_head`` reads the embedding table: the config ties them and no ``lm_head.weight`` is stored."""
        return bool(self.config.tie_word_embeddings) and "lm_head.weight" not in self.tensors

    def validate(self) -> None:
        """Compare the checkpoint with its config and quantization config; raise one error listing every problem.

        From the safetensors headers alone: missing, unexpected (other than ``mtp.*``), wrong-shape
        and wrong-dtype tensors, and for every quantized module the tensors its format needs
        (names, shapes, dtypes), modules listed as quantized but stored in a float dtype, modules
        stored quantized that the config does not list, and MoE layers whose experts mix formats.
        """
        expected = expected_tensors(self.config)
        if self.config.tie_word_embeddings and "lm_head.weight" in self.tensors:
            # stored anyway (transformers' save_pretrained writes it): it is used, as transformers does
            expected["lm_head.weight"] = (self.config.vocab_size, self.config.hidden_size)
        quant_problems: list[str] = []
        quant_names: set[str] = set()  # tensors accounted for by a quantized (or mis-stored) module
        specs = {m: self.module_spec(m) for m in self.linears} if self.quant is not None else {}
        for module, spec in specs.items():
            if spec is None:
                continue
            out_f, in_f = self.linears[module]
            problem, names = self._check_quantized(module, spec, out_f, in_f)
            quant_names |= names
            quant_names.add(f"{module}.weight")
            if problem:
                quant_problems.append(f"{module} ({spec.format}): {problem}")
        for module in self.linears:
            if specs.get(module) is not None:
                continue
            weight = self.tensors.get(f"{module}.weight")
            packed = [leaf for leaf in ("weight_scale", "weight_packed", "weight_scale_2")
                      if f"{module}.{leaf}" in self.tensors]
            if packed or (weight is not None and weight.dtype not in FLOAT_DTYPES):
                stored = f"weight {weight.dtype}" if weight is not None else "no weight"
                why = (f"{self.quant.source} does not list it as quantized" if self.quant is not None else
                       "the checkpoint has no quantization config (config.json quantization_config or "
                       "hf_quant_config.json)")
                quant_problems.append(f"{module}: stored quantized ({stored}, {', '.join(packed) or 'no scales'}) "
                                      f"but {why}")
                quant_names |= {f"{module}.{leaf}" for leaf in packed} | {f"{module}.weight"}
        if self.quant is not None:
            unknown = sorted(m for m in self.quant.listed_modules()
                             if m not in self.linears and not m.startswith("mtp."))
            if unknown:
                shown = unknown[:5] + ([f"... and {len(unknown) - 5} more"] if len(unknown) > 5 else [])
                quant_problems.append(
                    f"{len(unknown)} module(s) listed as quantized in {self.quant.source} are not Linear modules of "
                    f"this model: {', '.join(shown)}"
                )
            for layer in self.config.moe_layers:
                try:
                    self.expert_spec(layer)
                except CheckpointError as exc:
                    quant_problems.append(str(exc).split(": ", 1)[1])
        allowed_extra = self._kv_scale_names() if self.quant is not None and self.quant.kv_cache else set()
        plain = {n: s for n, s in expected.items() if n not in quant_names}
        problems: list[str] = []
        missing = sorted(set(plain) - set(self.tensors))
        unexpected = sorted(n for n in set(self.tensors) - set(plain) - quant_names - allowed_extra
                            if not n.startswith("mtp."))
        wrong_shape = [
            f"{n}: {list(self.tensors[n].shape)} != expected {list(s)}"
            for n, s in plain.items() if n in self.tensors and self.tensors[n].shape != s
        ]
        wrong_dtype = [
            f"{n}: {i.dtype}" for n, i in self.tensors.items()
            if n in plain and i.dtype not in FLOAT_DTYPES
        ]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape),
                             ("unsupported dtype (BF16/F16/F32 expected)", wrong_dtype),
                             ("quantized module problem(s):", quant_problems)):
            if items:
                shown = items[:20] + ([f"... and {len(items) - 20} more"] if len(items) > 20 else [])
                head = f"{len(items)} {title}" if title.endswith(":") else f"{len(items)} {title} tensor(s):"
                problems.append(head + "\n    " + "\n    ".join(shown))
        if problems:
            quant = f", quantization {self.quant.describe()} from {self.quant.source}" if self.quant else ""
            fix = ("make config.json, its quantization config (quantization_config / hf_quant_config.json) and the "
                   "weights come from the same export" if self.quant is not None or quant_problems else
                   "make config.json and the weights come from the same model")
            raise CheckpointError(
                f"{self.folder}: checkpoint does not match its config.json ({self.config.describe()}{quant}).\n  "
                + "\n  ".join(problems)
                + f"\n  Fix: {fix}."
            )

    def _check_quantized(self, module: str, spec, out_f: int, in_f: int) -> tuple[str, set[str]]:
        """Problems of one quantized module's tensors (empty when fine) and the tensor names it owns."""
        wanted = quantized_tensors(spec, out_f, in_f)
        names = {f"{module}.{leaf}" for leaf in wanted}
        weight = self.tensors.get(f"{module}.weight")
        has_scales = any(f"{module}.{leaf}" in self.tensors for leaf in wanted if leaf not in ("weight",))
        if weight is not None and weight.dtype in FLOAT_DTYPES and weight.shape == (out_f, in_f) and not has_scales:
            return (f"listed as quantized in {self.quant.source} but stored in {weight.dtype} "
                    f"([{out_f}, {in_f}], no scales)"), names
        problems = []
        try:
            spec.check_shape(out_f, in_f)
        except ValueError as exc:
            problems.append(str(exc))
        for leaf, (shapes, dtypes, required, meaning) in wanted.items():
            info = self.tensors.get(f"{module}.{leaf}")
            if info is None:
                if required:
                    problems.append(f"missing {leaf} ({meaning})")
                continue
            if info.shape not in shapes:
                problems.append(f"{leaf} {list(info.shape)} != expected {' or '.join(str(list(x)) for x in shapes)}")
            if info.dtype not in dtypes:
                problems.append(f"{leaf} is {info.dtype}, expected {'/'.join(dtypes)} ({meaning})")
        for leaf in ("weight_g_idx",):
            if f"{module}.{leaf}" in self.tensors:
                names.add(f"{module}.{leaf}")
                problems.append(f"{leaf} present: activation reordering is not supported")
        if spec.format == "w4a16" and spec.symmetric and f"{module}.weight_zero_point" in self.tensors:
            names.add(f"{module}.weight_zero_point")
            problems.append("weight_zero_point present but the config says symmetric")
        return "; ".join(problems), names

    def _kv_scale_names(self) -> set[str]:
        """KV-cache scale tensors a checkpoint with a quantized KV cache may carry (unused here)."""
        out = set()
        for layer in self.config.attention_layers:
            m = f"backbone.layers.{layer}.mixer."
            out |= {m + "k_proj.k_scale", m + "v_proj.v_scale", m + "k_scale", m + "v_scale"}
        return out & set(self.tensors)

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor (memory-mapped file, one tensor at a time)."""
        from safetensors import safe_open

        info = self.tensors.get(name)
        if info is None:
            raise CheckpointError(f"{self.folder}: no tensor {name!r}")
        handle = self._handles.get(info.shard)
        if handle is None:
            try:
                handle = safe_open(str(self.folder / info.shard), framework="pt")
            except Exception as exc:  # safetensors raises its own error type
                raise CheckpointError(f"{self.folder / info.shard}: cannot open ({exc}); re-download it") from exc
            self._handles[info.shard] = handle
        return handle.get_tensor(name)

    def read_into(self, name: str, out: torch.Tensor) -> None:
        """Read tensor ``name`` into ``out`` (same number of elements; any device).

        A CPU destination of the stored dtype is filled by ``readinto`` directly; otherwise the
        bytes pass through a staging buffer of at most :data:`STAGING_BYTES` and are converted
        (dtype, device) chunk by chunk, so no full-size temporary copy is ever allocated. Float
        tensors (BF16/F16/F32) convert to any floating dtype; packed and scale tensors (U8, I32,
        F8_E4M3 ...) are read only into their own dtype. ``<module>.weight`` of a quantized module
        read into a floating ``[out, in]`` destination is dequantized (:meth:`read_dequantized`).
        """
        module, _, leaf = name.rpartition(".")
        if leaf == "weight" and out.is_floating_point() and self.module_spec(module) is not None:
            info = self.tensors.get(name)
            if info is None or STORED_DTYPES.get(info.dtype) != out.dtype:
                self.read_dequantized(module, out)
                return
        info = self.tensors.get(name)
        if info is None:
            raise CheckpointError(f"{self.folder}: no tensor {name!r}")
        stored = STORED_DTYPES.get(info.dtype)
        if stored is None:
            raise CheckpointError(
                f"{self.folder}: tensor {name!r} has dtype {info.dtype}, which this loader cannot read"
            )
        if stored != out.dtype and not (info.dtype in FLOAT_DTYPES and out.is_floating_point()):
            raise CheckpointError(
                f"{self.folder}: tensor {name!r} is stored as {info.dtype} (packed or scale data) and is read only "
                f"into a {str(stored).removeprefix('torch.')} tensor, not {str(out.dtype).removeprefix('torch.')}; "
                "quantized weights are dequantized through their module's weight name"
            )
        count = math.prod(info.shape)
        if out.numel() != count or not out.is_contiguous():
            raise CheckpointError(
                f"{name}: destination {tuple(out.shape)} does not match the stored {list(info.shape)}"
            )
        flat = out.view(-1)
        item = stored.itemsize
        fh = self._file(info.shard)
        if out.device.type == "cpu" and out.dtype == stored:
            self._read_exact(fh, flat.view(torch.uint8).numpy(), info, name, info.offset)
            return
        step = max(1, STAGING_BYTES // item)
        staging = torch.empty(min(step, count) * item, dtype=torch.uint8)
        for start in range(0, count, step):
            n = min(step, count - start)
            chunk = staging[: n * item]
            self._read_exact(fh, chunk.numpy(), info, name, info.offset + start * item)
            flat[start:start + n].copy_(chunk.view(stored))

    def read_tensor(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """A new CPU tensor of ``name`` in its stored dtype (rows ``[r0, r1)`` of the first dimension when given)."""
        info = self.tensors.get(name)
        if info is None:
            raise CheckpointError(f"{self.folder}: no tensor {name!r}")
        stored = STORED_DTYPES.get(info.dtype)
        if stored is None:
            raise CheckpointError(
                f"{self.folder}: tensor {name!r} has dtype {info.dtype}, which this loader cannot read"
            )
        shape = list(info.shape)
        offset = info.offset
        if rows is not None:
            r0, r1 = rows
            row_bytes = math.prod(shape[1:]) * stored.itemsize
            offset += r0 * row_bytes
            shape[0] = r1 - r0
        out = torch.empty(math.prod(shape) * stored.itemsize, dtype=torch.uint8)
        fh = self._file(info.shard)
        self._read_exact(fh, out.numpy(), info, name, offset)
        return out.view(stored).reshape(shape)

    def read_dequantized(self, module: str, out: torch.Tensor) -> None:
        """Dequantize quantized Linear ``module``'s weight into floating ``out`` (``[out, in]`` elements).

        Rows are dequantized in blocks (fp32, at most :data:`STAGING_BYTES` of them at a time) with
        the reference dequantization of :mod:`residency.kernels.moe.quant_formats` and converted
        into ``out``'s dtype and device, so the values are those every kernel computes with.
        """
        from ..kernels.moe.quant_formats import dequantize

        spec = self.module_spec(module)
        if spec is None:
            raise CheckpointError(f"{self.folder}: {module} is not quantized; read {module}.weight directly")
        n, k = self.linears[module]
        if out.numel() != n * k or not out.is_contiguous() or not out.is_floating_point():
            raise CheckpointError(f"{module}: destination {tuple(out.shape)} {out.dtype} is not a contiguous "
                                  f"floating [{n}, {k}] tensor")
        leaves = {"nvfp4": ("weight", "weight_scale", "weight_scale_2"), "fp8": ("weight", None, "weight_scale"),
                  "w4a16": ("weight_packed", "weight_scale", None)}[spec.format]
        data_name, scale_name, scalar_name = (None if leaf is None else f"{module}.{leaf}" for leaf in leaves)
        scale = self.read_tensor(scale_name) if scale_name else None
        scalar = self.read_tensor(scalar_name).float().reshape(()) if scalar_name else None
        zero = self.read_tensor(f"{module}.weight_zero_point") if not spec.symmetric else None
        flat = out.view(-1)
        step = max(8, (STAGING_BYTES // (4 * k)) // 8 * 8)  # whole words of zero points per block
        for r0 in range(0, n, step):
            r1 = min(n, r0 + step)
            data = self.read_tensor(data_name, (r0, r1))
            block_scale = scale[r0:r1] if scale is not None else None
            # a block starts at a multiple of 8 rows, so its zero points are whole words
            block_zero = zero[r0 // 8:-(-r1 // 8)] if zero is not None else None
            w = dequantize(spec, r1 - r0, k, data, block_scale, scalar, block_zero)
            flat[r0 * k:r1 * k].copy_(w.reshape(-1))

    def _file(self, shard: str):
        handle = self._files.get(shard)
        if handle is None:
            with self._files_lock:
                handle = self._files.get(shard)
                if handle is None:
                    try:
                        handle = open(self.folder / shard, "rb", buffering=0)  # noqa: SIM115 - kept until close()
                    except OSError as exc:
                        raise CheckpointError(f"{self.folder / shard}: cannot open ({exc}); re-download it") from exc
                    self._files[shard] = handle
        return handle

    def _read_exact(self, fh, buffer, info: TensorInfo, name: str, offset: int) -> None:
        """Fill ``buffer`` from byte ``offset`` of the open shard ``fh``: positioned reads (``os.preadv``), so
        several threads may read one file at once; where the platform lacks them, seek and read under a lock."""
        view = memoryview(buffer).cast("B")
        done = 0
        while done < len(view):
            if _HAVE_PREADV:
                got = os.preadv(fh.fileno(), [view[done:]], offset + done)
            else:  # pragma: no cover - platforms without preadv
                with self._files_lock:
                    fh.seek(offset + done)
                    got = fh.readinto(view[done:])
            if not got:
                raise CheckpointError(f"{self.folder / info.shard}: file ended inside tensor {name!r}; re-download it")
            done += got

    def close(self) -> None:
        self._handles.clear()
        for handle in self._files.values():
            handle.close()
        self._files.clear()
