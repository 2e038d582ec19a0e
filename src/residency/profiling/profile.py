"""Prompt-conditioned expert profiling: which experts a prompt routes to, how much weight they get, how salient.

A :class:`Profile` holds, per prompt, per phase (prefill or decode), per MoE layer and expert:

- ``counts``: how often the expert was selected;
- ``gate_mass``: the sum of its routing weights (after renormalisation and the routed scaling factor);
- ``saliency_sum``: the sum of ``weight × ‖E_e(x)‖₂`` over the tokens routed to it. REAP saliency
  is ``saliency_sum / counts``: the mean, over the tokens that chose the expert, of gate weight
  times the L2 norm of the expert's own output. For LatentMoE (Nemotron 3 Super) the experts work
  in the latent space, so the norm is taken there, before ``fc2_latent_proj`` maps the sum back to
  the hidden size; it ranks experts of one layer consistently but is not comparable with norms
  measured in the hidden space.

Sums (not means) of raw observations are stored, with one weight per prompt (1 unless a weighted
merge changed it), so merging profiles is exact and associative and the stored arrays always
satisfy "each layer's counts sum to tokens × top_k" (which loading checks). The profiler is an
observer on the model's MoE layers (:class:`residency.model.moe.MoEObserver`): it reads the router's
decision and the norms of the expert outputs the normal forward already computes, so it neither
changes the output nor runs an expert that was not routed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import FileFormatError, ModelMismatchError, ResidencyError
from ..files import load_tensors, save_tensors
from ..model.moe import MoEObserver, RoutingEvent
from .trace import RoutingTrace

PROFILE_FORMAT_VERSION = 1
PHASES = ("prefill", "decode")
COVERAGE_LEVELS = (0.5, 0.8, 0.9, 0.95)
_ARRAYS = ("counts", "gate_mass", "saliency_sum")


@dataclass
class Profile:
    """Expert statistics of a set of prompts for one model.

    Per-prompt arrays have shape ``[prompts, 2 (prefill, decode), moe_layers, experts]`` (float32);
    ``prompt_tokens`` is ``[prompts, 2]``. The properties ``counts``, ``gate_mass``, ``saliency``
    and ``tokens`` aggregate over prompts and phases (float64), which is what the planner reads.

    ``prompt_weights`` ``[prompts]`` float64 (default all 1) scales each prompt's contribution to
    the aggregates; the per-prompt arrays themselves always hold the raw observations.
    """

    per_prompt_counts: torch.Tensor
    per_prompt_gate_mass: torch.Tensor
    per_prompt_saliency_sum: torch.Tensor
    prompt_tokens: torch.Tensor
    fingerprint: str
    top_k: int
    moe_layers: list[int]
    prompt_names: list[str] = field(default_factory=list)
    prompt_hashes: list[str] = field(default_factory=list)
    model_name: str = ""
    co_activation: list[list[tuple[int, int, int]]] = field(default_factory=list)
    prompt_weights: torch.Tensor | None = None

    def __post_init__(self) -> None:
        shape = self.per_prompt_counts.shape
        if len(shape) != 4 or shape[1] != 2:
            raise FileFormatError(f"profile arrays must be [prompts, 2, moe_layers, experts], got {tuple(shape)}")
        for name in ("per_prompt_gate_mass", "per_prompt_saliency_sum"):
            if getattr(self, name).shape != shape:
                raise FileFormatError(f"profile array {name} has shape {tuple(getattr(self, name).shape)}, "
                                      f"expected {tuple(shape)}")
        if self.prompt_tokens.shape != (shape[0], 2):
            raise FileFormatError(f"profile prompt_tokens must be [{shape[0]}, 2]")
        if len(self.moe_layers) != shape[2]:
            raise FileFormatError("profile moe_layers does not match the layer dimension")
        if not self.prompt_names:
            self.prompt_names = [f"prompt-{i}" for i in range(shape[0])]
        if len(self.prompt_names) != shape[0] or (self.prompt_hashes and len(self.prompt_hashes) != shape[0]):
            raise FileFormatError("profile prompt names/hashes do not match the prompt count")
        if self.prompt_weights is None:
            self.prompt_weights = torch.ones(shape[0], dtype=torch.float64)
        self.prompt_weights = self.prompt_weights.double()
        if self.prompt_weights.shape != (shape[0],):
            raise FileFormatError(f"profile prompt_weights must have one entry per prompt ({shape[0]})")
        if not bool(torch.isfinite(self.prompt_weights).all()) or bool((self.prompt_weights < 0).any()):
            raise FileFormatError("profile prompt_weights must be finite and non-negative")

    def check_values(self) -> None:
        """Check the arrays hold possible observations; :meth:`load` calls it.

        Every value finite and non-negative, counts whole numbers, and for every prompt, phase and
        MoE layer the counts sum to that phase's tokens × top_k (each token picks top_k experts).
        """
        for name in ("per_prompt_counts", "per_prompt_gate_mass", "per_prompt_saliency_sum"):
            t = getattr(self, name)
            if not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
                raise FileFormatError(f"profile array {name} holds negative or non-finite values")
        c = self.per_prompt_counts.double()
        if not torch.equal(c, c.round()):
            raise FileFormatError("profile counts must be whole numbers")
        if bool((self.prompt_tokens < 0).any()):
            raise FileFormatError("profile token counts must be non-negative")
        expected = (self.prompt_tokens.double() * self.top_k)[:, :, None].expand(c.shape[:3])
        if not torch.equal(c.sum(-1), expected):
            raise FileFormatError("a layer's counts do not sum to its tokens × top_k")

    # ------------------------------------------------------------------ aggregates
    @property
    def num_prompts(self) -> int:
        return int(self.per_prompt_counts.shape[0])

    @property
    def num_moe_layers(self) -> int:
        return int(self.per_prompt_counts.shape[2])

    @property
    def num_experts(self) -> int:
        return int(self.per_prompt_counts.shape[3])

    def _weighted_sum(self, rows: torch.Tensor) -> torch.Tensor:
        """Sum of per-prompt ``[P, 2, ...]`` arrays over prompts and phases, each prompt scaled by its weight."""
        x = rows.double()
        w = self.prompt_weights
        if not bool((w == 1).all()):
            x = x * w.view(-1, *([1] * (x.dim() - 1)))
        return x.sum(dim=(0, 1))

    @property
    def counts(self) -> torch.Tensor:
        """``[moe_layers, experts]`` float64: times each expert was selected (prompt weights applied)."""
        return self._weighted_sum(self.per_prompt_counts)

    @property
    def gate_mass(self) -> torch.Tensor:
        """``[moe_layers, experts]`` float64: summed routing weight."""
        return self._weighted_sum(self.per_prompt_gate_mass)

    @property
    def saliency(self) -> torch.Tensor:
        """``[moe_layers, experts]`` float64: REAP saliency (0 for experts never selected)."""
        counts = self.counts
        total = self._weighted_sum(self.per_prompt_saliency_sum)
        return torch.where(counts > 0, total / counts.clamp(min=1e-300), torch.zeros_like(total))

    def phase_tokens(self, name: str) -> float:
        """Weighted tokens of one phase (``"prefill"`` or ``"decode"``)."""
        if name not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {name!r}")
        return float((self.prompt_tokens[:, PHASES.index(name)].double() * self.prompt_weights).sum())

    @property
    def token_weight(self) -> float:
        """``Σ weight × tokens`` over prompts: the exact (possibly fractional) token count behind the aggregates."""
        return float((self.prompt_tokens.double().sum(1) * self.prompt_weights).sum())

    @property
    def tokens(self) -> int:
        """Tokens seen (each token passes every MoE layer once); weighted and rounded after a weighted merge."""
        return int(round(self.token_weight))

    def phase(self, name: str) -> Profile:
        """The same profile restricted to ``"prefill"`` or ``"decode"`` tokens."""
        if name not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {name!r}")
        i = PHASES.index(name)
        keep = torch.zeros(2, dtype=torch.bool)
        keep[i] = True

        def mask(t: torch.Tensor) -> torch.Tensor:
            return t * keep.view(1, 2, *([1] * (t.dim() - 2))).to(t.dtype)

        return self._replace(*(mask(getattr(self, f"per_prompt_{a}")) for a in _ARRAYS),
                             prompt_tokens=mask(self.prompt_tokens))

    # ------------------------------------------------------------------ selection and merging
    def select(self, prompts: Sequence[int | str]) -> Profile:
        """A profile of a subset of prompts, given by index or name, in that order.

        Prompt weights are kept; the co-activation pairs (a run-wide summary) are not.
        """
        index = []
        for p in prompts:
            if isinstance(p, str):
                if p not in self.prompt_names:
                    raise KeyError(f"no prompt named {p!r}; names are {self.prompt_names[:10]}...")
                index.append(self.prompt_names.index(p))
            elif not -self.num_prompts <= int(p) < self.num_prompts:
                raise IndexError(f"prompt index {p} out of range for a profile of {self.num_prompts} prompts")
            else:
                index.append(int(p) % self.num_prompts)
        if not index:
            raise ValueError("select needs at least one prompt")
        idx = torch.tensor(index, dtype=torch.long)
        return Profile(
            self.per_prompt_counts[idx], self.per_prompt_gate_mass[idx], self.per_prompt_saliency_sum[idx],
            self.prompt_tokens[idx], self.fingerprint, self.top_k, list(self.moe_layers),
            [self.prompt_names[i] for i in index],
            [self.prompt_hashes[i] for i in index] if self.prompt_hashes else [], self.model_name, [],
            self.prompt_weights[idx],
        )

    @staticmethod
    def merge(profiles: Sequence[Profile], weights: Sequence[float] | None = None) -> Profile:
        """Join profiles of one model; ``weights`` scale each profile's contribution (default 1 each).

        The result keeps every prompt with its raw arrays and multiplies each prompt's weight by its
        profile's weight, so the aggregates are ``Σ weights[i] × profile_i`` and the default is the
        plain union of the observations. Merging is exact and associative: ``[merge([a, b]), c]``
        equals ``[a, merge([b, c])]``. A weight of 2 counts a profile's prompts twice; weights of
        ``1 / len(set)`` give prompt sets of different sizes equal say before planning. Co-activation
        pairs are a run-wide summary and are not carried into the result.
        """
        if not profiles:
            raise ValueError("merge needs at least one profile")
        weights = [1.0] * len(profiles) if weights is None else [float(w) for w in weights]
        if len(weights) != len(profiles) or any(not w >= 0 or w == float("inf") for w in weights):
            raise ValueError(f"merge needs one finite non-negative weight per profile, got {weights}")
        first = profiles[0]
        for p in profiles[1:]:
            first._check_same_model(p, "merge")

        def cat(name: str) -> torch.Tensor:
            return torch.cat([getattr(p, name) for p in profiles])

        names = [n for p in profiles for n in p.prompt_names]
        hashes = [h for p in profiles for h in p.prompt_hashes] if all(p.prompt_hashes for p in profiles) else []
        prompt_weights = torch.cat([p.prompt_weights * w for p, w in zip(profiles, weights)])
        return Profile(cat("per_prompt_counts"), cat("per_prompt_gate_mass"), cat("per_prompt_saliency_sum"),
                       cat("prompt_tokens"), first.fingerprint, first.top_k, list(first.moe_layers), names, hashes,
                       first.model_name, [], prompt_weights)

    def _check_same_model(self, other: Profile, what: str) -> None:
        if other.fingerprint != self.fingerprint:
            raise ModelMismatchError(
                f"cannot {what} profiles of different models ({self.fingerprint} vs {other.fingerprint}); "
                "profile both prompt sets with the same model"
            )
        if (other.top_k, other.moe_layers, other.num_experts) != (self.top_k, self.moe_layers, self.num_experts):
            raise ModelMismatchError(
                f"cannot {what} profiles with different routing shapes (top-k, MoE layers, experts): "
                f"({self.top_k}, {len(self.moe_layers)}, {self.num_experts}) vs "
                f"({other.top_k}, {len(other.moe_layers)}, {other.num_experts}); profile both with the same model"
            )

    def _replace(self, counts, mass, sal, prompt_tokens=None) -> Profile:
        return Profile(counts, mass, sal, self.prompt_tokens if prompt_tokens is None else prompt_tokens,
                       self.fingerprint, self.top_k, list(self.moe_layers), list(self.prompt_names),
                       list(self.prompt_hashes), self.model_name, list(self.co_activation), self.prompt_weights)

    # ------------------------------------------------------------------ analysis
    def hottest(self, n: int = 5, by: str = "gate_mass") -> list[list[tuple[int, float]]]:
        """Per layer, the ``n`` experts with the largest share of ``by`` (counts, gate_mass or saliency)."""
        values = self._metric(by)
        share = values / values.sum(-1, keepdim=True).clamp(min=1e-30)
        order = torch.argsort(-share, dim=-1, stable=True)[:, :n]  # ties: lower expert id first
        top = share.gather(1, order)
        return [[(e, s) for e, s in zip(i.tolist(), v.tolist()) if s > 0] for i, v in zip(order, top)]

    def coverage(self, levels: Sequence[float] = COVERAGE_LEVELS, by: str = "gate_mass") -> torch.Tensor:
        """``[moe_layers, len(levels)]``: fewest experts whose ``by`` mass reaches each level, per layer."""
        return coverage(self._metric(by), levels)

    def effective_experts(self, by: str = "gate_mass") -> torch.Tensor:
        """``[moe_layers]``: exp(entropy) of each layer's mass distribution (E if uniform, 1 for one expert)."""
        p = self._metric(by)
        p = p / p.sum(-1, keepdim=True).clamp(min=1e-30)
        entropy = -(p * p.clamp(min=1e-300).log()).sum(-1)
        return entropy.exp()

    def compare(self, other: Profile, top_n: int | None = None, by: str = "gate_mass") -> dict[str, Any]:
        """Per-layer Jaccard of the two top-``top_n`` sets and both coverage tables.

        ``top_n`` defaults to the model's top-k. Returns ``{"jaccard": [layers], "mean_jaccard",
        "coverage_self", "coverage_other", "levels", "top_n", "self_mass_in_other_top",
        "other_mass_in_self_top"}``; the last two are, per layer, the share of one profile's gate mass
        that falls on the other's top-``top_n`` experts: how well a cache seeded from one workload
        serves the other.
        """
        self._check_same_model(other, "compare")
        n = top_n or self.top_k
        a, b = self._metric(by), other._metric(by)
        jac = top_n_jaccard(a, b, n)
        return {
            "top_n": n, "jaccard": jac.tolist(), "mean_jaccard": float(jac.mean()),
            "levels": list(COVERAGE_LEVELS), "coverage_self": self.coverage(by=by).tolist(),
            "coverage_other": other.coverage(by=by).tolist(),
            "self_mass_in_other_top": _share_in(self.gate_mass, top_n_mask(b, n)).tolist(),
            "other_mass_in_self_top": _share_in(other.gate_mass, top_n_mask(a, n)).tolist(),
        }

    def prompt_jaccard(self, top_n: int | None = None, by: str = "gate_mass") -> torch.Tensor:
        """``[prompts, prompts]``: mean over layers of the Jaccard of per-prompt top-``top_n`` sets."""
        n = top_n or self.top_k
        if by not in ("counts", "gate_mass"):
            raise ValueError(f"prompt_jaccard ranks by counts or gate_mass, not {by!r}")
        per = getattr(self, f"per_prompt_{by}").double().sum(1)  # [P, L, E]
        P = self.num_prompts
        total = torch.zeros(P, P, dtype=torch.float64)
        for layer in range(self.num_moe_layers):  # one [P, P] product per layer bounds memory at P² floats
            member = top_n_mask(per[:, layer], n).double()  # [P, E]
            inter = member @ member.T
            size = member.sum(-1)
            union = size[:, None] + size[None, :] - inter
            total += torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
        return total / self.num_moe_layers

    def _metric(self, by: str) -> torch.Tensor:
        if by == "counts":
            return self.counts
        if by == "gate_mass":
            return self.gate_mass
        if by == "saliency":
            return self.saliency
        raise ValueError(f"unknown metric {by!r}; use counts, gate_mass or saliency")

    def to_dataframe(self):
        """One row per (MoE layer, expert) with counts, frequency, gate mass, saliency (needs pandas)."""
        try:
            import pandas as pd
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError("to_dataframe needs pandas: pip install pandas") from exc
        counts, mass, sal = self.counts, self.gate_mass, self.saliency
        layers, experts = counts.shape
        rows = {
            "moe_layer": torch.arange(layers).repeat_interleave(experts).tolist(),
            "model_layer": [self.moe_layers[i] for i in range(layers) for _ in range(experts)],
            "expert": torch.arange(experts).repeat(layers).tolist(),
            "counts": counts.flatten().tolist(),
            "frequency": (counts / max(self.token_weight, 1e-300)).flatten().tolist(),
            "gate_mass": mass.flatten().tolist(),
            "saliency": sal.flatten().tolist(),
        }
        return pd.DataFrame(rows)

    def summary(self, top: int = 5) -> str:
        """A readable per-layer table: coverage, effective experts, hottest experts."""
        cov = self.coverage()
        eff = self.effective_experts()
        hot = self.hottest(top)
        used = (self.counts > 0).sum(-1)
        lines = [
            f"profile of {self.model_name or self.fingerprint}: {self.num_prompts} prompts, {self.tokens} tokens "
            f"({round(self.phase_tokens('prefill'))} prefill, {round(self.phase_tokens('decode'))} decode), "
            f"{self.num_moe_layers} MoE layers x {self.num_experts} experts, top-{self.top_k}",
            "experts needed to cover 50/80/90/95 % of gate mass; effective experts = exp(entropy) "
            f"({self.num_experts} = uniform)",
            f"{'moe':>4} {'layer':>5} {'used':>5} {'50%':>5} {'80%':>5} {'90%':>5} {'95%':>5} {'eff.':>7}  "
            f"hottest experts (share of mass)",
        ]
        for m in range(self.num_moe_layers):
            hot_text = " ".join(f"{e}:{s * 100:.1f}%" for e, s in hot[m])
            c = cov[m].tolist()
            lines.append(f"{m:>4} {self.moe_layers[m]:>5} {int(used[m]):>5} {c[0]:>5} {c[1]:>5} {c[2]:>5} "
                         f"{c[3]:>5} {float(eff[m]):>7.1f}  {hot_text}")
        mean_cov = cov.double().mean(0).tolist()
        lines.append("mean experts for 50/80/90/95 %: " + " / ".join(f"{v:.1f}" for v in mean_cov)
                     + f"; mean effective experts {float(eff.mean()):.1f} of {self.num_experts}")
        return "\n".join(lines)

    # ------------------------------------------------------------------ files
    def save(self, path: str | Path) -> Path:
        """Write as safetensors with JSON metadata (atomic; never pickle)."""
        meta = {
            "kind": "profile", "format_version": PROFILE_FORMAT_VERSION, "fingerprint": self.fingerprint,
            "model_name": self.model_name, "top_k": self.top_k, "moe_layers": self.moe_layers,
            "prompt_names": self.prompt_names, "prompt_hashes": self.prompt_hashes,
            "co_activation": self.co_activation,
        }
        tensors = {
            "per_prompt_counts": self.per_prompt_counts.float(),
            "per_prompt_gate_mass": self.per_prompt_gate_mass.float(),
            "per_prompt_saliency_sum": self.per_prompt_saliency_sum.float(),
            "prompt_tokens": self.prompt_tokens.long(),
            "prompt_weights": self.prompt_weights.double(),
        }
        meta["data_sha256"] = tensor_digest(tensors)
        return save_tensors(path, tensors, meta)

    @classmethod
    def load(cls, path: str | Path, fingerprint: str | None = None) -> Profile:
        """Read and validate; with ``fingerprint``, refuse a profile of another model.

        Raises :class:`~residency.errors.FileFormatError` for a truncated or corrupt file, data that
        does not match the digest written with it, arrays that disagree with the metadata or hold
        impossible values, and :class:`~residency.errors.ModelMismatchError` for another model.
        """
        tensors, meta = load_tensors(path, "profile", PROFILE_FORMAT_VERSION, fingerprint)
        needed = {f"per_prompt_{a}" for a in _ARRAYS} | {"prompt_tokens"}
        if needed - set(tensors):
            raise FileFormatError(f"{path}: profile lacks tensors {sorted(needed - set(tensors))}; regenerate it")
        if "data_sha256" in meta and meta["data_sha256"] != tensor_digest(tensors):
            raise FileFormatError(
                f"{path}: the profile's arrays do not match the digest written with them; the file was modified "
                "or corrupted after it was saved, regenerate it"
            )
        try:
            profile = cls(
                tensors["per_prompt_counts"], tensors["per_prompt_gate_mass"], tensors["per_prompt_saliency_sum"],
                tensors["prompt_tokens"], str(meta["fingerprint"]), int(meta["top_k"]),
                [int(x) for x in meta["moe_layers"]], list(meta.get("prompt_names", [])),
                list(meta.get("prompt_hashes", [])), str(meta.get("model_name", "")),
                [[tuple(p) for p in layer] for layer in meta.get("co_activation", [])],
                tensors.get("prompt_weights"),
            )
            profile.check_values()
        except FileFormatError as exc:
            raise FileFormatError(f"{path}: {exc}; regenerate it") from exc
        except (KeyError, TypeError, ValueError) as exc:
            raise FileFormatError(
                f"{path}: profile metadata is incomplete or malformed ({exc}); regenerate it"
            ) from exc
        return profile


