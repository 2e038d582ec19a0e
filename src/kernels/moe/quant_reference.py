"""Torch reference of the quantized slot-bank MoE: dequantize the slots in use fully, then the plain math.

Same semantics as :func:`residency.kernels.moe.reference.moe_gather_gemm_reference`, with the up and
down banks given as :class:`~residency.kernels.moe.quant_formats.QuantWeights` (NVFP4, FP8 or
W4A16 slots): for each resident expert that has tokens, its two weights are dequantized in fp32
(:func:`~residency.kernels.moe.quant_formats.dequantize`) and the pairs computed exactly as the
float reference computes them (the same fp32 operations on the same values as a bank dequantized to
fp32). Also the reference of one quantized Linear (:func:`quant_linear_reference`).
"""

from __future__ import annotations

import torch

from .quant_formats import QuantWeights
from .reference import check_routing_inputs, slot_loop

__all__ = ["check_quant_inputs", "moe_gather_gemm_quant_reference", "quant_linear_reference"]


def check_quant_inputs(
    x: torch.Tensor,
    up: QuantWeights,
    down: QuantWeights,
    slot_of_expert: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    skip: torch.Tensor | None,
    out: torch.Tensor | None,
    pair_norms: torch.Tensor | None = None,
) -> tuple[int, int, int, int]:
    """Validate shapes, dtypes and devices; return ``(tokens, top_k, latent L, intermediate I)``."""
    if not isinstance(up, QuantWeights) or not isinstance(down, QuantWeights):
        raise TypeError("up and down must be QuantWeights (use moe_gather_gemm for float banks)")
    if x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"x must be a float [tokens, latent] tensor, got {tuple(x.shape)} {x.dtype}")
    num_tokens, latent = x.shape
    if up.k != latent:
        raise ValueError(f"up weights must be [slots, I, L={latent}], got [{up.num_slots}, {up.n}, {up.k}]")
    inter = up.n
    if (down.n, down.k, down.num_slots) != (latent, inter, up.num_slots):
        raise ValueError(f"down weights must be [slots={up.num_slots}, L={latent}, I={inter}], got "
                         f"[{down.num_slots}, {down.n}, {down.k}]")
    if up.spec != down.spec:
        raise ValueError(f"up and down weights have different formats ({up.spec} vs {down.spec})")
    top_k = check_routing_inputs(x, slot_of_expert, topk_ids, topk_weights, skip, out, pair_norms,
                                 (*up.tensors(), *down.tensors()))
    return num_tokens, top_k, latent, inter


def moe_gather_gemm_quant_reference(
    x: torch.Tensor,
    up: QuantWeights,
    down: QuantWeights,
    slot_of_expert: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    skip: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
    pair_norms: torch.Tensor | None = None,
    intermediate: torch.dtype | None = None,
) -> torch.Tensor:
    """``out[t] = sum_j w[t, j] * down[s] @ relu(up[s] @ x[t])^2`` over quantized slots, in fp32.

    Arguments as :func:`~residency.kernels.moe.reference.moe_gather_gemm_reference`, with ``up``
    ``[slots, I, L]`` and ``down`` ``[slots, L, I]`` quantized weights.
    """
    check_quant_inputs(x, up, down, slot_of_expert, topk_ids, topk_weights, skip, out, pair_norms)
    return slot_loop(x, slot_of_expert, topk_ids, topk_weights, skip, out, pair_norms,
                     lambda slot: (up.slots(slice(slot, slot + 1)).dequantize()[0],  # [I, L] fp32
                                   down.slots(slice(slot, slot + 1)).dequantize()[0]),  # [L, I] fp32
                     intermediate)


def quant_linear_reference(x: torch.Tensor, weight: QuantWeights, bias: torch.Tensor | None = None,
                           *, slot: int = 0) -> torch.Tensor:
    """``x @ W.T (+ bias)`` for one quantized weight (slot ``slot`` of ``weight``): the weight is
    dequantized in fp32, rounded to x's dtype, and multiplied by ``F.linear`` in x's dtype (what a
    model whose weights were dequantized at load computes)."""
    w = weight.slots(slice(slot, slot + 1)).dequantize()[0].to(x.dtype)
    return torch.nn.functional.linear(x, w, bias)
