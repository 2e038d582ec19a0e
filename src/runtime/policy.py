"""Admission and eviction for one MoE layer's GPU expert slots, shared by the runtime and the simulator.

A layer has ``num_slots`` expert slots. The first ``len(static)`` hold the plan's static resident
experts and are never evicted; the rest are dynamic and managed by a policy:

- ``static`` (:class:`StaticOnly`): never admits; a miss is served without caching it.
- ``lru`` (:class:`LRU`): evicts the least recently used expert.
- ``lfu`` (:class:`LFU`): evicts the expert with the fewest uses since the cache was created
  (counts persist after eviction); ties go to the least recently used.
- ``hybrid`` (:class:`ProfileSeededHybrid`): LFU with dynamic aging (GreedyDual): an expert's key
  is ``L + f`` when it is used, where ``f`` = profile prior (picks per token x ``prior_tokens``)
  + online uses and ``L`` is the key of the last victim. Experts the profile calls frequent keep
  an advantage; experts not used for a while fall behind as ``L`` rises, so recency counts too.

Semantics every caller relies on:

- :meth:`ExpertCache.lookup` returns the expert's slot or None. It never changes state.
- :meth:`ExpertCache.admit` finds a slot for a missed expert: a free dynamic slot (lowest index)
  if any, else the policy's victim among dynamic slots whose expert is not ``pinned``. Pinned
  experts are the current step's experts and experts with copies in flight: they are never
  evicted. It returns ``(slot, evicted_expert)``; ``(None, None)`` when nothing can be evicted (or
  the policy never admits): the caller then serves the miss from a staging buffer or the CPU. The
  caller marks the slot resident only once its copy has completed.
- An admitted expert is not a victim until its first use (its copy may still be in flight).
- :meth:`ExpertCache.on_use` records one use of an expert (hit, admitted or bypassed) for the
  policy's bookkeeping. Each use advances a per-cache access counter, which orders recency.
- :meth:`ExpertCache.step` does a whole decode step of one layer in one compiled call: pins the
  step's experts (and copies in flight), then for each expert lookup, admit on a miss, on_use.
- Victims are the minimum of (key, last use). Each use has its own tick, so among used experts
  the choice does not depend on slot numbering; look-ahead admissions of one call share a tick,
  and among those the lower slot goes first.
- A step finds all its victims in one pass over the slots (:func:`_victims`), not one search per
  miss: within a step every expert is pinned and a use re-keys only its own slot, so they are the
  victims one search per miss (:func:`_victim`, which :meth:`ExpertCache.admit` runs) would find.

The per-access functions are compiled with numba when it is importable (plain Python otherwise,
or with ``NUMBA_DISABLE_JIT=1``); :func:`replay_layer` runs a whole layer's routing trace through
the same functions, so the simulator and the runtime share one implementation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar

import numpy as np

from .jit import HAVE_NUMBA
from .jit import njit as _jit

__all__ = [
    "POLICIES",
    "POLICY_NAMES",
    "ExpertCache",
    "StaticOnly",
    "LRU",
    "LFU",
    "ProfileSeededHybrid",
    "make_policy",
    "replay_layer",
    "COUNTERS",
    "njit",
    "hash_unit",
    "HAVE_NUMBA",
]

def njit(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Compiled with numba and cached on disk (:func:`residency.runtime.jit.njit`), or the function itself when
    numba is missing."""
    return _jit(fn)


def _inline(fn: Callable[..., Any]) -> Callable[..., Any]:
    # Inlined at numba-IR level: a real call would incref/decref every array argument per access.
    return _jit(fn, inline="always")


# Policy kinds as integers for the compiled core.
K_STATIC, K_LRU, K_LFU, K_HYBRID = 0, 1, 2, 3

#: Names of the counters :func:`replay_layer` returns, in order.
COUNTERS = ("hits", "misses", "admitted", "bypassed", "evicted", "disk_reads", "prefetch_used", "prefetch_wasted")
_HITS, _MISSES, _ADMITTED, _BYPASSED, _EVICTED, _DISK, _PREFETCHED, _WASTED = range(len(COUNTERS))

# Cache state lives in two flat arrays so the compiled per-access functions take few array
# arguments (each array argument costs reference-count updates on every call).
# I (int64): [n_static, n_used, tick, S, E] + slot->expert[S] + expert->slot[E] + last use per slot[S]
#            + pinned flag per expert[E]
# F (float64): [GreedyDual inflation L] + key per slot[S] + uses per expert[E] (prior included)
_N_STATIC, _N_USED, _TICK, _S, _E, _HEAD = 0, 1, 2, 3, 4, 5


