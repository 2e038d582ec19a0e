"""Quantized slot-bank MoE: NVFP4 / FP8 / W4A16 experts read from the bank and dequantized in registers.

:func:`moe_gather_gemm_quant` has the semantics of :func:`~residency.kernels.moe.gather_gemm.moe_gather_gemm`
(pairs, slot table, skip mask, -1 sentinels, NaN rows for active pairs without a slot when
unchecked, per-pair norms, fp32 workspace and the fixed-order reduction) with the up and down
banks given as :class:`~residency.kernels.moe.quant_formats.QuantWeights`, typically the
``up`` / ``down`` views of an :class:`~residency.kernels.moe.quant_formats.ExpertRecordLayout` bank
of records. Decode: one program per (pair, row tile) streams the expert's packed words once and
dequantizes them in registers (fp32 products and sums). Prefill: pairs grouped by expert
(``align.py``), each B tile dequantized in registers and fed to ``tl.dot`` in the compute dtype
(fp32 in the interpreter and for fp32 activations, bf16 for bf16 activations on a GPU) with fp32
accumulators; the tile holds values that dtype represents exactly (the per-tensor scale and W4A16
group scales are applied to the fp32 products), so only the intermediate ``h``, stored in the
compute dtype, is rounded (:func:`quant_intermediate_dtype`). On a GPU, W4A16 groups that no
power-of-two K tile of at least 16 divides (groups of 8, 12 ...) are dequantized in fp32 and
rounded to the compute dtype instead. W4A16 decode needs a group size divisible by 8 (or one
group per row); other group sizes run the prefill kernel for every call.

:func:`quant_linear` is one quantized Linear (``y = x @ W.T + b``) through the same kernels: the
dense modules of a checkpoint that stay quantized in memory (FP8 Mamba projections, shared
experts ...) use it on a GPU.
"""

from __future__ import annotations

import os

import torch

from .._dispatch import cdiv, interpret_mode, use_triton
from .align import align_pairs
from .gather_gemm import CHECK_ENV, MIN_DOT_BLOCK, PATHS, _tl_dtype, finish_pairs
from .quant_formats import QuantWeights
from .quant_reference import check_quant_inputs, moe_gather_gemm_quant_reference, quant_linear_reference
from .reference import resolve_slots
from .tuning import MoeConfig, table_for

__all__ = ["moe_gather_gemm_quant", "quant_linear", "quant_decode_pairs", "quant_prefill_pairs",
           "quant_intermediate_dtype"]

_FORMAT_ID = {"nvfp4": 0, "fp8": 1, "w4a16": 2}
_PACK = {"nvfp4": 2, "fp8": 1, "w4a16": 8}


def moe_gather_gemm_quant(
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
    path: str = "auto",
    backend: str | None = None,
    config: MoeConfig | None = None,
    check: bool | None = None,
) -> torch.Tensor:
    """``out[t] = sum_j w[t, j] * down[s] @ relu(up[s] @ x[t])^2`` with quantized ``up`` / ``down`` slots.

    Args:
        x: latent activations ``[T, L]``.
        up: ``[slots, I, L]`` quantized up projections; down: ``[slots, L, I]``, same format.
        slot_of_expert, topk_ids, topk_weights, skip, out, pair_norms, path, backend, config,
        check: as :func:`~residency.kernels.moe.gather_gemm.moe_gather_gemm` (the tuning table is
        looked up with the format's name in place of the dtype, e.g. ``moe_L1024_I2688_nvfp4_<GPU>.json``).

    Returns:
        ``[T, L]`` in x's dtype (or ``out``'s), fp32-accumulated.
    """
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    if not use_triton(backend, x, up.data, down.data, slot_of_expert, topk_ids, topk_weights):
        return moe_gather_gemm_quant_reference(
            x, up, down, slot_of_expert, topk_ids, topk_weights, skip, out=out, pair_norms=pair_norms
        )
    num_tokens, *_ = check_quant_inputs(
        x, up, down, slot_of_expert, topk_ids, topk_weights, skip, out, pair_norms
    )
    if check is None:
        check = not x.is_cuda or os.environ.get(CHECK_ENV) == "1"
    if check:
        resolve_slots(slot_of_expert, topk_ids, skip)
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if num_tokens == 0:
        return out
    path, config = _choose_path(x, up, down, slot_of_expert, topk_ids, path, config)
    topk_ids = topk_ids.contiguous()
    topk_weights = topk_weights.contiguous()
    skip = None if skip is None else skip.contiguous()
    pairs = quant_decode_pairs if path == "decode" else quant_prefill_pairs
    weighted = pair_norms is None
    pair_out = pairs(x, up, down, slot_of_expert, topk_ids, topk_weights, skip, config, weighted)
    return finish_pairs(pair_out, slot_of_expert, topk_ids, topk_weights, skip, pair_norms, out)


