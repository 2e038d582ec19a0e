"""Quantize a float (BF16 / FP16 / FP32) Nemotron-H checkpoint into the ModelOpt or compressed-tensors layout.

``quantize_checkpoint(src, dst, experts="nvfp4", dense=None)`` writes a new checkpoint folder:

- routed experts in ``experts`` (``nvfp4``, ``fp8`` or ``w4a16``, or None to leave them alone);
- optionally the dense Linears (Mamba in/out projections, attention q/k/v/o, latent projections,
  shared experts, dense MLPs) in ``dense``; ``lm_head``, embeddings, router, convolutions, norms
  and ``mtp.*`` tensors are copied unchanged (as in the official releases);
- ModelOpt formats (NVFP4, FP8) get ``hf_quant_config.json`` and a ``quantization_config`` in
  ``config.json`` (one ``quant_algo`` with ``exclude_modules`` when every quantized module shares a
  format, ``MIXED_PRECISION`` with ``quantized_layers`` otherwise); W4A16 gets a compressed-tensors
  ``pack-quantized`` ``quantization_config``. W4A16 cannot be mixed with ModelOpt formats in one
  checkpoint (no producer writes that).

Weights are quantized one tensor at a time (memory: one float tensor plus one output shard of at
most ``shard_bytes``); shards are written into a temporary folder beside ``dst`` that is renamed
into place at the end, so an interrupted run leaves nothing half-written at ``dst``. The result is
validated by opening it as a checkpoint before the rename.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ...errors import CheckpointError
from ...kernels.moe.quant_formats import QuantSpec
from ..checkpoint import INDEX_NAME, SINGLE_NAME, Checkpoint
from .pack import quantize_weight
from .scheme import HF_QUANT_CONFIG, compressed_tensors_config, modelopt_configs

__all__ = ["DEFAULT_SHARD_BYTES", "QuantizeReport", "quantize_checkpoint", "plan_formats"]

DEFAULT_SHARD_BYTES = 4 << 30
_WEIGHT_FILES = (SINGLE_NAME, INDEX_NAME, "config.json", HF_QUANT_CONFIG)


@dataclass(frozen=True)
class QuantizeReport:
    """What :func:`quantize_checkpoint` wrote."""

    folder: Path
    formats: dict[str, int]  # format -> Linear modules
    bytes_in: int
    bytes_out: int
    method: str

    def describe(self) -> str:
        counts = ", ".join(f"{n} {f}" for f, n in sorted(self.formats.items()))
        return (f"wrote {self.folder} ({self.method}): Linear modules {counts}; weights "
                f"{self.bytes_in / 2**20:.1f} MiB -> {self.bytes_out / 2**20:.1f} MiB")


def plan_formats(ckpt: Checkpoint, experts: QuantSpec | None, dense: QuantSpec | None) -> dict[str, QuantSpec | None]:
    """Format of every Linear module of ``ckpt`` (None = left in its float dtype)."""
    out: dict[str, QuantSpec | None] = {}
    for name in ckpt.linears:
        if ".mixer.experts." in name:
            out[name] = experts
        elif name == "lm_head":
            out[name] = None
        else:
            out[name] = dense
    return out


def quantize_checkpoint(
    src: str | Path,
    dst: str | Path,
    *,
    experts: QuantSpec | str | None = "nvfp4",
    dense: QuantSpec | str | None = None,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> QuantizeReport:
    """Write ``dst``: the float checkpoint ``src`` with its experts (and optionally dense Linears) quantized.

    ``experts`` / ``dense``: a :class:`QuantSpec` or a format name (``w4a16`` by name means group
    128, symmetric). Raises :class:`CheckpointError` for a quantized or invalid ``src``, an
    existing non-empty ``dst``, or formats that cannot share one checkpoint.
    """
    src, dst = Path(src), Path(dst)
    experts, dense = _spec(experts), _spec(dense)
    if experts is None and dense is None:
        raise CheckpointError("nothing to quantize: give an experts format, a dense format, or both")
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise CheckpointError(f"{dst}: already exists and is not empty; choose a new output folder or remove it")
    ckpt = Checkpoint(src)
    if ckpt.quant is not None:
        raise CheckpointError(f"{src}: already quantized ({ckpt.quant.describe()}); quantize from the BF16 checkpoint")
    ckpt.validate()
    float_dtypes = {i.dtype for i in ckpt.tensors.values() if i.name.endswith(".weight")}
    scale_dtype = {"BF16": torch.bfloat16, "F16": torch.float16}.get(
        next((d for d in ("BF16", "F16") if d in float_dtypes), "F32"), torch.float32)
    specs = {}
    for name, spec in plan_formats(ckpt, experts, dense).items():
        if spec is not None and spec.format == "w4a16":
            spec = QuantSpec("w4a16", spec.group_size, spec.symmetric, scale_dtype)
        specs[name] = spec
    formats = {s.format for s in specs.values() if s is not None}
    if "w4a16" in formats and len(formats) > 1:
        raise CheckpointError(f"W4A16 (compressed-tensors) cannot be combined with {sorted(formats - {'w4a16'})} "
                              "(ModelOpt) in one checkpoint; quantize experts and dense modules alike")
    for name, spec in specs.items():
        if spec is not None:
            n, k = ckpt.linears[name]
            try:
                spec.check_shape(n, k)
            except ValueError as exc:
                raise CheckpointError(f"{name} [{n}, {k}] cannot be stored as {spec.format}: {exc}") from exc

    dst.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        bytes_out = _write_weights(ckpt, specs, work, shard_bytes, progress)
        raw = json.loads((src / "config.json").read_text())
        if "w4a16" in formats:
            (spec,) = {s for s in specs.values() if s is not None}
            raw["quantization_config"] = compressed_tensors_config(spec, [m for m, s in specs.items() if s is None])
            method = "compressed-tensors pack-quantized"
        else:
            hf, qc = modelopt_configs(specs)
            (work / HF_QUANT_CONFIG).write_text(json.dumps(hf, indent=2) + "\n")
            raw["quantization_config"] = qc
            method = f"ModelOpt {hf['quantization']['quant_algo']}"
        (work / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
        for item in src.iterdir():
            if item.name in _WEIGHT_FILES or item.suffix == ".safetensors" or item.name.startswith("."):
                continue
            if item.is_file():
                shutil.copy2(item, work / item.name)
            elif item.is_dir():
                shutil.copytree(item, work / item.name)
        check = Checkpoint(work)
        check.validate()
        check.close()
        if dst.exists():
            dst.rmdir()
        work.rename(dst)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    finally:
        ckpt.close()
    counts: dict[str, int] = {}
    for s in specs.values():
        key = "float" if s is None else s.format
        counts[key] = counts.get(key, 0) + 1
    report = QuantizeReport(dst, counts, ckpt.total_bytes, bytes_out, method)
    if log is not None:
        log(report.describe())
    return report


def _spec(value: QuantSpec | str | None) -> QuantSpec | None:
    if value is None or isinstance(value, QuantSpec):
        return value
    if value == "w4a16":
        return QuantSpec("w4a16", group_size=128)
    return QuantSpec(value)


def _write_weights(ckpt: Checkpoint, specs: dict[str, QuantSpec | None], folder: Path, shard_bytes: int,
                   progress: bool) -> int:
    """Quantize and write every tensor of ``ckpt`` into shards of ``folder``; returns the bytes written."""
    from safetensors.torch import save_file

    def order(name: str) -> tuple[int, str]:
        parts = name.split(".")
        layer = int(parts[2]) if len(parts) > 2 and parts[0] == "backbone" and parts[2].isdigit() else -1
        return (layer if not name.startswith("mtp.") else 1 << 30, name)

    names = sorted(ckpt.tensors, key=order)
    if progress:
        from tqdm.auto import tqdm

        names = tqdm(names, desc="quantizing", unit="tensor")
    shards: list[dict[str, torch.Tensor]] = [{}]
    sizes = [0]
    total = 0
    paths: list[Path] = []

    def flush() -> None:
        if shards[-1]:
            path = folder / f"part-{len(paths):05d}.safetensors"
            save_file(shards[-1], str(path), metadata={"format": "pt"})
            paths.append(path)
        shards[-1] = {}
        sizes[-1] = 0

    for name in names:
        module, _, leaf = name.rpartition(".")
        spec = specs.get(module) if leaf == "weight" else None
        if spec is not None:
            out = {f"{module}.{k}": v for k, v in quantize_weight(ckpt.get(name), spec).items()}
        else:
            out = {name: ckpt.get(name).contiguous()}
        for key, tensor in out.items():
            nbytes = tensor.numel() * tensor.element_size()
            if sizes[-1] and sizes[-1] + nbytes > shard_bytes:
                flush()
            shards[-1][key] = tensor
            sizes[-1] += nbytes
            total += nbytes
    flush()
    if len(paths) == 1:
        paths[0].rename(folder / SINGLE_NAME)
        return total
    weight_map: dict[str, str] = {}
    from ..checkpoint import read_safetensors_header

    for i, path in enumerate(paths):
        final = folder / f"model-{i + 1:05d}-of-{len(paths):05d}.safetensors"
        path.rename(final)
        for key in read_safetensors_header(final):
            weight_map[key] = final.name
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return total
