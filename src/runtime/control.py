"""The offload runtime's per-call bookkeeping for one MoE layer, compiled: one call per layer call.

A layer call's host work used to be a Python loop per expert (lookup, admission, the copy-or-CPU
choice, slot state, slot-table updates, telemetry) and grew with the number of misses. Here it is
one numba call, :func:`classify`, over flat arrays, so its cost barely depends on how many experts
miss; the Python caller then issues at most one copy job per priority and one kernel launch.
:func:`admit_predicted` does the same for a look-ahead prefetch, and :func:`mark_pairs` builds the
per-pair masks the kernels and the CPU part read.

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

from .policy import _HEAD, _access, _admit, _key, njit

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
 WAIT_JOB) = range(11)
OUT_ROWS = 11

# ---------------------------------------------------------------------- counts
(N_GPU, N_DEMAND, N_BACK, N_STAGED, N_CPU, N_WAIT, HITS, MISSES, DEMAND_COPIES, PREFETCH_USED,
 PREFETCH_WASTED, N_FROM_DISK, N_COUNTS) = range(13)

# pair codes written by mark_pairs
PAIR_GPU, PAIR_CPU, PAIR_STAGED = 0, 1, 2


def new_state(num_slots: int) -> np.ndarray:
    """Slot state of an empty bank: no expert, nothing in flight, nothing prefetched."""
    state = np.full((STATE_ROWS, num_slots), -1, dtype=np.int64)
    state[PREFETCHED] = 0
    return state


@njit
def classify(kind: int, decode: bool, order: np.ndarray, tokens: np.ndarray, cpu_limit: float, I: np.ndarray,
             F: np.ndarray, state: np.ndarray, disk_row: np.ndarray, table: np.ndarray, demand_job: int,
             back_job: int, out: np.ndarray, counts: np.ndarray) -> None:
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
    (``WAIT_JOB``) so the caller can order the kernel after them.
    """
    S = state.shape[1]
    n = order.shape[0]
    for c in range(N_COUNTS):
        counts[c] = 0
    E = I[4]
    slot_of = _HEAD + S  # I[slot_of + e]: slot of expert e
    pin0 = _HEAD + 2 * S + E
    if decode:
        for s in range(S):
            if state[JOB, s] >= 0:
                I[pin0 + state[EXPERT, s]] = 1
        for i in range(n):
            I[pin0 + order[i]] = 1
    for i in range(n):
        e = order[i]
        if decode:
            hit, s, evicted = _access(kind, e, I, F)
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
def admit_predicted(kind: int, predicted: np.ndarray, I: np.ndarray, F: np.ndarray, state: np.ndarray,
                    disk_row: np.ndarray, table: np.ndarray, job: int, out: np.ndarray, counts: np.ndarray) -> None:
    """Admit look-ahead predictions of one layer that have no slot, never over a pinned or in-flight expert.

    Each admitted expert is keyed as of now without counting a use (the policy's ``settle``), so
    a wrong guess can be evicted later, marked prefetched and given job ``job``. Fills go to the
    ``DEMAND_SLOT`` / ``DEMAND_EXPERT`` / ``DEMAND_ROW`` rows of ``out``; ``counts[N_DEMAND]`` is their
    number, ``counts[N_FROM_DISK]`` how many are read from disk and ``counts[PREFETCH_WASTED]`` the
    unused look-ahead copies they displaced.
    """
    S = state.shape[1]
    E = I[4]
    slot_of = _HEAD + S
    pin0 = _HEAD + 2 * S + E
    counts[N_DEMAND] = 0
    counts[PREFETCH_WASTED] = 0
    counts[N_FROM_DISK] = 0
    for s in range(S):
        if state[JOB, s] >= 0:
            I[pin0 + state[EXPERT, s]] = 1
    for i in range(predicted.shape[0]):
        e = predicted[i]
        if I[slot_of + e] >= 0:
            continue
        s, evicted = _admit(kind, e, I, F)
        if s < 0:
            continue
        if evicted >= 0:
            if state[PREFETCHED, s] != 0:
                counts[PREFETCH_WASTED] += 1
            table[evicted] = -1
        _key(kind, e, I, F)
        I[pin0 + e] = 1
        table[e] = s
        state[EXPERT, s] = e
        state[JOB, s] = job
        state[PREFETCHED, s] = 1
        out[DEMAND_SLOT, counts[N_DEMAND]] = s
        out[DEMAND_EXPERT, counts[N_DEMAND]] = e
        out[DEMAND_ROW, counts[N_DEMAND]] = disk_row[e]
        if disk_row[e] < 0:
            counts[N_FROM_DISK] += 1
        counts[N_DEMAND] += 1
    for s in range(S):
        if state[JOB, s] >= 0:
            I[pin0 + state[EXPERT, s]] = 0


