"""The offloaded MoE backend: serves each MoE layer's routed experts from device slots, the host store or the CPU.

One :class:`OffloadRuntime` holds the state of every MoE layer. The model's layers reach it
through per-layer expert backends that the public API installs (``residency.offload``; the
runtime does not import the model), which call :meth:`OffloadRuntime.submit` and
:meth:`OffloadRuntime.collect` with the layer's work item (an object with the attributes of
``residency.model.moe.ExpertWork``); it also listens to step boundaries. Per forward call of a
layer:

1. The call's distinct experts, in order of first appearance, are looked up. In a decode step
   they go through the layer's eviction policy exactly as the simulator replays them (all pinned,
   then lookup / admit on a miss / use, experts with copies in flight pinned too; without look-ahead
   into the layer, copies still in flight from earlier calls land first, so the pinned set does not
   depend on their timing); a prefill call only looks up, so a long prompt does not wipe the decode
   working set.
2. Each miss is either computed on the CPU from host memory (:mod:`residency.runtime.cpu_experts`)
   or copied: into the slot the policy admitted it to (demand priority), or, when the policy
   admits nothing (no dynamic slots, or a prefill call), through shared staging slots in rounds.
   A miss computed on the CPU that the policy admitted is still copied into its slot, at prefetch
   priority, for later calls (the simulator's ``cpu`` miss path). Per miss the choice follows
   ``cpu_experts``: always, never, or ``"auto"``: the layer's planned miss path, and for
   ``copy`` layers the cheaper of copying (record bytes / host link) and computing (tokens x
   record bytes / CPU expert throughput).
3. The GPU part runs as one :func:`~residency.kernels.moe_gather_gemm` launch over the layer's
   bank through its slot table (CPU and staged pairs skipped), after the copies it needs have
   landed; staged rounds add one launch each. The CPU pairs' inputs are read to the host before
   those launches are queued; the CPU part is computed in :meth:`OffloadRuntime.collect`, after the
   model has queued the shared expert, so on CUDA the GPU runs both while the host computes it (no
   worker thread: no hand-over, no GIL contention), and it is added in the latent space.
4. Look-ahead (decode): the next MoE layer's router applied to this layer's normalised hidden
   state predicts its experts (read to the host together with the call's own ids: one wait on
   CUDA); predicted experts without a slot are admitted (never over a pinned or in-flight
   expert), in the same compiled call as this layer's own bookkeeping (:func:`control.layer_call`),
   and copied at prefetch priority behind every demand copy, before the call's kernels are queued.
   Fills of experts the plan left on disk are read (several at once) and copied on a thread of
   their own, so the call does not wait for the disk; a call that computes from such a slot waits
   for its read and copy like for any copy in flight.

Unified memory: the kernels read the store's records in place through a fixed table; experts left
on disk are staged. A layer with no expert on disk needs no host decision in a one-token call, so
there its routing ids are not read on the host at all (hits are the token's top-k experts).

Exactness: routing is never changed; every routed pair is computed once, on the GPU or the CPU. A
copy that failed, or one never issued because an error or interrupt came between a slot's
admission and its copy, is repaired (:meth:`OffloadRuntime.repair`) before the error propagates.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from contextlib import nullcontext as _no_context
from dataclasses import dataclass, field

import numpy as np
import torch

from ..kernels import moe_gather_gemm, moe_gather_gemm_quant
from ..kernels.moe.gather_gemm import intermediate_dtype
from ..kernels.moe.quant_gather_gemm import quant_intermediate_dtype
from . import control
from . import telemetry as tm
from .cache import SlotCache
from .copies import (
    DEMAND,
    PREFETCH,
    CopyEngine,
    CopyTicket,
    CudaCopyEngine,
    DeferredTicket,
    HostUploads,
    JoinedTicket,
    ThreadCopyEngine,
)
from .ledger import DeviceLedger
from .policy import LRU
from .store import HostExpertStore
from .telemetry import Telemetry

MODES = ("cuda", "unified", "cpu")
CPU_CHOICES = ("auto", True, False)


def is_cpu_choice(value: object) -> bool:
    """Whether ``value`` is one of :data:`CPU_CHOICES` itself (``1`` equals True but is not a choice)."""
    return value is True or value is False or (isinstance(value, str) and value == "auto")


@dataclass(frozen=True)
class LayerSlotPlan:
    """What the runtime needs of a plan for one MoE layer."""

    static: tuple[int, ...]
    dynamic_slots: int
    miss_path: str = "copy"  # copy | cpu | disk | none
    prior: np.ndarray | None = None
    disk: tuple[int, ...] = ()  # experts the host store leaves on disk (read from the checkpoint when missed)


@dataclass(frozen=True)
class RuntimeOptions:
    """How the runtime serves misses.

    ``cpu_experts``: True computes every miss on the CPU, False none, ``"auto"`` decides per miss
    (see the module docstring) from ``h2d_gbps`` and ``cpu_expert_gbps``. ``disk_readers``: how
    many experts a copy job reads from disk at once (threads; 1 reads them one after another).
    ``copy_delay`` (tests): seconds to sleep before each copy on the CPU device's copy thread.
    ``verify`` (tests): check
    on the host, before each launch, that every slot it reads holds its expert and has landed, and
    that the table the kernel reads says so. ``mirror_tables`` (tests): on the CPU device too, keep
    host copies of the slot tables and copy them to the tables the kernels read after changes, as
    on CUDA, so that path runs without a GPU.
    """

    mode: str = "cpu"
    policy: str = LRU.name
    prefetch: bool = True
    cpu_experts: str | bool = "auto"
    staging_slots: int = 8
    prior_tokens: float = 64.0
    h2d_gbps: float = 25.0
    cpu_expert_gbps: float = 10.0
    disk_readers: int = 8
    verify: bool = False
    mirror_tables: bool = False
    copy_delay: Callable[[], float] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if not is_cpu_choice(self.cpu_experts):
            raise ValueError(f"cpu_experts must be 'auto', True or False, got {self.cpu_experts!r}")
        if isinstance(self.staging_slots, bool) or not isinstance(self.staging_slots, int) or self.staging_slots < 1:
            raise ValueError("at least one staging slot is needed to serve misses that are not cached")
        if isinstance(self.disk_readers, bool) or not isinstance(self.disk_readers, int) or self.disk_readers < 1:
            raise ValueError(f"disk_readers must be a positive int (threads reading experts from disk), got "
                             f"{self.disk_readers!r}")


def host_fp32(latent: torch.Tensor, weights: torch.Tensor, *, merged: bool) -> tuple[np.ndarray, np.ndarray]:
    """``latent [T, L]`` and ``weights [T, k]`` as C-contiguous fp32 host arrays; ``merged``: through one
    device-to-host copy of both side by side (one wait on CUDA instead of two)."""
    if not merged:
        return _host_view(latent), _host_view(weights)
    both = torch.cat((latent.detach().float(), weights.detach().float()), dim=1).cpu().numpy()
    return np.ascontiguousarray(both[:, : latent.shape[1]]), np.ascontiguousarray(both[:, latent.shape[1]:])


def _host_view(t: torch.Tensor) -> np.ndarray:
    """``t`` as a C-contiguous fp32 host array: a view when it is one already (the cpu device), else a copy."""
    if t.is_cpu and t.dtype == torch.float32 and not t.requires_grad and t.is_contiguous():
        return t.numpy()
    return t.detach().to("cpu", torch.float32).contiguous().numpy()


@dataclass(slots=True)
class _CpuPart:
    """The CPU pairs of one layer call, read to the host in ``submit`` and computed in ``collect``."""

    layer: int
    pairs: np.ndarray  # int64 [PAIR_ROWS, >= n]: token, top-k position, store record, flat index of each CPU pair
    n: int  # how many pairs
    x: np.ndarray  # [T, L] fp32 latent activations
    weights: np.ndarray  # [T, k] fp32 routing weights (the CPU kernels read the pairs' own)
    h_round: int = 0  # how the intermediate is rounded: as the GPU kernel of the call's other pairs does

    def own_pairs(self) -> None:
        """Copy the pair lists, the runtime's workspace until now, before that is reused."""
        self.pairs = self.pairs[:, :self.n].copy()


