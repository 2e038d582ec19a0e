"""Device slot cache of one MoE layer: a slot bank, the expert→slot table the kernels read, and slot state.

The bank ``[slots, record]`` has the host store's record layout, so one copy fills a slot; its
``up`` / ``down`` views are what :func:`residency.kernels.moe_gather_gemm` reads through
``table`` (``table[e]`` = slot of expert ``e``, -1 = none). Slots ``0 .. len(static)-1`` hold the
plan's static experts for the whole run; the rest are managed by the eviction policy of
:mod:`residency.runtime.policy`, the same code the simulator replays.

State per slot, the source of the residency promises:

- ``expert[s]``: whose data is in (or on its way to) the slot;
- ``ticket[s]``: the copy in flight into it, or None once landed;
- ``landed[s]``: the copy has completed; only then is the slot *resident* (the kernel of a call
  that needs it is ordered after the copy, never before);
- ``release[s]``: marks the last compute that read the slot; a copy into the slot starts only
  after it (on CUDA an event; on the CPU device compute is synchronous and it stays None);
- ``prefetched[s]``: filled by a look-ahead copy not yet used.

The policy is told which experts are in flight, and the current call pins its own experts, so a
slot in use by the current call or in flight is never chosen as a victim.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .copies import CopyTicket
from .ledger import DeviceLedger
from .policy import LRU, ExpertCache, make_policy
from .store import ExpertLayout


class SlotCache:
    """One MoE layer's device slots (see the module docstring)."""

    def __init__(self, moe_index: int, num_experts: int, static: Sequence[int], dynamic_slots: int,
                 layout: ExpertLayout, ledger: DeviceLedger, *, policy: str = LRU.name,
                 prior: np.ndarray | None = None, prior_tokens: float = 64.0) -> None:
        self.moe_index = moe_index
        self.num_experts = num_experts
        self.layout = layout
        self.num_slots = len(static) + dynamic_slots
        self.bank = ledger.empty((self.num_slots, layout.record_numel), layout.dtype, f"slots of MoE layer {moe_index}")
        self.up = layout.up(self.bank)
        self.down = layout.down(self.bank)
        self.table = ledger.empty((num_experts,), torch.int32, "slot tables")
        self.table.fill_(-1)
        self._table_updates: dict[int, int] = {}  # expert -> slot (-1 = none), written by flush_table
        kwargs = {} if prior is None else {"prior": prior, "prior_tokens": prior_tokens}
        self.policy: ExpertCache = make_policy(policy, num_experts, self.num_slots, list(static), **kwargs)
        self.expert = np.full(self.num_slots, -1, dtype=np.int64)
        self.landed = np.zeros(self.num_slots, dtype=bool)
        self.ticket: list[CopyTicket | None] = [None] * self.num_slots
        self.inflight: set[int] = set()  # slots whose ticket is not None
        self.release: list[object | None] = [None] * self.num_slots
        self.prefetched = np.zeros(self.num_slots, dtype=bool)
        self.static = list(static)

    # ------------------------------------------------------------------ state
    def poll(self) -> None:
        """Mark slots whose copies have completed as resident."""
        for s in [s for s in self.inflight if self.ticket[s].done()]:
            self._landed(s)

    def _landed(self, s: int) -> None:
        self.landed[s] = True
        self.ticket[s] = None
        self.inflight.discard(s)

    def inflight_experts(self) -> np.ndarray:
        return self.expert[sorted(self.inflight)] if self.inflight else np.empty(0, dtype=np.int64)

    def slot_of(self, expert: int) -> int:
        s = self.policy.lookup(expert)
        return -1 if s is None else s

    def assign(self, slot: int, expert: int, ticket: CopyTicket | None, evicted: int | None) -> None:
        """Record that ``slot`` now receives ``expert`` (its copy ``ticket``), displacing ``evicted``."""
        if evicted is not None:
            self._table_updates[evicted] = -1
        self.expert[slot] = expert
        self.landed[slot] = ticket is None
        self.ticket[slot] = ticket
        if ticket is None:
            self.inflight.discard(slot)
        else:
            self.inflight.add(slot)
        self.prefetched[slot] = False
        self._table_updates[expert] = slot

    def flush_table(self) -> None:
        """Write the slot-table changes since the last flush to the device table (one indexed write)."""
        if not self._table_updates:
            return
        experts = np.fromiter(self._table_updates, dtype=np.int64, count=len(self._table_updates))
        slots = np.fromiter(self._table_updates.values(), dtype=np.int32, count=len(self._table_updates))
        self._table_updates.clear()
        if self.table.device.type == "cpu":
            self.table.numpy()[experts] = slots
        else:
            self.table[torch.from_numpy(experts).to(self.table.device)] = torch.from_numpy(slots).to(self.table.device)

    def wait(self, slots: Sequence[int]) -> float:
        """Order compute after the copies into ``slots`` (host wait on the CPU device); returns seconds stalled."""
        pending = [s for s in slots if s in self.inflight]
        if not pending:
            return 0.0
        stalled = 0.0
        for ticket in {id(self.ticket[s]): self.ticket[s] for s in pending}.values():
            stalled += ticket.order_before_compute()
        for s in pending:
            if self.ticket[s].done():
                self._landed(s)
        return stalled

    def check_resident(self, slots: Sequence[int], experts: Sequence[int]) -> None:
        """Raise if a slot about to be computed has not landed or holds another expert (a broken promise).

        A host-side check, meaningful where compute is ordered on the host (the CPU device); the
        runtime runs it when built with ``verify=True``.
        """
        for s, e in zip(slots, experts):
            if int(self.expert[s]) != int(e) or (self.ticket[s] is not None and not self.ticket[s].done()):
                raise AssertionError(
                    f"MoE layer {self.moe_index}: slot {s} computed for expert {e} holds {int(self.expert[s])} "
                    f"(landed={bool(self.landed[s])}, in flight={self.ticket[s] is not None})"
                )
