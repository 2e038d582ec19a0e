"""The offload runtime's per-call bookkeeping for one MoE layer, compiled: one call per layer call.

A layer call's host work used to be a Python loop per expert (lookup, admission, the copy-or-CPU
choice, slot state, slot-table updates, telemetry) and grew with the number of misses. Here it is
one numba call, :func:`layer_call`, over flat arrays, so its cost barely depends on how many experts
miss; the Python caller then issues at most one copy job per priority and one kernel launch. It
runs, in order: :func:`distinct_in_order` (the call's experts), :func:`classify` (lookup,
admission and the copy-or-CPU choice), :func:`split_pairs` (the per-pair mask the kernel reads and
the CPU part's pair lists) and, for a look-ahead, :func:`admit_predicted` on the next layer's
state. :func:`staging_round` sets the staging table, mask and records of one staging round.

Slot state of a layer lives in one ``int64 [STATE_ROWS, slots]`` array (see :data:`EXPERT` ..
:data:`PREFETCHED`); the policy's own state (``I``, ``F`` of :class:`residency.runtime.policy.ExpertCache`)
is updated through the policy's compiled per-access functions, so the decisions are exactly the
ones :func:`residency.runtime.policy.replay_layer` (the simulator) makes on the same trace.

Outputs go to a caller-owned ``int64 [OUT_ROWS, width]`` array (one row per list, see
:data:`GPU_SLOT` ..) and an ``int64 [N_COUNTS]`` array of list lengths and telemetry increments
(:data:`N_GPU` ..). Everything here is plain integer bookkeeping: no tensor is touched.
"""

from __future__ import annotations

import numpy as np

from . import telemetry as tm
from .policy import _HEAD, _key, _slotless, _step_access, _take, _victims, njit

# ---------------------------------------------------------------------- slot state rows
#: the expert whose record is in (or on its way to) the slot, -1 none
EXPERT = 0
#: id of the copy job in flight into the slot, -1 once it has landed
JOB = 1
#: 1 while the slot holds a look-ahead copy not yet used
PREFETCHED = 2
STATE_ROWS = 3

# ---------------------------------------------------------------------- output rows of classify / admit_predicted
(GPU_SLOT, GPU_EXPERT, DEMAND_SLOT, DEMAND_EXPERT, DEMAND_ROW, BACK_SLOT, BACK_EXPERT, BACK_ROW, STAGED, CPU,
 WAIT_JOB, PF_SLOT, PF_EXPERT, PF_ROW) = range(14)
OUT_ROWS = 14

# ---------------------------------------------------------------------- counts
(N_GPU, N_DEMAND, N_BACK, N_STAGED, N_CPU, N_WAIT, HITS, MISSES, DEMAND_COPIES, PREFETCH_USED,
 PREFETCH_WASTED, N_FROM_DISK, N_PAIRS, N_PF, PF_WASTED, N_PF_FROM_DISK, N_COUNTS) = range(17)

# ---------------------------------------------------------------------- rows of layer_call's workspace
WORK_ORDER, WORK_TOKENS, WORK_SCRATCH, WORK_PF_ORDER, WORK_VICTIMS = range(5)
WORK_ROWS = 5

# ---------------------------------------------------------------------- rows of layer_call's CPU pair lists
PAIR_TOKEN, PAIR_PICK, PAIR_ROW, PAIR_FLAT = range(4)
PAIR_ROWS = 4

# codes of split_pairs' per-expert scratch
PAIR_GPU, PAIR_CPU, PAIR_STAGED = 0, 1, 2


def new_state(num_slots: int) -> np.ndarray:
    """Slot state of an empty bank: no expert, nothing in flight, nothing prefetched."""
    state = np.full((STATE_ROWS, num_slots), -1, dtype=np.int64)
    state[PREFETCHED] = 0
    return state


def new_work(num_experts: int) -> np.ndarray:
    """The workspace :func:`layer_call` takes (``WORK_SCRATCH`` row -1)."""
    work = np.empty((WORK_ROWS, num_experts), dtype=np.int64)
    work[WORK_SCRATCH] = -1
    return work