def coverage(values: torch.Tensor, levels: Sequence[float] = COVERAGE_LEVELS) -> torch.Tensor:
    """``[layers, len(levels)]`` int64: fewest experts whose share of ``values [layers, E]`` reaches each level.

    A layer with no mass at all (for example the decode phase of a prefill-only profile) needs 0.
    """
    v = values.double()
    total = v.sum(-1, keepdim=True)
    share = v.sort(dim=-1, descending=True).values.cumsum(-1) / total.clamp(min=1e-300)
    target = torch.tensor(list(levels), dtype=torch.float64)
    # first index where the cumulative share reaches the level (tolerant of rounding), plus one
    reached = share[:, None, :] >= (target[None, :, None] - 1e-12)
    return (reached.to(torch.int64).argmax(-1) + 1) * (total > 0).to(torch.int64)


def top_n_mask(values: torch.Tensor, n: int) -> torch.Tensor:
    """Boolean mask of each row's ``n`` largest entries (ties: lower expert id), leaving out zeros.

    Experts that were never picked are not part of a "top" set: a prompt that used 10 experts of a
    layer has a top-20 set of 10, so short prompts do not look alike through arbitrary unused ids.
    """
    n = min(n, values.shape[-1])
    order = torch.argsort(-values.double(), dim=-1, stable=True)[..., :n]
    mask = torch.zeros(values.shape, dtype=torch.bool)
    mask.scatter_(-1, order, True)
    return mask & (values > 0)


