"""Triton MoE over a slot bank: decode (gather-GEMV per pair) and prefill (grouped GEMM) paths.

Both paths compute, for every computed (token, k) pair ``p = t * k + j``, the weighted expert
output ``y[p] = w[p] * down[slot] @ relu(up[slot] @ x[t]) ** 2`` into an fp32 workspace
``[T * k, L]``, then one reduction kernel sums each token's k rows in the fixed order j = 0..k-1
(deterministic; no atomics) and writes ``out`` in x's dtype.

- Decode (few tokens): no sorting. Program (p, n-tile) reads its pair's expert id, looks the slot
  up in the table and streams that expert's weight rows: kernel 1 writes ``h[p] = relu(up @ x)^2``
  (fp32), kernel 2 writes ``y[p] = w * down @ h[p]``. Weights are read once per pair, which is the
  bandwidth floor when the pairs of a step hit distinct experts.
- Prefill: pairs are grouped by expert and padded to BLOCK_M rows (``align.py``); each BLOCK_M
  block loads one expert's tiles and runs ``tl.dot`` with fp32 accumulators. The up GEMM gathers x
  rows by token and stores ``h`` in the compute dtype (bf16 for bf16 banks on a GPU:
  :func:`intermediate_dtype` says which, for a given call); the down GEMM multiplies by the routing
  weight in fp32 in its epilogue.

Pairs with id -1 or ``skip`` set contribute nothing (another path computes them). An active pair
whose expert has no slot (or an id past the table) is an error: ``check=True`` raises before the
launch (reads the table on the host, so it syncs; the default on CPU, or on CUDA with
``RESIDENCY_KERNEL_CHECKS=1``); unchecked, the kernels make that token's output row NaN, never a
silently wrong number.
"""

from __future__ import annotations

import os

import torch

from .._dispatch import cdiv, interpret_mode, next_power_of_2, use_triton
from .align import align_pairs
from .reference import active_pairs, check_inputs, moe_gather_gemm_reference, resolve_slots
from .tuning import MoeConfig, table_for

CHECK_ENV = "RESIDENCY_KERNEL_CHECKS"
PATHS = ("auto", "decode", "prefill")
# tl.dot on GPUs needs every block dimension to be at least 16
MIN_DOT_BLOCK = 16
REDUCE_BLOCK_N = 128


def moe_gather_gemm(
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
    path: str = "auto",
    backend: str | None = None,
    config: MoeConfig | None = None,
    check: bool | None = None,
) -> torch.Tensor:
    """``out[t] = sum_j w[t, j] * down[s] @ relu(up[s] @ x[t])^2`` with ``s = slot_of_expert[topk_ids[t, j]]``.

    Args:
        x: latent activations ``[T, L]`` (bf16 on GPU; fp16/fp32 also work).
        up_bank: ``[slots, I, L]`` up projections of the resident experts.
        down_bank: ``[slots, L, I]`` down projections.
        slot_of_expert: ``[E]`` int32, expert id -> slot, -1 = not resident.
        topk_ids: ``[T, k]`` int32/int64 expert ids; -1 = skip the pair.
        topk_weights: ``[T, k]`` routing weights (applied in fp32).
        skip: optional ``[T, k]`` bool; True = another path computes this pair.
        out: optional ``[T, L]`` output of x's dtype, or fp32 to keep the fp32 sum unrounded (callers
            that add several partial results); every element is written.
        pair_norms: optional ``[T, k]`` fp32; each computed pair's entry is overwritten with the L2
            norm of its unweighted expert output ``down @ relu(up @ x)^2`` (the profiler's REAP
            saliency input); entries of pairs not computed here are left as they are.
        path: ``"decode"``, ``"prefill"`` or ``"auto"`` (the tuning table's threshold, else
            decode while ``T * k * 4 <= E``).
        backend: ``"auto"`` (Triton on CUDA or under ``TRITON_INTERPRET=1``, else torch),
            ``"triton"``, ``"torch"``, or None (default) for the library-wide setting.
        config: tile sizes; default from the tuning table for this device and shape.
        check: raise on active pairs without a slot (syncs on CUDA). Default: True on CPU, on
            CUDA only with ``RESIDENCY_KERNEL_CHECKS=1``.

    Returns:
        ``[T, L]`` in x's dtype (or ``out``'s), fp32-accumulated (``out`` when given).
    """
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    if not use_triton(backend, x, up_bank, down_bank, slot_of_expert, topk_ids, topk_weights):
        return moe_gather_gemm_reference(
            x, up_bank, down_bank, slot_of_expert, topk_ids, topk_weights, skip, out=out, pair_norms=pair_norms
        )
    num_tokens, *_ = check_inputs(
        x, up_bank, down_bank, slot_of_expert, topk_ids, topk_weights, skip, out, pair_norms
    )
    if check is None:
        check = not x.is_cuda or os.environ.get(CHECK_ENV) == "1"
    if check:
        resolve_slots(slot_of_expert, topk_ids, skip)
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if num_tokens == 0:
        return out

    path, config = _choose_path(x, up_bank, slot_of_expert, topk_ids, path, config)
    topk_ids = topk_ids.contiguous()
    topk_weights = topk_weights.contiguous()
    skip = None if skip is None else skip.contiguous()
    pairs = decode_pairs if path == "decode" else prefill_pairs
    # with norms requested the kernels leave the weight out; it is applied after the norms are
    # taken, in the same fp32 multiply the kernel epilogue would do, so the result is unchanged
    weighted = pair_norms is None
    pair_out = pairs(x, up_bank, down_bank, slot_of_expert, topk_ids, topk_weights, skip, config, weighted)
    return finish_pairs(pair_out, slot_of_expert, topk_ids, topk_weights, skip, pair_norms, out)


