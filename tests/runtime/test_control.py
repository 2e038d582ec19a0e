"""The compiled per-call bookkeeping (runtime/control.py) against the policy's own step and plain references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from residency.runtime import control
from residency.runtime import telemetry as tm
from residency.runtime.copies import DEMAND, ThreadCopyEngine
from residency.runtime.policy import POLICY_NAMES, make_policy

E, K = 40, 5


def fresh(policy: str, slots: int, static=(1, 2)):
    cache = make_policy(policy, E, slots, list(static))
    state = control.new_state(slots)
    table = np.full(E, -1, dtype=np.int32)
    for s, e in enumerate(static):
        state[control.EXPERT, s] = e
        table[e] = s
    return cache, state, table


def run_classify(cache, state, table, order, tokens, cpu_limit, disk_row, decode=True, jobs=(100, 101)):
    out = np.full((control.OUT_ROWS, E + 1), -7, dtype=np.int64)
    counts = np.zeros(control.N_COUNTS, dtype=np.int64)
    control.classify(cache.kind, decode, np.asarray(order, np.int64), np.asarray(tokens, np.int64), cpu_limit,
                     cache._I, cache._F, state, disk_row, table, jobs[0], jobs[1], out, counts, np.empty(E, np.int64))
    return counts.tolist(), lists_of(out, counts)


def lists_of(out, counts):
    """classify's output lists by name, from its output rows and counts."""
    c = counts.tolist()

    def row(r, n):
        return out[r, :c[n]].tolist()

    names = {"gpu": (control.GPU_SLOT, control.N_GPU), "gpu_e": (control.GPU_EXPERT, control.N_GPU),
             "demand": (control.DEMAND_EXPERT, control.N_DEMAND), "demand_s": (control.DEMAND_SLOT, control.N_DEMAND),
             "demand_row": (control.DEMAND_ROW, control.N_DEMAND), "back": (control.BACK_EXPERT, control.N_BACK),
             "back_s": (control.BACK_SLOT, control.N_BACK), "staged": (control.STAGED, control.N_STAGED),
             "cpu": (control.CPU, control.N_CPU), "wait": (control.WAIT_JOB, control.N_WAIT)}
    return {name: row(r, n) for name, (r, n) in names.items()}


@pytest.mark.parametrize("policy", POLICY_NAMES)
@pytest.mark.parametrize("cpu_limit", [0.0, 1.5, np.inf])
def test_decode_classification_matches_the_policy_step_and_the_rules(policy, cpu_limit):
    """Per call: the same (hit, slot, evicted) as ExpertCache.step with the in-flight experts pinned, and
    every miss served exactly once by the rules (CPU when tokens < limit and in host memory, else slot or staging)."""
    rng = np.random.default_rng(3)
    cache, state, table = fresh(policy, 9)
    twin = make_policy(policy, E, 9, [1, 2])
    disk_row = np.arange(E, dtype=np.int64)
    disk_row[[7, 8, 30]] = -1  # on disk: never computed on the CPU
    job = 100
    for _ in range(60):
        order = rng.choice(E, K, replace=False)
        tokens = rng.integers(1, 4, K)
        inflight = state[control.EXPERT, state[control.JOB] >= 0].copy()
        expect = twin.step(order, inflight)
        c, lists = run_classify(cache, state, table, order, tokens, cpu_limit, disk_row, jobs=(job, job + 1))
        assert c[control.HITS] == int(expect[:, 0].sum()) and c[control.MISSES] == K - c[control.HITS]
        gpu, cpu, staged, demand, back = [], [], [], [], []
        for e, (hit, s, _), t in zip(order.tolist(), expect.tolist(), tokens.tolist()):
            if hit:
                gpu.append(e)
                continue
            on_cpu = disk_row[e] >= 0 and t < cpu_limit
            if on_cpu:
                cpu.append(e)
                if s >= 0:
                    back.append(e)
            elif s >= 0:
                demand.append(e)
                gpu.append(e)
            else:
                staged.append(e)
        assert sorted(lists["gpu_e"]) == sorted(gpu) and lists["cpu"] == cpu and lists["staged"] == staged
        assert lists["demand"] == demand and lists["back"] == back
        assert lists["demand_row"] == [int(disk_row[e]) for e in demand]
        assert c[control.N_FROM_DISK] == sum(disk_row[e] < 0 for e in demand + back)
        # the table and the slot state say what the policy says
        resident = cache.resident()
        assert resident == twin.resident()
        assert {e: s for e, s in enumerate(table.tolist()) if s >= 0} == resident
        for e, s in resident.items():
            assert state[control.EXPERT, s] == e
        for s, e in zip(lists["gpu"], lists["gpu_e"]):
            assert table[e] == s
        assert all(state[control.JOB, s] == job for s in lists["demand_s"])
        assert all(state[control.JOB, s] == job + 1 for s in lists["back_s"])
        if demand:
            assert job in lists["wait"]
        # some copies land before the next call, some stay in flight (pinned)
        if rng.random() < 0.6:
            control.job_landed(state, job)
        if rng.random() < 0.6:
            control.job_landed(state, job + 1)
        job += 2