def top_n_jaccard(a: torch.Tensor, b: torch.Tensor, n: int) -> torch.Tensor:
    """``[layers]``: Jaccard similarity of the top-``n`` experts of ``a`` and ``b`` per layer.

    Sets are :func:`top_n_mask` (ties by lower id, unused experts left out); two empty sets count as
    identical (1.0).
    """
    ta, tb = top_n_mask(a, n), top_n_mask(b, n)
    inter = (ta & tb).sum(-1).double()
    union = (ta | tb).sum(-1).double()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def _share_in(mass: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[layers]``: share of each layer's ``mass`` that falls on the experts in ``mask`` (0 for empty layers)."""
    total = mass.sum(-1)
    return torch.where(total > 0, (mass * mask).sum(-1) / total.clamp(min=1e-300), torch.zeros_like(total))


def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the tensors' names, dtypes, shapes and bytes (sorted by name); detects edited data."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------- the observer


class ProfileObserver(MoEObserver):
    """Accumulates per-layer expert statistics (and optionally the routing trace) for one prompt at a time."""

    wants_pair_norms = True

    def __init__(self, num_moe_layers: int, num_experts: int, device: torch.device, record_trace: bool = False,
                 co_activation: bool = False) -> None:
        self.shape = (2, num_moe_layers, num_experts)
        self.device = device
        self.record_trace = record_trace
        self.co_activation = co_activation
        self.pairs = (torch.zeros(num_moe_layers, num_experts * num_experts, dtype=torch.int64, device=device)
                      if co_activation else None)
        self.reset()

    @property
    def counts(self) -> torch.Tensor:
        """``[2, layers, experts]`` selections of the current prompt."""
        return self.acc[:, :, 0]

    def reset(self) -> None:
        """Start a new prompt."""
        phases, layers, experts = self.shape
        # [phase, layer, (count, gate mass, saliency sum), expert]: one index_add per routing event.
        # float32 (the stored precision) keeps the per-event cost low; counts stay exact below 2^24.
        self.acc = torch.zeros(phases, layers, 3, experts, dtype=torch.float32, device=self.device)
        self.tokens = [0, 0]
        self.steps: list[tuple[bool, list[tuple[torch.Tensor, torch.Tensor] | None]]] = []

    def on_routing(self, event: RoutingEvent) -> None:
        phase = int(event.is_decode)
        ids = event.ids.reshape(-1)
        w = event.weights.reshape(-1).float()
        m = event.moe_index
        if event.pair_norms is None:
            raise ResidencyError(
                f"MoE layer {event.layer_idx} gave the profiler no expert output norms; the MoE layer must pass a "
                "pair_norms buffer to its experts when an observer sets wants_pair_norms"
            )
        norms = event.pair_norms.reshape(-1)
        self.acc[phase, m].index_add_(1, ids, torch.stack([torch.ones_like(w), w, w * norms]))
        if m == 0:
            self.tokens[phase] += int(event.ids.shape[0])
            if self.record_trace:
                self.steps.append((event.is_decode, [None] * self.shape[1]))
        if self.record_trace:
            self.steps[-1][1][m] = (event.ids.detach().cpu(), event.weights.detach().float().cpu())
        if self.pairs is not None:
            E = self.shape[2]
            k = event.ids.shape[1]
            i, j = torch.triu_indices(k, k, offset=1, device=event.ids.device)
            a, b = event.ids[:, i], event.ids[:, j]
            key = torch.minimum(a, b) * E + torch.maximum(a, b)
            self.pairs[m].index_add_(0, key.reshape(-1), torch.ones(key.numel(), dtype=torch.int64,
                                                                    device=key.device))

    def trace_rows(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids [tokens, layers, k], weights, is_decode [tokens]) of the current prompt, in token order."""
        ids, weights, decode = [], [], []
        for is_decode, layers in self.steps:
            ids.append(torch.stack([ly[0] for ly in layers], dim=1))
            weights.append(torch.stack([ly[1] for ly in layers], dim=1))
            decode.append(torch.full((ids[-1].shape[0],), is_decode, dtype=torch.bool))
        return torch.cat(ids), torch.cat(weights), torch.cat(decode)

    def top_pairs(self, n: int) -> list[list[tuple[int, int, int]]]:
        if self.pairs is None:
            return []
        E = self.shape[2]
        out = []
        for layer in self.pairs.cpu():
            top = layer.topk(min(n, layer.numel()))
            out.append([(int(k) // E, int(k) % E, int(c)) for k, c in zip(top.indices, top.values) if c > 0])
        return out


# ---------------------------------------------------------------------- driving the model


# the keys a prompt given as a dict (a JSONL line) may carry its content under, in order of preference
PROMPT_KEYS = ("input_ids", "text", "prompt")


def _normalise_prompts(model, prompts: Iterable[Any]) -> list[tuple[str, list[int], str]]:
    """(name, token ids, sha256) for each prompt: text, id lists or JSONL-style dicts."""
    out = []
    for i, p in enumerate(prompts):
        name = f"prompt-{i}"
        if isinstance(p, dict):
            name = str(p.get("id", p.get("name", name)))
            if "input_ids" in p:
                p = list(p["input_ids"])
            elif "text" in p or "prompt" in p:
                p = p.get("text", p.get("prompt"))
            else:
                raise ValueError(f"prompt {i} has none of the keys {', '.join(map(repr, PROMPT_KEYS))}")
        if isinstance(p, str):
            if model.tokenizer is None:
                raise ValueError("this checkpoint has no tokenizer: give prompts as token id lists")
            ids = model.tokenizer.encode(p)
            digest = hashlib.sha256(p.encode("utf-8")).hexdigest()
        else:
            ids = [int(t) for t in p]
            digest = hashlib.sha256(json.dumps(ids).encode()).hexdigest()
        if not ids:
            raise ValueError(f"prompt {name!r} is empty")
        out.append((name, ids, digest))
    if not out:
        raise ValueError("no prompts to profile")
    return out


@torch.no_grad()
def profile_model(
    model,
    prompts: Iterable[Any],
    *,
    decode_tokens: int = 0,
    trace: bool = False,
    co_activation: int = 0,
    progress: bool | None = None,
) -> Profile | tuple[Profile, RoutingTrace]:
    """Run each prompt through ``model`` (an :class:`~residency.offloaded.OffloadedNemotron`) and profile it.

    - ``prompts``: texts (the checkpoint needs a tokenizer), token-id lists, or dicts with ``text`` /
      ``prompt`` / ``input_ids`` and an optional ``id``. Each prompt runs alone (no padding).
    - ``decode_tokens``: also greedily decode this many tokens per prompt and record their routing
      as the decode phase (otherwise only the prefill is profiled).
    - ``trace``: also return the :class:`~residency.profiling.trace.RoutingTrace` (ids and weights per token
      and MoE layer, prompt boundaries, phase flags) as ``(profile, trace)``.
    - ``co_activation``: keep the top-N co-selected expert pairs per layer in the profile metadata.
    - ``progress``: show a progress bar over prompts (default: when there are more than 4).
    """
    items = _normalise_prompts(model, prompts)
    if hasattr(model, "check_fits"):  # every prompt is checked before the first runs
        for prompt_name, ids, _digest in items:
            # (decode_tokens + 1 new tokens: the last one is sampled but never fed back)
            model.check_fits(len(ids), decode_tokens + 1 if decode_tokens > 0 else 0, what=f"prompt {prompt_name!r}",
                             new_name="decode_tokens (+ 1)")
    net = model.model
    cfg = model.config
    device = model.device
    obs = ProfileObserver(cfg.num_moe_layers, cfg.n_routed_experts, device, record_trace=trace,
                          co_activation=co_activation > 0)
    detach = net.add_observer(obs)
    counts, mass, sal, tokens = [], [], [], []
    t_ids, t_w, t_dec, offsets = [], [], [], [0]
    iterator: Iterable = items
    if progress if progress is not None else len(items) > 4:
        from tqdm.auto import tqdm

        iterator = tqdm(items, desc="profiling", unit="prompt")
    try:
        for prompt_name, ids, _digest in iterator:
            obs.reset()
            x = torch.tensor([ids], dtype=torch.long, device=device)
            if decode_tokens > 0:
                # decode_tokens + 1 new tokens: the last one is sampled but never fed back
                model.generate(x, max_new_tokens=decode_tokens + 1, temperature=0, stop_at_eos=False)
            else:
                net(x)
            acc = obs.acc.float().cpu()
            if not bool(torch.isfinite(acc).all()) or bool((acc < 0).any()):
                raise ResidencyError(
                    f"prompt {prompt_name!r}: the routed-expert implementation left negative or non-finite expert "
                    "output norms; it must fill the pair_norms buffer with each routed pair's output L2 norm"
                )
            counts.append(acc[:, :, 0])
            mass.append(acc[:, :, 1])
            sal.append(acc[:, :, 2])
            tokens.append(torch.tensor(obs.tokens, dtype=torch.int64))
            if trace:
                i, w, d = obs.trace_rows()
                t_ids.append(i)
                t_w.append(w)
                t_dec.append(d)
                offsets.append(offsets[-1] + i.shape[0])
    finally:
        detach()
    name = model.path.name if getattr(model, "path", None) is not None else ""
    profile = Profile(
        torch.stack(counts), torch.stack(mass), torch.stack(sal), torch.stack(tokens), cfg.fingerprint(),
        cfg.num_experts_per_tok, list(cfg.moe_layers), [n for n, _, _ in items], [h for _, _, h in items], name,
        obs.top_pairs(co_activation) if co_activation > 0 else [],
    )
    if not trace:
        return profile
    routing = RoutingTrace(
        ids=torch.cat(t_ids), weights=torch.cat(t_w), prompt_offsets=torch.tensor(offsets, dtype=torch.int64),
        is_decode=torch.cat(t_dec), num_experts=cfg.n_routed_experts, fingerprint=cfg.fingerprint(),
        prompts=[n for n, _, _ in items], meta={"source": "profiler", "model_name": name},
    )
    return profile, routing