@_inline
def _mix32(x: int) -> int:
    x = (((x >> 16) ^ x) * 0x45D9F3B) & 0xFFFFFFFF
    x = (((x >> 16) ^ x) * 0x45D9F3B) & 0xFFFFFFFF
    return (x >> 16) ^ x


@njit
def hash_unit(seed: int, a: int, b: int) -> float:
    """A deterministic number in [0, 1) from three small non-negative integers (same with or without numba)."""
    x = _mix32(((seed & 0xFFFF) * 65599 + (a & 0xFFFFFF)) & 0xFFFFFFFF)
    x = _mix32((x + (b & 0xFFFF) * 40503) & 0xFFFFFFFF)
    return x / 4294967296.0


@njit
def _init_state(kind: int, num_slots: int, num_experts: int, static: np.ndarray, prior: np.ndarray,
                prior_tokens: float) -> tuple[np.ndarray, np.ndarray]:
    """Fresh cache state (I, F) with ``static`` in the first slots."""
    S, E = num_slots, num_experts
    I = np.zeros(_HEAD + 2 * S + 2 * E, np.int64)
    F = np.zeros(1 + S + E, np.float64)
    I[_S] = S
    I[_E] = E
    I[_HEAD:_HEAD + S + E] = -1  # slot->expert and expert->slot empty
    I[_HEAD + S + E:_HEAD + 2 * S + E] = -1  # last use
    for i in range(static.shape[0]):
        I[_HEAD + i] = static[i]
        I[_HEAD + S + static[i]] = i
    I[_N_STATIC] = static.shape[0]
    I[_N_USED] = static.shape[0]
    if kind == K_HYBRID:
        for e in range(E):
            F[1 + S + e] = prior[e] * prior_tokens
    return I, F


@_inline
def _key(kind: int, e: int, I: np.ndarray, F: np.ndarray) -> None:
    # (re)key expert e's slot as of the current tick and its use count, if it has a slot
    S = I[_S]
    s = I[_HEAD + S + e]
    if s < 0:
        return
    I[_HEAD + S + I[_E] + s] = I[_TICK]
    if kind == K_LRU:
        F[1 + s] = I[_TICK]
    elif kind == K_LFU:
        F[1 + s] = F[1 + S + e]
    elif kind == K_HYBRID:
        F[1 + s] = F[0] + F[1 + S + e]


@_inline
def _use(kind: int, e: int, I: np.ndarray, F: np.ndarray) -> None:
    I[_TICK] += 1
    F[1 + I[_S] + e] += 1.0
    _key(kind, e, I, F)


@_inline
def _victim(I: np.ndarray, F: np.ndarray) -> int:
    S = I[_S]
    if I[_N_USED] < S:
        return I[_N_USED]
    last0 = _HEAD + S + I[_E]
    pin0 = last0 + S
    best = -1
    best_key = 0.0
    best_last = 0
    for s in range(I[_N_STATIC], S):
        k = F[1 + s]
        if best < 0 or k < best_key or (k == best_key and I[last0 + s] < best_last):
            if I[pin0 + I[_HEAD + s]] != 0:
                continue
            best = s
            best_key = k
            best_last = I[last0 + s]
    return best


@_inline
def _victims(kind: int, I: np.ndarray, F: np.ndarray, m: int, out: np.ndarray) -> int:
    """The slots the next ``m`` admissions of a step take, in order, into ``out[:m]``; returns how many there are.

    Exactly what ``m`` successive :func:`_victim` calls return when each admitted expert is pinned
    and no unpinned slot's key changes in between, as within a step (every expert of a step is
    pinned before its first access, and a use re-keys only the used expert's slot): free dynamic
    slots first, lowest index first, then the unpinned used dynamic slots by ascending
    (key, last use, slot). One pass over the slots instead of one per miss. Fewer than ``m`` when
    the rest are pinned; none for the static policy.
    """
    if kind == K_STATIC or m <= 0:
        return 0
    S = I[_S]
    used = I[_N_USED]
    n = 0
    while n < m and used + n < S:
        out[n] = used + n
        n += 1
    if n == m:
        return n
    last0 = _HEAD + S + I[_E]
    pin0 = last0 + S
    first = n  # out[first:n]: the best candidates so far, ascending
    for s in range(I[_N_STATIC], used):
        if I[pin0 + I[_HEAD + s]] != 0:
            continue
        k = F[1 + s]
        last = I[last0 + s]
        if n == m:  # full: s must beat the worst kept
            w = out[n - 1]
            if not (k < F[1 + w] or (k == F[1 + w] and last < I[last0 + w])):
                continue
            at = n - 1
        else:
            at = n
            n += 1
        while at > first:  # (equal keys keep scan order: the lower slot first, as _victim)
            p = out[at - 1]
            if k < F[1 + p] or (k == F[1 + p] and last < I[last0 + p]):
                out[at] = p
                at -= 1
            else:
                break
        out[at] = s
    return n