@dataclass(slots=True)
class _Pending:
    """What ``submit`` started and ``collect`` finishes."""

    out: torch.Tensor  # [T, L] GPU part: latent dtype, or fp32 when staged or CPU parts are added to it
    cpu: _CpuPart | None
    out_host: np.ndarray | None = None  # the cpu device: ``out`` as an array, which the CPU part is added into


def _finish_copies(fills, copies, keep) -> None:
    """Let queued fills and copies in flight finish (``keep``: what they write into, held until then)."""
    try:
        if fills is not None:
            fills.shutdown(cancel_futures=True)
    except Exception:  # pragma: no cover - interpreter shutdown order varies
        pass
    try:
        if copies is not None:
            copies.synchronize()
    except Exception:  # pragma: no cover - interpreter shutdown order varies
        pass
    del keep


class DiskReader:
    """Reads the records of experts a host store leaves on disk into new host records, several at once.

    Positioned reads of the shared checkpoint file on up to ``threads`` threads: a disk serves
    parallel requests faster than one after another. It holds the store, not the runtime, so the
    runtime's fills thread (which uses one) never keeps a deleted model's runtime alive.
    """

    def __init__(self, store: HostExpertStore, threads: int, *, pinned: bool, name: str) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.store = store
        self.pinned = pinned  # page-locked records (CUDA: copied from asynchronously)
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix=name) if threads > 1 else None

    def read(self, j: int, expert: int) -> torch.Tensor:
        """Expert ``expert`` of layer ``j`` (on disk), read into a new host record."""
        lay = self.store.layout
        out = torch.empty(lay.record_numel, dtype=lay.dtype, pin_memory=self.pinned)
        self.store.read_from_disk(j, expert, out)
        return out

    def sources(self, j: int, experts: list[int]) -> list[torch.Tensor]:
        """The host records of layer ``j``'s ``experts``: views of the store, and records read now for those on disk.
        Returns once every read is done; a read's error is raised then (a Ctrl-C while waiting leaves the reads
        writing only the new records they were given)."""
        store = self.store
        on_disk = [e for e in experts if store.on_disk(j, e)]
        if len(on_disk) == 1 or self.pool is None:
            read = {e: self.read(j, e) for e in on_disk}
        else:
            from concurrent.futures import wait

            futures = {e: self.pool.submit(self.read, j, e) for e in on_disk}
            wait(futures.values())
            failed = [f.exception() for f in futures.values() if f.exception() is not None]
            if failed:
                error = next((x for x in failed if not isinstance(x, Exception)), failed[0])
                futures = failed = None  # (no cycle: error -> traceback -> this frame -> futures -> error)
                try:
                    raise error
                finally:
                    error = None
            read = {e: f.result() for e, f in futures.items()}
        return [read[e] if e in read else store.record(j, e) for e in experts]

    def shutdown(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()


class OffloadRuntime:
    """Offload state of every MoE layer; see the module docstring.

    Args:
        store: the host expert store (filled).
        layers: per MoE layer slot plan (static experts, dynamic slots, miss path, prior).
        ledger: the device budget every allocation is charged to.
        options: see :class:`RuntimeOptions`.
        routers: per MoE layer, ``hidden [T, D] -> (ids, weights, logits)`` (look-ahead prefetch).
        top_k: experts per token.
    """

    def __init__(self, store: HostExpertStore, layers: Sequence[LayerSlotPlan], ledger: DeviceLedger,
                 options: RuntimeOptions, routers: Sequence[Callable] | None, top_k: int) -> None:
        if len(layers) != store.num_layers:
            raise ValueError(f"{len(layers)} layer plans for {store.num_layers} MoE layers")
        self.store = store
        self.plans = list(layers)
        self.ledger = ledger
        self.options = options
        self.routers = list(routers) if routers is not None else None
        self.top_k = top_k
        self.device = ledger.device
        self.layout = store.layout
        self._record_bytes = store.layout.record_bytes
        # quantized records (NVFP4 / FP8 / W4A16) are read by the quantized gather-GEMM
        self._kernel = moe_gather_gemm_quant if store.layout.quantized else None
        self.telemetry = {"prefill": Telemetry.for_layers(store.num_layers),
                          "decode": Telemetry.for_layers(store.num_layers)}
        # experts the plan left on disk: read several at once for a call's own copies (_disk), and for look-ahead
        # fills read and then copied on a thread of their own (_fills, with readers of its own, so a call's reads
        # never queue behind guesses), so that the call that issued them does not wait for the disk
        self._disk = self._fill_disk = self._fills = None
        self._repairing = False  # a repair began and has not completed (see repair)
        self._closed = False
        if any((rows < 0).any() for rows in store.row_of_expert):
            from concurrent.futures import ThreadPoolExecutor

            pinned = self.device.type == "cuda"  # (also unified memory on a CUDA device: staged through copies)
            self._disk = DiskReader(store, options.disk_readers, pinned=pinned, name="residency-disk")
            self._fill_disk = DiskReader(store, options.disk_readers, pinned=pinned, name="residency-disk-fill-reads")
            self._fills = ThreadPoolExecutor(1, thread_name_prefix="residency-disk-fills")
        if self.device.type == "cuda":  # also unified memory on a CUDA device: staging copies on streams, ordered
            self.copies: CopyEngine = CudaCopyEngine(self.device)
            store.copy_device = self.device  # (unpinning the store waits for these streams)
        else:
            self.copies = ThreadCopyEngine(options.copy_delay)
        lay = self.layout
        self.caches: list[SlotCache | None] = []
        if options.mode == "unified":
            # the kernels read the store in place: its rows are the slots; disk experts go through staging
            self.caches = [None] * store.num_layers
            self.unified_tables = []
            for j in range(store.num_layers):
                table = ledger.empty((store.num_experts,), torch.int32, "slot tables")
                table.copy_(torch.from_numpy(store.row_of_expert[j].astype(np.int32)))
                self.unified_tables.append(table)
        else:
            for j, plan in enumerate(self.plans):
                self.caches.append(SlotCache(j, store.num_experts, plan.static, plan.dynamic_slots, lay, ledger,
                                             policy=options.policy, prior=plan.prior,
                                             prior_tokens=options.prior_tokens, mirror_table=options.mirror_tables))
        self._upload = HostUploads(self.device)  # small host-to-device copies: tables, masks, CPU sums, norms
        self.staging = ledger.empty((options.staging_slots, lay.record_numel), lay.dtype, "staging slots")
        self.staging_up, self.staging_down = lay.up(self.staging), lay.down(self.staging)
        self.staging_table = ledger.empty((store.num_experts,), torch.int32, "slot tables")
        if self.staging_table.device.type == "cpu" and not options.mirror_tables:
            self.staging_table_host, self._staging_table_src = self.staging_table.numpy(), None
        else:
            self.staging_table_host = np.full(store.num_experts, -1, dtype=np.int32)
            self._staging_table_src = torch.from_numpy(self.staging_table_host)
        self._staging_rows = np.arange(options.staging_slots, dtype=np.int64)
        self._staging_src_rows = np.empty(options.staging_slots, dtype=np.int64)  # a round's store records
        self.staging_marker: object | None = None
        # host workspaces of the compiled bookkeeping (runtime.control), reused by every call
        E = store.num_experts
        self._cpu_limits = [self._cpu_limit(j) for j in range(store.num_layers)]
        self._out = np.empty((control.OUT_ROWS, E + 1), dtype=np.int64)
        self._counts = np.zeros(control.N_COUNTS, dtype=np.int64)
        self._scratch_pair = np.zeros(E, dtype=np.int8)
        self._work = control.new_work(E)
        self._no_prediction = np.empty((0, 1), dtype=np.int64)  # layer_call's look-ahead input when there is none
        self._skip_views: dict[tuple[int, ...], torch.Tensor] = {}  # see _skip_tensor
        self._grow_pair_workspace(0)  # (the skip mask and CPU pair lists)
        # per layer, the arguments of layer_call that stay the same objects for the runtime's life (the policy's,
        # slot and table state, the store's records), gathered once: the decode path's host work is this call
        self._layer_args = [None if c is None else (c.policy._I, c.policy._F, c.state, store.row_of_expert[j],
                                                    c.table_host) for j, c in enumerate(self.caches)]
        self._open_part: _CpuPart | None = None  # a CPU part submitted, not yet collected
        self._ahead = [self._looks_ahead(j) for j in range(store.num_layers + 1)]  # per layer: predicted?
        # per layer: unified memory with no expert on disk (a call never stages, see _submit)
        self._in_place = [options.mode == "unified" and bool((rows >= 0).all()) for rows in store.row_of_expert]
        self._on_cpu = self.device.type == "cpu"
        # whether the slot tables the kernels read are device copies of the host tables the bookkeeping writes (CUDA,
        # or mirror_tables): else nothing is flushed
        self._mirrored = not self._on_cpu or options.mirror_tables
        self._store_views = [(store.up(j), store.down(j)) for j in range(store.num_layers)]  # up / down of each layer
        self._cpu_prepared: list = [None] * store.num_layers  # the CPU kernels' checked view of each layer's store
        # the CPU expert kernels of the store's format (imported here: their modules load numba kernels)
        # (their unchecked entries: the runtime builds the inputs with the right types and shapes itself)
        if self.layout.quantized:
            from .cpu_quant import run_prepared_quant

            self._cpu_call = run_prepared_quant
        else:
            from .cpu_experts import run_prepared

            self._cpu_call = run_prepared
        from .cpu_experts import rounding_code

        self._rounding_code = rounding_code
        self._no_norms = np.empty(0, dtype=np.float32)  # the CPU kernels' norms argument when none are wanted
        # the GPU kernels' prefill path keeps the intermediate relu(up @ x)^2 in 16 bits: CPU pairs of such a call are
        # rounded alike (see _intermediate_rounding); the kernels of the cpu device keep it in fp32
        self._gpu_kernels = self.device.type == "cuda"
        self._intermediate_dtype = quant_intermediate_dtype if self.layout.quantized else intermediate_dtype
        control.warm_up()  # compile the bookkeeping now, not in the first decode step
        if max(self._cpu_limits) > 0:
            self._warm_cpu_kernels()
        # the first copies into the banks and staging slots wait for what the compute stream has queued so far
        # (the banks' memory may have been used by kernels of the loading that are still running)
        start = self.copies.release_marker()
        self.staging_marker = start
        for cache in self.caches:
            if cache is not None:
                cache.marker = start
        self._load_static()

    # ------------------------------------------------------------------ set-up
    def _load_static(self) -> None:
        tickets = []
        for j, cache in enumerate(self.caches):
            if cache is None or not cache.static:
                continue
            job = cache.new_job()
            slots = cache.assign_static(job)
            experts = np.asarray(cache.static, dtype=np.int64)
            rows = self.store.row_of_expert[j][experts]
            tickets.append(self._issue(j, cache, slots, experts, rows, int((rows < 0).sum()), job, DEMAND))
            cache.flush_table()
        for t in tickets:
            t.wait()
        for cache in self.caches:
            if cache is not None:
                cache.poll()

    def _warm_cpu_kernels(self) -> None:
        """Compile (or load from numba's cache) the CPU expert kernel of this store's format now: the first
        compile of a quantized format takes seconds, which would otherwise stall the first CPU miss."""
        j = next((j for j, rows in enumerate(self.store.row_of_expert) if (rows >= 0).any()), None)
        if j is None:
            return
        row = int(self.store.row_of_expert[j][self.store.row_of_expert[j] >= 0][0])
        x = np.zeros((1, self.layout.width), dtype=np.float32)
        pairs = np.zeros((control.PAIR_ROWS, 1), np.int64)
        pairs[control.PAIR_ROW] = row
        part = _CpuPart(j, pairs, 1, x, np.zeros((1, 1), np.float32))
        self._cpu_compute(part, want_norms=False)

    def close(self) -> None:
        self._closed = True
        if self._fills is not None:  # (fills not started are dropped; one still reading issues its copy first)
            self._fills.shutdown(cancel_futures=True)
        self.copies.synchronize()
        self.copies.close()
        for reader in (self._disk, self._fill_disk):
            if reader is not None:
                reader.shutdown()

    def __del__(self) -> None:  # pragma: no cover - interpreter shutdown order varies
        # fills still reading, and copies still in flight, must land before the banks they write are freed. On a
        # thread of the runtime's own (a garbage-collector pass may run anywhere) waiting here could wait for this
        # very thread: a thread of its own does it then, keeping the banks until it is done.
        fills, copies = getattr(self, "_fills", None), getattr(self, "copies", None)
        if threading.current_thread().name.startswith("residency-"):  # (copy, disk and fill threads)
            keep = (getattr(self, "caches", None), getattr(self, "staging", None))
            try:
                threading.Thread(target=_finish_copies, args=(fills, copies, keep), name="residency-cleanup",
                                 daemon=True).start()
            except RuntimeError:  # interpreter shutdown: no new threads
                pass
        else:
            _finish_copies(fills, copies, None)

    # ------------------------------------------------------------------ step boundaries (StepListener)
    def begin_step(self, input_ids: torch.Tensor, is_decode: bool) -> None:
        # (whether a call is a decode step comes with each call's work item)
        if self._closed:
            raise RuntimeError("this offload runtime was closed; load the model again")
        if self._repairing:  # a repair was interrupted (a second Ctrl-C): finish it before anything runs
            self.repair(range(len(self.caches)))
        try:
            for cache in self.caches:
                if cache is not None:
                    cache.poll()
        except BaseException:
            self.repair(range(len(self.caches)))
            raise

    def end_step(self) -> None:
        pass

    # ------------------------------------------------------------------ telemetry
    def stats(self) -> dict:
        total = Telemetry.for_layers(self.store.num_layers)
        for phase in self.telemetry.values():
            total.add(phase)
        out = total.as_dict()
        out["by_phase"] = {name: t.as_dict() for name, t in self.telemetry.items()}
        return out

    def reset_stats(self) -> None:
        for t in self.telemetry.values():
            t.reset()

    # ------------------------------------------------------------------ copies
    def _copy(self, j: int, dst: torch.Tensor, slots: np.ndarray, experts: np.ndarray, rows: np.ndarray,
              from_disk: int, priority: int, after: object | None) -> CopyTicket:
        """Copy layer ``j``'s ``experts`` (store ``rows``, -1 on disk) into rows ``slots`` of ``dst`` as one job
        (its bytes are counted by the caller). Experts on disk are read first, several at once (:class:`DiskReader`)."""
        if not from_disk:
            return self.copies.copy_records(dst, self.store.buffers[j], slots, rows, priority, after)
        experts_l = experts.tolist()
        return self.copies.copy_many([(dst[s], src, after)
                                      for s, src in zip(slots.tolist(), self._disk.sources(j, experts_l))], priority)

    def _issue(self, j: int, cache: SlotCache, slots: np.ndarray, experts: np.ndarray, rows: np.ndarray,
               from_disk: int, job: int, priority: int) -> CopyTicket:
        """Issue job ``job`` (its slots' state already says so): ``experts`` into ``slots`` of the layer's bank."""
        if from_disk and priority == PREFETCH:
            ticket = self._fill_after_reads(j, cache, slots, experts, rows)
        elif from_disk:
            ticket = self._copy(j, cache.bank, slots, experts, rows, from_disk, priority, cache.marker)
        else:  # (the common case, without _copy's call)
            ticket = self.copies.copy_records(cache.bank, self.store.buffers[j], slots, rows, priority, cache.marker)
        cache.jobs[job] = ticket
        return ticket

    def _fill_after_reads(self, j: int, cache: SlotCache, slots: np.ndarray, experts: np.ndarray,
                          rows: np.ndarray) -> CopyTicket:
        """A prefetch-priority fill with experts on disk, without waiting for the disk: the records in RAM are copied
        now, the others read (several at once) and then copied on the fills thread. A call that computes from one
        of its slots waits for the read and the copy through the job's ticket, as for any copy in flight."""
        ram = rows >= 0
        tickets = []
        if ram.any():
            tickets.append(self.copies.copy_records(cache.bank, self.store.buffers[j], slots[ram], rows[ram], PREFETCH,
                                                    cache.marker))
        disk_slots, disk_experts = slots[~ram].tolist(), experts[~ram].tolist()  # (own lists: slots is a workspace)
        # (what the fill needs, not the runtime: a pending fill must not keep a deleted model's runtime alive)
        fill_reader, call_reader, copies = self._fill_disk, self._disk, self.copies
        bank, after, device = cache.bank, cache.marker, self.device

        def read_then_copy(by_caller: bool) -> CopyTicket:
            # (a call that needs the fill before the fills thread took it reads with the calls' readers, which never
            # queue behind guesses, and copies at demand priority, not behind the prefetches queued)
            sources = (call_reader if by_caller else fill_reader).sources(j, disk_experts)
            with torch.cuda.device(device) if device.type == "cuda" else _no_context():
                return copies.copy_many([(bank[s], src, after) for s, src in zip(disk_slots, sources)],
                                        DEMAND if by_caller else PREFETCH)

        tickets.append(DeferredTicket(self._fills, read_then_copy, len(disk_slots) * self._record_bytes))
        return tickets[0] if len(tickets) == 1 else JoinedTicket(tickets)

    def _gemm(self, *args, **kwargs) -> torch.Tensor:
        # looked up at call time so a benchmark can stub the module's moe_gather_gemm
        return (self._kernel or moe_gather_gemm)(*args, **kwargs)

    # ------------------------------------------------------------------ CPU choice
    def _cpu_limit(self, j: int) -> float:
        """A miss of layer ``j`` is computed on the CPU when its token count is below this (see the module docstring).

        For ``copy`` layers under ``"auto"``: computing (tokens x record bytes / CPU expert
        throughput) beats copying (record bytes / host link) when tokens < CPU GB/s / link GB/s.
        """
        if self.options.mode == "unified":  # the kernels read RAM experts in place: no miss to compute
            return 0.0
        choice = self.options.cpu_experts
        if choice is True or choice is False:
            return float("inf") if choice else 0.0
        path = self.plans[j].miss_path
        if path == "cpu":
            return float("inf")
        if path != "copy":
            return 0.0
        return self.options.cpu_expert_gbps / self.options.h2d_gbps

    def _ids_on_host(self, ids: torch.Tensor) -> np.ndarray:
        """Routing ids as a C-contiguous int64 host array (a view on the cpu device). Integer ids carry no autograd."""
        if ids.dtype is torch.int64 and ids.is_contiguous():
            return ids.numpy() if ids.is_cpu else ids.cpu().numpy()
        return np.ascontiguousarray(ids.cpu().numpy(), np.int64)

    # ------------------------------------------------------------------ one layer call
    def submit(self, j: int, work) -> _Pending:
        try:
            return self._submit(j, work)
        except BaseException:  # an error or Ctrl-C mid-call (a notebook carries on): no slot may be left stale
            self.repair((j, j + 1))
            raise

    def repair(self, layers) -> None:
        """Make every slot of ``layers`` whose copy was never issued or failed hold its expert again: copied now
        and waited for (a second failure raises). Called when a layer call or a step boundary raised, so that a
        caught error or an interrupt cannot leave a slot the policy counts as resident computed from stale
        bytes; the error itself is re-raised by the caller.

        Fills still reading from disk, and copies in flight, finish first: one interrupted between its issue and
        the record of its ticket would otherwise write into a slot after the slot was repaired and reused."""
        self._repairing = True  # (until it completes: an interrupted repair is run again at the next step)
        if self._fills is not None:
            self._fills.submit(lambda: None).result()  # (the fills thread runs its queue in order)
        self.copies.synchronize()
        for j in layers:
            cache = self.caches[j] if 0 <= j < len(self.caches) else None
            if cache is None:
                continue
            lost = cache.lost_slots()
            if not lost.size:
                continue
            experts = cache.state[control.EXPERT, lost]
            rows = self.store.row_of_expert[j][experts]
            self._copy(j, cache.bank, lost, experts, rows, int((rows < 0).sum()), DEMAND, cache.marker).wait()
            cache.state[control.JOB, lost] = -1
            cache.mark_table_changed()
            cache.flush_table()
        self._repairing = False

    def _submit(self, j: int, work) -> _Pending:
        decode = work.is_decode
        phase = self.telemetry["decode" if decode else "prefill"]
        tel = phase.rows[j]  # this layer's counters, added to in place (by layer_call, mostly)
        if self._in_place[j] and work.ids.shape[0] == 1:
            # unified memory with every expert of the layer in RAM, one token: the kernel reads the store in place
            # through its fixed table and the token's top-k experts are distinct hits, so nothing is read on the
            # host (no device-to-host wait in a decode step)
            tel[tm.HITS] += work.ids.shape[1]
            return _Pending(self._gemm(work.latent, *self._store_views[j], self.unified_tables[j], work.ids,
                                       work.weights, None, pair_norms=work.pair_norms), None)
        predicted_h = None
        if decode and self._ahead[j + 1]:
            # the next MoE layer's router on this layer's hidden state, read to the host with this call's ids:
            # on CUDA one wait (for the two routers), not two
            predicted = self.routers[j + 1](work.hidden)[0]
            if work.ids.is_cpu:  # nothing to copy
                ids_h, predicted_h = self._ids_on_host(work.ids), self._ids_on_host(predicted)
            else:
                both = self._ids_on_host(torch.cat((work.ids, predicted.to(work.ids.dtype)), dim=0))
                ids_h, predicted_h = both[: work.ids.shape[0]], both[work.ids.shape[0]:]
        else:
            ids_h = self._ids_on_host(work.ids)
        cache = self.caches[j]
        if self._open_part is not None:  # a CPU part not collected yet still reads the pair workspace: let go
            self._open_part.own_pairs()
            self._open_part = None
        if self._skip_ws.size < ids_h.size:  # workspaces of the skip mask and the CPU pair lists
            self._grow_pair_workspace(ids_h.size)
        pairs = self._pairs_ws
        n_gpu = n_pairs = 0
        if cache is None:  # unified memory: RAM experts are read in place, disk experts are staged
            w = self._work
            order = w[control.WORK_ORDER, :control.distinct_in_order(ids_h, w[control.WORK_SCRATCH],
                                                                     w[control.WORK_ORDER], w[control.WORK_TOKENS])]
            staged = order[self.store.row_of_expert[j][order] < 0]
            cpu = staged[:0]
            tel[tm.MISSES] += staged.shape[0]
            tel[tm.HITS] += order.shape[0] - staged.shape[0]
            table, up, down = self.unified_tables[j], *self._store_views[j]
            if staged.shape[0]:
                control.split_pairs(ids_h, cpu, staged, self._scratch_pair, self.store.row_of_expert[j],
                                    self._skip_ws[:ids_h.size].reshape(ids_h.shape), pairs)
        else:
            table, up, down = cache.table, cache.up, cache.down
            if decode and cache.jobs and not self._ahead[j]:
                # copies into this layer still in flight here are fills for later calls that an earlier call issued
                # (a miss computed on the CPU and admitted): let them land first, so that the policy sees the pinned
                # set the simulator sees, whatever the copies' timing (with look-ahead, copies the layer before
                # issued for this call are in flight by design)
                phase.stall_s[j] += cache.settle()
            out, counts = self._out, self._counts
            demand_job, back_job = cache.new_job(), cache.new_job()
            own = self._layer_args[j]
            if predicted_h is not None:  # the next layer's predicted experts are admitted in the same call
                ahead, pf_job = self.caches[j + 1], self.caches[j + 1].new_job()
                predicted_in, ahead_args = predicted_h, self._layer_args[j + 1]
                tel_next = self.telemetry["decode"].rows[j + 1]
            else:  # (no prediction: the next layer's arguments are not read)
                predicted_in, ahead_args, pf_job, tel_next = self._no_prediction, own, 0, tel
            # lookup, admission, the copy-or-CPU choice, slot state and table, the pair masks, the look-ahead's
            # admission, the telemetry: one compiled call
            control.layer_call(cache.policy.kind, decode, ids_h, self._cpu_limits[j], *own, demand_job, back_job,
                               predicted_in, *ahead_args, pf_job, *self._call_workspaces, tel, tel_next,
                               self._record_bytes)
            c = counts.tolist()
            n_gpu, n_demand, n_back, n_staged, n_cpu, n_wait = c[:control.HITS]
            if self._mirrored and (n_demand or n_back):
                cache.mark_table_changed()
            if n_demand:
                self._issue(j, cache, out[control.DEMAND_SLOT, :n_demand], out[control.DEMAND_EXPERT, :n_demand],
                            out[control.DEMAND_ROW, :n_demand], c[control.N_FROM_DISK], demand_job, DEMAND)
            if n_back:  # host records only: the CPU computes no disk expert
                self._issue(j, cache, out[control.BACK_SLOT, :n_back], out[control.BACK_EXPERT, :n_back],
                            out[control.BACK_ROW, :n_back], 0, back_job, PREFETCH)
            if predicted_h is not None:  # behind this call's copies, before its kernels are queued
                n_pf = c[control.N_PF]
                if n_pf:
                    self._issue(j + 1, ahead, out[control.PF_SLOT, :n_pf], out[control.PF_EXPERT, :n_pf],
                                out[control.PF_ROW, :n_pf], c[control.N_PF_FROM_DISK], pf_job, PREFETCH)
                    if self._mirrored:
                        ahead.mark_table_changed()
                        ahead.flush_table()
            # views of the workspace: used within this call only
            staged, cpu = out[control.STAGED, :n_staged], out[control.CPU, :n_cpu]
            n_pairs = c[control.N_PAIRS] if n_cpu else 0
            wait_jobs = out[control.WAIT_JOB, :n_wait].tolist() if n_wait else None

        cpu_part = None
        # with several parts (staged rounds, the CPU) they are summed in fp32 and rounded once
        parts = bool(staged.shape[0] or cpu.shape[0])
        if n_pairs:
            # read the CPU pairs' inputs now, before the GPU kernels below are queued behind them; on CUDA
            # this waits for the latent projection only, so the CPU part (computed in collect) overlaps them
            x_h, w_h = host_fp32(work.latent, work.weights, merged=not self._on_cpu)
            # (the pair lists are the workspace, see own_pairs)
            cpu_part = _CpuPart(j, pairs, n_pairs, x_h, w_h,
                                self._intermediate_rounding(work, up, down, table) if self._gpu_kernels else 0)
            self._open_part = cpu_part

        written = cache is None or n_gpu > 0  # the slot-bank launch writes every row of acc
        # its mask goes to the device ahead of the waits for copies below (on CUDA a small copy on the compute stream)
        skip = self._skip_tensor(ids_h.shape) if written and parts else None
        if cache is not None:
            if self._mirrored:
                cache.flush_table()
            if wait_jobs is not None:
                phase.stall_s[j] += cache.wait(wait_jobs)
            if self.options.verify:
                cache.check_resident(out[control.GPU_SLOT, :n_gpu], out[control.GPU_EXPERT, :n_gpu])
        # (C-contiguous whatever the latent's strides: the CPU kernels add into it as a [T, L] array; on the cpu device
        # made as one, which collect hands them without converting again)
        acc_h = acc = None
        if parts:
            if self._on_cpu:
                acc_h = np.empty(work.latent.shape, dtype=np.float32)
                acc = torch.from_numpy(acc_h)
            else:
                acc = torch.empty_like(work.latent, dtype=torch.float32, memory_format=torch.contiguous_format)
        if written:
            acc = self._gemm(work.latent, up, down, table, work.ids, work.weights, skip, out=acc,
                             pair_norms=work.pair_norms)
            if cache is not None:
                cache.marker = self.copies.release_marker()
        elif acc is None:
            acc = torch.zeros_like(work.latent)
        elif not staged.shape[0]:
            acc.zero_()  # only CPU pairs: their sum is added in collect
        if staged.shape[0]:
            self._staged(j, work, ids_h, staged, acc, phase, first_writes=not written)
        return _Pending(acc, cpu_part, acc_h)

    def _staged(self, j: int, work, ids_h: np.ndarray, staged: np.ndarray, acc: torch.Tensor,
                phase: Telemetry, first_writes: bool = False) -> None:
        """Add ``staged`` experts into the fp32 ``acc``, through the staging slots, as many per round as there are.

        ``first_writes``: nothing was written into ``acc`` yet, so the first round's launch writes it directly.
        """
        n = self.options.staging_slots
        part = None
        for start in range(0, staged.shape[0], n):
            chunk = staged[start:start + n]
            m = chunk.shape[0]
            # the table names this round's experts, the mask skips every other pair (the workspace's mask of the
            # call was read by the slot-bank launch already)
            skip_h = self._skip_ws[:ids_h.size].reshape(ids_h.shape)
            from_disk = control.staging_round(ids_h, chunk, self._staging_rows, self.store.row_of_expert[j],
                                              self.staging_table_host, skip_h, self._staging_src_rows)
            ticket = self._copy(j, self.staging, self._staging_rows[:m], chunk, self._staging_src_rows[:m], from_disk,
                                DEMAND, self.staging_marker)
            tel = phase.rows[j]
            tel[tm.DEMAND_COPIES] += m
            tel[tm.H2D_BYTES] += m * self._record_bytes
            tel[tm.DISK_BYTES] += from_disk * self._record_bytes
            phase.stall_s[j] += ticket.order_before_compute()
            if self._staging_table_src is not None:  # (the host table changes at the next round)
                self._upload(self._staging_table_src, out=self.staging_table)
            skip = self._skip_tensor(ids_h.shape)
            into = acc if first_writes and start == 0 else (part if part is not None else torch.empty_like(acc))
            self._gemm(work.latent, self.staging_up, self.staging_down, self.staging_table, work.ids,
                       work.weights, skip, out=into, pair_norms=work.pair_norms)
            if into is not acc:
                part = into
                acc += part
            self.staging_marker = self.copies.release_marker()

    def _grow_pair_workspace(self, size: int) -> None:
        """Room for ``size`` routed pairs in the skip-mask and CPU-pair workspaces (they grow to the largest call
        seen; a call's views of the mask are used within the call; a CPU part reads the pair lists' workspace until
        it is collected or the next call begins, see :meth:`_CpuPart.own_pairs`)."""
        self._skip_ws = np.empty(size, dtype=np.bool_)
        self._pairs_ws = np.empty((control.PAIR_ROWS, size), dtype=np.int64)
        self._call_workspaces = (self._work, self._scratch_pair, self._out, self._counts, self._skip_ws, self._pairs_ws)
        self._skip_views.clear()

    def _skip_tensor(self, shape: tuple[int, ...]) -> torch.Tensor:
        """The skip-mask workspace's first ``T * k`` entries as a ``[T, k]`` tensor on the runtime's device: on the cpu
        device a view of the workspace (kept per shape, so a decode step builds none), else a copy on the device."""
        t = self._skip_views.get(shape)
        if t is None:
            if len(self._skip_views) > 64:  # (prefill chunks of many lengths)
                self._skip_views.clear()
            n = shape[0] * shape[1]
            t = self._skip_views[shape] = torch.from_numpy(self._skip_ws[:n].reshape(shape))
        return t if self._on_cpu else self._upload(t)  # (the workspace changes at the next round or call)

    def _cpu_compute(self, part: _CpuPart, want_norms: bool,
                     into: np.ndarray | None = None) -> tuple[torch.Tensor | None, np.ndarray | None]:
        """Weighted sum of the CPU pairs ``[T, L]`` fp32 (host), and their output norms.

        ``into``: a host fp32 ``[T, L]`` array the sum is added to in place (then None is returned for it).
        """
        out = None
        if into is None:  # (page-locked when it goes to a GPU: uploaded asynchronously, see collect)
            out = self._upload.host_empty(tuple(part.x.shape), torch.float32)
            target = out.numpy()
            target[...] = 0.0
        else:
            target = into
        norms = np.full(part.n, np.nan, dtype=np.float32) if want_norms else self._no_norms
        j = part.layer
        prepared = self._cpu_prepared[j]
        if prepared is None:  # checked once per layer: the store's buffers never change
            if self.layout.quantized:
                from .cpu_quant import prepare_records

                prepared = prepare_records(self.layout, self.store.buffers[j])
            else:
                from .cpu_experts import prepare_banks

                prepared = prepare_banks(*self._store_views[j])
            self._cpu_prepared[j] = prepared
        self._cpu_call(prepared, part.x, part.pairs, part.n, part.weights, target, norms, part.h_round)
        return out, norms if want_norms else None

    def _intermediate_rounding(self, work, up, down, table) -> int:
        """How the CPU part of a layer call rounds its intermediate ``relu(up @ x)^2``: as the GPU kernel that
        computes the call's other pairs (and the resident model's whole call) does. Its prefill path keeps it in the
        banks' 16-bit dtype, its decode path in fp32; without this the CPU pairs of a bf16 prompt differ from the
        resident run by more than summation order (a code of :func:`~residency.runtime.cpu_experts.rounding_code`)."""
        return self._rounding_code(self._intermediate_dtype(work.latent, up, down, table, work.ids))

    def _looks_ahead(self, j: int) -> bool:
        """Whether decode calls predict layer ``j``'s experts (it exists, a layer comes before it, and it has dynamic
        slots to fill)."""
        if not self.options.prefetch or self.routers is None or not 0 < j < len(self.caches):
            return False
        cache = self.caches[j]
        return cache is not None and cache.num_slots > len(cache.static)

    def collect(self, j: int, pending: _Pending, work) -> torch.Tensor:
        out = pending.out
        part = pending.cpu
        if part is not None:  # on CUDA the GPU runs this call's kernels and the shared expert meanwhile
            if part is self._open_part:
                self._open_part = None
            if self._on_cpu:  # the cpu device: added straight into the fp32 sum of the parts
                _, norms = self._cpu_compute(part, work.pair_norms is not None, into=pending.out_host)
            else:
                cpu_out, norms = self._cpu_compute(part, work.pair_norms is not None)
                out += self._upload(cpu_out, staged=True)  # (asynchronous: the host does not wait for the GPU here)
            if norms is not None:
                at = self._upload(torch.from_numpy(part.pairs[(control.PAIR_TOKEN, control.PAIR_PICK), :part.n]))
                work.pair_norms[at[0], at[1]] = self._upload(torch.from_numpy(norms))
        return out if out.dtype == work.latent.dtype else out.to(work.latent.dtype)