def test_prefill_classification_only_looks_up():
    cache, state, table = fresh("lru", 6)
    before_I, before_F, before_table = cache._I.copy(), cache._F.copy(), table.copy()
    c, lists = run_classify(cache, state, table, [1, 5, 2, 9], [3, 1, 2, 1], 0.0, np.arange(E), decode=False)
    assert lists["gpu_e"] == [1, 2] and lists["staged"] == [5, 9] and lists["demand"] == []
    assert np.array_equal(cache._I, before_I) and np.array_equal(cache._F, before_F)
    assert np.array_equal(table, before_table)


def test_in_flight_experts_are_never_evicted_and_prefetched_slots_count_use_and_waste():
    cache, state, table = fresh("lru", 4, static=())
    out = np.zeros((control.OUT_ROWS, E + 1), np.int64)
    counts = np.zeros(control.N_COUNTS, np.int64)
    disk_row = np.arange(E, dtype=np.int64)
    control.admit_predicted(cache.kind, np.array([3, 4, 5, 6], np.int64), cache._I, cache._F, state, disk_row,
                            table, 7, out, counts, np.empty(E, np.int64))
    assert counts[control.N_PF] == 4 and (state[control.PREFETCHED] == 1).all()
    # all four in flight (job 7): a new prediction finds no victim
    control.admit_predicted(cache.kind, np.array([9], np.int64), cache._I, cache._F, state, disk_row, table, 8,
                            out, counts, np.empty(E, np.int64))
    assert counts[control.N_PF] == 0 and cache.lookup(9) is None
    control.job_landed(state, 7)
    # landed and unused: a guess can now be replaced, and the replaced guess is counted as wasted
    control.admit_predicted(cache.kind, np.array([9], np.int64), cache._I, cache._F, state, disk_row, table, 8,
                            out, counts, np.empty(E, np.int64))
    assert counts[control.N_PF] == 1 and counts[control.PF_WASTED] == 1
    evicted = {3, 4, 5, 6} - set(cache.resident())
    assert len(evicted) == 1 and table[evicted.pop()] == -1 and table[9] >= 0
    # a hit on a prefetched slot counts it used, once
    c, _ = run_classify(cache, state, table, [4], [1], 0.0, disk_row)
    c2, _ = run_classify(cache, state, table, [4], [1], 0.0, disk_row)
    assert c[control.PREFETCH_USED] == 1 and c2[control.PREFETCH_USED] == 0


def test_a_guess_never_evicts_another_guess_of_the_same_call():
    cache, state, table = fresh("lru", 4, static=())
    disk_row = np.arange(E, dtype=np.int64)
    for e in (1, 2, 3, 4):  # all four slots used, 1 least recently
        run_classify(cache, state, table, [e], [1], 0.0, disk_row)
    control.job_landed(state, 100)  # (run_classify's demand job)
    out = np.zeros((control.OUT_ROWS, E + 1), np.int64)
    counts = np.zeros(control.N_COUNTS, np.int64)
    # 1 is predicted too: the fill for 7 takes the least recent expert that is not (2)
    control.admit_predicted(cache.kind, np.array([1, 7], np.int64), cache._I, cache._F, state, disk_row, table, 9,
                            out, counts, np.empty(E, np.int64))
    assert counts[control.N_PF] == 1 and out[control.PF_EXPERT, 0] == 7
    assert sorted(cache.resident()) == [1, 3, 4, 7] and table[2] == -1 and table[1] >= 0


