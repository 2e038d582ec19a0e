"""Device slot cache of one MoE layer: a slot bank, the expert→slot table the kernels read, and slot state.

The bank ``[slots, record]`` has the host store's record layout, so one copy fills a slot; its
``up`` / ``down`` views are what :func:`residency.kernels.moe_gather_gemm` reads through
``table`` (``table[e]`` = slot of expert ``e``, -1 = none). Slots ``0 .. len(static)-1`` hold the
plan's static experts for the whole run; the rest are managed by the eviction policy of
:mod:`residency.runtime.policy`, the same code the simulator replays.

Slot state (``state``, rows defined in :mod:`residency.runtime.control`), the source of the
residency promises:

- ``EXPERT``: whose record is in (or on its way to) the slot;
- ``JOB``: the copy job in flight into it, or -1 once landed; only then is the slot *resident*
  (the kernel of a call that needs it is ordered after the job, never before);
- ``PREFETCHED``: filled by a look-ahead copy not yet used.

``jobs`` maps each job in flight to its :class:`~residency.runtime.copies.CopyTicket`;
``marker`` marks the last kernel that read the bank (a copy into the bank starts only after it:
on CUDA an event, on the CPU device compute is synchronous and it stays None). One marker per
layer is enough: between two calls of a layer no other kernel reads its bank.

The policy is told which experts are in flight, and the current call pins its own experts, so a
slot in use by the current call or in flight is never chosen as a victim. The table has a host
copy (``table_host``) that the compiled bookkeeping writes; on the CPU device it is the table
itself, on CUDA (and with ``mirror_table``, for tests) :meth:`flush_table` copies it to the device
(2 KiB for 512 experts) after changes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from . import control
from .copies import CopyTicket, HostUploads
from .ledger import DeviceLedger
from .policy import LRU, ExpertCache, make_policy
from .store import ExpertLayout


class SlotCache:
    """One MoE layer's device slots (see the module docstring)."""

    def __init__(self, moe_index: int, num_experts: int, static: Sequence[int], dynamic_slots: int,
                 layout: ExpertLayout, ledger: DeviceLedger, *, policy: str = LRU.name,
                 prior: np.ndarray | None = None, prior_tokens: float = 64.0, mirror_table: bool = False) -> None:
        self.moe_index = moe_index
        self.num_experts = num_experts
        self.layout = layout
        self.num_slots = len(static) + dynamic_slots
        self.bank = ledger.empty((self.num_slots, layout.record_numel), layout.dtype, f"slots of MoE layer {moe_index}")
        self.up = layout.up(self.bank)
        self.down = layout.down(self.bank)
        self.table = ledger.empty((num_experts,), torch.int32, "slot tables")
        self.table.fill_(-1)
        if self.table.device.type == "cpu" and not mirror_table:
            self.table_host = self.table.numpy()  # written in place by the bookkeeping
            self._table_src = None
        else:
            self.table_host = np.full(num_experts, -1, dtype=np.int32)
            self._table_src = torch.from_numpy(self.table_host)
        self._upload = HostUploads(self.table.device)
        self._table_dirty = False
        kwargs = {} if prior is None else {"prior": prior, "prior_tokens": prior_tokens}
        self.policy: ExpertCache = make_policy(policy, num_experts, self.num_slots, list(static), **kwargs)
        self.state = control.new_state(self.num_slots)
        self.jobs: dict[int, CopyTicket] = {}
        self.marker: object | None = None
        self.static = list(static)
        self._next_job = 0

    # ------------------------------------------------------------------ jobs
    def new_job(self) -> int:
        """A fresh job id for slots about to be filled (in ``jobs`` with its ticket once issued)."""
        self._next_job += 1
        return self._next_job

    def assign_static(self, job: int) -> np.ndarray:
        """State and table for the static experts in slots ``0 .. len(static)-1`` (job ``job``); returns the slots."""
        n = len(self.static)
        slots = np.arange(n, dtype=np.int64)
        self.state[control.EXPERT, :n] = self.static
        self.state[control.JOB, :n] = job
        self.state[control.PREFETCHED, :n] = 0
        self.table_host[self.static] = slots
        self._table_dirty = True
        return slots

    def poll(self) -> None:
        """Mark slots whose copies have completed as resident."""
        if self.jobs:
            for job, ticket in list(self.jobs.items()):
                if ticket.done():
                    self._landed(job)

    def _landed(self, job: int) -> None:
        ticket = self.jobs[job]
        if ticket.error is not None:  # its slots hold no expert: the runtime repairs them (OffloadRuntime.repair)
            raise RuntimeError(f"MoE layer {self.moe_index}: an expert copy failed: {ticket.error}") from ticket.error
        del self.jobs[job]
        control.job_landed(self.state, job)

    def lost_slots(self) -> np.ndarray:
        """Slots whose copy job was never issued (an error or interrupt between admission and issue) or failed:
        the policy and the table say they hold their expert, their bytes do not. Their jobs are forgotten."""
        jobs = self.state[control.JOB]
        lost = []
        for s in np.flatnonzero(jobs >= 0).tolist():
            ticket = self.jobs.get(int(jobs[s]))
            if ticket is None or (ticket.done() and ticket.error is not None):
                lost.append(s)
        for job in {int(jobs[s]) for s in lost}:
            self.jobs.pop(job, None)
        return np.asarray(lost, dtype=np.int64)

    def settle(self) -> float:
        """Wait on the host for every copy job in flight into the bank and mark its slots resident; returns seconds
        stalled. (What the simulator assumes at a decode call: earlier calls' copies have landed.)"""
        stalled = 0.0
        for job, ticket in list(self.jobs.items()):
            stalled += ticket.wait()
            self._landed(job)
        return stalled

    def wait(self, jobs: Sequence[int]) -> float:
        """Order compute after the copy jobs ``jobs`` (host wait on the CPU device); returns seconds stalled."""
        stalled = 0.0
        for job in jobs:
            ticket = self.jobs.get(job)
            if ticket is None:  # landed already
                continue
            if not ticket.done():  # (a look-ahead copy issued a layer earlier has usually landed: no wait to queue)
                stalled += ticket.order_before_compute()
                if not ticket.done():
                    continue
            self._landed(job)
        return stalled

    # ------------------------------------------------------------------ table
    def mark_table_changed(self) -> None:
        self._table_dirty = True

    def flush_table(self) -> None:
        """Bring the device table up to date with ``table_host`` (a no-op on the CPU device)."""
        if not self._table_dirty:
            return
        self._table_dirty = False
        if self._table_src is not None:  # (through a page-locked block: table_host may change right after)
            self._upload(self._table_src, out=self.table)

    # ------------------------------------------------------------------ checks
    def check_resident(self, slots: Sequence[int], experts: Sequence[int]) -> None:
        """Raise if a slot about to be computed has not landed or holds another expert (a broken promise).

        A host-side check; the runtime runs it when built with ``verify=True``. On the CPU device compute is
        ordered on the host, so a copy still in flight here is a broken promise. On CUDA the compute stream is
        ordered after the copies on the device, which the host cannot see: there it first waits on the host for
        the slots' copies, then checks what they hold. It also checks the table the kernel reads.
        """
        table = self.table.cpu().numpy()  # what the kernel reads
        for s, e in zip(np.asarray(slots).tolist(), np.asarray(experts).tolist()):
            job = int(self.state[control.JOB, s])
            ticket = self.jobs.get(job) if job >= 0 else None
            if ticket is not None and self.table.device.type == "cuda":
                ticket.wait()
            in_flight = ticket is not None and not ticket.done()
            if int(self.state[control.EXPERT, s]) != e or in_flight or int(table[e]) != s:
                raise AssertionError(
                    f"MoE layer {self.moe_index}: slot {s} computed for expert {e} holds "
                    f"{int(self.state[control.EXPERT, s])} (in flight={in_flight}, table says {int(table[e])})"
                )
