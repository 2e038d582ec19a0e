"""Router top-k for Nemotron-H LatentMoE: sigmoid scores, bias-corrected choice, renormalised weights.

Semantics (the torch reference defines them; the Triton kernel matches):

1. ``scores = sigmoid(logits)`` in fp32.
2. The ``top_k`` experts with the largest ``scores + bias`` are chosen. Equal biased scores are
   broken by the lower expert index; without ties the order equals ``torch.topk``. Ids come out
   sorted by descending biased score. With group-limited routing (``n_group > 1``, DeepSeek-V3
   style, as ``transformers`` implements it for Nemotron-H) the experts split into ``n_group``
   equal groups, each group scores the sum of its two best biased scores, and only the experts of
   the ``topk_group`` best groups (lower group index first among ties) can be chosen.
3. ``weights = scores[ids]`` (the unbiased scores), divided by ``sum + 1e-20`` when
   ``renormalize``, then multiplied by ``scaling_factor``.

Output ids are int64 (as ``torch.topk`` gives them), weights fp32. The kernel handles any
``top_k <= num_experts`` up to 64, including Super's top-22 of 512, and negative biased scores.
The Triton and torch paths may differ by an ulp in the sigmoid, which can swap two experts whose
biased scores are that close.
"""

from __future__ import annotations

import torch

from ._dispatch import next_power_of_2, use_triton

MAX_TOP_K = 64


def route_reference(
    logits: torch.Tensor,
    bias: torch.Tensor | None,
    top_k: int,
    scaling_factor: float,
    renormalize: bool = True,
    *,
    n_group: int = 1,
    topk_group: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch router: ``(ids [T, k] int64, weights [T, k] fp32)`` from ``logits [T, E]``."""
    _check(logits, bias, top_k, n_group, topk_group)
    scores = torch.sigmoid(logits.float())  # [T, E]
    choice = scores if bias is None else scores + bias.float()
    if n_group > 1:
        grouped = choice.view(choice.shape[0], n_group, -1)  # [T, G, E/G]
        group_scores = grouped.topk(2, dim=-1).values.sum(-1)  # [T, G]
        best = torch.sort(group_scores, dim=-1, descending=True, stable=True).indices[:, :topk_group]
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
        choice = grouped.masked_fill(~keep[..., None], float("-inf")).view_as(choice)
    # a stable descending sort puts the lower expert index first among equal scores
    ids = torch.sort(choice, dim=-1, descending=True, stable=True).indices[:, :top_k]  # [T, k]
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return ids, weights * scaling_factor


def route(
    logits: torch.Tensor,
    bias: torch.Tensor | None,
    top_k: int,
    scaling_factor: float,
    renormalize: bool = True,
    *,
    n_group: int = 1,
    topk_group: int = 1,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Route tokens to experts; Triton on CUDA (or under ``TRITON_INTERPRET=1``), else the reference.

    Args:
        logits: router logits ``[T, E]``, fp32 (other float dtypes are upcast).
        bias: score-correction bias ``[E]`` (fp32) added for the choice only, or None.
        top_k: experts per token, ``1 <= top_k <= min(E, 64)``.
        scaling_factor: multiplies the final weights (Super: 5.0).
        renormalize: divide the chosen weights by their sum (+1e-20) before scaling.
        n_group: expert groups for group-limited routing (1 = none); must divide E, groups of >= 2.
        topk_group: groups whose experts may be chosen when ``n_group > 1``.
        backend: ``"auto"``, ``"triton"``, ``"torch"``, or None for the library-wide setting.

    Returns:
        ids ``[T, k]`` int64 sorted by descending biased score, weights ``[T, k]`` fp32.
    """
    tensors = (logits,) if bias is None else (logits, bias)
    if not use_triton(backend, *tensors):
        return route_reference(logits, bias, top_k, scaling_factor, renormalize,
                               n_group=n_group, topk_group=topk_group)
    _check(logits, bias, top_k, n_group, topk_group)
    if top_k > MAX_TOP_K:
        raise ValueError(f"the Triton router supports top_k <= {MAX_TOP_K}, got {top_k}; use backend='torch'")
    num_tokens, num_experts = logits.shape
    ids = torch.empty(num_tokens, top_k, dtype=torch.int64, device=logits.device)
    weights = torch.empty(num_tokens, top_k, dtype=torch.float32, device=logits.device)
    if num_tokens == 0:
        return ids, weights
    from .routing_kernel import route_fwd_kernel

    route_fwd_kernel[(num_tokens,)](
        logits,
        logits if bias is None else bias,
        ids,
        weights,
        num_experts,
        num_experts // n_group,
        logits.stride(0),
        logits.stride(1),
        float(scaling_factor),
        K=top_k,
        BLOCK_E=next_power_of_2(num_experts),
        BLOCK_K=next_power_of_2(top_k),
        N_GROUP=n_group,
        TOPK_GROUP=topk_group,
        BLOCK_G=next_power_of_2(n_group),
        HAS_BIAS=bias is not None,
        RENORMALIZE=bool(renormalize),
        num_warps=4 if num_experts <= 1024 else 8,
    )
    return ids, weights


def _check(logits: torch.Tensor, bias: torch.Tensor | None, top_k: int, n_group: int, topk_group: int) -> None:
    if logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError(f"logits must be a float [tokens, experts] tensor, got {tuple(logits.shape)} {logits.dtype}")
    num_experts = logits.shape[1]
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be in 1..{num_experts} (the number of experts), got {top_k}")
    if n_group < 1 or num_experts % n_group or (n_group > 1 and num_experts // n_group < 2):
        raise ValueError(f"n_group ({n_group}) must split {num_experts} experts into equal groups of at least 2")
    if n_group > 1 and not (1 <= topk_group <= n_group and top_k <= topk_group * (num_experts // n_group)):
        raise ValueError(
            f"topk_group ({topk_group}) must be in 1..n_group ({n_group}) and leave at least top_k ({top_k}) experts"
        )
    if bias is not None:
        if bias.shape != (num_experts,):
            raise ValueError(f"bias must have shape ({num_experts},) like logits' last dim, got {tuple(bias.shape)}")
        if bias.device != logits.device:
            raise ValueError(f"bias is on {bias.device} but logits on {logits.device}")
