"""Routing metadata for the prefill path: (token, k) pairs grouped by expert, padded to BLOCK_M.

Each active pair ``p = t * k + j`` is placed in its expert's run of ``sorted_pair_ids``; every
run is padded to a multiple of ``block_m`` with the sentinel ``T * k``, so each BLOCK_M block of
rows belongs to one expert and the GEMM kernels can load one weight tile per block. Pairs are
grouped by *expert id* (not slot) and each block's expert is then mapped through the slot table,
so a bank with more slots than experts, or unused slots, changes nothing. Pairs not computed
here are left out: inactive ones (id -1 or skipped), and active ones whose expert has no slot or
lies past the table (the reduction turns those into NaN, see ``gather_gemm``).

Everything stays on the device (no host reads): the row count the kernels need is the
one-element tensor ``num_rows``, and the tensors have sizes fixed by the input shapes alone, so
the step can be captured in a CUDA graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .reference import active_pairs


@dataclass(frozen=True)
class AlignedPairs:
    """Per-expert grouping of the active pairs for one launch.

    Attributes:
        sorted_pair_ids: ``[num_blocks * block_m]`` int32; pair index ``t * k + j``, or the sentinel
            ``T * k`` for padding.
        block_slot: ``[num_blocks]`` int32; slot of each block's expert, -1 past ``num_rows``.
        num_rows: ``[1]`` int32 on the device: rows in use (a multiple of ``block_m``).
        block_m: rows per block.
        num_blocks: upper bound on the blocks in use, from the shapes alone (the launch grid).
    """

    sorted_pair_ids: torch.Tensor
    block_slot: torch.Tensor
    num_rows: torch.Tensor
    block_m: int
    num_blocks: int


def max_aligned_rows(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Rows needed in the worst case: every pair, plus padding for each expert that can be hit."""
    rows = num_pairs + min(num_experts, num_pairs) * (block_m - 1)
    return -(-rows // block_m) * block_m


def align_pairs(
    topk_ids: torch.Tensor,
    slot_of_expert: torch.Tensor,
    block_m: int,
    skip: torch.Tensor | None = None,
) -> AlignedPairs:
    """Group the active pairs of ``topk_ids [T, k]`` by expert, each run padded to ``block_m`` rows.

    Within an expert, pairs keep their order ``t * k + j`` (a stable sort), so the result is
    deterministic.
    """
    if block_m < 1:
        raise ValueError(f"block_m must be >= 1, got {block_m}")
    device = topk_ids.device
    num_experts = slot_of_expert.shape[0]
    num_pairs = topk_ids.numel()
    max_rows = max_aligned_rows(num_pairs, num_experts, block_m)
    num_blocks = max_rows // block_m

    ids = topk_ids.flatten().long()  # [P]
    in_range = (ids >= 0) & (ids < num_experts)
    has_slot = slot_of_expert.long()[ids.clamp(0, num_experts - 1)] >= 0
    computed = active_pairs(topk_ids, skip).flatten() & in_range & has_slot
    # pairs not computed here go to bucket E, which is dropped
    key = torch.where(computed, ids, num_experts)  # [P]
    sorted_key, order = torch.sort(key, stable=True)  # [P]
    bucket = torch.arange(num_experts + 1, device=device)
    first = torch.searchsorted(sorted_key, bucket)  # [E + 1] first sorted position of each bucket
    counts = first[1 : num_experts + 1] - first[:num_experts]  # [E]
    padded = (counts + block_m - 1) // block_m * block_m
    run_end = torch.cumsum(padded, 0)  # [E]
    run_start = run_end - padded

    # destination row of each sorted pair; inactive ones land in a spare row past the end
    in_table = sorted_key < num_experts
    e = sorted_key.clamp(max=num_experts - 1)
    rank = torch.arange(num_pairs, device=device) - first[e]
    dest = torch.where(in_table, run_start[e] + rank, max_rows)
    sorted_pair_ids = torch.full((max_rows + 1,), num_pairs, dtype=torch.int32, device=device)
    sorted_pair_ids.scatter_(0, dest, order.to(torch.int32))

    # expert of each block: the first run that ends after the block's first row
    block_start = torch.arange(num_blocks, device=device) * block_m
    block_expert = torch.searchsorted(run_end, block_start, right=True)  # [num_blocks], E = past the end
    block_slot = slot_of_expert.long()[block_expert.clamp(max=num_experts - 1)]
    block_slot = torch.where(block_expert < num_experts, block_slot, -1).to(torch.int32)

    num_rows = run_end[-1:].to(torch.int32)  # [1]
    return AlignedPairs(sorted_pair_ids[:max_rows], block_slot, num_rows, block_m, num_blocks)
