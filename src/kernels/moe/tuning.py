"""Tile sizes for the MoE kernels, kept as JSON tables per device and shape.

A table file is named by :func:`table_name`, e.g.
``moe_L1024_I2688_bfloat16_NVIDIA_H100_80GB_HBM3.json``, and holds::

    {
      "measured": true,                  # false for hand-chosen tables
      "note": "how it was made",
      "decode_max_tokens": 5,            # optional: largest token count for the decode path
      "decode":  {"1": {"up": TILE, "down": TILE}, ...},
      "prefill": {"16": {"BLOCK_M": 16, "up": TILE, "down": TILE}, ...}
    }

where ``TILE = {"BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages"}`` (GROUP_M,
num_warps and num_stages optional; block sizes powers of two). Keys are token counts; a lookup
takes the nearest key (the smaller on a tie). Other keys are allowed and ignored.

Tables are searched in the folders of ``RESIDENCY_KERNEL_CONFIGS`` (``os.pathsep``-separated),
then in the package's ``configs/`` folder. With no file for the device and shape, the shipped
``configs/default.json`` applies: hand-chosen defaults, not measured. ``benchmarks/autotune_moe.py``
writes measured tables.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_TABLE = CONFIG_DIR / "default.json"
PATHS = ("decode", "prefill")


@dataclass(frozen=True)
class GemmTile:
    """Launch parameters of one GEMM/GEMV kernel (up or down projection)."""

    BLOCK_N: int
    BLOCK_K: int
    GROUP_M: int = 1
    num_warps: int = 4
    num_stages: int = 3


@dataclass(frozen=True)
class MoeConfig:
    """Launch parameters for one call: a tile per projection, and BLOCK_M (prefill alignment)."""

    up: GemmTile
    down: GemmTile
    BLOCK_M: int = 16


@dataclass(frozen=True)
class TuningTable:
    """A loaded table: configs by path and token count, and the decode/prefill threshold."""

    source: str
    measured: bool
    decode: dict[int, MoeConfig]
    prefill: dict[int, MoeConfig]
    decode_max_tokens: int | None = None

    def config(self, path: str, num_tokens: int) -> MoeConfig:
        """Config of the key nearest ``num_tokens`` for ``path`` (``"decode"`` or ``"prefill"``)."""
        entries = self.decode if path == "decode" else self.prefill
        key = min(entries, key=lambda k: (abs(k - num_tokens), k))
        return entries[key]

    def choose_path(self, num_tokens: int, top_k: int, num_experts: int) -> str:
        """``"decode"`` up to ``decode_max_tokens`` tokens; without one, while ``T * k * 4 <= E``."""
        if self.decode_max_tokens is not None:
            return "decode" if num_tokens <= self.decode_max_tokens else "prefill"
        return "decode" if num_tokens * top_k * 4 <= num_experts else "prefill"


def table_name(device_name: str, latent: int, inter: int, dtype: torch.dtype) -> str:
    """File name of the table for a device and expert shape."""
    device = "".join(c if c.isalnum() or c in "-." else "_" for c in device_name)
    return f"moe_L{latent}_I{inter}_{str(dtype).removeprefix('torch.')}_{device}.json"


def search_dirs() -> list[Path]:
    """Folders searched for tables, first match wins."""
    extra = [Path(p) for p in os.environ.get("RESIDENCY_KERNEL_CONFIGS", "").split(os.pathsep) if p]
    return [*extra, CONFIG_DIR]


def find_table(
    device_name: str, latent: int, inter: int, dtype: torch.dtype, dirs: list[Path] | None = None
) -> TuningTable:
    """The table for this device and shape, or the shipped defaults when no folder has one."""
    name = table_name(device_name, latent, inter, dtype)
    for folder in search_dirs() if dirs is None else dirs:
        if (folder / name).is_file():
            return load_table(folder / name)
    return load_table(DEFAULT_TABLE)


@functools.lru_cache(maxsize=64)
def _cached_table(device_name: str, latent: int, inter: int, dtype: torch.dtype, dirs: tuple[Path, ...]) -> TuningTable:
    return find_table(device_name, latent, inter, dtype, list(dirs))


def table_for(device: torch.device, latent: int, inter: int, dtype: torch.dtype) -> TuningTable:
    """The table for a torch device (by its CUDA name; ``"cpu"`` otherwise), cached per process.

    The cache keeps file-system look-ups off the per-call path; :func:`clear_table_cache` makes a
    process see tables written after its first call.
    """
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return _cached_table(name, latent, inter, dtype, tuple(search_dirs()))


def clear_table_cache() -> None:
    """Forget the tables :func:`table_for` found, so that new or changed files are read again."""
    _cached_table.cache_clear()


def load_table(path: Path | str) -> TuningTable:
    """Read and validate a table; errors name the file and the problem."""
    path = Path(path)
    try:
        return _parse(json.loads(path.read_text()), str(path))
    except (json.JSONDecodeError, ValueError, TypeError, KeyError) as err:
        raise ValueError(f"bad MoE tuning table {path}: {err}") from err


def table_to_json(table: TuningTable, note: str, **extra: object) -> dict:
    """The JSON form of a table (inverse of loading), with a note and any extra fields."""

    def tile(t: GemmTile) -> dict:
        return {f: getattr(t, f) for f in ("BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages")}

    def entry(c: MoeConfig, with_m: bool) -> dict:
        d = {"up": tile(c.up), "down": tile(c.down)}
        return {"BLOCK_M": c.BLOCK_M, **d} if with_m else d

    data: dict = {"measured": table.measured, "note": note, **extra}
    if table.decode_max_tokens is not None:
        data["decode_max_tokens"] = table.decode_max_tokens
    data["decode"] = {str(k): entry(c, False) for k, c in sorted(table.decode.items())}
    data["prefill"] = {str(k): entry(c, True) for k, c in sorted(table.prefill.items())}
    return data


def _parse(data: object, source: str) -> TuningTable:
    if not isinstance(data, dict):
        raise ValueError("the top level must be a JSON object")
    if not isinstance(data.get("measured"), bool):
        raise ValueError('"measured" must be true or false')
    threshold = data.get("decode_max_tokens")
    if threshold is not None and (not isinstance(threshold, int) or threshold < 0):
        raise ValueError('"decode_max_tokens" must be a non-negative integer or absent')
    entries = {}
    for path in PATHS:
        section = data.get(path)
        if not isinstance(section, dict) or not section:
            raise ValueError(f'"{path}" must be a non-empty object keyed by token count')
        entries[path] = {_token_key(k, path): _moe_config(v, f"{path}.{k}") for k, v in section.items()}
    return TuningTable(source, data["measured"], entries["decode"], entries["prefill"], threshold)


def _token_key(key: str, path: str) -> int:
    if not key.isdigit() or int(key) < 1:
        raise ValueError(f'"{path}" keys must be positive token counts, got {key!r}')
    return int(key)


def _moe_config(entry: object, where: str) -> MoeConfig:
    if not isinstance(entry, dict):
        raise ValueError(f"{where} must be an object with 'up' and 'down'")
    block_m = _pow2(entry.get("BLOCK_M", 16), f"{where}.BLOCK_M")
    return MoeConfig(_tile(entry.get("up"), f"{where}.up"), _tile(entry.get("down"), f"{where}.down"), block_m)


def _tile(entry: object, where: str) -> GemmTile:
    if not isinstance(entry, dict) or "BLOCK_N" not in entry or "BLOCK_K" not in entry:
        raise ValueError(f"{where} must be an object with BLOCK_N and BLOCK_K")
    unknown = set(entry) - set(GemmTile.__dataclass_fields__)
    if unknown:
        raise ValueError(f"{where} has unknown fields {sorted(unknown)}")
    check = {"BLOCK_N": _pow2, "BLOCK_K": _pow2, "num_warps": _pow2, "GROUP_M": _positive, "num_stages": _positive}
    return GemmTile(**{k: check[k](v, f"{where}.{k}") for k, v in entry.items()})


def _positive(value: object, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{where} must be a positive integer, got {value!r}")
    return value


def _pow2(value: object, where: str) -> int:
    if _positive(value, where) & (value - 1):
        raise ValueError(f"{where} must be a power of two, got {value!r}")
    return value
