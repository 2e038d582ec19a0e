"""The offloaded MoE backend: serves each MoE layer's routed experts from device slots, the host store or the CPU.

One :class:`OffloadRuntime` holds the state of every MoE layer. The model's layers reach it
through per-layer expert backends that the public API installs (``residency.offload``; the
runtime does not import the model), which call :meth:`OffloadRuntime.submit` and
:meth:`OffloadRuntime.collect` with the layer's work item (an object with the attributes of
``residency.model.moe.ExpertWork``); it also listens to step boundaries. Per forward call of a
layer:

1. The call's distinct experts, in order of first appearance, are looked up. In a decode step
   they go through the layer's eviction policy exactly as the simulator replays them (all pinned,
   then lookup / admit on a miss / use, experts with copies in flight pinned too); a prefill call
   only looks up, so a long prompt does not wipe the decode working set.
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
   landed; staged rounds add one launch each; the CPU part runs on a worker thread meanwhile and
   is added in :meth:`OffloadRuntime.collect` (in the latent space).
4. Look-ahead (decode): the next MoE layer's router applied to this layer's normalised hidden
   state predicts its experts; predicted experts without a slot are admitted (never over a
   pinned or in-flight expert) and copied at prefetch priority behind every demand copy.

Exactness: routing is never changed; every routed pair is computed once, on the GPU or the CPU.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from ..kernels import moe_gather_gemm, moe_gather_gemm_quant
from .cache import SlotCache
from .copies import DEMAND, PREFETCH, CopyEngine, CopyTicket, CudaCopyEngine, ThreadCopyEngine
from .ledger import DeviceLedger
from .policy import LRU
from .store import HostExpertStore
from .telemetry import LayerCounters, Telemetry

MODES = ("cuda", "unified", "cpu")
CPU_CHOICES = ("auto", True, False)


@dataclass(frozen=True)
class LayerSlotPlan:
    """What the runtime needs of a plan for one MoE layer."""

    static: tuple[int, ...]
    dynamic_slots: int
    miss_path: str = "copy"  # copy | cpu | disk | none
    prior: np.ndarray | None = None


@dataclass(frozen=True)
class RuntimeOptions:
    """How the runtime serves misses.

    ``cpu_experts``: True computes every miss on the CPU, False none, ``"auto"`` decides per miss
    (see the module docstring) from ``h2d_gbps`` and ``cpu_expert_gbps``. ``copy_delay`` (tests):
    seconds to sleep before each copy on the CPU device's copy thread. ``verify`` (tests): check
    on the host, before each launch, that every slot it reads holds its expert and has landed.
    """

    mode: str = "cpu"
    policy: str = LRU.name
    prefetch: bool = True
    cpu_experts: str | bool = "auto"
    staging_slots: int = 8
    prior_tokens: float = 64.0
    h2d_gbps: float = 25.0
    cpu_expert_gbps: float = 10.0
    verify: bool = False
    copy_delay: Callable[[], float] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.cpu_experts not in CPU_CHOICES:
            raise ValueError(f"cpu_experts must be 'auto', True or False, got {self.cpu_experts!r}")
        if self.staging_slots < 1:
            raise ValueError("at least one staging slot is needed to serve misses that are not cached")


@dataclass
class _Pending:
    """What ``submit`` started and ``collect`` finishes."""

    out: torch.Tensor  # [T, L] GPU part (latent dtype)
    cpu: Future | None
    counters: LayerCounters


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
        # quantized records (NVFP4 / FP8 / W4A16) are read by the quantized gather-GEMM
        self._kernel = moe_gather_gemm_quant if store.layout.quantized else None
        self.telemetry = {"prefill": Telemetry.for_layers(store.num_layers),
                          "decode": Telemetry.for_layers(store.num_layers)}
        self._is_decode = False
        if options.mode == "cuda":
            self.copies: CopyEngine = CudaCopyEngine(self.device)
        else:
            self.copies = ThreadCopyEngine(options.copy_delay)
        self._cpu_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="residency-cpu-experts")
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
                                             prior_tokens=options.prior_tokens))
        self.staging = ledger.empty((options.staging_slots, lay.record_numel), lay.dtype, "staging slots")
        self.staging_up, self.staging_down = lay.up(self.staging), lay.down(self.staging)
        self.staging_table = ledger.empty((store.num_experts,), torch.int32, "slot tables")
        self.staging_release: list[object | None] = [None] * options.staging_slots
        self._load_static()

    # ------------------------------------------------------------------ set-up
    def _load_static(self) -> None:
        tickets = []
        for j, cache in enumerate(self.caches):
            if cache is None or not cache.static:
                continue
            tickets.append(self._issue(j, cache, [(s, e, None) for s, e in enumerate(cache.static)], DEMAND, None))
            cache.flush_table()
        for t in tickets:
            t.wait()
        for cache in self.caches:
            if cache is not None:
                cache.poll()

    def close(self) -> None:
        self.copies.synchronize()
        self.copies.close()
        self._cpu_pool.shutdown(wait=True)

    # ------------------------------------------------------------------ step boundaries (StepListener)
    def begin_step(self, input_ids: torch.Tensor, is_decode: bool) -> None:
        self._is_decode = is_decode
        for cache in self.caches:
            if cache is not None:
                cache.poll()

    def end_step(self) -> None:
        pass

    # ------------------------------------------------------------------ telemetry
    def stats(self) -> dict:
        total = Telemetry.for_layers(self.store.num_layers)
        for phase in self.telemetry.values():
            for mine, theirs in zip(total.layers, phase.layers):
                mine.add(theirs)
        out = total.as_dict()
        out["by_phase"] = {name: t.as_dict() for name, t in self.telemetry.items()}
        return out

    def reset_stats(self) -> None:
        for t in self.telemetry.values():
            t.reset()

    # ------------------------------------------------------------------ copies
    def _source(self, j: int, expert: int, counters: LayerCounters | None) -> torch.Tensor:
        """The host record of expert ``expert`` of layer ``j``: in the store, or read from disk now."""
        if self.store.on_disk(j, expert):
            src = torch.empty(self.layout.record_numel, dtype=self.layout.dtype,
                              pin_memory=self.options.mode == "cuda")
            self.store.read_from_disk(j, expert, src)
            if counters is not None:
                counters.disk_bytes += self.layout.record_bytes
        else:
            src = self.store.record(j, expert)
        if counters is not None:
            counters.h2d_bytes += self.layout.record_bytes
        return src

    def _issue(self, j: int, cache: SlotCache, fills: list[tuple[int, int, int | None]], priority: int,
               counters: LayerCounters | None) -> CopyTicket:
        """Copy ``(slot, expert, evicted)`` fills into ``cache`` as one job and record the slots' new state."""
        jobs = [(cache.bank[s], self._source(j, e, counters), cache.release[s]) for s, e, _ in fills]
        ticket = self.copies.copy_many(jobs, priority)
        for s, e, evicted in fills:
            cache.assign(s, e, ticket, evicted)
        return ticket

    def _gemm(self, *args, **kwargs) -> torch.Tensor:
        # looked up at call time so a benchmark can stub the module's moe_gather_gemm
        return (self._kernel or moe_gather_gemm)(*args, **kwargs)

    # ------------------------------------------------------------------ CPU choice
    def _on_cpu(self, j: int, tokens: int) -> bool:
        choice = self.options.cpu_experts
        if choice is True or choice is False:
            return choice
        path = self.plans[j].miss_path
        if path == "cpu":
            return True
        if path != "copy" or self.options.mode == "unified":
            return False
        nbytes = self.layout.record_bytes
        copy_s = nbytes / (self.options.h2d_gbps * 1e9)
        cpu_s = tokens * nbytes / (self.options.cpu_expert_gbps * 1e9)
        return cpu_s < copy_s

    # ------------------------------------------------------------------ one layer call
    def submit(self, j: int, work) -> _Pending:
        decode = work.is_decode
        counters = self.telemetry["decode" if decode else "prefill"].layers[j]  # counted in place
        ids_h = work.ids.detach().cpu().numpy()
        if ids_h.shape[0] == 1:  # one token (batch-1 decode): its top-k ids are distinct already
            order = ids_h[0].astype(np.int64)
            tokens_of = None  # every expert serves the one token
        else:
            flat = ids_h.reshape(-1)
            uniq, first, counts = np.unique(flat, return_index=True, return_counts=True)
            order = uniq[np.argsort(first, kind="stable")]
            tokens_of = dict(zip(uniq.tolist(), counts.tolist()))
        cache = self.caches[j]
        gpu_slots: list[int] = []
        gpu_experts: list[int] = []
        staged: list[int] = []
        cpu: list[int] = []
        if cache is None:  # unified memory: RAM experts are read in place, disk experts are staged
            for e in order.tolist():
                if self.store.on_disk(j, e):
                    counters.misses += 1
                    staged.append(e)
                else:
                    counters.hits += 1
            table, up, down = self.unified_tables[j], self.store.up(j), self.store.down(j)
        else:
            table, up, down = cache.table, cache.up, cache.down
            demand: list[tuple[int, int, int | None]] = []
            background: list[tuple[int, int, int | None]] = []
            if decode:
                result = cache.policy.step(order, cache.inflight_experts()).tolist()
            hits = 0
            prefetched = cache.prefetched
            for idx, e in enumerate(order.tolist()):
                if decode:
                    hit, s, evicted = result[idx]
                else:
                    s = cache.slot_of(e)
                    hit, evicted = int(s >= 0), -1
                if hit:
                    hits += 1
                    if prefetched[s]:
                        counters.prefetch_used += 1
                        prefetched[s] = False
                    gpu_slots.append(s)
                    gpu_experts.append(e)
                    continue
                counters.misses += 1
                on_cpu = self._on_cpu(j, 1 if tokens_of is None else tokens_of[e])
                if s >= 0:  # admitted by the policy (decode only)
                    if evicted >= 0 and cache.prefetched[s]:
                        counters.prefetch_wasted += 1
                    (background if on_cpu else demand).append((s, e, evicted if evicted >= 0 else None))
                    if not on_cpu:
                        counters.demand_copies += 1
                        gpu_slots.append(s)
                        gpu_experts.append(e)
                elif not on_cpu:
                    staged.append(e)
                if on_cpu:
                    cpu.append(e)
            counters.hits += hits
            if demand:
                self._issue(j, cache, demand, DEMAND, counters)
            if background:
                self._issue(j, cache, background, PREFETCH, counters)
        counters.cpu_computed += len(cpu)

        # the CPU part starts first and overlaps everything below
        skip = None
        if cpu or staged:
            skip = torch.from_numpy(np.isin(ids_h, cpu + staged)).to(work.ids.device, non_blocking=True)
        future = None
        if cpu:
            future = self._cpu_pool.submit(self._cpu_part, j, work, ids_h, np.isin(ids_h, cpu))

        if cache is not None:
            cache.flush_table()
            if cache.inflight:
                counters.stall_s += cache.wait(gpu_slots)
            if self.options.verify:
                cache.check_resident(gpu_slots, gpu_experts)
        # with several parts (staged rounds, the CPU) they are summed in fp32 and rounded once
        parts = bool(staged or cpu)
        out = None
        if parts:
            out = torch.empty(work.latent.shape, dtype=torch.float32, device=work.latent.device)
        if cache is None or gpu_slots:
            out = self._gemm(work.latent, up, down, table, work.ids, work.weights, skip, out=out,
                             pair_norms=work.pair_norms)
            marker = self.copies.release_marker() if cache is not None else None
            if marker is not None:
                for s in gpu_slots:
                    cache.release[s] = marker
        elif out is None:
            out = torch.zeros_like(work.latent)
        else:
            out.zero_()
        if staged:
            self._staged(j, work, ids_h, staged, out, counters)
        if decode and self.options.prefetch and self.routers is not None and j + 1 < len(self.caches):
            self._prefetch(j + 1, work.hidden, self.telemetry["decode"].layers[j + 1])
        return _Pending(out, future, counters)

    def _staged(self, j: int, work, ids_h: np.ndarray, staged: list[int], acc: torch.Tensor,
                counters: LayerCounters) -> None:
        """Add ``staged`` experts into the fp32 ``acc``, through the staging slots, as many per round as there are."""
        n = self.options.staging_slots
        part = torch.empty_like(acc)
        for start in range(0, len(staged), n):
            chunk = staged[start:start + n]
            jobs = [(self.staging[i], self._source(j, e, counters), self.staging_release[i])
                    for i, e in enumerate(chunk)]
            counters.demand_copies += len(chunk)
            counters.stall_s += self.copies.copy_many(jobs, DEMAND).order_before_compute()
            self.staging_table.fill_(-1)
            self.staging_table[torch.tensor(chunk, dtype=torch.long)] = torch.arange(len(chunk), dtype=torch.int32
                                                                                   ).to(self.device)
            skip = torch.from_numpy(~np.isin(ids_h, chunk)).to(work.ids.device)
            self._gemm(work.latent, self.staging_up, self.staging_down, self.staging_table, work.ids,
                       work.weights, skip, out=part, pair_norms=work.pair_norms)
            acc += part
            marker = self.copies.release_marker()
            if marker is not None:
                for i in range(len(chunk)):
                    self.staging_release[i] = marker

    def _cpu_part(self, j: int, work, ids_h: np.ndarray, mask: np.ndarray) -> tuple[torch.Tensor, ...]:
        """Weighted sum of the CPU pairs ``[T, L]`` fp32 (host), and their output norms."""
        tokens, picks = np.nonzero(mask)
        experts = ids_h[tokens, picks]
        x = work.latent.detach().float().cpu().contiguous()
        weights = work.weights.detach().float().cpu().numpy()[tokens, picks]
        out = torch.zeros(x.shape, dtype=torch.float32)
        norms = None if work.pair_norms is None else np.full(tokens.size, np.nan, dtype=np.float32)
        rows = self.store.row_of_expert[j][experts]
        if (rows < 0).any():  # disk experts computed on the CPU: read them first
            raise NotImplementedError("computing disk-tier experts on the CPU is not supported; they are copied")
        if self.layout.quantized:
            from .cpu_quant import cpu_moe_quant

            cpu_moe_quant(x.numpy(), self.layout, self.store.buffers[j], tokens.astype(np.int64),
                          rows.astype(np.int64), weights.astype(np.float32), out.numpy(), norms)
        else:
            from .cpu_experts import cpu_moe

            cpu_moe(x.numpy(), self.store.up(j), self.store.down(j), tokens.astype(np.int64), rows.astype(np.int64),
                    weights.astype(np.float32), out.numpy(), norms)
        return out, (tokens, picks, norms)

    def _prefetch(self, j: int, hidden: torch.Tensor, counters: LayerCounters) -> None:
        cache = self.caches[j]
        if cache is None or cache.num_slots == len(cache.static):
            return
        ids = self.routers[j](hidden)[0]
        predicted = np.unique(ids.detach().cpu().numpy().reshape(-1))
        pinned = cache.inflight_experts()
        fills = []
        for e in predicted.tolist():
            if cache.slot_of(e) >= 0:
                continue
            s, evicted = cache.policy.admit(e, pinned)
            if s is None:
                continue
            if evicted is not None and cache.prefetched[s]:
                counters.prefetch_wasted += 1
            cache.policy.settle(e)
            fills.append((s, e, evicted))
            pinned = np.append(pinned, e)
        if fills:
            self._issue(j, cache, fills, PREFETCH, counters)
            for s, _, _ in fills:
                cache.prefetched[s] = True
            counters.prefetch_issued += len(fills)
        cache.flush_table()

    def collect(self, j: int, pending: _Pending, work) -> torch.Tensor:
        out = pending.out
        if pending.cpu is not None:
            t0 = time.perf_counter()
            cpu_out, (tokens, picks, norms) = pending.cpu.result()
            pending.counters.stall_s += time.perf_counter() - t0
            out += cpu_out.to(out.device)
            if work.pair_norms is not None:
                work.pair_norms[torch.from_numpy(tokens).to(out.device), torch.from_numpy(picks).to(out.device)] = (
                    torch.from_numpy(norms).to(out.device))
        return out.to(work.latent.dtype)
