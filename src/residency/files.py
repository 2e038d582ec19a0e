"""Safe files for profiles, traces and plans: safetensors or JSON, written atomically, validated on load.

Never pickle. Every file carries ``kind``, ``format_version`` and the model ``fingerprint`` so a
file of the wrong kind, a newer format or another model is refused with a clear message. Writes go
to a temporary file in the same folder, are flushed to disk and then renamed over the target, so
an interrupted write never leaves a half-written file in place of a good one.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import FileFormatError, ModelMismatchError

if TYPE_CHECKING:  # torch is imported only where tensors are read or written
    import torch

_META_KEY = "residency"


@dataclass(frozen=True)
class FileKind:
    """How to name a kind of file in messages: what it is, how to use it, where to get one."""

    name: str
    use: str
    get: str


#: The files residency reads and writes (``kind`` in their metadata), plus two that users pass by mistake.
FILE_KINDS: dict[str, FileKind] = {
    "plan": FileKind("residency plan", "use it with `residency simulate --plan` or `residency plan show`",
                     "pass a file written by `residency plan --out`"),
    "profile": FileKind("residency profile", "pass it as --profile",
                        "pass a file written by `residency profile --out`"),
    "trace": FileKind("routing trace", "pass it as --trace",
                      "pass a trace written by `residency profile --trace`"),
    "gpu_spec": FileKind("GPU spec", "pass it as --gpu-spec",
                         "pass a file written by `residency calibrate --out` or by hand (docs/planning.md)"),
    "simulation": FileKind("simulation result", "it is a result of `residency simulate --json`, not an input",
                           "pass a file written by residency"),
    "gpu_catalog": FileKind("GPU catalog", "it is the package's catalog, read by `residency gpus`",
                            "pass a file written by residency"),
    "config": FileKind("model config.json", "pass it as --config", "pass a file written by residency"),
}


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` then atomically rename the temporary file to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    return path


def save_json(path: str | Path, obj: dict[str, Any]) -> Path:
    """Write ``obj`` as indented JSON, atomically."""
    text = json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n"
    return atomic_write(path, lambda p: p.write_text(text))


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Write tensors as safetensors with ``meta`` (JSON) in the header, atomically."""
    from safetensors.torch import save_file

    header = {_META_KEY: json.dumps(meta, allow_nan=False)}
    data = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return atomic_write(path, lambda p: save_file(data, str(p), metadata=header))


def check_header(meta: Any, path: Path, kind: str, max_version: int, fingerprint: str | None) -> dict[str, Any]:
    """Validate the common fields of a residency file's metadata."""
    if not isinstance(meta, dict):
        raise FileFormatError(f"{path}: metadata is not an object; the file is corrupt, regenerate it")
    if meta.get("kind") != kind:
        raise FileFormatError(wrong_kind_message(path, guess_kind(meta), kind))
    version = meta.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise FileFormatError(f"{path}: missing or invalid format_version; the file is corrupt, regenerate it")
    if version > max_version:
        raise FileFormatError(
            f"{path}: {kind} format version {version} is newer than this residency reads ({max_version}); "
            "upgrade residency"
        )
    if fingerprint is not None and meta.get("fingerprint") != fingerprint:
        raise ModelMismatchError(
            f"{path}: this {kind} was made for model {meta.get('fingerprint')!r}, not {fingerprint!r} "
            f"({meta.get('model_name', 'unknown model')}); make a new {kind} for this model"
        )
    return meta


def load_json(path: str | Path, kind: str, max_version: int, fingerprint: str | None = None) -> dict[str, Any]:
    """Read and validate a residency JSON file."""
    path = Path(path)
    if not path.is_file():
        raise FileFormatError(f"{path}: no such file")
    try:
        obj = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        found = sniff_kind(path)
        if found is not None and found != kind:
            raise FileFormatError(wrong_kind_message(path, found, kind)) from exc
        raise FileFormatError(
            f"{path}: not valid JSON ({exc}); the file is truncated or corrupt, regenerate it"
        ) from exc
    return check_header(obj, path, kind, max_version, fingerprint)


def load_tensors(
    path: str | Path, kind: str, max_version: int, fingerprint: str | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read and validate a residency safetensors file; returns (tensors, metadata)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileFormatError(f"{path}: no such file")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            header = fh.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        found = sniff_kind(path)
        if found is not None and found != kind:
            raise FileFormatError(wrong_kind_message(path, found, kind)) from exc
        raise FileFormatError(
            f"{path}: not a readable safetensors file ({exc}); it is truncated or corrupt, regenerate it"
        ) from exc
    if _META_KEY not in header:
        raise FileFormatError(f"{path}: no residency metadata in the safetensors header; not a residency {kind}")
    try:
        meta = json.loads(header[_META_KEY])
    except json.JSONDecodeError as exc:
        raise FileFormatError(f"{path}: metadata is not valid JSON ({exc}); the file was tampered with") from exc
    return tensors, check_header(meta, path, kind, max_version, fingerprint)


def wrong_kind_message(path: str | Path, found: str | None, wanted: str) -> str:
    """One line for a file of kind ``found`` (None: unknown) passed where a ``wanted`` file belongs."""
    want = FILE_KINDS.get(wanted, FileKind(f"{wanted!r} file", "", "pass the right file"))
    if found is None:
        return f"{path} is not a {want.name}: it has no residency 'kind' field; {want.get}"
    have = FILE_KINDS.get(found)
    if have is None:
        return f"{path} is a {found!r} file, not a {wanted!r} file ({want.name}); {want.get}"
    return (f"{path} is a {have.name} ('{found}' file, not a '{wanted}' file): {have.use}; "
            f"for a {want.name}, {want.get}")


def guess_kind(obj: Any) -> str | None:
    """The ``kind`` of a residency file's metadata, or a guess for JSON files without one (a model
    ``config.json``, a hand-written GPU spec); None when it cannot be told."""
    if not isinstance(obj, dict):
        return None
    kind = obj.get("kind")
    if isinstance(kind, str):
        return kind
    if "model_type" in obj or "num_hidden_layers" in obj:
        return "config"
    if "base" in obj or "mem_bw_gbps" in obj:
        return "gpu_spec"
    return None


def sniff_kind(path: str | Path) -> str | None:
    """The kind of a residency file (JSON or safetensors) without validating it; None if it cannot be told.

    Used to replace "truncated or corrupt" with "this is a plan, not a profile" when a file of
    another kind is passed.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(9)
            (n,) = struct.unpack("<Q", head[:8]) if len(head) == 9 else (0,)
            if head[8:9] == b"{" and 2 <= n <= min(size - 8, 100 << 20):  # safetensors: u64 length, JSON header
                try:
                    header = json.loads(b"{" + fh.read(n - 1))
                except ValueError:
                    header = None
                if isinstance(header, dict):
                    meta = header.get("__metadata__")
                    inner = meta.get(_META_KEY) if isinstance(meta, dict) else None
                    return guess_kind(json.loads(inner)) if isinstance(inner, str) else None
        if size > 256 << 20:
            return None
        return guess_kind(json.loads(path.read_text()))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