@njit
def classify(kind: int, decode: bool, order: np.ndarray, tokens: np.ndarray, cpu_limit: float, I: np.ndarray,
             F: np.ndarray, state: np.ndarray, disk_row: np.ndarray, table: np.ndarray, demand_job: int,
             back_job: int, out: np.ndarray, counts: np.ndarray, victims: np.ndarray) -> None:
    """Look up one layer call's distinct experts ``order`` and decide how each is served.

    Decode (``decode``): exactly the simulator's step: the call's experts and every expert with a
    copy in flight are pinned, then each expert is looked up, admitted on a miss and recorded as
    used by the policy. Prefill: lookups only (the policy's state is not changed).

    Per expert: a hit is computed from its slot (a look-ahead copy counts as used). A miss is
    computed on the CPU when its token count is below ``cpu_limit`` and its record is in host
    memory (``disk_row >= 0``); otherwise it is copied: into the slot the policy admitted it to
    (a demand copy, job ``demand_job``) or, without a slot, through the staging slots. A miss the
    CPU computes that the policy admitted is still copied into its slot behind the demand copies
    (job ``back_job``), for later calls. The slot table (``table``, expert -> slot) is updated in
    place for every admission and eviction; in-flight jobs among the slots to compute are listed
    (``WAIT_JOB``) so the caller can order the kernel after them. ``victims`` (``int64``, at least
    ``len(order)``) is a workspace for the step's victims (:func:`residency.runtime.policy._victims`).
    """
    S = state.shape[1]
    n = order.shape[0]
    for c in range(N_COUNTS):
        counts[c] = 0
    E = I[4]
    slot_of = _HEAD + S  # I[slot_of + e]: slot of expert e
    pin0 = _HEAD + 2 * S + E
    available = taken = 0
    if decode:
        for s in range(S):
            if state[JOB, s] >= 0:
                I[pin0 + state[EXPERT, s]] = 1
        for i in range(n):
            I[pin0 + order[i]] = 1
        available = _victims(kind, I, F, _slotless(I, order), victims)
    for i in range(n):
        e = order[i]
        if decode:
            hit, s, evicted, taken = _step_access(kind, e, I, F, victims, taken, available)
        else:
            s = I[slot_of + e]
            hit = 1 if s >= 0 else 0
            evicted = -1
        if hit:
            counts[HITS] += 1
            if state[PREFETCHED, s] != 0:
                counts[PREFETCH_USED] += 1
                state[PREFETCHED, s] = 0
            out[GPU_SLOT, counts[N_GPU]] = s
            out[GPU_EXPERT, counts[N_GPU]] = e
            counts[N_GPU] += 1
            job = state[JOB, s]
            if job >= 0:
                new = True
                for w in range(counts[N_WAIT]):
                    if out[WAIT_JOB, w] == job:
                        new = False
                if new:
                    out[WAIT_JOB, counts[N_WAIT]] = job
                    counts[N_WAIT] += 1
            continue
        counts[MISSES] += 1
        on_cpu = disk_row[e] >= 0 and tokens[i] < cpu_limit
        if s >= 0:  # admitted by the policy (decode only)
            if evicted >= 0:
                if state[PREFETCHED, s] != 0:
                    counts[PREFETCH_WASTED] += 1
                table[evicted] = -1
            table[e] = s
            state[EXPERT, s] = e
            state[PREFETCHED, s] = 0
            if disk_row[e] < 0:
                counts[N_FROM_DISK] += 1
            if on_cpu:
                state[JOB, s] = back_job
                out[BACK_SLOT, counts[N_BACK]] = s
                out[BACK_EXPERT, counts[N_BACK]] = e
                out[BACK_ROW, counts[N_BACK]] = disk_row[e]
                counts[N_BACK] += 1
            else:
                state[JOB, s] = demand_job
                out[DEMAND_SLOT, counts[N_DEMAND]] = s
                out[DEMAND_EXPERT, counts[N_DEMAND]] = e
                out[DEMAND_ROW, counts[N_DEMAND]] = disk_row[e]
                counts[N_DEMAND] += 1
                counts[DEMAND_COPIES] += 1
                out[GPU_SLOT, counts[N_GPU]] = s
                out[GPU_EXPERT, counts[N_GPU]] = e
                counts[N_GPU] += 1
        elif not on_cpu:
            out[STAGED, counts[N_STAGED]] = e
            counts[N_STAGED] += 1
        if on_cpu:
            out[CPU, counts[N_CPU]] = e
            counts[N_CPU] += 1
    if counts[N_DEMAND] > 0:
        out[WAIT_JOB, counts[N_WAIT]] = demand_job
        counts[N_WAIT] += 1
    if decode:
        for i in range(n):
            I[pin0 + order[i]] = 0
        for s in range(S):
            if state[JOB, s] >= 0:
                I[pin0 + state[EXPERT, s]] = 0


