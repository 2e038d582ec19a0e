"""Calibration: measure this machine's GPU (pinned host→device rate, device copy rate, CUDA context size)
and turn the result into a :class:`~residency.planning.hardware.GpuSpec` the planner can use.

``residency calibrate --out gpu.json`` calls :func:`calibrate` and writes the spec with
:func:`~residency.planning.hardware.save_gpu_spec`; ``residency plan --gpu-spec gpu.json`` plans
with it. Measured figures carry ``measured: residency calibrate`` source notes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..sizes import MiB
from .cost import GPU_BW_EFFICIENCY
from .detect import detect_local
from .hardware import GpuSpec, HardwareError

__all__ = ["Calibration", "calibrate", "calibrated_spec", "measure", "DEFAULT_COPY_BYTES", "DEFAULT_REPEATS"]

DEFAULT_COPY_BYTES = 256 * MiB
DEFAULT_REPEATS = 20


@dataclass(frozen=True)
class Calibration:
    """What :func:`measure` found on one CUDA device."""

    device: int
    h2d_gbps: float
    device_copy_gbps: float
    context_bytes: int
    copy_bytes: int
    repeats: int


def measure(device: int = 0, copy_bytes: int = DEFAULT_COPY_BYTES, repeats: int = DEFAULT_REPEATS) -> Calibration:
    """Time pinned host→device copies and device-to-device copies with CUDA events on one stream.

    ``context_bytes`` is the device memory in use right after CUDA initialisation (the context,
    plus whatever other processes hold). Needs a CUDA device; raises :class:`HardwareError` without one.
    """
    import torch

    if not torch.cuda.is_available():
        raise HardwareError("no CUDA device is visible (torch.cuda.is_available() is False); run calibrate on the "
                            "machine with the GPU")
    if copy_bytes < 1 or repeats < 1:
        raise HardwareError(f"calibrate needs a positive copy size and repeat count (got {copy_bytes}, {repeats})")
    free, total = torch.cuda.mem_get_info(device)
    context_bytes = int(total - free)
    dev = torch.device("cuda", device)
    host_buf = torch.empty(copy_bytes, dtype=torch.uint8, pin_memory=True)
    a = torch.empty(copy_bytes, dtype=torch.uint8, device=dev)
    b = torch.empty(copy_bytes, dtype=torch.uint8, device=dev)
    stream = torch.cuda.Stream(device=dev)

    def rate(copy: Any, bytes_moved: int) -> float:
        with torch.cuda.stream(stream):
            copy()  # warm-up
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            for _ in range(repeats):
                copy()
            end.record(stream)
        end.synchronize()
        return bytes_moved * repeats / (start.elapsed_time(end) * 1e-3) / 1e9

    h2d = rate(lambda: a.copy_(host_buf, non_blocking=True), copy_bytes)
    d2d = rate(lambda: b.copy_(a, non_blocking=True), 2 * copy_bytes)
    return Calibration(device, h2d, d2d, context_bytes, copy_bytes, repeats)


def calibrated_spec(base: GpuSpec, h2d_gbps: float, device_copy_gbps: float, context_bytes: int) -> GpuSpec:
    """``base`` with measured H2D rate and CUDA context size; device bandwidth kept as the datasheet peak
    when known (the cost model applies its own efficiency), else derived from the measured copy rate."""
    changes: dict[str, Any] = {"h2d_gbps": round(h2d_gbps, 2), "context_bytes": int(context_bytes)}
    sources = {"h2d_gbps": "measured: residency calibrate, pinned H2D copy",
               "context_bytes": "measured: residency calibrate, device memory in use after CUDA init"}
    if not base.source_of("mem_bw_gbps").startswith("spec"):
        changes["mem_bw_gbps"] = round(device_copy_gbps / GPU_BW_EFFICIENCY, 1)
        sources["mem_bw_gbps"] = f"derived: measured device copy {device_copy_gbps:.0f} GB/s / {GPU_BW_EFFICIENCY}"
    notes = (base.notes + " " if base.notes else "") + f"calibrated: device-to-device copy {device_copy_gbps:.0f} GB/s"
    spec = base.replace(**changes)
    return GpuSpec.from_dict({**spec.to_dict(), "notes": notes, "sources": {**spec.sources, **sources}})


def calibrate(device: int = 0, copy_bytes: int = DEFAULT_COPY_BYTES,
              repeats: int = DEFAULT_REPEATS) -> tuple[GpuSpec, Calibration]:
    """Detect GPU ``device`` and its host, measure it, and return the calibrated spec (host included)."""
    det = detect_local(device)
    if det.gpu is None:
        raise HardwareError(f"calibrate: {'; '.join(det.notes)}")
    result = measure(device, copy_bytes, repeats)
    spec = calibrated_spec(det.gpu, result.h2d_gbps, result.device_copy_gbps, result.context_bytes)
    if det.host is not None:
        spec = GpuSpec.from_dict({**spec.to_dict(), "host": det.host.to_dict()})
    return spec, result