@_inline
def _take(kind: int, e: int, v: int, I: np.ndarray, F: np.ndarray) -> int:
    """Admit missed expert ``e`` into slot ``v`` (free or a victim); returns the evicted expert, -1 for none."""
    S = I[_S]
    evicted = -1
    if v == I[_N_USED]:
        I[_N_USED] += 1
    else:
        evicted = I[_HEAD + v]
        I[_HEAD + S + evicted] = -1
        if kind == K_HYBRID and F[1 + v] < np.inf:  # (an admitted, never used victim has no key to inflate to)
            F[0] = F[1 + v]
    I[_HEAD + v] = e
    I[_HEAD + S + e] = v
    F[1 + v] = np.inf  # not a victim until its first use sets the key (admitted, copy in flight)
    I[_HEAD + S + I[_E] + v] = I[_TICK]
    return evicted


@_inline
def _admit(kind: int, e: int, I: np.ndarray, F: np.ndarray) -> tuple[int, int]:
    s = I[_HEAD + I[_S] + e]
    if s >= 0:
        return s, -1
    if kind == K_STATIC:
        return -1, -1
    v = _victim(I, F)
    if v < 0:
        return -1, -1
    return v, _take(kind, e, v, I, F)


@_inline
def _slotless(I: np.ndarray, experts: np.ndarray) -> int:
    """How many of ``experts`` have no slot (the misses of a step, whose victims :func:`_victims` finds)."""
    slot_of = _HEAD + I[_S]
    n = 0
    for i in range(experts.shape[0]):
        if I[slot_of + experts[i]] < 0:
            n += 1
    return n


@_inline
def _step_access(kind: int, e: int, I: np.ndarray, F: np.ndarray, victims: np.ndarray, taken: int,
                 available: int) -> tuple[int, int, int, int]:
    """One access within a step whose victims :func:`_victims` found (``victims[:available]``, ``taken`` of them
    used so far): lookup, admission on a miss (while a victim is left), use. Returns (hit, slot, evicted, victims
    used now); slot -1 for a miss not admitted."""
    s = I[_HEAD + I[_S] + e]
    hit = 1 if s >= 0 else 0
    evicted = -1
    if hit == 0 and taken < available:
        s = victims[taken]
        taken += 1
        evicted = _take(kind, e, s, I, F)
    _use(kind, e, I, F)
    return hit, s, evicted, taken


@njit
def replay_layer(kind: int, ids: np.ndarray, static: np.ndarray, num_slots: int, num_experts: int,
                 prior: np.ndarray, prior_tokens: float, disk: np.ndarray, recall: float, extra: int,
                 seed: int) -> np.ndarray:
    """Replay one layer's picks ``ids`` [tokens, top_k] through a fresh cache; returns :data:`COUNTERS`.

    Per token, all of the token's experts are pinned first, then each pick is looked up, admitted
    on a miss and recorded as used, exactly as :meth:`ExpertCache.access` does. ``disk`` marks
    experts whose host copy is on disk (their misses count as disk reads). Prefetch model: a miss
    counts as prefetched (its copy issued a layer ahead) with probability ``recall``, drawn from a
    hash of (seed, token, pick); ``extra`` wrong guesses per token are counted as wasted copies.
    """
    I, F = _init_state(kind, num_slots, num_experts, static, prior, prior_tokens)
    pin0 = _HEAD + 2 * num_slots + num_experts
    counts = np.zeros(8, np.int64)
    n_tokens = ids.shape[0]
    top_k = ids.shape[1]
    victims = np.empty(top_k, np.int64)
    for t in range(n_tokens):
        for j in range(top_k):
            I[pin0 + ids[t, j]] = 1
        available = _victims(kind, I, F, _slotless(I, ids[t]), victims)
        taken = 0
        for j in range(top_k):
            e = ids[t, j]
            hit, s, evicted, taken = _step_access(kind, e, I, F, victims, taken, available)
            if hit:
                counts[_HITS] += 1
                continue
            counts[_MISSES] += 1
            if s >= 0:
                counts[_ADMITTED] += 1
            else:
                counts[_BYPASSED] += 1
            if evicted >= 0:
                counts[_EVICTED] += 1
            if disk[e]:
                counts[_DISK] += 1
            if recall > 0.0 and hash_unit(seed, t, j) < recall:
                counts[_PREFETCHED] += 1
        counts[_WASTED] += extra
        for j in range(top_k):
            I[pin0 + ids[t, j]] = 0
    return counts


