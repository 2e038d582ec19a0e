"""Torch reference of the slot-bank MoE: the semantics the Triton kernels match, and the CPU path.

For each token t and each of its k routed pairs (expert ``e = topk_ids[t, j]``, weight
``w = topk_weights[t, j]``), with ``s = slot_of_expert[e]``:

    out[t] = sum_j  w * down_bank[s] @ relu(up_bank[s] @ x[t]) ** 2

A pair is *active* unless ``topk_ids[t, j] < 0`` (sentinel) or ``skip[t, j]`` is True: skipped
pairs are computed by another path (the CPU) and contribute nothing here. An active pair whose
expert has no slot (``slot_of_expert[e] == -1``) is an error. Everything is computed in fp32; the
result is cast to ``x.dtype`` (or written into ``out``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def check_inputs(
    x: torch.Tensor,
    up_bank: torch.Tensor,
    down_bank: torch.Tensor,
    slot_of_expert: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    skip: torch.Tensor | None,
    out: torch.Tensor | None,
    pair_norms: torch.Tensor | None = None,
) -> tuple[int, int, int, int]:
    """Validate shapes, dtypes and devices; return ``(tokens, top_k, latent L, intermediate I)``."""
    if x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"x must be a float [tokens, latent] tensor, got {tuple(x.shape)} {x.dtype}")
    num_tokens, latent = x.shape
    if up_bank.dim() != 3 or up_bank.shape[2] != latent:
        raise ValueError(f"up_bank must be [slots, I, L={latent}], got {tuple(up_bank.shape)}")
    num_slots, inter, _ = up_bank.shape
    if tuple(down_bank.shape) != (num_slots, latent, inter):
        raise ValueError(f"down_bank must be [slots={num_slots}, L={latent}, I={inter}], got {tuple(down_bank.shape)}")
    top_k = check_routing_inputs(x, slot_of_expert, topk_ids, topk_weights, skip, out, pair_norms,
                                 (up_bank, down_bank))
    return num_tokens, top_k, latent, inter


def check_routing_inputs(
    x: torch.Tensor,
    slot_of_expert: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    skip: torch.Tensor | None,
    out: torch.Tensor | None,
    pair_norms: torch.Tensor | None,
    bank_tensors: tuple[torch.Tensor, ...],
) -> int:
    """Checks of everything but the weight banks (shared by the float and quantized variants); returns top_k."""
    num_tokens = x.shape[0]
    int_types = (torch.int32, torch.int64)
    if slot_of_expert.dim() != 1 or slot_of_expert.numel() == 0 or slot_of_expert.dtype not in int_types:
        got = f"{tuple(slot_of_expert.shape)} {slot_of_expert.dtype}"
        raise ValueError(f"slot_of_expert must be a non-empty 1-D int32 tensor [experts], got {got}")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != num_tokens or topk_ids.dtype not in int_types:
        got = f"{tuple(topk_ids.shape)} {topk_ids.dtype}"
        raise ValueError(f"topk_ids must be an int [tokens={num_tokens}, k] tensor, got {got}")
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
    tensors = [*bank_tensors, slot_of_expert, topk_ids, topk_weights]
    tensors += [t for t in (skip, out, pair_norms) if t is not None]
    for t in tensors:
        if t.device != x.device:
            raise ValueError(f"all inputs must be on x's device {x.device}; found one on {t.device}")
    return topk_ids.shape[1]


def active_pairs(topk_ids: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
    """``[T, k]`` bool: pairs computed here (id not the -1 sentinel and not skipped)."""
    active = topk_ids >= 0
    return active if skip is None else active & ~skip


def resolve_slots(slot_of_expert: torch.Tensor, topk_ids: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
    """Slots of the active pairs as ``[T, k]`` int64 (-1 where inactive); raise if one has no slot.

    Reads the answer on the host, so on CUDA it synchronises: the Triton path calls it only when
    asked to check.
    """
    num_experts = slot_of_expert.shape[0]
    active = active_pairs(topk_ids, skip)
    if bool((active & (topk_ids >= num_experts)).any()):
        bad = int(topk_ids[active].max())
        raise ValueError(f"topk_ids holds expert {bad}, but slot_of_expert covers only {num_experts} experts")
    ids = torch.where(active, topk_ids, 0).long()
    slots = torch.where(active, slot_of_expert.long()[ids], -1)  # [T, k]
    missing = active & (slots < 0)
    if bool(missing.any()):
        t, j = (int(v) for v in missing.nonzero()[0])
        raise ValueError(
            f"{int(missing.sum())} routed pair(s) need experts with no slot (slot_of_expert == -1), first: "
            f"token {t}, k {j}, expert {int(topk_ids[t, j])}; load the expert into the bank or mark the pair in skip"
        )
    return slots


def moe_gather_gemm_reference(
    x: torch.Tensor,
    up_bank: torch.Tensor,
    down_bank: torch.Tensor,
    slot_of_expert: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    skip: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
    pair_norms: torch.Tensor | None = None,
    intermediate: torch.dtype | None = None,
) -> torch.Tensor:
    """Torch MoE over a slot bank: one dense GEMM pair per resident expert that has tokens.

    Args:
        x: latent activations ``[T, L]``.
        up_bank: ``[slots, I, L]``; down_bank: ``[slots, L, I]``.
        slot_of_expert: ``[E]`` int32, expert id -> slot, -1 = not resident.
        topk_ids: ``[T, k]`` expert ids, -1 = skip this pair.
        topk_weights: ``[T, k]`` routing weights.
        skip: optional ``[T, k]`` bool, True = computed elsewhere.
        out: optional ``[T, L]`` tensor of x's dtype (or fp32: the accumulator unrounded) to write into.
        pair_norms: optional ``[T, k]`` fp32; the entries of the pairs computed here receive the L2
            norm of their unweighted expert output; the others are left unchanged.
        intermediate: round ``relu(up @ x)^2`` to this dtype before the down projection (what the
            Triton prefill path does with 16-bit banks on a GPU, see
            :func:`~residency.kernels.moe.gather_gemm.intermediate_dtype`); None: fp32 throughout.

    Returns:
        ``[T, L]`` in x's dtype (``out`` when given).
    """
    check_inputs(x, up_bank, down_bank, slot_of_expert, topk_ids, topk_weights, skip, out, pair_norms)
    return slot_loop(x, slot_of_expert, topk_ids, topk_weights, skip, out, pair_norms,
                     lambda slot: (up_bank[slot].float(), down_bank[slot].float()), intermediate)


def slot_loop(
    x: torch.Tensor,
    slot_of_expert: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    skip: torch.Tensor | None,
    out: torch.Tensor | None,
    pair_norms: torch.Tensor | None,
    weights_of_slot: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
    intermediate: torch.dtype | None = None,
) -> torch.Tensor:
    """The reference computation given each used slot's fp32 ``(up [I, L], down [L, I])``; ``intermediate``:
    the dtype ``h`` is rounded to (None: fp32)."""
    slots = resolve_slots(slot_of_expert, topk_ids, skip)  # [T, k]
    top_k = topk_ids.shape[1]
    acc = torch.zeros(x.shape, dtype=torch.float32, device=x.device)  # [T, L]
    flat_slots = slots.flatten()
    flat_weights = topk_weights.flatten().float()
    for slot in flat_slots[flat_slots >= 0].unique().tolist():
        pairs = (flat_slots == slot).nonzero().flatten()  # pair index t * k + j
        tokens = pairs // top_k
        w_up, w_down = weights_of_slot(slot)
        h = torch.relu(x[tokens].float() @ w_up.T) ** 2  # [n, I]
        if intermediate is not None:
            h = h.to(intermediate).float()
        y = h @ w_down.T  # [n, L]
        if pair_norms is not None:
            pair_norms.view(-1)[pairs] = y.norm(dim=-1)
        acc.index_add_(0, tokens, y * flat_weights[pairs, None])
    if out is None:
        return acc.to(x.dtype)
    return out.copy_(acc)