def _choose_path(x: torch.Tensor, up_bank: torch.Tensor, slot_of_expert: torch.Tensor, topk_ids: torch.Tensor,
                path: str, config: MoeConfig | None) -> tuple[str, MoeConfig]:
    """A call's path and tiles: ``path`` unless ``"auto"`` (then the tuning table's choice for its tokens, top-k
    and experts), ``config`` unless None (then the table's tiles for that path)."""
    if path == "auto" or config is None:
        table = table_for(x.device, x.shape[1], up_bank.shape[1], up_bank.dtype)
        if path == "auto":
            path = table.choose_path(topk_ids.shape[0], topk_ids.shape[1], slot_of_expert.shape[0])
        config = config or table.config(path, topk_ids.shape[0])
    return path, config


def finish_pairs(
    pair_out: torch.Tensor,
    slot_of_expert: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    skip: torch.Tensor | None,
    pair_norms: torch.Tensor | None,
    out: torch.Tensor,
) -> torch.Tensor:
    """From per-pair outputs to ``out``: with ``pair_norms`` the outputs came unweighted, so take their
    norms, then apply the weights (the same fp32 multiply as the kernels' epilogue); reduce over k."""
    if pair_norms is not None:
        active = active_pairs(topk_ids, skip) & (topk_ids < slot_of_expert.shape[0])
        pair_norms.copy_(torch.where(active, pair_out.norm(dim=-1).view(active.shape), pair_norms))
        pair_out.mul_(topk_weights.reshape(-1, 1).float())
    reduce_pairs(pair_out, slot_of_expert, topk_ids, skip, out)
    return out


def decode_pairs(
    x: torch.Tensor,
    up_bank: torch.Tensor,
    down_bank: torch.Tensor,
    slot_of_expert: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    skip: torch.Tensor | None,
    config: MoeConfig,
    weighted: bool = True,
) -> torch.Tensor:
    """Expert outputs ``[T * k, L]`` fp32 of the computed pairs (times the routing weight when
    ``weighted``), one program per pair and tile."""
    num_pairs, top_k = topk_ids.numel(), topk_ids.shape[1]
    latent, inter = x.shape[1], up_bank.shape[1]
    h = torch.empty(num_pairs, inter, dtype=torch.float32, device=x.device)  # [P, I]
    y = torch.empty(num_pairs, latent, dtype=torch.float32, device=x.device)  # [P, L]
    from .gather_gemm_kernels import moe_gemv_decode_kernel

    pair_args = (topk_ids, _skip_arg(skip, topk_ids), slot_of_expert, topk_weights, slot_of_expert.shape[0])
    for a, row_div, bank, c, relu2, tile in (
        (x, top_k, up_bank, h, True, config.up),
        (h, 1, down_bank, y, False, config.down),
    ):
        n, d = bank.shape[1], bank.shape[2]
        moe_gemv_decode_kernel[(num_pairs, cdiv(n, tile.BLOCK_N))](
            a, bank, c, *pair_args, n, d,
            a.stride(0), a.stride(1), bank.stride(0), bank.stride(1), bank.stride(2), c.stride(0),
            A_ROW_DIV=row_div, HAS_SKIP=skip is not None, RELU2=relu2, MUL_WEIGHT=weighted and not relu2,
            BLOCK_N=tile.BLOCK_N, BLOCK_K=tile.BLOCK_K, num_warps=tile.num_warps, num_stages=tile.num_stages,
        )  # fmt: skip
    return y