@njit
def _step(kind: int, experts: np.ndarray, extra_pinned: np.ndarray, I: np.ndarray, F: np.ndarray,
          out: np.ndarray) -> None:
    """One decode step of one layer: pin ``experts`` and ``extra_pinned``, access each expert.

    ``out`` [len(experts), 3] receives (hit, slot, evicted) per expert (-1 for none).
    """
    S, E = I[_S], I[_E]
    pin0 = _HEAD + 2 * S + E
    for j in range(extra_pinned.shape[0]):
        I[pin0 + extra_pinned[j]] = 1
    for j in range(experts.shape[0]):
        I[pin0 + experts[j]] = 1
    victims = np.empty(experts.shape[0], np.int64)
    available = _victims(kind, I, F, _slotless(I, experts), victims)
    taken = 0
    for j in range(experts.shape[0]):
        hit, s, evicted, taken = _step_access(kind, experts[j], I, F, victims, taken, available)
        out[j, 0] = hit
        out[j, 1] = s
        out[j, 2] = evicted
    for j in range(experts.shape[0]):
        I[pin0 + experts[j]] = 0
    for j in range(extra_pinned.shape[0]):
        I[pin0 + extra_pinned[j]] = 0


@njit
def _call_admit(kind: int, e: int, I: np.ndarray, F: np.ndarray) -> tuple[int, int]:
    return _admit(kind, e, I, F)


@njit
def _settle(kind: int, e: int, I: np.ndarray, F: np.ndarray) -> None:
    # give an admitted expert the key a use would, without counting a use: it becomes a victim candidate
    _key(kind, e, I, F)


@njit
def _call_use(kind: int, e: int, I: np.ndarray, F: np.ndarray) -> None:
    _use(kind, e, I, F)


# ---------------------------------------------------------------------- object interface for the runtime


