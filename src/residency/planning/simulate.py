"""Trace replay: run a routing trace through a plan's caches with the runtime's policies, then cost it.

:func:`simulate` replays each MoE layer's picks, token by token, through
:func:`residency.runtime.policy.replay_layer` — the same admission/eviction code the runtime calls —
starting from the plan's static sets and dynamic slot counts. It counts hits, misses, admissions,
evictions, bypassed misses, disk reads and prefetches, turns them into per-token traffic per layer
and prices it with the planner's cost model (:mod:`residency.planning.cost`).

Policies: ``static`` (the plan's dynamic slots are given to the next most probable experts as
extra static experts, so every policy uses the same bytes), ``lru``, ``lfu`` and ``hybrid``
(LFU with aging, seeded by the plan's per-expert prior).

Prefetch model: a trace does not carry look-ahead predictions, so ``prefetch_recall`` is the
share of a copy-path layer's misses that a look-ahead would have fetched one layer early (those
copies overlap compute) and ``prefetch_extra`` the wrong guesses per layer and token (copied, never
used). The first MoE layer has no earlier layer to predict from and is never prefetched.

:func:`synthetic_trace` generates routing with Zipf skew and temporal locality when no recorded
trace exists; its parameters are stored in the trace and repeated in every result.
:func:`reference_replay` is a deliberately plain re-implementation used to check the fast path.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..config import NemotronHConfig
from ..errors import ModelMismatchError, ResidencyError
from ..profiling.trace import RoutingTrace
from ..runtime.policy import (
    COUNTERS,
    LFU,
    LRU,
    POLICIES,
    POLICY_NAMES,
    ProfileSeededHybrid,
    StaticOnly,
    njit,
    replay_layer,
)
from ..sizes import format_bytes
from .cost import CostModel, CostReport, LayerTraffic
from .plan import Plan

__all__ = [
    "SimulationResult",
    "simulate",
    "compare_policies",
    "describe_trace",
    "format_comparison",
    "format_layers",
    "synthetic_trace",
    "reference_replay",
    "static_set_for",
]

_KINDS = {name: cls.kind for name, cls in POLICIES.items()}


@dataclass
class SimulationResult:
    """Counters per MoE layer ([layers] arrays named as :data:`COUNTERS`), their cost, and the inputs."""

    policy: str
    tokens: int
    counters: dict[str, np.ndarray]
    cost: CostReport
    trace_info: dict[str, Any]
    settings: dict[str, Any]

    @property
    def hit_rate(self) -> float:
        accesses = self.counters["hits"].sum() + self.counters["misses"].sum()
        return float(self.counters["hits"].sum() / accesses) if accesses else 1.0

    @property
    def layer_hit_rate(self) -> np.ndarray:
        acc = self.counters["hits"] + self.counters["misses"]
        return np.divide(self.counters["hits"], acc, out=np.ones(len(acc)), where=acc > 0)

    def per_token(self, name: str) -> float:
        """A counter summed over layers, per token."""
        return float(self.counters[name].sum() / max(self.tokens, 1))

    def to_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "tokens": self.tokens,
            "hit_rate": round(self.hit_rate, 6),
            "trace": self.trace_info,
            "settings": self.settings,
            "cost": self.cost.to_dict(),
            "layer_ms": [round(float(x), 4) for x in self.cost.layer_ms],
            "counters": {k: v.astype(int).tolist() for k, v in self.counters.items()},
        }


def static_set_for(plan: Plan, j: int, policy: str) -> np.ndarray:
    """Layer ``j``'s never-evicted experts under ``policy``: the plan's static set, and for ``static``
    also the next most probable experts in place of the dynamic slots (same bytes for every policy)."""
    lp = plan.layers[j]
    static = list(lp.static)
    if policy == StaticOnly.name and lp.dynamic_slots:
        prior = np.asarray(lp.prior) if lp.prior is not None else np.zeros(plan.num_experts)
        taken = set(static)
        order = [int(e) for e in np.lexsort((np.arange(plan.num_experts), -prior)) if int(e) not in taken]
        static += order[: lp.dynamic_slots]
    return np.asarray(static, dtype=np.int64)


def simulate(
    plan: Plan,
    trace: RoutingTrace,
    *,
    policy: str | None = None,
    prefetch_recall: float = 0.0,
    prefetch_extra: int = 0,
    decode_only: bool = False,
    seed: int = 0,
    check_fingerprint: bool = True,
    threads: int | None = None,
) -> SimulationResult:
    """Replay ``trace`` through ``plan``'s caches under ``policy`` (default: the plan's) and cost it."""
    policy = policy or plan.settings.policy
    if policy not in _KINDS:
        raise ResidencyError(f"unknown policy {policy!r}; choose one of {POLICY_NAMES}")
    if not 0.0 <= prefetch_recall <= 1.0 or prefetch_extra < 0:
        raise ResidencyError("prefetch recall must lie in [0, 1] and prefetch extra must be >= 0")
    L, E, k = len(plan.layers), plan.num_experts, plan.top_k
    if check_fingerprint and trace.fingerprint != plan.fingerprint:
        raise ModelMismatchError(
            f"the trace was recorded for model {trace.fingerprint!r}, the plan is for {plan.fingerprint!r}; "
            "replay a trace of the planned model"
        )
    if (trace.num_moe_layers, trace.num_experts, trace.top_k) != (L, E, k):
        raise ModelMismatchError(
            f"trace shape ({trace.num_moe_layers} layers, {trace.num_experts} experts, top-{trace.top_k}) does not "
            f"match the plan ({L}, {E}, top-{k})"
        )
    ids = trace.ids.numpy() if isinstance(trace.ids, torch.Tensor) else np.asarray(trace.ids)
    if decode_only:
        ids = ids[np.asarray(trace.is_decode, dtype=bool)]
    ids = np.ascontiguousarray(ids.astype(np.int64))
    T = ids.shape[0]
    priors = plan.priors()
    prior_tokens = plan.settings.prior_tokens
    kind = _KINDS[policy]

    def run(j: int) -> np.ndarray:
        lp = plan.layers[j]
        static = static_set_for(plan, j, policy)
        disk = np.zeros(E, dtype=np.bool_)
        disk[list(lp.disk)] = True
        recall = prefetch_recall if (lp.miss_path == "copy" and j > 0) else 0.0
        extra = prefetch_extra if (lp.miss_path == "copy" and j > 0) else 0
        layer_ids = np.ascontiguousarray(ids[:, j, :])
        return replay_layer(kind, layer_ids, static, lp.slots, E, priors[j], prior_tokens, disk, recall, extra,
                            (seed * 131 + j * 7 + 1) & 0xFFFF)

    workers = threads or min(os.cpu_count() or 1, 8)
    if workers > 1 and L > 1:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            rows = list(pool.map(run, range(L)))
    else:
        rows = [run(j) for j in range(L)]
    counts = np.stack(rows) if rows else np.zeros((0, len(COUNTERS)), dtype=np.int64)
    counters = {name: counts[:, i].astype(np.int64) for i, name in enumerate(COUNTERS)}
    cost = CostModel.from_specs(plan.gpu, plan.host, plan.expert_size, plan.settings.dense_bytes_per_token)
    report = cost.evaluate(_traffic(plan, counters, T))
    info = {"tokens": T, "prompts": trace.num_prompts, "fingerprint": trace.fingerprint, **trace.meta}
    settings = {"prefetch_recall": prefetch_recall, "prefetch_extra": prefetch_extra, "decode_only": decode_only,
                "seed": seed}
    return SimulationResult(policy=policy, tokens=T, counters=counters, cost=report, trace_info=info,
                            settings=settings)


def _traffic(plan: Plan, c: dict[str, np.ndarray], tokens: int) -> LayerTraffic:
    """Per-token traffic per layer from replay counters and each layer's miss path."""
    n = max(tokens, 1)
    t = LayerTraffic.zeros(len(plan.layers))
    t.hits[:] = c["hits"] / n
    for j, lp in enumerate(plan.layers):
        misses = c["misses"][j] / n
        if lp.miss_path in ("copy", "none"):
            t.prefetched[j] = c["prefetch_used"][j] / n
            t.copies[j] = misses - t.prefetched[j]
            t.wasted[j] = c["prefetch_wasted"][j] / n
            t.disk[j] = c["disk_reads"][j] / n
        elif lp.miss_path == "cpu":
            t.cpu[j] = misses
            t.background[j] = c["admitted"][j] / n
            t.disk[j] = c["disk_reads"][j] / n
        else:  # unified memory: misses are read from disk straight into slots
            t.disk[j] = misses
    if plan.gpu.h2d_gbps is None and (t.copies.sum() > 0 or t.prefetched.sum() > 0):
        raise ResidencyError("the plan sends copies over a host link the unified-memory target does not have")
    return t


