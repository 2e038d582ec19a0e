"""The device-memory budget as a hard cap: every device allocation the library makes goes through here.

Dense weights, expert slot banks, staging slots, slot tables and the reserve for caches and
activations are each charged to the :class:`DeviceLedger` under a name. An allocation that would
take the total past the budget raises :class:`~residency.errors.BudgetError` with the list of what
holds the memory, before anything is allocated.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import BudgetError


def _fmt(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n < 2**30 else f"{n / 2**30:.2f} GiB"


class DeviceLedger:
    """Bytes charged on one device under a budget (``None`` = unlimited, counted only)."""

    def __init__(self, device: torch.device, budget_bytes: int | None) -> None:
        self.device = device
        self.budget_bytes = budget_bytes
        self.items: dict[str, int] = {}
        self.allocated_bytes = 0
        self.peak_bytes = 0

    def charge(self, nbytes: int, what: str) -> None:
        """Account ``nbytes`` under ``what``; raise if the budget would be exceeded."""
        if nbytes < 0:
            raise ValueError("cannot charge a negative size")
        if self.budget_bytes is not None and self.allocated_bytes + nbytes > self.budget_bytes:
            held = "; ".join(f"{k} {_fmt(v)}" for k, v in sorted(self.items.items(), key=lambda kv: -kv[1]))
            raise BudgetError(
                f"the device budget of {_fmt(self.budget_bytes)} on {self.device} cannot hold {what} "
                f"({_fmt(nbytes)}) on top of {_fmt(self.allocated_bytes)} already allocated ({held or 'nothing'}); "
                "raise vram_budget or plan fewer expert slots"
            )
        self.items[what] = self.items.get(what, 0) + nbytes
        self.allocated_bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self.allocated_bytes)

    def release(self, nbytes: int, what: str) -> None:
        held = self.items.get(what, 0)
        if nbytes > held:
            raise ValueError(f"releasing {nbytes} bytes of {what!r}, only {held} charged")
        self.items[what] = held - nbytes
        self.allocated_bytes -= nbytes

    def empty(self, shape: Sequence[int], dtype: torch.dtype, what: str) -> torch.Tensor:
        """``torch.empty`` on the device, charged to ``what`` first."""
        numel = 1
        for s in shape:
            numel *= int(s)
        self.charge(numel * dtype.itemsize, what)
        return torch.empty(tuple(shape), dtype=dtype, device=self.device)

    @property
    def free_bytes(self) -> int | None:
        return None if self.budget_bytes is None else self.budget_bytes - self.allocated_bytes