class ExpertCache:
    """One MoE layer's expert slots under an admission/eviction policy (see the module docstring).

    ``static`` experts occupy slots ``0 .. len(static) - 1`` and are never evicted; the other
    ``num_slots - len(static)`` slots are dynamic. ``prior`` (picks per token per expert, from a
    profile) seeds :class:`ProfileSeededHybrid` and is ignored by the other policies.

    The runtime calls :meth:`step` once per layer and decode step (one compiled call for all the
    step's experts); :meth:`lookup`, :meth:`admit` and :meth:`on_use` give the same behaviour one
    expert at a time.
    """

    name: ClassVar[str] = ""
    kind: ClassVar[int] = -1

    def __init__(
        self,
        num_experts: int,
        num_slots: int,
        static: Sequence[int] = (),
        *,
        prior: Sequence[float] | np.ndarray | None = None,
        prior_tokens: float = 64.0,
    ) -> None:
        static_arr = np.asarray(list(static), dtype=np.int64)
        if num_experts < 1 or num_slots < 0:
            raise ValueError(f"need num_experts >= 1 and num_slots >= 0, got {num_experts}, {num_slots}")
        if static_arr.size > num_slots:
            raise ValueError(f"{static_arr.size} static experts do not fit {num_slots} slots")
        if static_arr.size and (static_arr.min() < 0 or static_arr.max() >= num_experts):
            raise ValueError(f"static expert ids must lie in [0, {num_experts})")
        if np.unique(static_arr).size != static_arr.size:
            raise ValueError("static expert ids must be distinct")
        prior_arr = np.zeros(num_experts) if prior is None else np.asarray(prior, dtype=np.float64)
        if prior_arr.shape != (num_experts,) or not np.all(np.isfinite(prior_arr)) or (prior_arr < 0).any():
            raise ValueError(f"prior must be {num_experts} finite non-negative numbers")
        self.num_experts = int(num_experts)
        self.num_slots = int(num_slots)
        self._I, self._F = _init_state(self.kind, self.num_slots, self.num_experts, static_arr, prior_arr,
                                       float(prior_tokens))
        self._pin0 = _HEAD + 2 * self.num_slots + self.num_experts

    @property
    def num_static(self) -> int:
        return int(self._I[_N_STATIC])

    @property
    def num_dynamic(self) -> int:
        return self.num_slots - self.num_static

    def _check(self, expert: int) -> int:
        e = int(expert)
        if not 0 <= e < self.num_experts:
            raise ValueError(f"expert id {expert} outside [0, {self.num_experts})")
        return e

    def _ids(self, experts: Iterable[int]) -> np.ndarray:
        arr = np.asarray(list(experts) if not isinstance(experts, np.ndarray) else experts, dtype=np.int64)
        if arr.size and (arr.min() < 0 or arr.max() >= self.num_experts):
            raise ValueError(f"expert ids must lie in [0, {self.num_experts})")
        return arr.reshape(-1)

    def lookup(self, expert: int) -> int | None:
        """The expert's slot, or None when it is not in GPU memory."""
        s = int(self._I[_HEAD + self.num_slots + self._check(expert)])
        return s if s >= 0 else None

    def on_use(self, expert: int) -> None:
        """Record one use of ``expert`` (call once per pick, whether it hit or not)."""
        _call_use(self.kind, self._check(expert), self._I, self._F)

    def admit(self, expert: int, pinned: Iterable[int] = ()) -> tuple[int | None, int | None]:
        """Reserve a slot for a missed ``expert``; returns (slot, evicted expert) or (None, None)."""
        e = self._check(expert)
        pins = self._ids(pinned)
        self._I[self._pin0 + pins] = 1
        try:
            s, ev = _call_admit(self.kind, e, self._I, self._F)
        finally:
            self._I[self._pin0 + pins] = 0
        return (int(s) if s >= 0 else None), (int(ev) if ev >= 0 else None)

    def settle(self, expert: int) -> None:
        """Make an admitted but unused expert evictable, keyed as of now, without counting a use.

        Look-ahead prefetches are admitted before anyone uses them; without this a wrong guess
        would keep its slot until used (an admitted expert is no victim before its first use).
        """
        _settle(self.kind, self._check(expert), self._I, self._F)

    def step(self, experts: Sequence[int] | np.ndarray, inflight: Iterable[int] = ()) -> np.ndarray:
        """Access one decode step's experts (all pinned, plus ``inflight``); returns [k, 3] (hit, slot, evicted).

        ``slot`` is -1 when a miss could not be cached (serve it from staging or the CPU) and
        ``evicted`` -1 when no expert was displaced.
        """
        ids = self._ids(experts)
        out = np.empty((ids.size, 3), dtype=np.int64)
        _step(self.kind, ids, self._ids(inflight), self._I, self._F, out)
        return out

    def access(self, expert: int, pinned: Iterable[int] = ()) -> tuple[bool, int | None, int | None]:
        """lookup + admit on a miss + on_use for one expert: (hit, slot, evicted)."""
        e = self._check(expert)
        out = np.empty((1, 3), dtype=np.int64)
        _step(self.kind, np.array([e], dtype=np.int64), self._ids(pinned), self._I, self._F, out)
        hit, s, ev = (int(x) for x in out[0])
        return bool(hit), (s if s >= 0 else None), (ev if ev >= 0 else None)

    def resident(self) -> dict[int, int]:
        """Expert → slot for every expert currently holding a slot."""
        slot_expert = self._I[_HEAD:_HEAD + self.num_slots]
        return {int(e): s for s, e in enumerate(slot_expert.tolist()) if e >= 0}

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(experts={self.num_experts}, static={self.num_static}, "
                f"dynamic={self.num_dynamic}, resident={len(self.resident())})")


class StaticOnly(ExpertCache):
    """Only the static set is resident; misses are never cached."""

    name = "static"
    kind = K_STATIC


class LRU(ExpertCache):
    """Evict the least recently used dynamic expert."""

    name = "lru"
    kind = K_LRU


class LFU(ExpertCache):
    """Evict the dynamic expert with the fewest uses so far (ties: least recently used)."""

    name = "lfu"
    kind = K_LFU


class ProfileSeededHybrid(ExpertCache):
    """LFU with dynamic aging, seeded by the profile's pick frequencies (see the module docstring)."""

    name = "hybrid"
    kind = K_HYBRID


POLICIES: dict[str, type[ExpertCache]] = {c.name: c for c in (StaticOnly, LRU, LFU, ProfileSeededHybrid)}
#: The policy names, in the order every table lists them; the one place the planner, the simulator, the
#: command line and the runtime take them from.
POLICY_NAMES: tuple[str, ...] = tuple(POLICIES)


def make_policy(name: str, num_experts: int, num_slots: int, static: Sequence[int] = (), **kwargs: Any) -> ExpertCache:
    """Build the cache for policy ``name`` ('static', 'lru', 'lfu' or 'hybrid')."""
    try:
        cls = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; choose one of {sorted(POLICIES)}") from None
    return cls(num_experts, num_slots, static, **kwargs)