def compare_policies(plan: Plan, trace: RoutingTrace, policies: Sequence[str] = POLICY_NAMES,
                     **kwargs: Any) -> list[SimulationResult]:
    """:func:`simulate` once per policy, same trace and settings."""
    return [simulate(plan, trace, policy=p, **kwargs) for p in policies]


def describe_trace(info: dict[str, Any]) -> str:
    """One line naming the trace and, for a synthetic one, its generator parameters."""
    if info.get("generator") == "synthetic":
        return (f"synthetic trace: {info['tokens']} tokens, Zipf skew {info['skew']}, locality {info['locality']} "
                f"(window {info['window']} tokens), seed {info['seed']}")
    return f"recorded trace: {info['tokens']} tokens, {info.get('prompts', '?')} prompt(s)"


def format_comparison(results: Sequence[SimulationResult]) -> str:
    """A table with one row per policy: hits, misses, evictions, prefetches, bytes per link, speed."""
    if not results:
        return "(no results)"
    head = (f"{'policy':<8} {'hit %':>6} {'miss/tok':>8} {'evict/tok':>9} {'pf used':>8} {'pf waste':>8} "
            f"{'H2D/tok':>11} {'CPU/tok':>11} {'disk/tok':>11} {'ms/tok':>8} {'tok/s':>7}  bound")
    lines = [describe_trace(results[0].trace_info), head]
    for r in results:
        b = r.cost.bytes_per_token
        lines.append(
            f"{r.policy:<8} {100 * r.hit_rate:>6.2f} {r.per_token('misses'):>8.2f} {r.per_token('evicted'):>9.2f} "
            f"{r.per_token('prefetch_used'):>8.2f} {r.per_token('prefetch_wasted'):>8.2f} "
            f"{format_bytes(b['host_to_device']):>11} {format_bytes(b['cpu_dram']):>11} {format_bytes(b['disk']):>11} "
            f"{r.cost.token_ms:>8.2f} {r.cost.tokens_per_s:>7.2f}  {r.cost.bound}"
        )
    return "\n".join(lines)


