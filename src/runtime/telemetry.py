"""Counters of the offload runtime, per MoE layer, and the one-line summary printed after generation.

Counts are per distinct expert per MoE layer per forward call: at batch-1 decode a step routes
``top_k`` distinct experts in every MoE layer, so ``hits + misses = top_k x MoE layers x steps``.

- ``hits``: the expert had a device slot (resident, or its copy already issued) when looked up;
- ``misses``: it had none;
- ``demand_copies``: copies issued for the current call's own needs (misses and staging);
- ``prefetch_issued`` / ``prefetch_used`` / ``prefetch_wasted``: look-ahead copies issued, hit
  before their slot was reused, or evicted unused;
- ``prefetch_precision`` = used / issued and ``prefetch_recall`` = used / (used + misses): the
  share of guesses that were right, and the share of would-be misses (experts without a slot before
  the look-ahead) that a guess covered (None when undefined; derived from the counts above);
- ``cpu_computed``: missed experts computed on the CPU from host memory;
- ``h2d_bytes``: bytes copied host → device; ``disk_bytes``: bytes read from the checkpoint on demand;
- ``stall_s``: host time spent waiting for copies (on CUDA the wait is on the device and shows as 0).

Copies are counted when a layer call decides them, before they are issued: if the call then
raises, the copies it had not issued yet stay counted, and :meth:`OffloadRuntime.repair
<residency.runtime.backend.OffloadRuntime.repair>` moves their bytes before the error reaches the caller.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

COUNTER_NAMES = ("hits", "misses", "demand_copies", "prefetch_issued", "prefetch_used", "prefetch_wasted",
                 "cpu_computed", "h2d_bytes", "disk_bytes")
#: columns of :attr:`Telemetry.counts`, in the order of :data:`COUNTER_NAMES`
(HITS, MISSES, DEMAND_COPIES, PREFETCH_ISSUED, PREFETCH_USED, PREFETCH_WASTED, CPU_COMPUTED, H2D_BYTES,
 DISK_BYTES) = range(len(COUNTER_NAMES))


@dataclass
class LayerCounters:
    """One MoE layer's counters (or a sum of layers'), as :meth:`Telemetry.as_dict` reports them."""

    hits: int = 0
    misses: int = 0
    demand_copies: int = 0
    prefetch_issued: int = 0
    prefetch_used: int = 0
    prefetch_wasted: int = 0
    cpu_computed: int = 0
    h2d_bytes: int = 0
    disk_bytes: int = 0
    stall_s: float = 0.0


class Telemetry:
    """Per-layer counters of one phase (prefill or decode); :meth:`as_dict` is ``stats()["experts"]``.

    ``counts [layers, len(COUNTER_NAMES)]`` (int64) is added to in place: a layer call's row
    (``rows[j]``, a view made once) is passed to the runtime's compiled bookkeeping, which counts
    there (no Python work per counter per call); ``stall_s`` (a list, one float per layer) holds
    the host seconds spent waiting for copies.
    """

    def __init__(self, num_layers: int) -> None:
        self.counts = np.zeros((num_layers, len(COUNTER_NAMES)), dtype=np.int64)
        self.rows = list(self.counts)
        self.stall_s = [0.0] * num_layers

    @classmethod
    def for_layers(cls, n: int) -> Telemetry:
        return cls(n)

    @property
    def layers(self) -> list[LayerCounters]:
        """A snapshot of every layer's counters."""
        return [LayerCounters(*row, stall_s=stall) for row, stall in zip(self.counts.tolist(), self.stall_s)]

    def add(self, other: Telemetry) -> None:
        self.counts += other.counts
        self.stall_s = [a + b for a, b in zip(self.stall_s, other.stall_s)]

    def total(self) -> LayerCounters:
        return LayerCounters(*self.counts.sum(axis=0).tolist(), stall_s=sum(self.stall_s))

    def reset(self) -> None:
        self.counts[:] = 0  # in place: the row views stay valid
        self.stall_s = [0.0] * len(self.stall_s)

    def as_dict(self) -> dict[str, Any]:
        total = with_rates(asdict(self.total()))
        total["per_layer"] = [with_rates(asdict(layer)) for layer in self.layers]
        return total


def with_rates(counts: dict[str, Any]) -> dict[str, Any]:
    """``counts`` plus ``prefetch_precision`` and ``prefetch_recall`` (see the module docstring)."""
    used, issued = counts["prefetch_used"], counts["prefetch_issued"]
    would_miss = used + counts["misses"]
    counts["prefetch_precision"] = used / issued if issued else None
    counts["prefetch_recall"] = used / would_miss if would_miss else None
    return counts


def summary_line(experts: dict[str, Any], memory: dict[str, Any] | None = None) -> str:
    """One line: ``experts: 812 hits / 68 misses (92.3 %), 40 demand copies, 1200.0 MB to device, 12 on CPU,
    prefetch 25/30 used (recall 27 %), stall 0.010 s`` (then disk reads and device memory when known)."""
    looked = experts["hits"] + experts["misses"]
    rate = f"{100 * experts['hits'] / looked:.1f} %" if looked else "n/a"
    parts = [
        f"experts: {experts['hits']} hits / {experts['misses']} misses ({rate})",
        f"{experts['demand_copies']} demand copies",
        f"{experts['h2d_bytes'] / 1e6:.1f} MB to device",
        f"{experts['cpu_computed']} on CPU",
        f"prefetch {experts['prefetch_used']}/{experts['prefetch_issued']} used"
        + (f" (recall {100 * experts['prefetch_recall']:.0f} %)" if experts.get("prefetch_issued") else ""),
        f"stall {experts['stall_s']:.3f} s",
    ]
    if experts.get("disk_bytes"):
        parts.append(f"{experts['disk_bytes'] / 1e6:.1f} MB from disk")
    if memory is not None and memory.get("device_budget_bytes"):
        parts.append(f"device {memory['device_allocated_bytes'] / 2**20:.1f} of "
                     f"{memory['device_budget_bytes'] / 2**20:.1f} MiB")
    return ", ".join(parts)
