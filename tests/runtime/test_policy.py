"""Admission/eviction semantics of the per-layer expert caches shared by the runtime and the simulator."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from residency.runtime.policy import (
    COUNTERS,
    LFU,
    LRU,
    POLICIES,
    ProfileSeededHybrid,
    StaticOnly,
    make_policy,
    replay_layer,
)


def test_static_experts_are_resident_and_never_evicted():
    for cls in POLICIES.values():
        cache = cls(16, 6, static=[3, 9])
        assert cache.lookup(3) == 0 and cache.lookup(9) == 1 and cache.lookup(0) is None
        for e in range(16):
            cache.access(e, pinned=[e])
        assert cache.lookup(3) == 0 and cache.lookup(9) == 1


def test_free_slots_fill_lowest_first_then_lru_evicts_least_recent():
    cache = LRU(16, 4, static=[0])
    assert cache.admit(5) == (1, None)
    cache.on_use(5)
    assert cache.access(6) == (False, 2, None)
    assert cache.access(7) == (False, 3, None)
    cache.on_use(5)  # 5 is now more recent than 6 and 7
    assert cache.access(8) == (False, 2, 6)  # 6 was least recently used
    assert cache.access(5) == (True, 1, None)
    assert cache.resident() == {0: 0, 5: 1, 8: 2, 7: 3}


def test_lookup_does_not_change_state():
    a, b = LRU(8, 3), LRU(8, 3)
    for e in (1, 2, 3):
        a.access(e)
        b.access(e)
    a.lookup(1)
    a.lookup(4)
    assert a.access(4) == b.access(4) == (False, 0, 1)


def test_pinned_experts_are_never_evicted():
    cache = LRU(16, 3)
    for e in (1, 2, 3):
        cache.access(e)
    # 1 is least recent, but pinned (in the current step); 2 goes instead
    assert cache.admit(4, pinned=[1, 4]) == (1, 2)
    # every dynamic expert pinned: nothing can be evicted, the miss is served without caching
    assert cache.admit(5, pinned=[1, 3, 4]) == (None, None)
    assert cache.lookup(5) is None


def test_admitted_but_unused_expert_is_not_a_victim():
    cache = LFU(16, 2)
    cache.access(1)
    cache.access(1)
    s, _ = cache.admit(2)  # copy in flight, no use recorded yet
    assert s == 1
    assert cache.admit(3) == (0, 1)  # 2 (admitted, not yet used) is protected; 1 goes


def test_static_only_never_admits():
    cache = StaticOnly(8, 4, static=[1, 2])
    assert cache.admit(5) == (None, None)
    assert cache.access(5) == (False, None, None)
    assert cache.resident() == {1: 0, 2: 1}


def test_lfu_evicts_least_frequent_and_breaks_ties_by_recency():
    cache = LFU(16, 3)
    for e in (1, 1, 1, 2, 2, 3):
        cache.access(e)
    assert cache.access(4) == (False, 2, 3)  # 3 has one use
    cache.access(4)
    cache.access(4)  # 4: three uses
    assert cache.access(5) == (False, 1, 2)  # 2 has two uses, the fewest now
    lfu_tie = LFU(16, 2)
    lfu_tie.access(7)
    lfu_tie.access(8)
    assert lfu_tie.access(9) == (False, 0, 7)  # both used once: the older one goes


def test_hybrid_prior_protects_profiled_experts_and_ages_them_out():
    prior = np.zeros(64)
    prior[1] = 0.5  # the profile says expert 1 is picked every other token
    hyb = ProfileSeededHybrid(64, 2, prior=prior, prior_tokens=64)
    lru = LRU(64, 2)
    for cache in (hyb, lru):
        cache.access(1)
        cache.access(2)
        cache.access(3)
    assert hyb.lookup(1) is not None and hyb.lookup(2) is None  # 1 kept: prior frequency 32 + 1 use
    assert lru.lookup(1) is None
    # a stream of one-off experts raises the inflation value L by one per eviction, so the stale
    # prior (key 33) survives 20 of them but is aged out within 40
    for e in range(4, 24):
        hyb.access(e)
    assert hyb.lookup(1) is not None
    for e in range(24, 44):
        hyb.access(e)
    assert hyb.lookup(1) is None


def test_evicting_an_admitted_but_never_used_expert_does_not_inflate_the_hybrid_keys_to_infinity():
    cache = ProfileSeededHybrid(16, 2)
    cache.admit(1)  # admitted through the object interface, never used: no key yet
    cache.admit(2)
    cache.admit(3)  # evicts one of them
    cache.on_use(3)
    assert np.isfinite(cache._F[0])
    cache.access(4)
    cache.access(5)
    assert np.isfinite(cache._F[0]) and np.isfinite(cache._F[1 + cache.lookup(5)])  # used experts keep real keys


def test_step_equals_one_access_per_expert_with_the_step_pinned():
    rng = np.random.default_rng(0)
    a, b = make_policy("lru", 64, 12, static=[0, 1]), make_policy("lru", 64, 12, static=[0, 1])
    for _ in range(200):
        experts = rng.choice(64, 5, replace=False)
        out = a.step(experts)
        for j, e in enumerate(experts):
            hit, slot, ev = b.access(int(e), pinned=experts)
            assert (bool(out[j, 0]), out[j, 1], out[j, 2]) == (hit, -1 if slot is None else slot,
                                                              -1 if ev is None else ev)
    assert a.resident() == b.resident()


def test_step_protects_inflight_copies():
    cache = LRU(16, 2)
    cache.step([1])
    cache.step([2])
    out = cache.step([3], inflight=[1])
    assert out[0].tolist() == [0, 1, 2]  # 1 is least recent but in flight, 2 is evicted


def test_validation_errors():
    with pytest.raises(ValueError, match="do not fit"):
        LRU(8, 1, static=[0, 1])
    with pytest.raises(ValueError, match="distinct"):
        LRU(8, 4, static=[2, 2])
    with pytest.raises(ValueError, match="lie in"):
        LRU(8, 4, static=[9])
    with pytest.raises(ValueError, match="outside"):
        LRU(8, 4).lookup(8)
    with pytest.raises(ValueError, match="prior"):
        ProfileSeededHybrid(8, 4, prior=[1.0])
    with pytest.raises(ValueError, match="unknown policy"):
        make_policy("fifo", 8, 4)


def test_replay_layer_equals_the_object_interface():
    rng = np.random.default_rng(5)
    ids = np.stack([rng.choice(32, 4, replace=False) for _ in range(300)]).astype(np.int64)
    prior = rng.random(32)
    for name, cls in POLICIES.items():
        counts = replay_layer(cls.kind, ids, np.array([0, 1, 2], dtype=np.int64), 10, 32, prior, 16.0,
                              np.zeros(32, dtype=np.bool_), 0.0, 0, 0)
        cache = cls(32, 10, static=[0, 1, 2], prior=prior, prior_tokens=16.0)
        out = np.concatenate([cache.step(row) for row in ids])
        got = dict(zip(COUNTERS, counts.tolist()))
        assert got["hits"] == int(out[:, 0].sum()), name
        assert got["misses"] == int((out[:, 0] == 0).sum())
        assert got["admitted"] == int(((out[:, 0] == 0) & (out[:, 1] >= 0)).sum())
        assert got["evicted"] == int((out[:, 2] >= 0).sum())


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_a_step_finds_the_victims_one_search_per_miss_would(name):
    """A step's victims come from one pass over the slots; the same accesses one at a time through
    :meth:`ExpertCache.admit` (one victim search each) make the same choices: free slots first, then
    the least key, ties (look-ahead admissions settled at one tick) to the lower slot."""
    rng = np.random.default_rng(11)
    prior = rng.random(40)
    batched = make_policy(name, 40, 14, [0, 1], prior=prior, prior_tokens=4.0)
    one_by_one = make_policy(name, 40, 14, [0, 1], prior=prior, prior_tokens=4.0)
    for step in range(400):
        experts = rng.choice(40, int(rng.integers(1, 11)), replace=False)
        inflight = rng.choice(40, int(rng.integers(0, 4)), replace=False)
        got = batched.step(experts, inflight)
        pinned = np.concatenate([experts, inflight])
        for j, e in enumerate(experts.tolist()):
            hit = one_by_one.lookup(e) is not None
            slot, evicted = (one_by_one.lookup(e), None) if hit else one_by_one.admit(e, pinned=pinned)
            one_by_one.on_use(e)
            assert got[j].tolist() == [int(hit), -1 if slot is None else slot, -1 if evicted is None else evicted], \
                (step, j)
        if step % 7 == 0:  # look-ahead style admissions: keyed at one tick, unused (equal keys)
            guesses = [int(e) for e in rng.choice(40, 3, replace=False) if batched.lookup(int(e)) is None]
            for cache in (batched, one_by_one):
                for e in guesses:
                    slot, _ = cache.admit(e, pinned=guesses)
                    if slot is not None:
                        cache.settle(e)
        assert batched.resident() == one_by_one.resident()


def test_replay_counts_prefetch_and_disk():
    ids = np.array([[0, 1], [2, 3], [0, 4]], dtype=np.int64)
    disk = np.zeros(8, dtype=np.bool_)
    disk[[3, 4]] = True
    c = dict(zip(COUNTERS, replay_layer(1, ids, np.zeros(0, np.int64), 2, 8, np.zeros(8), 0.0, disk, 1.0, 3, 1)))
    assert c["misses"] == 6 and c["hits"] == 0
    assert c["disk_reads"] == 2 and c["prefetch_used"] == 6 and c["prefetch_wasted"] == 9
    c0 = dict(zip(COUNTERS, replay_layer(1, ids, np.zeros(0, np.int64), 2, 8, np.zeros(8), 0.0, disk, 0.0, 0, 1)))
    assert c0["prefetch_used"] == 0 and c0["prefetch_wasted"] == 0


def test_pure_python_path_agrees_with_the_compiled_one(tmp_path):
    """The same functions run uncompiled (NUMBA_DISABLE_JIT=1) give identical counters."""
    script = (
        "import json, numpy as np\n"
        "from residency.runtime.policy import replay_layer\n"
        "rng = np.random.default_rng(3)\n"
        "ids = np.stack([rng.choice(40, 6, replace=False) for _ in range(150)]).astype(np.int64)\n"
        "prior = rng.random(40)\n"
        "disk = np.zeros(40, dtype=np.bool_); disk[::3] = True\n"
        "out = [replay_layer(k, ids, np.array([1, 2], dtype=np.int64), 9, 40, prior, 8.0, disk, 0.4, 1, 7).tolist()"
        " for k in range(4)]\n"
        "print(json.dumps(out))\n"
    )
    results = []
    for disable in ("0", "1"):
        env = {**os.environ, "NUMBA_DISABLE_JIT": disable}
        proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
        results.append(json.loads(proc.stdout))
    assert results[0] == results[1]
    assert all(sum(row[:2]) == 900 for row in results[0])