def test_distinct_in_order_matches_numpy():
    rng = np.random.default_rng(0)
    scratch64 = np.full(E, -1, np.int64)
    for T in (1, 3, 17):
        ids = rng.integers(0, E, (T, K)).astype(np.int64)
        order, tokens = np.empty(E, np.int64), np.empty(E, np.int64)
        n = control.distinct_in_order(ids, scratch64, order, tokens)
        uniq, first, cnt = np.unique(ids.reshape(-1), return_index=True, return_counts=True)
        by_first = np.argsort(first, kind="stable")
        assert order[:n].tolist() == uniq[by_first].tolist() and tokens[:n].tolist() == cnt[by_first].tolist()
        assert (scratch64 == -1).all()


def test_staging_round_table_names_exactly_the_round_and_skips_every_other_pair():
    rng = np.random.default_rng(1)
    table = np.full(E, 3, np.int32)  # stale entries of an earlier round must go
    for T in (1, 4):
        ids = rng.integers(0, E, (T, K)).astype(np.int64)
        chunk = np.unique(ids)[:3].astype(np.int64)
        slots = np.array([5, 0, 2, 9], np.int64)
        disk_row = rng.permutation(E).astype(np.int64)
        disk_row[chunk[1]] = -1
        skip = np.zeros(ids.shape, np.bool_)
        rows = np.full(5, -9, np.int64)
        on_disk = control.staging_round(ids, chunk, slots, disk_row, table, skip, rows)
        expect = np.full(E, -1, np.int32)
        expect[chunk] = slots[:3]
        assert np.array_equal(table, expect) and np.array_equal(skip, ~np.isin(ids, chunk))
        assert rows[:3].tolist() == disk_row[chunk].tolist() and on_disk == 1 and (rows[3:] == -9).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.uint8])
def test_record_copies_on_the_copy_thread_move_exactly_the_named_rows(dtype):
    src = torch.randint(0, 100, (12, 33), dtype=torch.int32).to(dtype)
    dst = torch.full((5, 33), 7, dtype=torch.int32).to(dtype)
    engine = ThreadCopyEngine(delay=lambda: 0.002)
    try:
        dst_rows, src_rows = np.array([4, 0, 2]), np.array([11, 3, 3])
        ticket = engine.copy_records(dst, src, dst_rows, src_rows, DEMAND)
        dst_rows[:], src_rows[:] = 1, 0  # the caller may reuse its arrays once the call returns (workspace rows)
        ticket.wait()
        assert ticket.done() and ticket.nbytes == 3 * 33 * dst.element_size()
        assert torch.equal(dst[4], src[11]) and torch.equal(dst[0], src[3]) and torch.equal(dst[2], src[3])
        assert (dst[[1, 3]] == 7).all()
        with pytest.raises(ValueError, match="bytes"):
            engine.copy_records(dst[:, :32].contiguous(), src, np.array([0]), np.array([0]))
    finally:
        engine.close()


