"""Safe files for profiles, traces and plans: safetensors or JSON, written atomically, validated on load.

Never pickle. Every file carries ``kind``, ``format_version`` and the model ``fingerprint`` so a
file of the wrong kind, a newer format or another model is refused with a clear message. Writes go
to a temporary file in the same folder, are flushed to disk and then renamed over the target, so
an interrupted write never leaves a half-written file in place of a good one.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .errors import FileFormatError, ModelMismatchError

_META_KEY = "residency"


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
        raise FileFormatError(
            f"{path}: this is a {meta.get('kind')!r} file, not a {kind!r} file; pass the right file"
        )
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