def prefill_pairs(
    x: torch.Tensor,
    up_bank: torch.Tensor,
    down_bank: torch.Tensor,
    slot_of_expert: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    skip: torch.Tensor | None,
    config: MoeConfig,
    weighted: bool = True,
) -> torch.Tensor:
    """Expert outputs ``[T * k, L]`` fp32 of the computed pairs (times the routing weight when
    ``weighted``), by expert-grouped GEMMs."""
    interpreting = interpret_mode()
    tiles = (config.BLOCK_M, config.up.BLOCK_N, config.up.BLOCK_K, config.down.BLOCK_N, config.down.BLOCK_K)
    if not interpreting and min(tiles) < MIN_DOT_BLOCK:
        raise ValueError(f"prefill block sizes must be >= {MIN_DOT_BLOCK} on GPU (tl.dot), got {config}")
    num_pairs, top_k = topk_ids.numel(), topk_ids.shape[1]
    latent, inter = x.shape[1], up_bank.shape[1]
    aligned = align_pairs(topk_ids, slot_of_expert, config.BLOCK_M, skip)
    compute, precision = prefill_compute(x, up_bank, down_bank)
    h = torch.empty(num_pairs, inter, dtype=compute, device=x.device)  # [P, I]
    y = torch.empty(num_pairs, latent, dtype=torch.float32, device=x.device)  # [P, L]
    from .gather_gemm_kernels import moe_gemm_prefill_kernel

    block_args = (aligned.sorted_pair_ids, aligned.block_slot, aligned.num_rows, topk_weights)
    for a, row_div, bank, c, relu2, tile in (
        (x, top_k, up_bank, h, True, config.up),
        (h, 1, down_bank, y, False, config.down),
    ):
        n, d = bank.shape[1], bank.shape[2]
        grid = (aligned.num_blocks * cdiv(n, tile.BLOCK_N),)
        moe_gemm_prefill_kernel[grid](
            a, bank, c, *block_args, n, d, num_pairs, aligned.num_blocks,
            a.stride(0), a.stride(1), bank.stride(0), bank.stride(1), bank.stride(2), c.stride(0),
            A_ROW_DIV=row_div, RELU2=relu2, MUL_WEIGHT=weighted and not relu2,
            COMPUTE_DTYPE=_tl_dtype(compute), DOT_PRECISION=precision,
            BLOCK_M=config.BLOCK_M, BLOCK_N=tile.BLOCK_N, BLOCK_K=tile.BLOCK_K, GROUP_M=tile.GROUP_M,
            num_warps=tile.num_warps, num_stages=tile.num_stages,
        )  # fmt: skip
    return y


def prefill_compute(x: torch.Tensor, up_bank: torch.Tensor, down_bank: torch.Tensor) -> tuple[torch.dtype, str]:
    """The dtype the prefill path feeds ``tl.dot`` (and stores the intermediate ``h`` in) and the dot's input
    precision: the banks' 16-bit dtype on a GPU; fp32 (``"ieee"``) when any operand is fp32, and always in the
    interpreter, which computes bf16 wrongly."""
    if interpret_mode() or torch.float32 in (x.dtype, up_bank.dtype, down_bank.dtype):
        return torch.float32, "ieee"
    return up_bank.dtype, "tf32"


def intermediate_dtype(
    x: torch.Tensor,
    up_bank: torch.Tensor,
    down_bank: torch.Tensor,
    slot_of_expert: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    path: str = "auto",
    backend: str | None = None,
) -> torch.dtype:
    """The dtype :func:`moe_gather_gemm`, given these arguments, keeps the intermediate ``relu(up @ x)^2`` in.

    fp32 (the torch reference, the decode path, fp32 operands), except on the prefill path of the Triton
    kernels with 16-bit banks on a GPU: there ``h`` is rounded to the banks' dtype (to nearest even), the
    operand type ``tl.dot`` takes for the down projection. A caller that computes some of a call's pairs
    elsewhere rounds its intermediate the same way, so that every pair of the call follows the same
    arithmetic (the offload runtime's CPU experts, ``residency.runtime.cpu_experts``).
    """
    if not use_triton(backend, x, up_bank, down_bank, slot_of_expert, topk_ids):
        return torch.float32
    path, _ = _choose_path(x, up_bank, slot_of_expert, topk_ids, path, None)
    return torch.float32 if path == "decode" else prefill_compute(x, up_bank, down_bank)[0]


def reduce_pairs(
    pair_out: torch.Tensor,
    slot_of_expert: torch.Tensor,
    topk_ids: torch.Tensor,
    skip: torch.Tensor | None,
    out: torch.Tensor,
) -> None:
    """``out[t] = sum_j pair_out[t * k + j]`` over the computed pairs, in order j = 0..k-1."""
    num_tokens, top_k = topk_ids.shape
    latent = out.shape[1]
    from .gather_gemm_kernels import moe_reduce_kernel

    block_n = min(REDUCE_BLOCK_N, next_power_of_2(latent))
    moe_reduce_kernel[(num_tokens, cdiv(latent, block_n))](
        pair_out, out, topk_ids, _skip_arg(skip, topk_ids), slot_of_expert,
        latent, slot_of_expert.shape[0], pair_out.stride(0), out.stride(0), out.stride(1),
        TOP_K=top_k, HAS_SKIP=skip is not None, BLOCK_N=block_n,
    )  # fmt: skip


def _skip_arg(skip: torch.Tensor | None, placeholder: torch.Tensor) -> torch.Tensor:
    # kernels read the mask as bytes; without a mask they get an unused pointer
    return placeholder if skip is None else skip.view(torch.uint8)


def _tl_dtype(dtype: torch.dtype):
    import triton.language as tl

    return {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]