def test_split_pairs_marks_skipped_pairs_and_lists_cpu_pairs_in_row_major_order():
    rng = np.random.default_rng(4)
    scratch = np.zeros(E, np.int8)
    disk_row = rng.permutation(E).astype(np.int64)
    for T in (1, 6):
        ids = rng.integers(0, E, (T, K)).astype(np.int64)
        cpu = np.unique(ids)[:3].astype(np.int64)
        staged = np.setdiff1d(np.unique(ids), cpu)[:2].astype(np.int64)
        skip = np.zeros(ids.shape, np.bool_)
        pairs = np.full((control.PAIR_ROWS, ids.size + 3), -1, np.int64)
        n = control.split_pairs(ids, cpu, staged, scratch, disk_row, skip, pairs)
        assert np.array_equal(skip, np.isin(ids, cpu) | np.isin(ids, staged)) and not scratch.any()
        expect_t, expect_p = np.nonzero(np.isin(ids, cpu))
        assert n == expect_t.size
        assert pairs[control.PAIR_TOKEN, :n].tolist() == expect_t.tolist()
        assert pairs[control.PAIR_PICK, :n].tolist() == expect_p.tolist()
        assert pairs[control.PAIR_ROW, :n].tolist() == disk_row[ids[expect_t, expect_p]].tolist()
        assert pairs[control.PAIR_FLAT, :n].tolist() == (expect_t * K + expect_p).tolist()
        assert (pairs[:, n:] == -1).all()


