"""Temporal statistics of a routing trace: how soon experts are re-used, per MoE layer.

These numbers decide whether a cache of recently used experts pays off (high re-use at short
distances) or whether only a static hot set does. Distances are counted in tokens within one
prompt; the first use of an expert in a prompt is "cold".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .trace import RoutingTrace

# histogram bins of reuse distance in tokens: 1, 2, 3, 4, 5-8, 9-16, 17-32, 33-64, 65+, then cold
DISTANCE_EDGES = (1, 2, 3, 4, 5, 9, 17, 33, 65)
BIN_LABELS = ("1", "2", "3", "4", "5-8", "9-16", "17-32", "33-64", "65+", "cold")


@dataclass
class TemporalStats:
    """Per layer: reuse-distance histogram ``[layers, 10]`` (counts of picks), and re-use fractions."""

    histogram: np.ndarray
    reused_from_previous: np.ndarray  # [layers] fraction of picks also picked by the previous token
    reused_within_8: np.ndarray  # [layers] fraction of picks picked within the last 8 tokens
    labels: tuple[str, ...] = BIN_LABELS

    def table(self) -> str:
        head = f"{'moe':>4} {'prev':>6} {'<=8':>6}  " + " ".join(f"{lab:>6}" for lab in self.labels)
        rows = [head]
        share = self.histogram / np.maximum(self.histogram.sum(1, keepdims=True), 1)
        for m in range(self.histogram.shape[0]):
            rows.append(f"{m:>4} {self.reused_from_previous[m]:>6.3f} {self.reused_within_8[m]:>6.3f}  "
                        + " ".join(f"{v:>6.3f}" for v in share[m]))
        return "\n".join(rows)


def reuse_distances(trace: RoutingTrace, layer: int) -> np.ndarray:
    """``[tokens, k]`` int64: tokens since each pick's expert was last used in this layer (-1 = cold)."""
    ids = trace.ids[:, layer].numpy().astype(np.int64)  # [N, k]
    n, k = ids.shape
    tok = np.repeat(np.arange(n), k)
    exp = ids.reshape(-1)
    order = np.lexsort((tok, exp))  # picks grouped by expert, in token order
    e_sorted, t_sorted = exp[order], tok[order]
    prev_t = np.empty_like(t_sorted)
    prev_t[0] = -1
    prev_t[1:] = np.where(e_sorted[1:] == e_sorted[:-1], t_sorted[:-1], -1)
    start = np.repeat(trace.prompt_offsets[:-1].numpy(), np.diff(trace.prompt_offsets.numpy()))  # prompt start
    dist_sorted = np.where(prev_t >= start[t_sorted], t_sorted - prev_t, -1)
    out = np.empty(n * k, dtype=np.int64)
    out[order] = dist_sorted
    return out.reshape(n, k)


def temporal_stats(trace: RoutingTrace) -> TemporalStats:
    """Reuse-distance histogram and re-use fractions for every MoE layer of ``trace``."""
    layers = trace.num_moe_layers
    hist = np.zeros((layers, len(BIN_LABELS)), dtype=np.int64)
    prev = np.zeros(layers)
    within = np.zeros(layers)
    edges = np.array(DISTANCE_EDGES)
    for m in range(layers):
        d = reuse_distances(trace, m).reshape(-1)
        warm = d[d > 0]
        hist[m, :-1] = np.bincount(np.searchsorted(edges, warm, side="right") - 1, minlength=len(edges))
        hist[m, -1] = int((d < 0).sum())
        total = max(d.size, 1)
        prev[m] = float((d == 1).sum()) / total
        within[m] = float(((d > 0) & (d <= 8)).sum()) / total
    return TemporalStats(hist, prev, within)
