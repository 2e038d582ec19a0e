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
from .reference import resolve_slots

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
    int_types = (torch.int32, torch.int64)
    if slot_of_expert.dim() != 1 or slot_of_expert.numel() == 0 or slot_of_expert.dtype not in int_types:
        got = f"{tuple(slot_of_expert.shape)} {slot_of_expert.dtype}"
        raise ValueError(f"slot_of_expert must be a non-empty 1-D int32 tensor [experts], got {got}")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != num_tokens or topk_ids.dtype not in int_types:
        got = f"{tuple(topk_ids.shape)} {topk_ids.dtype}"
        raise ValueError(f"topk_ids must be an int [tokens={num_tokens}, k] tensor, got {got}")
    top_k = topk_ids.shape[1]
    if topk_weights.shape != topk_ids.shape or not topk_weights.is_floating_point():
        raise ValueError(f"topk_weights must be a float tensor shaped like topk_ids {tuple(topk_ids.shape)}")
    if skip is not None and (skip.shape != topk_ids.shape or skip.dtype != torch.bool):
        raise ValueError(f"skip must be a bool tensor shaped like topk_ids {tuple(topk_ids.shape)}")
    if out is not None and (out.shape != x.shape or out.dtype not in (x.dtype, torch.float32)):
        raise ValueError(f"out must be shaped like x {tuple(x.shape)}, in x's dtype {x.dtype} or fp32; got "
                         f"{tuple(out.shape)} {out.dtype}")
    if pair_norms is not None and (pair_norms.shape != topk_ids.shape or pair_norms.dtype != torch.float32
                                   or not pair_norms.is_contiguous()):
        raise ValueError(f"pair_norms must be a contiguous fp32 tensor shaped like topk_ids {tuple(topk_ids.shape)}")
    tensors = [*up.tensors(), *down.tensors(), slot_of_expert, topk_ids, topk_weights]
    tensors += [t for t in (skip, out, pair_norms) if t is not None]
    for t in tensors:
        if t.device != x.device:
            raise ValueError(f"all inputs must be on x's device {x.device}; found one on {t.device}")
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
) -> torch.Tensor:
    """``out[t] = sum_j w[t, j] * down[s] @ relu(up[s] @ x[t])^2`` over quantized slots, in fp32.

    Arguments as :func:`~residency.kernels.moe.reference.moe_gather_gemm_reference`, with ``up``
    ``[slots, I, L]`` and ``down`` ``[slots, L, I]`` quantized weights.
    """
    check_quant_inputs(x, up, down, slot_of_expert, topk_ids, topk_weights, skip, out, pair_norms)
    slots = resolve_slots(slot_of_expert, topk_ids, skip)  # [T, k]
    top_k = topk_ids.shape[1]
    acc = torch.zeros(x.shape, dtype=torch.float32, device=x.device)  # [T, L]
    flat_slots = slots.flatten()
    flat_weights = topk_weights.flatten().float()
    for slot in flat_slots[flat_slots >= 0].unique().tolist():
        pairs = (flat_slots == slot).nonzero().flatten()  # pair index t * k + j
        tokens = pairs // top_k
        w_up = up.slots(slice(slot, slot + 1)).dequantize()[0]  # [I, L] fp32
        w_down = down.slots(slice(slot, slot + 1)).dequantize()[0]  # [L, I] fp32
        h = torch.relu(x[tokens].float() @ w_up.T) ** 2  # [n, I]
        y = h @ w_down.T  # [n, L]
        if pair_norms is not None:
            pair_norms.view(-1)[pairs] = y.norm(dim=-1)
        acc.index_add_(0, tokens, y * flat_weights[pairs, None])
    if out is None:
        return acc.to(x.dtype)
    return out.copy_(acc)


def quant_linear_reference(x: torch.Tensor, weight: QuantWeights, bias: torch.Tensor | None = None,
                           *, slot: int = 0) -> torch.Tensor:
    """``x @ W.T (+ bias)`` for one quantized weight (slot ``slot`` of ``weight``): the weight is
    dequantized in fp32, rounded to x's dtype, and multiplied by ``F.linear`` in x's dtype (what a
    model whose weights were dequantized at load computes)."""
    w = weight.slots(slice(slot, slot + 1)).dequantize()[0].to(x.dtype)
    return torch.nn.functional.linear(x, w, bias)