@njit
def layer_call(kind: int, decode: bool, ids: np.ndarray, cpu_limit: float, I: np.ndarray, F: np.ndarray,
               state: np.ndarray, disk_row: np.ndarray, table: np.ndarray, demand_job: int, back_job: int,
               predicted: np.ndarray, I_next: np.ndarray, F_next: np.ndarray, state_next: np.ndarray,
               disk_row_next: np.ndarray, table_next: np.ndarray, pf_job: int, work: np.ndarray,
               scratch_pair: np.ndarray, out: np.ndarray, counts: np.ndarray, skip: np.ndarray,
               pairs: np.ndarray, tel: np.ndarray, tel_next: np.ndarray, record_bytes: int) -> None:
    """The whole bookkeeping of one layer call over its routed ids ``ids [T, k]``, in one call.

    The call's distinct experts in order of first appearance go through :func:`classify`; then,
    when any pair is computed on the CPU or in staging rounds, ``skip`` (bool, the first ``T * k``
    entries, row-major) marks those pairs and ``pairs [PAIR_ROWS, >= T * k]`` lists the CPU pairs in
    row-major order (token, top-k position, store record, flat index into ``[T, k]``);
    ``counts[N_PAIRS]`` is their number. ``skip`` is not written when nothing is skipped.

    Look-ahead (when ``predicted [T', k]``, the next MoE layer's predicted ids, is not empty): its
    distinct experts are admitted into the next layer (``*_next``, job ``pf_job``) by
    :func:`admit_predicted`, after this call's own lookups.

    Telemetry is counted here too: the call's row of :attr:`residency.runtime.telemetry.Telemetry.counts`
    (``tel``) gets its hits, misses, copies issued (and their bytes at ``record_bytes`` each, disk
    reads among them) and CPU-computed experts; the next layer's row (``tel_next``) its look-ahead
    copies and the unused ones they displaced.

    ``work`` is an ``int64 [WORK_ROWS, num_experts]`` workspace (:func:`new_work`: its
    ``WORK_SCRATCH`` row -1, as it is again on return), ``scratch_pair`` an ``int8 [num_experts]``
    array of zeros (zero again on return).
    """
    order, tokens = work[WORK_ORDER], work[WORK_TOKENS]
    n = distinct_in_order(ids, work[WORK_SCRATCH], order, tokens)
    classify(kind, decode, order[:n], tokens[:n], cpu_limit, I, F, state, disk_row, table, demand_job, back_job,
             out, counts, work[WORK_VICTIMS])
    n_cpu, n_staged = counts[N_CPU], counts[N_STAGED]
    if n_cpu or n_staged:
        counts[N_PAIRS] = split_pairs(ids, out[CPU, :n_cpu], out[STAGED, :n_staged], scratch_pair, disk_row,
                                      skip[:ids.size].reshape(ids.shape), pairs)
    if predicted.shape[0]:
        order_pf = work[WORK_PF_ORDER]
        m = distinct_in_order(predicted, work[WORK_SCRATCH], order_pf, tokens)  # (tokens: not needed any more)
        admit_predicted(kind, order_pf[:m], I_next, F_next, state_next, disk_row_next, table_next, pf_job, out,
                        counts, work[WORK_VICTIMS])
        tel_next[tm.PREFETCH_ISSUED] += counts[N_PF]
        tel_next[tm.PREFETCH_WASTED] += counts[PF_WASTED]
        tel_next[tm.H2D_BYTES] += counts[N_PF] * record_bytes
        tel_next[tm.DISK_BYTES] += counts[N_PF_FROM_DISK] * record_bytes
    tel[tm.HITS] += counts[HITS]
    tel[tm.MISSES] += counts[MISSES]
    tel[tm.DEMAND_COPIES] += counts[DEMAND_COPIES]
    tel[tm.PREFETCH_USED] += counts[PREFETCH_USED]
    tel[tm.PREFETCH_WASTED] += counts[PREFETCH_WASTED]
    tel[tm.CPU_COMPUTED] += counts[N_CPU]
    tel[tm.H2D_BYTES] += (counts[N_DEMAND] + counts[N_BACK]) * record_bytes
    tel[tm.DISK_BYTES] += counts[N_FROM_DISK] * record_bytes