def format_layers(result: SimulationResult, plan: Plan) -> str:
    """Per-layer hit rate, misses and time for one result."""
    lines = [f"{'moe':>3} {'layer':>5} {'path':>5} {'hit %':>6} {'miss/tok':>8} {'evict/tok':>9} {'ms':>7}"]
    n = max(result.tokens, 1)
    for j, lp in enumerate(plan.layers):
        lines.append(
            f"{j:>3} {lp.layer:>5} {lp.miss_path:>5} {100 * result.layer_hit_rate[j]:>6.2f} "
            f"{result.counters['misses'][j] / n:>8.2f} {result.counters['evicted'][j] / n:>9.2f} "
            f"{result.cost.layer_ms[j]:>7.3f}"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------- synthetic traces


@njit
def _synth_layer(n_tokens: int, num_experts: int, top_k: int, cdf: np.ndarray, rank_to_expert: np.ndarray,
                 locality: float, window: int, seed: int, out: np.ndarray) -> None:
    """Fill ``out`` [tokens, top_k] with distinct picks per token: with probability ``locality`` a pick
    reuses one of the previous ``window`` tokens' picks (uniformly over those picks), otherwise it is a
    Zipf draw (inverse CDF over ranks). Duplicates are redrawn; xorshift32 keeps it reproducible with
    or without numba."""
    x = (seed * 2654435761 + 12345) & 0xFFFFFFFF
    if x == 0:
        x = 1
    chosen = np.zeros(num_experts, np.bool_)
    for t in range(n_tokens):
        for j in range(top_k):
            e = -1
            x ^= (x << 13) & 0xFFFFFFFF
            x ^= x >> 17
            x ^= (x << 5) & 0xFFFFFFFF
            if t > 0 and x / 4294967296.0 < locality:
                n_recent = min(window, t) * top_k
                for _ in range(8):
                    x ^= (x << 13) & 0xFFFFFFFF
                    x ^= x >> 17
                    x ^= (x << 5) & 0xFFFFFFFF
                    idx = int(x / 4294967296.0 * n_recent)
                    cand = out[t - 1 - idx // top_k, idx % top_k]
                    if not chosen[cand]:
                        e = cand
                        break
            if e < 0:
                for _ in range(64):
                    x ^= (x << 13) & 0xFFFFFFFF
                    x ^= x >> 17
                    x ^= (x << 5) & 0xFFFFFFFF
                    r = min(np.searchsorted(cdf, x / 4294967296.0, side="right"), num_experts - 1)
                    cand = rank_to_expert[r]
                    if not chosen[cand]:
                        e = cand
                        break
            if e < 0:  # extreme skew: take the most probable expert not yet picked
                for r in range(num_experts):
                    if not chosen[rank_to_expert[r]]:
                        e = rank_to_expert[r]
                        break
            chosen[e] = True
            out[t, j] = e
        for j in range(top_k):
            chosen[out[t, j]] = False


def synthetic_trace(
    shape: NemotronHConfig | Plan | tuple[int, int, int],
    tokens: int,
    *,
    skew: float = 1.0,
    locality: float = 0.2,
    window: int = 4,
    seed: int = 0,
    prompts: int = 1,
    fingerprint: str | None = None,
) -> RoutingTrace:
    """A routing trace with controlled skew and temporal locality, for a model, a plan or a shape.

    Per layer, expert popularity follows Zipf with exponent ``skew`` (0 = uniform) over a random
    ranking of the experts (each layer has different hot experts). Each pick reuses an expert of
    the last ``window`` tokens with probability ``locality``, else draws from the Zipf distribution;
    picks within a token are distinct. The parameters go into ``trace.meta`` (``generator``,
    ``skew``, ``locality``, ``window``, ``seed``) and into every simulation result.
    """
    if isinstance(shape, NemotronHConfig):
        L, E, k = shape.num_moe_layers, shape.n_routed_experts, shape.num_experts_per_tok
        fp, scale = fingerprint or shape.fingerprint(), shape.routed_scaling_factor
    elif isinstance(shape, Plan):
        L, E, k = len(shape.layers), shape.num_experts, shape.top_k
        fp, scale = fingerprint or shape.fingerprint, 1.0
    else:
        L, E, k = (int(v) for v in shape)
        fp, scale = fingerprint or f"synthetic-{L}x{E}-top{k}", 1.0
    if tokens < 1 or not 1 <= k <= E or L < 1:
        raise ResidencyError(f"synthetic trace needs tokens >= 1 and 1 <= top_k <= experts (got {tokens}, {k}, {E})")
    if skew < 0 or not 0.0 <= locality <= 1.0 or window < 1 or prompts < 1:
        raise ResidencyError("synthetic trace needs skew >= 0, locality in [0, 1], window >= 1 and prompts >= 1")
    rng = np.random.default_rng(seed)
    weights = (1.0 / np.arange(1, E + 1) ** skew)
    cdf = np.cumsum(weights / weights.sum())
    ids = np.empty((tokens, L, k), dtype=np.int64)
    layer_seeds = rng.integers(1, 2**31, size=L)
    for j in range(L):
        rank_to_expert = rng.permutation(E).astype(np.int64)
        out = np.empty((tokens, k), dtype=np.int64)
        _synth_layer(tokens, E, k, cdf, rank_to_expert, float(locality), int(window), int(layer_seeds[j]), out)
        ids[:, j, :] = out
    w = rng.random((tokens, L, k), dtype=np.float32) + 0.05
    w = w / w.sum(axis=2, keepdims=True) * scale
    bounds = np.linspace(0, tokens, prompts + 1).round().astype(np.int64)
    meta = {"generator": "synthetic", "skew": float(skew), "locality": float(locality), "window": int(window),
            "seed": int(seed)}
    return RoutingTrace(
        ids=torch.from_numpy(ids), weights=torch.from_numpy(w), prompt_offsets=torch.from_numpy(bounds),
        is_decode=torch.ones(tokens, dtype=torch.bool), num_experts=E, fingerprint=fp, meta=meta,
    )


# ---------------------------------------------------------------------- reference replay


def reference_replay(
    ids: np.ndarray,
    static: Sequence[int],
    num_slots: int,
    policy: str,
    prior: Sequence[float] | None = None,
    prior_tokens: float = 64.0,
) -> dict[str, int]:
    """Plain-Python replay of one layer's picks ``ids`` [tokens, top_k], written for clarity, not speed.

    Same rules as the runtime's policies (see :mod:`residency.runtime.policy`): static experts are
    always resident; a miss fills a free dynamic slot, else evicts the unpinned dynamic expert with
    the smallest (key, last use) — key = last use (lru), uses so far (lfu) or aged frequency
    (hybrid) — else is bypassed. Returns hits, misses, admitted, bypassed and evicted counts.
    """
    static_set = {int(e) for e in static}
    dynamic_capacity = num_slots - len(static_set)
    cached: set[int] = set()  # dynamic residents
    last: dict[int, int] = {}
    uses: dict[int, float] = defaultdict(float)
    if policy == ProfileSeededHybrid.name and prior is not None:
        for e, p in enumerate(prior):
            uses[e] = float(p) * prior_tokens
    key: dict[int, float] = {}
    inflation = 0.0
    tick = 0
    out = dict.fromkeys(("hits", "misses", "admitted", "bypassed", "evicted"), 0)
    for row in np.asarray(ids).tolist():
        pinned = set(row)
        for e in row:
            if e in static_set or e in cached:
                out["hits"] += 1
            else:
                out["misses"] += 1
                if policy == StaticOnly.name or dynamic_capacity <= 0:
                    out["bypassed"] += 1
                elif len(cached) < dynamic_capacity:
                    cached.add(e)
                    out["admitted"] += 1
                else:
                    candidates = [c for c in cached if c not in pinned]
                    if not candidates:
                        out["bypassed"] += 1
                    else:
                        if policy == LRU.name:
                            victim = min(candidates, key=lambda c: last[c])
                        elif policy == LFU.name:
                            victim = min(candidates, key=lambda c: (uses[c], last[c]))
                        else:
                            victim = min(candidates, key=lambda c: (key[c], last[c]))
                            inflation = key[victim]
                        cached.remove(victim)
                        cached.add(e)
                        out["evicted"] += 1
                        out["admitted"] += 1
            tick += 1
            last[e] = tick
            uses[e] += 1
            if e in cached:
                key[e] = inflation + uses[e]
    return out