@njit
def mark_pairs(ids: np.ndarray, cpu: np.ndarray, staged: np.ndarray, scratch: np.ndarray, codes: np.ndarray) -> None:
    """Per routed pair of ``ids [T, k]``: :data:`PAIR_CPU`, :data:`PAIR_STAGED` or :data:`PAIR_GPU` into ``codes``.

    ``scratch`` is an ``int8 [num_experts]`` array of zeros; it is zero again on return.
    """
    for i in range(cpu.shape[0]):
        scratch[cpu[i]] = PAIR_CPU
    for i in range(staged.shape[0]):
        scratch[staged[i]] = PAIR_STAGED
    for t in range(ids.shape[0]):
        for j in range(ids.shape[1]):
            codes[t, j] = scratch[ids[t, j]]
    for i in range(cpu.shape[0]):
        scratch[cpu[i]] = 0
    for i in range(staged.shape[0]):
        scratch[staged[i]] = 0


@njit
def split_pairs(ids: np.ndarray, cpu: np.ndarray, staged: np.ndarray, scratch: np.ndarray, skip: np.ndarray,
                cpu_tokens: np.ndarray, cpu_picks: np.ndarray) -> int:
    """Per routed pair of ``ids [T, k]``: ``skip`` (bool) where the CPU or the staging rounds compute it, and the
    (token, pick) of every CPU pair into ``cpu_tokens`` / ``cpu_picks``, in row-major order; returns their number.

    ``scratch`` is an ``int8 [num_experts]`` array of zeros; it is zero again on return.
    """
    for i in range(cpu.shape[0]):
        scratch[cpu[i]] = PAIR_CPU
    for i in range(staged.shape[0]):
        scratch[staged[i]] = PAIR_STAGED
    n = 0
    for t in range(ids.shape[0]):
        for j in range(ids.shape[1]):
            code = scratch[ids[t, j]]
            skip[t, j] = code != PAIR_GPU
            if code == PAIR_CPU:
                cpu_tokens[n] = t
                cpu_picks[n] = j
                n += 1
    for i in range(cpu.shape[0]):
        scratch[cpu[i]] = 0
    for i in range(staged.shape[0]):
        scratch[staged[i]] = 0
    return n


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
    """``dst[dst_rows[i]] = src[src_rows[i]]`` for byte matrices (the cpu device's copy of expert records)."""
    for i in range(dst_rows.shape[0]):
        dst[dst_rows[i], :] = src[src_rows[i], :]


@njit
def job_landed(state: np.ndarray, job: int) -> None:
    """Job ``job`` completed: the slots that wait for it become resident."""
    for s in range(state.shape[1]):
        if state[JOB, s] == job:
            state[JOB, s] = -1


def warm_up() -> None:
    """Compile (or load from numba's cache) every function here for the argument types the runtime passes.

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
    classify(K_LRU, True, ids[0], np.ones(2, np.int64), 0.0, I, F, state, rows, table, 1, 2, out, counts)
    admit_predicted(K_LRU, ids[0], I, F, state, rows, table, 3, out, counts)
    job_landed(state, 1)
    codes = np.empty(ids.shape, dtype=np.int8)
    mark_pairs(ids, ids[0, :1], ids[0, 1:], np.zeros(experts, np.int8), codes)
    pairs = np.empty(2, np.int64)
    split_pairs(ids, ids[0, :1], ids[0, 1:], np.zeros(experts, np.int8), np.empty(ids.shape, np.bool_), pairs, pairs)
    distinct_in_order(ids, np.full(experts, -1, np.int64), np.empty(experts, np.int64), np.empty(experts, np.int64))
    buf = np.zeros((2, 8), dtype=np.uint8)
    copy_rows(buf, buf, np.zeros(1, np.int64), np.ones(1, np.int64))