@njit
def admit_predicted(kind: int, predicted: np.ndarray, I: np.ndarray, F: np.ndarray, state: np.ndarray,
                    disk_row: np.ndarray, table: np.ndarray, job: int, out: np.ndarray, counts: np.ndarray,
                    victims: np.ndarray) -> None:
    """Admit look-ahead predictions of one layer that have no slot, never over a pinned or in-flight expert.

    Every predicted expert is pinned while the others are admitted, so a guess never evicts
    another guess of the same call, nor an expert with a copy in flight. Each admitted expert is
    keyed as of now without counting a use (the policy's ``settle``), so a wrong guess can be
    evicted later, marked prefetched and given job ``job``. Fills go to the ``PF_SLOT`` /
    ``PF_EXPERT`` / ``PF_ROW`` rows of ``out``; ``counts[N_PF]`` is their number,
    ``counts[N_PF_FROM_DISK]`` how many are read from disk and ``counts[PF_WASTED]`` the unused
    look-ahead copies they displaced. ``victims`` is a workspace as in :func:`classify`.
    """
    S = state.shape[1]
    E = I[4]
    slot_of = _HEAD + S
    pin0 = _HEAD + 2 * S + E
    counts[N_PF] = 0
    counts[PF_WASTED] = 0
    counts[N_PF_FROM_DISK] = 0
    for s in range(S):
        if state[JOB, s] >= 0:
            I[pin0 + state[EXPERT, s]] = 1
    for i in range(predicted.shape[0]):
        I[pin0 + predicted[i]] = 1
    available = _victims(kind, I, F, _slotless(I, predicted), victims)
    taken = 0
    for i in range(predicted.shape[0]):
        if taken == available:
            break
        e = predicted[i]
        if I[slot_of + e] >= 0:
            continue
        s = victims[taken]
        taken += 1
        evicted = _take(kind, e, s, I, F)
        if evicted >= 0:
            if state[PREFETCHED, s] != 0:
                counts[PF_WASTED] += 1
            table[evicted] = -1
        _key(kind, e, I, F)
        table[e] = s
        state[EXPERT, s] = e
        state[JOB, s] = job
        state[PREFETCHED, s] = 1
        out[PF_SLOT, counts[N_PF]] = s
        out[PF_EXPERT, counts[N_PF]] = e
        out[PF_ROW, counts[N_PF]] = disk_row[e]
        if disk_row[e] < 0:
            counts[N_PF_FROM_DISK] += 1
        counts[N_PF] += 1
    for i in range(predicted.shape[0]):
        I[pin0 + predicted[i]] = 0
    for s in range(S):
        if state[JOB, s] >= 0:
            I[pin0 + state[EXPERT, s]] = 0


@njit
def split_pairs(ids: np.ndarray, cpu: np.ndarray, staged: np.ndarray, scratch: np.ndarray, disk_row: np.ndarray,
                skip: np.ndarray, pairs: np.ndarray) -> int:
    """Per routed pair of ``ids [T, k]``: ``skip`` (bool) where the CPU (experts ``cpu``) or the staging rounds
    (``staged``) compute it; and every CPU pair, in row-major order, into ``pairs [PAIR_ROWS, T * k]``: its token,
    top-k position, store record (``disk_row[expert]``) and flat index into ``[T, k]``. Returns the number of CPU
    pairs.

    ``scratch`` is an ``int8 [num_experts]`` array of zeros; it is zero again on return.
    """
    for i in range(cpu.shape[0]):
        scratch[cpu[i]] = PAIR_CPU
    for i in range(staged.shape[0]):
        scratch[staged[i]] = PAIR_STAGED
    n = 0
    k = ids.shape[1]
    for t in range(ids.shape[0]):
        for j in range(k):
            e = ids[t, j]
            code = scratch[e]
            skip[t, j] = code != PAIR_GPU
            if code == PAIR_CPU:
                pairs[PAIR_TOKEN, n] = t
                pairs[PAIR_PICK, n] = j
                pairs[PAIR_ROW, n] = disk_row[e]
                pairs[PAIR_FLAT, n] = t * k + j
                n += 1
    for i in range(cpu.shape[0]):
        scratch[cpu[i]] = 0
    for i in range(staged.shape[0]):
        scratch[staged[i]] = 0
    return n


