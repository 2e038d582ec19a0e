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
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import NemotronHConfig, load_config
from ..errors import CheckpointError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
FLOAT_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
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

    def validate(self) -> None:
        """Compare the checkpoint with its config; raise one error listing every problem."""
        expected = expected_tensors(self.config)
        problems: list[str] = []
        missing = sorted(set(expected) - set(self.tensors))
        unexpected = sorted(n for n in set(self.tensors) - set(expected) if not n.startswith("mtp."))
        wrong_shape = [
            f"{n}: {list(self.tensors[n].shape)} != expected {list(s)}"
            for n, s in expected.items() if n in self.tensors and self.tensors[n].shape != s
        ]
        wrong_dtype = [
            f"{n}: {i.dtype}" for n, i in self.tensors.items()
            if n in expected and i.dtype not in FLOAT_DTYPES
        ]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape),
                             ("unsupported dtype (BF16/F16/F32 expected)", wrong_dtype)):
            if items:
                shown = items[:20] + ([f"... and {len(items) - 20} more"] if len(items) > 20 else [])
                problems.append(f"{len(items)} {title} tensor(s):\n    " + "\n    ".join(shown))
        if problems:
            raise CheckpointError(
                f"{self.folder}: checkpoint does not match its config.json ({self.config.describe()}).\n  "
                + "\n  ".join(problems)
                + "\n  Fix: make config.json and the weights come from the same model (quantized FP8/NVFP4 "
                "checkpoints are not supported by this loader)."
            )

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
        """Read tensor ``name`` into ``out`` (same number of elements; any dtype and device).

        A CPU destination of the stored dtype is filled by ``readinto`` directly; otherwise the
        bytes pass through a staging buffer of at most :data:`STAGING_BYTES` and are converted
        (dtype, device) chunk by chunk, so no full-size temporary copy is ever allocated.
        """
        info = self.tensors.get(name)
        if info is None:
            raise CheckpointError(f"{self.folder}: no tensor {name!r}")
        stored = FLOAT_DTYPES.get(info.dtype)
        if stored is None:
            raise CheckpointError(
                f"{self.folder}: tensor {name!r} has dtype {info.dtype}, which this loader cannot read"
            )
        count = math.prod(info.shape)
        if out.numel() != count or not out.is_contiguous():
            raise CheckpointError(
                f"{name}: destination {tuple(out.shape)} does not match the stored {list(info.shape)}"
            )
        flat = out.view(-1)
        item = stored.itemsize
        fh = self._file(info.shard)
        fh.seek(info.offset)
        if out.device.type == "cpu" and out.dtype == stored:
            self._read_exact(fh, flat.view(torch.uint8).numpy(), info, name)
            return
        step = max(1, STAGING_BYTES // item)
        staging = torch.empty(min(step, count) * item, dtype=torch.uint8)
        for start in range(0, count, step):
            n = min(step, count - start)
            chunk = staging[: n * item]
            self._read_exact(fh, chunk.numpy(), info, name)
            flat[start:start + n].copy_(chunk.view(stored))

    def _file(self, shard: str):
        handle = self._files.get(shard)
        if handle is None:
            try:
                handle = open(self.folder / shard, "rb", buffering=0)  # noqa: SIM115 - kept open until close()
            except OSError as exc:
                raise CheckpointError(f"{self.folder / shard}: cannot open ({exc}); re-download it") from exc
            self._files[shard] = handle
        return handle

    def _read_exact(self, fh, buffer, info: TensorInfo, name: str) -> None:
        view = memoryview(buffer).cast("B")
        done = 0
        while done < len(view):
            got = fh.readinto(view[done:])
            if not got:
                raise CheckpointError(f"{self.folder / info.shard}: file ended inside tensor {name!r}; re-download it")
            done += got

    def close(self) -> None:
        self._handles.clear()
        for handle in self._files.values():
            handle.close()
        self._files.clear()