@pytest.mark.parametrize("policy", POLICY_NAMES)
@pytest.mark.parametrize("decode", [True, False])
def test_layer_call_is_distinct_then_classify_then_split_pairs_then_the_look_ahead(decode, policy):
    """The fused call the runtime makes equals its parts run one after the other, on twin states (this layer
    and the next one, whose predicted experts it admits)."""
    rng = np.random.default_rng(5)
    disk_row = np.arange(E, dtype=np.int64)
    disk_row[[7, 30]] = -1
    a, b = fresh(policy, 9), fresh(policy, 9)
    a_next, b_next = fresh(policy, 6, static=(3,)), fresh(policy, 6, static=(3,))
    admitted = 0
    RB = 48  # record bytes
    tel_a, tel = np.zeros((2, len(tm.COUNTER_NAMES)), np.int64), np.zeros((2, len(tm.COUNTER_NAMES)), np.int64)
    for step in range(40):
        T = 1 if step % 2 else 3
        ids = np.stack([rng.choice(E, K, replace=False) for _ in range(T)]).astype(np.int64)
        predicted = (np.stack([rng.choice(E, K, replace=False) for _ in range(T)]).astype(np.int64)
                     if decode and step % 4 else np.empty((0, 1), np.int64))
        limit = 2.0 if step % 3 else 0.0
        jobs = (3 * step + 100, 3 * step + 101, 3 * step + 102)
        # the parts
        order, tokens = np.empty(E, np.int64), np.empty(E, np.int64)
        n = control.distinct_in_order(ids, np.full(E, -1, np.int64), order, tokens)
        c, lists = run_classify(*a, order[:n], tokens[:n], limit, disk_row, decode=decode, jobs=jobs[:2])
        skip_a = np.zeros(ids.shape, np.bool_)
        pairs_a = np.zeros((control.PAIR_ROWS, ids.size), np.int64)
        n_pairs = 0
        if lists["cpu"] or lists["staged"]:
            cpu, staged = np.asarray(lists["cpu"], np.int64), np.asarray(lists["staged"], np.int64)
            n_pairs = control.split_pairs(ids, cpu, staged, np.zeros(E, np.int8), disk_row, skip_a, pairs_a)
        out_a = np.zeros((control.OUT_ROWS, E + 1), np.int64)
        counts_a = np.zeros(control.N_COUNTS, np.int64)
        if predicted.shape[0]:
            m = control.distinct_in_order(predicted, np.full(E, -1, np.int64), order, tokens)
            cache_n, state_n, table_n = a_next
            control.admit_predicted(cache_n.kind, order[:m], cache_n._I, cache_n._F, state_n, disk_row, table_n,
                                    jobs[2], out_a, counts_a, np.empty(E, np.int64))
        # the fused call
        cache, state, table = b
        cache_n, state_n, table_n = b_next
        out = np.full((control.OUT_ROWS, E + 1), -7, dtype=np.int64)
        counts = np.zeros(control.N_COUNTS, dtype=np.int64)
        skip_b = np.zeros(ids.size + 4, np.bool_)  # workspaces larger than the call, as the runtime's grow
        pairs_b = np.zeros((control.PAIR_ROWS, ids.size + 4), np.int64)
        work, scratch_pair = control.new_work(E), np.zeros(E, np.int8)
        control.layer_call(cache.kind, decode, ids, limit, cache._I, cache._F, state, disk_row, table, *jobs[:2],
                           predicted, cache_n._I, cache_n._F, state_n, disk_row, table_n, jobs[2],
                           work, scratch_pair, out, counts, skip_b, pairs_b, tel[0], tel[1], RB)
        # the telemetry the call counted: this layer's lookups and copies, the next layer's look-ahead copies
        C = control
        tel_a[0, tm.HITS] += c[C.HITS]
        tel_a[0, tm.MISSES] += c[C.MISSES]
        tel_a[0, tm.DEMAND_COPIES] += c[C.DEMAND_COPIES]
        tel_a[0, tm.PREFETCH_USED] += c[C.PREFETCH_USED]
        tel_a[0, tm.PREFETCH_WASTED] += c[C.PREFETCH_WASTED]
        tel_a[0, tm.CPU_COMPUTED] += len(lists["cpu"])
        tel_a[0, tm.H2D_BYTES] += (len(lists["demand"]) + len(lists["back"])) * RB
        tel_a[0, tm.DISK_BYTES] += sum(disk_row[e] < 0 for e in lists["demand"]) * RB
        tel_a[1, tm.PREFETCH_ISSUED] += counts_a[C.N_PF]
        tel_a[1, tm.PREFETCH_WASTED] += counts_a[C.PF_WASTED]
        tel_a[1, tm.H2D_BYTES] += counts_a[C.N_PF] * RB
        tel_a[1, tm.DISK_BYTES] += counts_a[C.N_PF_FROM_DISK] * RB
        assert np.array_equal(tel, tel_a), (tel, tel_a)
        assert counts.tolist()[:control.N_PAIRS] == c[:control.N_PAIRS] and counts[control.N_PAIRS] == n_pairs
        assert lists_of(out, counts) == lists  # every output list: slots to compute, copies, staged, CPU, waits
        assert np.array_equal(a[1], state) and np.array_equal(a[2], table)
        assert np.array_equal(a[0]._I, cache._I) and np.array_equal(a[0]._F, cache._F)
        if lists["cpu"] or lists["staged"]:  # (else the mask is not written: no pair is skipped)
            assert np.array_equal(skip_a.reshape(-1), skip_b[:ids.size])
        assert np.array_equal(pairs_a[:, :n_pairs], pairs_b[:, :n_pairs])
        pf = [control.N_PF, control.PF_WASTED, control.N_PF_FROM_DISK]
        assert counts[pf].tolist() == counts_a[pf].tolist()
        k = counts[control.N_PF]
        admitted += k
        rows = slice(control.PF_SLOT, control.PF_ROW + 1)
        assert np.array_equal(out[rows, :k], out_a[rows, :k])
        assert np.array_equal(a_next[1], state_n) and np.array_equal(a_next[2], table_n)
        assert np.array_equal(a_next[0]._I, cache_n._I) and np.array_equal(a_next[0]._F, cache_n._F)
        assert (work[control.WORK_SCRATCH] == -1).all() and not scratch_pair.any()
        for state_ in (a[1], state, a_next[1], state_n):  # copies land between calls
            state_[control.JOB] = -1
    assert (admitted > 0) == (decode and policy != "static")  # the look-ahead admitted experts (decode only)
    assert tel[0, tm.HITS] > 0 and tel[0, tm.MISSES] > 0
    assert (tel[0, tm.H2D_BYTES] > 0) == (decode and policy != "static")  # (only a decode call admits experts)
    assert (tel[1, tm.PREFETCH_ISSUED] > 0) == (admitted > 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_inputs_read_in_one_copy_equal_two_copies(dtype):
    from residency.runtime.backend import host_fp32

    latent, weights = torch.randn(5, 33).to(dtype), torch.rand(5, 7)
    x1, w1 = host_fp32(latent, weights, merged=False)
    x2, w2 = host_fp32(latent, weights, merged=True)
    assert np.array_equal(x1, x2) and np.array_equal(w1, w2) and x2.flags.c_contiguous and x2.dtype == np.float32
    assert np.array_equal(x2, latent.float().numpy())