@njit
def staging_round(ids: np.ndarray, chunk: np.ndarray, slots: np.ndarray, disk_row: np.ndarray, table: np.ndarray,
                  skip: np.ndarray, rows: np.ndarray) -> int:
    """One staging round: the staging table (``table``, expert -> staging slot) names exactly the experts of
    ``chunk`` (in ``slots``), ``skip [T, k]`` (bool) is set for every routed pair of ``ids`` it does not hold, and
    ``rows`` gets each expert's store record (``disk_row``, -1 on disk). Returns how many are on disk.
    """
    for e in range(table.shape[0]):
        table[e] = -1
    on_disk = 0
    for i in range(chunk.shape[0]):
        table[chunk[i]] = slots[i]
        rows[i] = disk_row[chunk[i]]
        if rows[i] < 0:
            on_disk += 1
    for t in range(ids.shape[0]):
        for j in range(ids.shape[1]):
            skip[t, j] = table[ids[t, j]] < 0
    return on_disk


@njit
def distinct_in_order(ids: np.ndarray, scratch: np.ndarray, order: np.ndarray, tokens: np.ndarray) -> int:
    """Distinct experts of ``ids [T, k]`` in order of first appearance into ``order`` and their token counts.

    Returns how many there are. ``scratch`` is an ``int64 [num_experts]`` array of -1; it is -1 again on
    return.
    """
    n = 0
    for t in range(ids.shape[0]):
        for j in range(ids.shape[1]):
            e = ids[t, j]
            at = scratch[e]
            if at < 0:
                scratch[e] = n
                order[n] = e
                tokens[n] = 1
                n += 1
            else:
                tokens[at] += 1
    for i in range(n):
        scratch[order[i]] = -1
    return n


@njit
def copy_rows(dst: np.ndarray, src: np.ndarray, dst_rows: np.ndarray, src_rows: np.ndarray) -> None:
    """``dst[dst_rows[i]] = src[src_rows[i]]`` for byte matrices (the cpu device's copy of expert records).

    An explicit byte loop, which LLVM vectorises: numba's row-slice assignment costs about 8x more
    (4 us against 0.5 us for 22 records of 512 bytes, 3 against 23 GB/s for 4 MiB records).
    """
    width = dst.shape[1]
    for i in range(dst_rows.shape[0]):
        d, s = dst_rows[i], src_rows[i]
        for b in range(width):
            dst[d, b] = src[s, b]


@njit
def job_landed(state: np.ndarray, job: int) -> None:
    """Job ``job`` completed: the slots that wait for it become resident."""
    for s in range(state.shape[1]):
        if state[JOB, s] == job:
            state[JOB, s] = -1


def warm_up() -> None:
    """Compile (or load from numba's cache) every function the runtime calls, for the argument types it passes
    (:func:`classify` and :func:`admit_predicted` it reaches through :func:`layer_call` only).

    The runtime calls this at construction, so the first decode step is not the one that pays for
    compilation.
    """
    from .policy import K_LRU, _init_state

    experts, slots = 4, 2
    I, F = _init_state(K_LRU, slots, experts, np.zeros(0, np.int64), np.zeros(experts), 1.0)
    state = new_state(slots)
    table = np.full(experts, -1, dtype=np.int32)
    out = np.zeros((OUT_ROWS, experts + 1), dtype=np.int64)
    counts = np.zeros(N_COUNTS, dtype=np.int64)
    ids = np.array([[0, 1]], dtype=np.int64)
    rows = np.arange(experts, dtype=np.int64)
    tel = np.zeros((2, len(tm.COUNTER_NAMES)), dtype=np.int64)
    layer_call(K_LRU, True, ids, 0.0, I, F, state, rows, table, 4, 5, ids, I, F, state, rows, table, 6,
               new_work(experts), np.zeros(experts, np.int8), out, counts, np.empty(ids.size, np.bool_),
               np.empty((PAIR_ROWS, ids.size), np.int64), tel[0], tel[1], 8)
    job_landed(state, 1)
    skip = np.empty(ids.shape, dtype=np.bool_)
    split_pairs(ids, ids[0, :1], ids[0, 1:], np.zeros(experts, np.int8), rows, skip,
                np.empty((PAIR_ROWS, ids.size), np.int64))
    staging_round(ids, ids[0, :1], rows[:1], rows, table, skip, np.empty(2, np.int64))
    distinct_in_order(ids, np.full(experts, -1, np.int64), np.empty(experts, np.int64), np.empty(experts, np.int64))
    buf = np.zeros((2, 8), dtype=np.uint8)
    copy_rows(buf, buf, np.zeros(1, np.int64), np.ones(1, np.int64))
