"""Cost model: per-layer expert traffic → time per layer and per token, tokens/s and the bounding resource.

Used by the planner (with predicted traffic) and the simulator (with replayed traffic), so both
report the same kind of numbers. Decode at batch 1 is memory-bound, so every cost is bytes over a
bandwidth:

- GPU: dense weights, KV cache at full context and Mamba state (read and written) once per token,
  plus every expert computed on the GPU, at ``GPU_BW_EFFICIENCY`` x the device's memory bandwidth;
- host link: every expert copied host→device (demand copies, prefetches, wasted prefetches,
  background admissions of CPU-computed misses) at the practical H2D rate;
- CPU: each CPU-computed miss reads its weights from host DRAM at ``HostSpec.cpu_bw_gbps``, plus a
  fixed per-layer overhead when the layer sends any expert to the CPU;
- disk: each miss of an expert whose host copy is on disk reads it at ``HostSpec.disk_gbps``.

Within a layer, copies, CPU work and GPU compute overlap perfectly, so the layer takes the longest
of them: ``max(gpu, demand copies + disk reads, cpu)``; prefetched copies were issued a layer
ahead and cost only link time. The token takes the dense time plus the layer times, or the busy
time of the link, CPU or disk if one of those is longer (a resource cannot do more than its
bandwidth allows even with overlap). The bound named is the resource whose time dominates.
This is an optimistic model (no launch latency, no contention between copy and compute for
memory bandwidth) and should be read as a ceiling.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..config import NemotronHConfig
from .hardware import GpuSpec, HostSpec
from .memory import KV_DTYPE_BYTES

__all__ = [
    "GPU_BW_EFFICIENCY", "MISS_PATHS", "MISS_PATH_CHOICES", "CostModel", "LayerTraffic", "CostReport",
    "dense_bytes_per_token",
]

#: Share of peak memory bandwidth a decode GEMV reaches (GB10: 231 of 273 GB/s in a read kernel).
GPU_BW_EFFICIENCY = 0.8
#: How a layer serves misses: copy to the GPU, compute on the CPU, read from disk (unified memory)
#: or nothing to serve (every expert resident).
MISS_PATHS = ("copy", "cpu", "disk", "none")
#: What a plan may be asked for: let the cost model choose per plan, or force copies or CPU compute.
MISS_PATH_CHOICES = ("auto", "copy", "cpu")


def dense_bytes_per_token(config: NemotronHConfig, dense_dtype: str, context: int, kv_dtype: str = "bf16") -> int:
    """Bytes the GPU reads per decoded token besides routed experts.

    Non-expert weights (one embedding row instead of the table), the KV cache at ``context``
    tokens, and the Mamba state read and written.
    """
    groups = config.non_expert_bytes_by_group(dense_dtype)
    weights = sum(groups.values()) - groups["embeddings"] + 2 * config.hidden_size
    kv = context * config.kv_bytes_per_token(KV_DTYPE_BYTES[kv_dtype])
    return int(weights + kv + 2 * config.mamba_state_bytes())


@dataclass
class LayerTraffic:
    """Expected experts per token for each MoE layer ([layers] arrays), by how they are served.

    ``copies``: misses copied host→device on demand (the layer waits for them); ``prefetched``:
    misses whose copy was issued a layer ahead; ``wasted``: prefetched experts never used;
    ``background``: copies into the cache of misses that the CPU computed; ``cpu``: misses
    computed on the CPU; ``disk``: misses read from disk (a subset of copies or CPU misses, or on
    unified memory the misses themselves).
    """

    hits: np.ndarray
    copies: np.ndarray
    prefetched: np.ndarray
    wasted: np.ndarray
    background: np.ndarray
    cpu: np.ndarray
    disk: np.ndarray

    @classmethod
    def zeros(cls, num_layers: int) -> LayerTraffic:
        return cls(*(np.zeros(num_layers) for _ in range(7)))


@dataclass
class CostReport:
    """Times in milliseconds per token; bytes per token per link."""

    layer_ms: np.ndarray
    dense_ms: float
    token_ms: float
    busy_ms: dict[str, float]
    bytes_per_token: dict[str, float]
    bound: str
    tokens_per_s: float = field(init=False)

    def __post_init__(self) -> None:
        self.tokens_per_s = 1000.0 / self.token_ms if self.token_ms > 0 else float("inf")

    def to_dict(self) -> dict[str, Any]:
        return {
            "tokens_per_s": round(self.tokens_per_s, 3),
            "bound": self.bound,
            "ms_per_token": round(self.token_ms, 4),
            "dense_ms_per_token": round(self.dense_ms, 4),
            "busy_ms_per_token": {k: round(v, 4) for k, v in self.busy_ms.items()},
            "bytes_per_token": {k: int(round(v)) for k, v in self.bytes_per_token.items()},
        }


@dataclass(frozen=True)
class CostModel:
    """Bandwidths (bytes/s) and sizes the cost of a token depends on; see the module docstring."""

    expert_bytes: int
    dense_bytes: int
    gpu_bw: float
    h2d_bw: float | None
    cpu_bw: float
    disk_bw: float
    cpu_overhead_s: float

    @classmethod
    def from_specs(cls, gpu: GpuSpec, host: HostSpec, expert_bytes: int, dense_bytes: int) -> CostModel:
        return cls(
            expert_bytes=int(expert_bytes),
            dense_bytes=int(dense_bytes),
            gpu_bw=gpu.mem_bw_gbps * 1e9 * GPU_BW_EFFICIENCY,
            h2d_bw=gpu.h2d_gbps * 1e9 if gpu.h2d_gbps else None,
            cpu_bw=host.cpu_bw_gbps * 1e9,
            disk_bw=host.disk_gbps * 1e9,
            cpu_overhead_s=host.cpu_overhead_us * 1e-6,
        )

    def _link(self, experts: np.ndarray | float) -> np.ndarray:
        experts = np.asarray(experts, dtype=np.float64)
        if self.h2d_bw is None:
            if np.any(experts > 0):
                raise ValueError("host-to-device copies on a unified-memory device; use the 'disk' miss path")
            return np.zeros_like(experts)
        return experts * self.expert_bytes / self.h2d_bw

    def evaluate(self, t: LayerTraffic) -> CostReport:
        eb = self.expert_bytes
        gpu = (t.hits + t.copies + t.prefetched) * eb / self.gpu_bw
        disk = t.disk * eb / self.disk_bw
        cpu = t.cpu * eb / self.cpu_bw + np.where(t.cpu > 0, self.cpu_overhead_s, 0.0)
        link = self._link(t.copies)
        demand = link + disk
        layer = np.maximum(np.maximum(gpu, demand), cpu)
        dense = self.dense_bytes / self.gpu_bw
        busy = {
            "gpu_memory": dense + float(gpu.sum()),
            "host_link": float(self._link(t.copies + t.prefetched + t.wasted + t.background).sum()),
            "cpu": float(cpu.sum()),
            "disk": float(disk.sum()),
        }
        critical = dense + float(layer.sum())
        token = max(critical, busy["host_link"], busy["cpu"], busy["disk"])
        if token > critical:  # a resource busier than the whole critical path bounds the token
            bound = max(("host_link", "cpu", "disk"), key=lambda k: busy[k])
        else:  # attribute each layer's time to the resource that set it
            sets_gpu = (gpu >= demand) & (gpu >= cpu)
            sets_cpu = ~sets_gpu & (cpu >= demand)
            sets_io = ~sets_gpu & ~sets_cpu
            on_path = {
                "gpu_memory": dense + float(gpu[sets_gpu].sum()),
                "cpu": float(cpu[sets_cpu].sum()),
                "host_link": float(demand[sets_io & (link >= disk)].sum()),
                "disk": float(demand[sets_io & (link < disk)].sum()),
            }
            bound = max(on_path, key=lambda k: on_path[k])
        bytes_per_token = {
            "gpu_memory": self.dense_bytes + float((t.hits + t.copies + t.prefetched).sum()) * eb,
            "host_to_device": float((t.copies + t.prefetched + t.wasted + t.background).sum()) * eb,
            "cpu_dram": float(t.cpu.sum()) * eb,
            "disk": float(t.disk.sum()) * eb,
        }
        return CostReport(
            layer_ms=layer * 1e3, dense_ms=dense * 1e3, token_ms=token * 1e3,
            busy_ms={k: v * 1e3 for k, v in busy.items()}, bytes_per_token=bytes_per_token, bound=bound,
        )

    def miss_time(self, path: str, top_k: int = 1) -> float:
        """Seconds to serve one miss by ``path`` ('copy' or 'cpu'); the CPU's per-layer overhead is
        spread over ``top_k`` misses (a layer with many misses pays it once)."""
        if path == "copy":
            return float("inf") if self.h2d_bw is None else self.expert_bytes / self.h2d_bw
        if path == "cpu":
            return self.expert_bytes / self.cpu_bw + self.cpu_overhead_s / max(top_k, 1)
        raise ValueError(f"unknown miss path {path!r}")
