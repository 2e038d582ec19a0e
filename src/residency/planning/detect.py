"""Local detection: describe this machine's GPU and host from NVML, torch and psutil.

:func:`detect_local` handles two known quirks: GB10 (DGX Spark) and Jetson Thor report
``NVML_ERROR_NOT_SUPPORTED`` for memory info because the GPU shares host DRAM, so the budget comes
from host memory figures; and the current PCIe link generation drops to Gen1 when the GPU idles,
so the link estimate uses the maximum negotiated generation and width instead. A discrete GPU
whose NVML memory query fails (MIG slice, vGPU, driver mismatch) falls back to
``torch.cuda.mem_get_info``. The modules can be injected, so the logic is tested with fakes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..sizes import GiB
from .hardware import DEFAULT_HOST, GpuSpec, HardwareError, HostSpec, find_gpu

__all__ = ["Detection", "detect_local", "pcie_practical_gbps"]

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