def _choose_path(x: torch.Tensor, up: QuantWeights, down: QuantWeights, slot_of_expert: torch.Tensor,
                 topk_ids: torch.Tensor, path: str, config: MoeConfig | None) -> tuple[str, MoeConfig]:
    """A call's path and tiles, as the float kernel's ``_choose_path`` (the table looked up by
    format); banks the decode kernel cannot read (:func:`decode_supported`) take the prefill path and its tiles."""
    table = table_for(x.device, x.shape[1], up.n, up.spec.format) if path == "auto" or config is None else None
    if path == "auto":
        path = table.choose_path(topk_ids.shape[0], topk_ids.shape[1], slot_of_expert.shape[0])
    if path == "decode" and not decode_supported(up, down):
        path = "prefill"
    return path, config or table.config(path, topk_ids.shape[0])


def decode_supported(*weights: QuantWeights) -> bool:
    """The decode kernel reads whole words per scale group: W4A16 groups must be a multiple of 8 inputs."""
    for w in weights:
        s = w.spec
        if s.format == "w4a16" and s.group_size is not None and s.group_size % 8 and s.group_size < w.k:
            return False
    return True


def _group_words(w: QuantWeights) -> int:
    """Words of ``data`` per scale column (decode kernel)."""
    s = w.spec
    words = w.data.shape[2]
    if s.format == "nvfp4":
        return 8  # 16 inputs, two per byte
    if s.format == "fp8":
        return words  # no scale groups
    if s.group_size is None or s.group_size >= w.k:
        return words
    return s.group_size // 8


def _operands(w: QuantWeights) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, ...]]:
    """(data, scale, scale2, zero) as the kernels read them (fp8 bytes as uint8; absent ones a
    placeholder) and their slot / row strides."""
    data = w.data.view(torch.uint8) if w.data.dtype == torch.float8_e4m3fn else w.data
    scale = w.scale if w.scale is not None else data
    if scale.dtype == torch.float8_e4m3fn:
        scale = scale.view(torch.uint8)
    scale2 = w.scale2 if w.scale2 is not None else data
    zero = w.zero if w.zero is not None else data
    strides = (data.stride(0), data.stride(1), scale.stride(0), scale.stride(1), scale2.stride(0),
               zero.stride(0), zero.stride(1))
    return data, scale, scale2, zero, strides


def _decode_tile(block_k: int, pack: int) -> int:
    return max(1, block_k // pack)


def quant_decode_pairs(
    x: torch.Tensor,
    up: QuantWeights,
    down: QuantWeights,
    slot_of_expert: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    skip: torch.Tensor | None,
    config: MoeConfig,
    weighted: bool = True,
) -> torch.Tensor:
    """Expert outputs ``[T * k, L]`` fp32 of the computed pairs, one program per pair and tile."""
    num_pairs, top_k = topk_ids.numel(), topk_ids.shape[1]
    latent, inter = x.shape[1], up.n
    h = torch.empty(num_pairs, inter, dtype=torch.float32, device=x.device)  # [P, I]
    y = torch.empty(num_pairs, latent, dtype=torch.float32, device=x.device)  # [P, L]
    skip_arg = topk_ids if skip is None else skip.view(torch.uint8)
    pair_args = (topk_ids, skip_arg, slot_of_expert, topk_weights, slot_of_expert.shape[0])
    for a, row_div, w, c, relu2, tile in ((x, top_k, up, h, True, config.up), (h, 1, down, y, False, config.down)):
        _launch_decode(a, row_div, w, c, pair_args, relu2, weighted and not relu2, skip is not None, tile)
    return y


def _launch_decode(a, row_div, w: QuantWeights, c, pair_args, relu2, mul_weight, has_skip, tile) -> None:
    from .quant_gather_gemm_kernels import moe_quant_gemv_decode_kernel

    fmt = w.spec.format
    data, scale, scale2, zero, st = _operands(w)
    num_pairs = pair_args[0].numel()
    moe_quant_gemv_decode_kernel[(num_pairs, cdiv(w.n, tile.BLOCK_N))](
        a, data, scale, scale2, zero, c, *pair_args, w.n, w.k, data.shape[2], _group_words(w),
        a.stride(0), a.stride(1), *st, c.stride(0),
        A_ROW_DIV=row_div, HAS_SKIP=has_skip, RELU2=relu2, MUL_WEIGHT=mul_weight, FORMAT=_FORMAT_ID[fmt],
        PACK=_PACK[fmt], SYMMETRIC=w.spec.symmetric, BLOCK_N=tile.BLOCK_N,
        BLOCK_W=_decode_tile(tile.BLOCK_K, _PACK[fmt]), num_warps=tile.num_warps, num_stages=tile.num_stages,
    )  # fmt: skip


def quant_prefill_pairs(
    x: torch.Tensor,
    up: QuantWeights,
    down: QuantWeights,
    slot_of_expert: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    skip: torch.Tensor | None,
    config: MoeConfig,
    weighted: bool = True,
) -> torch.Tensor:
    """Expert outputs ``[T * k, L]`` fp32 of the computed pairs, by expert-grouped GEMMs."""
    num_pairs, top_k = topk_ids.numel(), topk_ids.shape[1]
    latent, inter = x.shape[1], up.n
    aligned = align_pairs(topk_ids, slot_of_expert, config.BLOCK_M, skip)
    compute, precision = _compute(x)
    h = torch.empty(num_pairs, inter, dtype=compute, device=x.device)  # [P, I]
    y = torch.empty(num_pairs, latent, dtype=torch.float32, device=x.device)  # [P, L]
    for a, row_div, w, c, relu2, tile in ((x, top_k, up, h, True, config.up), (h, 1, down, y, False, config.down)):
        _launch_prefill(a, row_div, w, c, aligned, topk_weights, num_pairs, relu2, weighted and not relu2,
                        compute, precision, config.BLOCK_M, tile)
    return y


def quant_intermediate_dtype(
    x: torch.Tensor,
    up: QuantWeights,
    down: QuantWeights,
    slot_of_expert: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    path: str = "auto",
    backend: str | None = None,
) -> torch.dtype:
    """The dtype :func:`moe_gather_gemm_quant`, given these arguments, keeps ``relu(up @ x)^2`` in: fp32, except
    on the prefill path on a GPU with 16-bit activations, where it is their dtype (see
    :func:`~residency.kernels.moe.gather_gemm.intermediate_dtype`). Rounding ``h`` alike is all a caller needs
    to follow the kernel's arithmetic, except for W4A16 groups no K tile of at least 16 divides (8, 12 ...),
    whose weights the GPU's prefill path also rounds to the 16-bit dtype (``_scale_tiles``)."""
    if not use_triton(backend, x, up.data, down.data, slot_of_expert, topk_ids):
        return torch.float32
    path, _ = _choose_path(x, up, down, slot_of_expert, topk_ids, path, None)
    return torch.float32 if path == "decode" else _compute(x)[0]


def _compute(x: torch.Tensor) -> tuple[torch.dtype, str]:
    # the interpreter computes bf16 wrongly, so it always gets fp32 operands
    if interpret_mode() or x.dtype == torch.float32:
        return torch.float32, "ieee"
    return x.dtype, "tf32"


def _launch_prefill(a, row_div, w: QuantWeights, c, aligned, topk_weights, num_pairs, relu2, mul_weight, compute,
                    precision, block_m, tile) -> None:
    from .quant_gather_gemm_kernels import moe_quant_gemm_prefill_kernel

    tiles = (block_m, tile.BLOCK_N, tile.BLOCK_K)
    if not interpret_mode() and min(tiles) < MIN_DOT_BLOCK:
        raise ValueError(f"prefill block sizes must be >= {MIN_DOT_BLOCK} on GPU (tl.dot), got {tiles}")
    fmt = w.spec.format
    block_k, per_tile = _scale_tiles(w, tile.BLOCK_K)
    data, scale, scale2, zero, st = _operands(w)
    grid = (aligned.num_blocks * cdiv(w.n, tile.BLOCK_N),)
    moe_quant_gemm_prefill_kernel[grid](
        a, data, scale, scale2, zero, c, aligned.sorted_pair_ids, aligned.block_slot, aligned.num_rows,
        topk_weights, w.n, w.k, w.spec.group_of(w.k) if fmt != "fp8" else 1, num_pairs, aligned.num_blocks,
        a.stride(0), a.stride(1), *st, c.stride(0),
        A_ROW_DIV=row_div, RELU2=relu2, MUL_WEIGHT=mul_weight, FORMAT=_FORMAT_ID[fmt], PACK=_PACK[fmt],
        SYMMETRIC=w.spec.symmetric, COMPUTE_DTYPE=_tl_dtype(compute), DOT_PRECISION=precision,
        SCALE_PER_TILE=per_tile, BLOCK_M=block_m, BLOCK_N=tile.BLOCK_N, BLOCK_K=block_k, GROUP_M=tile.GROUP_M,
        num_warps=tile.num_warps, num_stages=tile.num_stages,
    )  # fmt: skip


def _scale_tiles(w: QuantWeights, block_k: int) -> tuple[int, bool]:
    """The prefill kernel's K tile for ``w`` and whether each tile lies in one W4A16 scale group (its scale then
    multiplies the tile's fp32 product, so the dot rounds no weight): the largest power of two up to
    ``block_k`` that divides the group size, as long as ``tl.dot`` takes it (the interpreter takes any).
    Other formats keep ``block_k``; their scales factor either way."""
    if w.spec.format != "w4a16":
        return block_k, False
    group = w.spec.group_of(w.k)
    if group >= w.k:  # one group per row: every tile lies in it
        return block_k, True
    tile = block_k
    while tile > 1 and group % tile:
        tile //= 2
    if interpret_mode() or tile >= MIN_DOT_BLOCK:
        return tile, True
    return block_k, False


def quant_linear(
    x: torch.Tensor,
    weight: QuantWeights,
    bias: torch.Tensor | None = None,
    *,
    backend: str | None = None,
    config: MoeConfig | None = None,
) -> torch.Tensor:
    """``x [..., K] @ W.T (+ bias)`` for one quantized weight (slot 0 of ``weight``), in x's dtype.

    Triton (CUDA, or the interpreter): the decode kernel for up to 4 rows, else the prefill GEMM,
    fp32 accumulation, no ReLU² and no routing weight; neither rounds the dequantized weight to x's
    dtype. Torch: :func:`quant_linear_reference` (dequantize, round to x's dtype, ``F.linear``), what a
    model dequantized at load computes; the two differ by at most that rounding of the weights.
    """
    if weight.k != x.shape[-1]:
        raise ValueError(f"x has {x.shape[-1]} features, the weight takes {weight.k}")
    if not use_triton(backend, x, weight.data):
        return quant_linear_reference(x, weight, bias)
    shape = x.shape
    rows = x.reshape(-1, shape[-1])
    num = rows.shape[0]
    out = torch.empty(num, weight.n, dtype=torch.float32, device=x.device)
    if num:
        one = weight.slots(slice(0, 1))
        ids = torch.zeros(num, 1, dtype=torch.int32, device=x.device)
        table = torch.zeros(1, dtype=torch.int32, device=x.device)
        ones = torch.ones(num, 1, dtype=torch.float32, device=x.device)
        tuning = table_for(x.device, weight.k, weight.n, weight.spec.format)
        if num <= 4 and decode_supported(one):
            cfg = config or tuning.config("decode", num)
            _launch_decode(rows, 1, one, out, (ids, ids, table, ones, 1), False, False, False, cfg.up)
        else:
            cfg = config or tuning.config("prefill", num)
            aligned = align_pairs(ids, table, cfg.BLOCK_M)
            compute, precision = _compute(rows)
            _launch_prefill(rows, 1, one, out, aligned, ones, num, False, False, compute, precision, cfg.BLOCK_M,
                            cfg.up)
    if bias is not None:
        out += bias.float()
    return out.to(x.dtype).reshape(*shape[:-1], weight.n)
