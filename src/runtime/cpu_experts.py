"""Routed experts computed on the CPU straight from host memory (numba), for misses the plan serves there.

For each routed pair ``p`` = (token ``t``, expert ``e``, weight ``w``)::

    out[t] += sum_p  w * down[e] @ relu(up[e] @ x[t]) ** 2        (fp32 accumulation)

with ``up`` ``[E, I, L]`` and ``down`` ``[E, L, I]`` banks read in place: BF16 weights as their raw
16 bits (``uint16`` or ``int16`` arrays, e.g. ``tensor.view(torch.int16).numpy()``; numba has no
bf16, so a weight is widened by shifting its bits into the high half of an fp32) or fp32 weights.
``x`` and ``out`` are fp32 ``[T, L]``. The semantics are those of
:func:`residency.kernels.moe.reference.moe_gather_gemm_reference` (relu², routing weight, sum);
:func:`cpu_moe_reference` runs that reference on the same inputs.

How the work is split (one compiled call; two parallel regions, so two thread wake-ups):

1. pairs are grouped by expert (stable), so each weight row is read from memory once per call
   and reused from L1 for every token routed to that expert;
2. up projection, parallel over (expert, block of ``I`` rows): ``h[p] = relu(up[e] @ x[t]) ** 2``;
3. down projection, parallel over (expert, block of ``L`` rows): ``y[p] = down[e] @ h[p]``;
4. serially (``L`` multiply-adds per pair against ``2 I L`` to compute it): the optional per-pair
   norms ``||y[p]||`` (unweighted, for the profiler), then ``out[t] += sum_p w_p * y[p]`` over the
   token's pairs in the order given.

Every output element is computed by one thread in a fixed order, so results are bit-identical
across runs and numba thread counts. The row dot products are explicit 16-lane fp32 vectors
(:data:`LANES`, four accumulators, then a fixed pairwise tree), emitted as LLVM vector IR: numba
does not vectorise a float reduction without ``fastmath`` (which would let LLVM pick the order),
and its SLP vectoriser is off. Lane-wise IEEE ops give the same bits on AVX-512, AVX2 or SSE.

Measured and not kept (AMD EPYC, AVX-512; docs/benchmarks/cpu_experts.md): fused multiply-adds,
a widening by one shift or mask per 16 weights (activations in an even/odd order), and four rows
per activation load each made the loop faster on cache-resident weights (34 -> 47 GB/s on one
core) but slower from memory (24 -> 13-19 GB/s): four interleaved 2 KB row streams defeat the
hardware prefetcher, and the other two lost for reasons not found. Weights come from memory here,
so the plain loop stays; re-measure before changing it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numba
import numpy as np
import torch
from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic

from .control import PAIR_FLAT, PAIR_ROW, PAIR_ROWS, PAIR_TOKEN
from .jit import njit

__all__ = [
    "LANES",
    "bank_view",
    "cpu_moe",
    "cpu_moe_prepared",
    "prepare_banks",
    "PreparedBanks",
    "cpu_moe_reference",
    "measure_throughput",
    "random_bf16_bits",
    "rounding_code",
    "step_bytes",
]

#: fp32 lanes of one vector accumulator in the row dot products.
LANES = 16
_UNROLL = 4  # independent vector accumulators (hides the add latency)
#: Weight bytes one parallel task reads per projection (a block of rows of one expert).
_TASK_BYTES = 64 * 1024
#: How the kernels round the intermediate ``relu(up @ x)^2`` (see :func:`rounding_code`).
ROUND_NONE, ROUND_BF16, ROUND_FP16 = 0, 1, 2


def rounding_code(dtype: torch.dtype | None) -> int:
    """The kernels' code for rounding the intermediate to ``dtype``: what a GPU kernel that keeps it in 16 bits
    does (:func:`residency.kernels.moe.gather_gemm.intermediate_dtype`); None or fp32: kept in fp32."""
    codes = {None: ROUND_NONE, torch.float32: ROUND_NONE, torch.bfloat16: ROUND_BF16, torch.float16: ROUND_FP16}
    if dtype not in codes:
        raise ValueError(f"the intermediate can be rounded to bfloat16 or float16 (or kept in float32), got {dtype}")
    return codes[dtype]


@intrinsic
def _float_bits(typingctx: Any, v: Any) -> Any:
    """The bits of fp32 ``v`` as an int32."""
    if v != types.float32:
        return None

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        return builder.bitcast(args[0], ir.IntType(32))

    return types.int32(types.float32), codegen


@intrinsic
def _bits_float(typingctx: Any, b: Any) -> Any:
    """The fp32 whose bits are int32 ``b``."""
    if b != types.int32:
        return None

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


@njit(inline="always")
def _round_mantissa(v: float, drop: int) -> float:
    """Finite fp32 ``v`` with its low ``drop`` mantissa bits rounded off, to nearest even (a carry moves the
    exponent, the largest values become infinite)."""
    b = np.int64(_float_bits(np.float32(v))) & 0xFFFFFFFF
    half = (np.int64(1) << (drop - 1)) - 1
    b = (b + half + ((b >> drop) & 1)) & ~((np.int64(1) << drop) - 1) & 0xFFFFFFFF
    return _bits_float(np.int32(b - (1 << 32) if b >= (1 << 31) else b))


@njit(inline="always")
def round_intermediate(v: float, code: int) -> float:
    """fp32 ``v`` rounded to bf16 (``code`` :data:`ROUND_BF16`) or fp16 (:data:`ROUND_FP16`), to nearest even, and
    widened back; unchanged for :data:`ROUND_NONE`. NaN stays NaN; values past the 16-bit range become infinite,
    fp16 subnormals keep their 2**-24 steps: what ``torch``'s and Triton's conversions give. Integer and fp32
    operations only (no half-precision instructions, which a target without F16C lacks)."""
    v = np.float32(v)
    if code == ROUND_NONE or v != v:
        return v
    if code == ROUND_BF16:
        return _round_mantissa(v, 16)
    a = abs(v)
    if a < np.float32(2.0**-14):  # fp16 subnormal: steps of 2**-24, rounded to even by one fp32 addition
        steps = (a * np.float32(2.0**24) + np.float32(2.0**23)) - np.float32(2.0**23)
        r = steps * np.float32(2.0**-24)
    else:
        r = _round_mantissa(a, 13)
        if r > np.float32(65504.0):
            r = np.float32(np.inf)
    return -r if _float_bits(v) < 0 else r  # (the sign bit: -0.0 stays -0.0)


@intrinsic
def _row_dot(typingctx: Any, w: Any, w_off: Any, v: Any, v_off: Any, n: Any) -> Any:
    """``sum_j float(w.flat[w_off + j]) * v.flat[v_off + j]`` for ``j < n``, in a fixed order.

    ``w``: uint16 (bf16 bits) or float32 array; ``v``: float32 array; offsets in elements from the
    arrays' data pointers (the caller guarantees the range is inside the array). The first
    ``n - n % 16`` terms go to 16-lane accumulators (four of them over 64-term steps, then the
    first one over 16-term steps), summed as ``(a0 + a1) + (a2 + a3)`` and then by halving the
    vector; the tail is summed in order and added last.
    """
    if not (isinstance(w, types.Array) and w.dtype in (types.uint16, types.float32)):
        return None
    if not (isinstance(v, types.Array) and v.dtype == types.float32):
        return None
    if not all(isinstance(a, types.Integer) for a in (w_off, v_off, n)):
        return None
    bf16 = w.dtype == types.uint16
    sig = types.float32(w, types.intp, v, types.intp, types.intp)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        w_arr, w_start, v_arr, v_start, count = args
        f32, i32 = ir.FloatType(), ir.IntType(32)
        intp = context.get_value_type(types.intp)
        vec_f32 = ir.VectorType(f32, LANES)
        w_base = builder.gep(context.make_array(signature.args[0])(context, builder, w_arr).data, [w_start])
        v_base = builder.gep(context.make_array(signature.args[2])(context, builder, v_arr).data, [v_start])

        def const(value: int) -> ir.Constant:
            return ir.Constant(intp, value)

        def widen(bits: Any) -> Any:  # bf16 bits (i16 or <16 x i16>) -> fp32
            wide = ir.VectorType(i32, LANES) if isinstance(bits.type, ir.VectorType) else i32
            shifted = builder.shl(builder.zext(bits, wide), ir.Constant(wide, 16))
            return builder.bitcast(shifted, vec_f32 if isinstance(wide, ir.VectorType) else f32)

        def load_w(j: Any, vector: bool) -> Any:
            ptr = builder.gep(w_base, [j])
            if vector:
                elem = ir.IntType(16) if bf16 else f32
                ptr = builder.bitcast(ptr, ir.VectorType(elem, LANES).as_pointer())
            value = builder.load(ptr, align=2 if bf16 else 4)
            return widen(value) if bf16 else value

        def load_v(j: Any, vector: bool) -> Any:
            ptr = builder.gep(v_base, [j])
            if vector:
                ptr = builder.bitcast(ptr, vec_f32.as_pointer())
            return builder.load(ptr, align=4)

        def accumulate(acc: Any, j: Any, vector: bool) -> None:
            builder.store(builder.fadd(builder.load(acc), builder.fmul(load_w(j, vector), load_v(j, vector))), acc)

        accs = [cgutils.alloca_once_value(builder, ir.Constant(vec_f32, [0.0] * LANES)) for _ in range(_UNROLL)]
        step = _UNROLL * LANES
        n_unrolled = builder.mul(builder.sdiv(count, const(step)), const(step))
        n_vector = builder.mul(builder.sdiv(count, const(LANES)), const(LANES))
        with cgutils.for_range_slice(builder, const(0), n_unrolled, const(step)) as (j, _):
            for a, acc in enumerate(accs):
                accumulate(acc, builder.add(j, const(a * LANES)), True)
        with cgutils.for_range_slice(builder, n_unrolled, n_vector, const(LANES)) as (j, _):
            accumulate(accs[0], j, True)
        tail = cgutils.alloca_once_value(builder, ir.Constant(f32, 0.0))
        with cgutils.for_range_slice(builder, n_vector, count, const(1)) as (j, _):
            accumulate(tail, j, False)

        loaded = [builder.load(acc) for acc in accs]
        while len(loaded) > 1:
            loaded = [builder.fadd(loaded[i], loaded[i + 1]) for i in range(0, len(loaded), 2)]
        total, width = loaded[0], LANES
        while width > 1:
            width //= 2
            low = builder.shuffle_vector(total, total, ir.Constant(ir.VectorType(i32, width), list(range(width))))
            high = builder.shuffle_vector(total, total,
                                          ir.Constant(ir.VectorType(i32, width), list(range(width, 2 * width))))
            total = builder.fadd(low, high)
        return builder.fadd(builder.extract_element(total, ir.Constant(i32, 0)), builder.load(tail))

    return sig, codegen


@njit
def _group_starts(keys: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Start offsets (plus the end) of the runs of equal ``keys[order]``."""
    n = order.shape[0]
    starts = np.empty(n + 1, np.int64)
    count = 0
    for q in range(n):
        if q == 0 or keys[order[q]] != keys[order[q - 1]]:
            starts[count] = q
            count += 1
    starts[count] = n
    return starts[:count + 1]


@njit
def _add_pairs_by_token(tok: np.ndarray, wgt: np.ndarray, y: np.ndarray, out: np.ndarray) -> None:
    """``out[t] += sum_p wgt[p] * y[p]`` over each token's pairs, in the pairs' given order (fp32)."""
    latent = y.shape[1]
    by_token = np.argsort(tok, kind="mergesort")
    token_starts = _group_starts(tok, by_token)
    acc = np.empty(latent, np.float32)
    for g in range(token_starts.shape[0] - 1):
        acc[:] = 0.0
        for q in range(token_starts[g], token_starts[g + 1]):
            p = by_token[q]
            w = wgt[p]
            for l in range(latent):
                acc[l] += w * y[p, l]
        t = tok[by_token[token_starts[g]]]
        for l in range(latent):
            out[t, l] += acc[l]


@njit
def _pair_lists(pairs: np.ndarray, num_pairs: int, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The kernels' pair inputs as per-pair arrays: tokens and expert rows (views of ``pairs``) and weights.

    ``pairs``: int64 ``[PAIR_ROWS, >= num_pairs]`` with the rows of the runtime's CPU pair lists
    (:data:`~residency.runtime.control.PAIR_TOKEN` .. ``PAIR_FLAT``: token, top-k position, expert or
    record, flat index of the pair's weight in ``weights``); ``weights``: fp32 2-D, read at those flat
    indices (row-major). The runtime hands its workspace and the call's ``[T, k]`` weights as they are,
    so a layer call builds no per-pair array in Python.
    """
    tok = pairs[PAIR_TOKEN, :num_pairs]
    rec = pairs[PAIR_ROW, :num_pairs]
    cols = weights.shape[1]
    wgt = np.empty(num_pairs, np.float32)
    for p in range(num_pairs):
        f = pairs[PAIR_FLAT, p]
        wgt[p] = weights[f // cols, f % cols]
    return tok, rec, wgt


def pair_array(pairs_token: np.ndarray, pairs_expert: np.ndarray) -> np.ndarray:
    """The ``pairs`` argument of the kernels for plain per-pair lists (weights then ``[1, P]``, in pair order)."""
    n = pairs_token.shape[0]
    pairs = np.zeros((PAIR_ROWS, n), np.int64)
    pairs[PAIR_TOKEN], pairs[PAIR_ROW], pairs[PAIR_FLAT] = pairs_token, pairs_expert, np.arange(n)
    return pairs


@njit(parallel=True, fastmath=False)
def _cpu_moe_kernel(x: np.ndarray, up: np.ndarray, up_e: int, up_i: int, down: np.ndarray, down_e: int, down_l: int,
                    inter: int, pairs: np.ndarray, num_pairs: int, weights: np.ndarray, out: np.ndarray,
                    norms: np.ndarray, rows_up: int, rows_down: int, h_round: int) -> None:
    """The phases of the module docstring. Inputs are validated by :func:`cpu_moe`.

    x, out: [T, L] fp32 C-contiguous. up, down: 1-D spans (uint16 or fp32) of the banks, expert
    ``e``'s row ``i`` of up at ``e * up_e + i * up_i`` (``L`` elements), its row ``l`` of down at
    ``e * down_e + l * down_l`` (``inter`` elements). pairs, num_pairs, weights: the pairs, see
    :func:`_pair_lists`; norms: [num_pairs] fp32 or empty (not wanted). h_round: :func:`rounding_code` of
    the intermediate.
    """
    tok, exp, wgt = _pair_lists(pairs, num_pairs, weights)
    latent = x.shape[1]

    by_expert = np.argsort(exp, kind="mergesort")  # stable: pairs of one expert in input order
    expert_starts = _group_starts(exp, by_expert)
    num_experts = expert_starts.shape[0] - 1

    h = np.empty((num_pairs, inter), np.float32)
    blocks_up = (inter + rows_up - 1) // rows_up
    for task in numba.prange(num_experts * blocks_up):
        g, block = task // blocks_up, task % blocks_up
        e = exp[by_expert[expert_starts[g]]]
        for i in range(block * rows_up, min(inter, (block + 1) * rows_up)):
            row = e * up_e + i * up_i
            for q in range(expert_starts[g], expert_starts[g + 1]):
                p = by_expert[q]
                a = _row_dot(up, row, x, tok[p] * latent, latent)
                if a < 0:  # relu that keeps NaN, like torch.relu
                    a = np.float32(0.0)
                h[p, i] = round_intermediate(a * a, h_round)

    y = np.empty((num_pairs, latent), np.float32)
    blocks_down = (latent + rows_down - 1) // rows_down
    for task in numba.prange(num_experts * blocks_down):
        g, block = task // blocks_down, task % blocks_down
        e = exp[by_expert[expert_starts[g]]]
        for l in range(block * rows_down, min(latent, (block + 1) * rows_down)):
            row = e * down_e + l * down_l
            for q in range(expert_starts[g], expert_starts[g + 1]):
                p = by_expert[q]
                y[p, l] = _row_dot(down, row, h, p * inter, inter)

    # Serial from here: L multiply-adds per pair, against 2 I L for computing it.
    if norms.shape[0] == num_pairs:
        for p in range(num_pairs):
            norms[p] = np.sqrt(_row_dot(y, p * latent, y, p * latent, latent))
    _add_pairs_by_token(tok, wgt, y, out)


def bank_view(bank: np.ndarray | torch.Tensor) -> np.ndarray:
    """A numpy view (no copy) of a bank the kernel reads: bf16 as uint16 bits, fp32 as is.

    Accepts numpy uint16/int16/float32 arrays and CPU torch bfloat16/int16/uint16/float32 tensors.
    """
    if isinstance(bank, torch.Tensor):
        if bank.device.type != "cpu":
            raise ValueError(f"expert banks must be in host memory, got a tensor on {bank.device}")
        if bank.dtype in (torch.bfloat16, torch.int16, torch.uint16):
            bank = bank.view(torch.int16)
        elif bank.dtype != torch.float32:
            raise ValueError(f"expert banks must be bfloat16 or float32, got {bank.dtype}")
        bank = bank.detach().numpy()
    if not isinstance(bank, np.ndarray):
        raise ValueError(f"expert banks must be numpy arrays or torch tensors, got {type(bank).__name__}")
    if bank.dtype in (np.int16, np.uint16):
        return bank.view(np.uint16)
    if bank.dtype == np.float32:
        return bank
    raise ValueError(f"expert banks must hold bf16 bits (uint16/int16) or float32, got {bank.dtype}")


def _as_array(a: Any, name: str) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        if a.device.type != "cpu":
            raise ValueError(f"{name} must be in host memory, got a tensor on {a.device}")
        return a.detach().numpy()
    if isinstance(a, np.ndarray):
        return a
    raise ValueError(f"{name} must be a numpy array or a CPU torch tensor, got {type(a).__name__}")


def _check_activation(a: Any, name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
    a = _as_array(a, name)
    if a.ndim != 2 or a.dtype != np.float32 or not a.flags.c_contiguous:
        raise ValueError(f"{name} must be a C-contiguous float32 [tokens, latent] array, got "
                         f"{a.shape} {a.dtype}{'' if a.flags.c_contiguous else ' (not contiguous)'}")
    if shape is not None and a.shape != shape:
        raise ValueError(f"{name} must match x's shape {shape}, got {a.shape}")
    return a


def _check_bank(bank: Any, name: str, expected: tuple[int | None, ...]) -> np.ndarray:
    bank = bank_view(bank)
    labels = ("experts", "I", "L") if name.startswith("up") else ("experts", "L", "I")
    want = "[" + ", ".join(lab if d is None else f"{lab}={d}" for lab, d in zip(labels, expected)) + "]"
    if bank.ndim != 3 or any(d is not None and d != s for d, s in zip(expected, bank.shape)) or 0 in bank.shape:
        raise ValueError(f"{name} must be a non-empty {want} array (each expert's matrix), got {bank.shape}")
    item = bank.itemsize
    if bank.strides[2] != item or any(s < 0 or s % item for s in bank.strides[:2]):
        raise ValueError(f"{name}'s rows must be contiguous (unit stride along the last axis, non-negative strides), "
                         f"got strides {bank.strides}")
    return bank


def _check_pairs(tokens: Any, experts: Any, weights: Any, num_tokens: int,
                 num_experts: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    tokens, experts, weights = (_as_array(a, n) for a, n in
                                ((tokens, "pairs_token"), (experts, "pairs_expert"), (weights, "pairs_weight")))
    for a, n in ((tokens, "pairs_token"), (experts, "pairs_expert")):
        if a.ndim != 1 or a.dtype.kind not in "iu":
            raise ValueError(f"{n} must be a 1-D integer array, got {a.shape} {a.dtype}")
    if weights.ndim != 1 or weights.dtype.kind != "f":
        raise ValueError(f"pairs_weight must be a 1-D float array, got {weights.shape} {weights.dtype}")
    if not len(tokens) == len(experts) == len(weights):
        raise ValueError(f"pairs_token, pairs_expert and pairs_weight must have one entry per pair, got lengths "
                         f"{len(tokens)}, {len(experts)}, {len(weights)}")
    for a, n, bound, what in ((tokens, "pairs_token", num_tokens, "tokens in x"),
                              (experts, "pairs_expert", num_experts, "experts in the banks")):
        if len(a) and (a.min() < 0 or a.max() >= bound):
            i = int(np.flatnonzero((a < 0) | (a >= bound))[0])
            raise ValueError(f"{n}[{i}] = {a[i]} is out of range: there are {bound} {what}")
    # Fresh copies (P is small): always the same array types, so no extra compilations.
    return np.array(tokens, dtype=np.int64), np.array(experts, dtype=np.int64), np.array(weights, dtype=np.float32)


def _span(bank: np.ndarray) -> tuple[np.ndarray, int, int]:
    """A 1-D view of the memory from a bank's first element to its last, and its expert and row strides.

    One compiled kernel then serves contiguous banks and views into per-expert records alike (the
    memory between records belongs to the same buffer; it is never read).
    """
    item = bank.itemsize
    e_stride, row_stride = bank.strides[0] // item, bank.strides[1] // item
    length = (bank.shape[0] - 1) * e_stride + (bank.shape[1] - 1) * row_stride + bank.shape[2]
    # Read-only: the kernel never writes them, and one array type means one compilation (x and out are passed
    # as the caller has them: writable, from the runtime).
    span = np.lib.stride_tricks.as_strided(bank, shape=(length,), strides=(item,), writeable=False)
    return span, e_stride, row_stride


def _rows_per_task(row_bytes: int, rows: int) -> int:
    return max(1, min(rows, _TASK_BYTES // max(1, row_bytes)))


def cpu_moe(x: Any, up_bank: Any, down_bank: Any, pairs_token: Any, pairs_expert: Any, pairs_weight: Any,
            out: Any, pair_norms: Any = None, *, intermediate: torch.dtype | None = None) -> np.ndarray:
    """Compute routed pairs on the CPU from host-memory banks and add them into ``out`` in place.

    Args:
        x: latent activations ``[T, L]`` float32, C-contiguous.
        up_bank: ``[E, I, L]``; down_bank: ``[E, L, I]``; both bf16 bits (uint16/int16, or torch
            bfloat16) or both float32; rows contiguous (any strides between rows and experts, so
            views into per-expert records work); read in place, never copied.
        pairs_token, pairs_expert: ``[P]`` integers, the token (row of ``x``) and expert of each pair.
        pairs_weight: ``[P]`` routing weights (float).
        out: ``[T, L]`` float32, C-contiguous; receives ``out[t] += sum_p w_p * y_p``. Rows of
            tokens without pairs are not touched.
        pair_norms: optional ``[P]`` float32; receives ``||y_p||`` (unweighted expert output).
        intermediate: round ``relu(up @ x)^2`` to this dtype (bf16 or fp16, to nearest even) before the
            down projection, as a GPU kernel that stores it in 16 bits does; None: kept in fp32.

    Returns ``out`` as the numpy array written (a view of a torch ``out``).
    """
    h_round = rounding_code(intermediate)
    x = _check_activation(x, "x")
    out = _check_activation(out, "out", x.shape)
    if not out.flags.writeable:
        raise ValueError("out must be writeable")
    num_tokens, latent = x.shape
    if latent == 0:
        raise ValueError("x must have a non-empty latent dimension")
    up = _check_bank(up_bank, "up_bank", (None, None, latent))
    inter = up.shape[1]
    down = _check_bank(down_bank, "down_bank", (up.shape[0], latent, inter))
    if up.dtype != down.dtype:
        raise ValueError(f"up_bank and down_bank must have the same dtype, got {up.dtype} and {down.dtype}")
    tokens, experts, weights = _check_pairs(pairs_token, pairs_expert, pairs_weight, num_tokens, up.shape[0])
    norms = np.empty(0, np.float32)
    if pair_norms is not None:
        norms = _as_array(pair_norms, "pair_norms")
        if norms.shape != (len(tokens),) or norms.dtype != np.float32 or not norms.flags.c_contiguous \
                or not norms.flags.writeable:
            raise ValueError(f"pair_norms must be a writeable contiguous float32 [{len(tokens)}] array (one per pair), "
                             f"got {norms.shape} {norms.dtype}")
    if len(tokens) == 0:
        return out
    cpu_moe_prepared(_prepared(up, down), x, tokens, experts, weights, out, norms, h_round)
    return out


@dataclass(frozen=True)
class PreparedBanks:
    """One layer's validated up / down banks as the kernel reads them (:func:`prepare_banks`)."""

    up: np.ndarray  # read-only 1-D span of the up bank
    up_expert_stride: int
    up_row_stride: int
    down: np.ndarray
    down_expert_stride: int
    down_row_stride: int
    num_experts: int
    inter: int
    latent: int
    up_rows_per_task: int
    down_rows_per_task: int

    @cached_property
    def kernel_args(self) -> tuple[tuple, tuple]:
        """The kernel's arguments from these banks, before and after the pair arguments (made once: a layer's
        banks serve every CPU part of the layer, and the runtime's call to the kernel is on the decode path)."""
        return ((self.up, self.up_expert_stride, self.up_row_stride, self.down, self.down_expert_stride,
                 self.down_row_stride, self.inter), (self.up_rows_per_task, self.down_rows_per_task))


def _prepared(up: np.ndarray, down: np.ndarray) -> PreparedBanks:
    inter, latent = up.shape[1], up.shape[2]
    (up_flat, up_e, up_i), (down_flat, down_e, down_l) = _span(up), _span(down)
    return PreparedBanks(up_flat, up_e, up_i, down_flat, down_e, down_l, up.shape[0], inter, latent,
                         _rows_per_task(latent * up.itemsize, inter), _rows_per_task(inter * down.itemsize, latent))


def prepare_banks(up_bank: Any, down_bank: Any) -> PreparedBanks:
    """Check ``up_bank [E, I, L]`` / ``down_bank [E, L, I]`` once (as :func:`cpu_moe` does every call) for
    repeated :func:`cpu_moe_prepared` calls: a store's buffers never change, and the checks cost about
    30 µs a call."""
    up = _check_bank(up_bank, "up_bank", (None, None, None))
    down = _check_bank(down_bank, "down_bank", (up.shape[0], up.shape[2], up.shape[1]))
    if up.dtype != down.dtype:
        raise ValueError(f"up_bank and down_bank must have the same dtype, got {up.dtype} and {down.dtype}")
    return _prepared(up, down)


def check_prepared_call(x: np.ndarray, out: np.ndarray, width: int, pairs_token: np.ndarray, pairs_row: np.ndarray,
                        pairs_weight: np.ndarray, pair_norms: np.ndarray | None) -> np.ndarray | None:
    """The cheap checks of a prepared CPU expert call (float and quantized): ``x`` / ``out`` C-contiguous
    float32 ``[T, width]``, pairs int64 / int64 / float32 of one length. Returns the norms array the
    kernels take (empty when not wanted), or None when there is no pair to compute."""
    if x.dtype != np.float32 or not x.flags.c_contiguous or x.ndim != 2 or x.shape[1] != width \
            or out.shape != x.shape or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"x and out must be C-contiguous float32 [tokens, {width}] arrays, got {x.shape} "
                         f"{x.dtype} and {out.shape} {out.dtype}")
    n = pairs_token.shape[0]
    if pairs_token.dtype != np.int64 or pairs_row.dtype != np.int64 or pairs_weight.dtype != np.float32 \
            or pairs_row.shape[0] != n or pairs_weight.shape[0] != n:
        raise ValueError("pairs must be int64 tokens, int64 experts (or records) and float32 weights of one length")
    if n == 0:
        return None
    return np.empty(0, np.float32) if pair_norms is None else pair_norms


def cpu_moe_prepared(banks: PreparedBanks, x: np.ndarray, pairs_token: np.ndarray, pairs_expert: np.ndarray,
                     pairs_weight: np.ndarray, out: np.ndarray, pair_norms: np.ndarray | None = None,
                     h_round: int = ROUND_NONE) -> None:
    """:func:`cpu_moe` on prepared banks, for a caller that built its inputs itself (the offload runtime);
    ``h_round``: :func:`rounding_code` of ``cpu_moe``'s ``intermediate``.

    Only cheap checks run: ``x`` / ``out`` C-contiguous float32 ``[T, latent]``, the pair arrays
    int64 / int64 / float32 of one length. Token and expert indices are *not* range-checked: the
    caller guarantees ``0 <= token < T`` and ``0 <= expert < num_experts``.
    """
    norms = check_prepared_call(x, out, banks.latent, pairs_token, pairs_expert, pairs_weight, pair_norms)
    if norms is not None:
        run_prepared(banks, x, pair_array(pairs_token, pairs_expert), pairs_token.shape[0], pairs_weight[None, :], out,
                     norms, h_round)


def run_prepared(banks: PreparedBanks, x: np.ndarray, pairs: np.ndarray, num_pairs: int, weights: np.ndarray,
                 out: np.ndarray, norms: np.ndarray, h_round: int = ROUND_NONE) -> None:
    """:func:`cpu_moe_prepared` without its checks, for the offload runtime, whose inputs have those types by
    construction (its latent and sum buffers, its pair workspace and the call's ``[T, k]`` weights, see
    :func:`_pair_lists`): at least one pair, ``norms`` empty when not wanted. Wrong types or shapes here read
    or write out of bounds."""
    head, tail = banks.kernel_args
    _cpu_moe_kernel(x, *head, pairs, num_pairs, weights, out, norms, *tail, h_round)


def _upcast(bank: np.ndarray) -> torch.Tensor:
    """fp32 torch copy of ``bank`` (bf16 bits widened exactly)."""
    if bank.dtype == np.uint16:
        return torch.from_numpy(np.ascontiguousarray(bank).view(np.int16)).view(torch.bfloat16).float()
    return torch.from_numpy(np.ascontiguousarray(bank)).clone()


def cpu_moe_reference(x: Any, up_bank: Any, down_bank: Any, pairs_token: Any, pairs_expert: Any, pairs_weight: Any,
                      out: Any, pair_norms: Any = None, *, intermediate: torch.dtype | None = None) -> np.ndarray:
    """:func:`cpu_moe` through the torch slot-bank reference (same arguments, same in-place effect).

    The experts used are widened to fp32 and put in a slot bank; each pair becomes one row of
    :func:`residency.kernels.moe.reference.moe_gather_gemm_reference` (top-1, its own copy of the
    token's activation), and the weighted rows are summed into their tokens in pair order.
    """
    from residency.kernels.moe.reference import moe_gather_gemm_reference

    x = _check_activation(x, "x")
    out = _check_activation(out, "out", x.shape)
    up = _check_bank(up_bank, "up_bank", (None, None, x.shape[1]))
    down = _check_bank(down_bank, "down_bank", (up.shape[0], x.shape[1], up.shape[1]))
    tokens, experts, weights = _check_pairs(pairs_token, pairs_expert, pairs_weight, x.shape[0], up.shape[0])
    if len(tokens) == 0:
        return out
    used = np.unique(experts)
    slot_of_expert = torch.full((up.shape[0],), -1, dtype=torch.int32)
    slot_of_expert[torch.from_numpy(used)] = torch.arange(len(used), dtype=torch.int32)
    norms = torch.zeros((len(tokens), 1), dtype=torch.float32)
    rows = moe_gather_gemm_reference(
        torch.from_numpy(x)[torch.from_numpy(tokens)], _upcast(up[used]), _upcast(down[used]), slot_of_expert,
        torch.from_numpy(experts)[:, None], torch.from_numpy(weights)[:, None], pair_norms=norms,
        intermediate=intermediate)
    total = torch.zeros(x.shape, dtype=torch.float32).index_add_(0, torch.from_numpy(tokens), rows)
    touched = np.unique(tokens)
    out[touched] += total.numpy()[touched]
    if pair_norms is not None:
        _as_array(pair_norms, "pair_norms")[:] = norms[:, 0].numpy()
    return out


def step_bytes(num_experts: int, latent: int = 1024, intermediate: int = 2688, itemsize: int = 2) -> int:
    """Weight bytes a step of ``num_experts`` distinct experts reads (up and down)."""
    return num_experts * 2 * latent * intermediate * itemsize


def random_bf16_bits(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Random BF16 weights as uint16 bits, magnitudes in [2**-7, 2**-6) with random signs.

    Generated as integers (no fp32 temporary of the bank's size); never NaN, Inf or subnormal,
    so the kernel's speed does not depend on the values.
    """
    bits = np.random.default_rng(seed).integers(0, 1 << 16, size=shape, dtype=np.uint16)
    return (bits & 0x807F) | 0x3C00  # keep sign and 7 mantissa bits; exponent 120


def measure_throughput(k: int = 22, *, latent: int = 1024, intermediate: int = 2688, bank_experts: int | None = None,
                       repeats: int = 5, threads: int | None = None, seed: int = 0) -> float:
    """This host's CPU expert throughput: GB/s (1e9 bytes) of BF16 weights a decode step of ``k`` experts processes.

    Allocates a bank of ``bank_experts`` (default ``max(2 k, 8)``) random BF16 experts of the
    given shape (Super's by default: 11 MB each, so 484 MB for k = 22); each step takes the next
    ``k`` experts of a rotation through the bank, so it reads weights at least ``bank_experts - k``
    experts' worth of other reads ago (assumed more than the last-level cache). Warms the kernel
    up once and returns the median over ``repeats`` steps of one token routed to ``k`` distinct
    experts, on ``threads`` numba threads (default: numba's current count; restored after).
    """
    if k < 1 or repeats < 1:
        raise ValueError(f"k and repeats must be at least 1, got k={k}, repeats={repeats}")
    n_bank = bank_experts if bank_experts is not None else max(2 * k, 8)
    if n_bank < k:
        raise ValueError(f"bank_experts ({n_bank}) must be at least k ({k})")
    up = random_bf16_bits((n_bank, intermediate, latent), seed)
    down = random_bf16_bits((n_bank, latent, intermediate), seed + 1)
    x = np.random.default_rng(seed).standard_normal((1, latent)).astype(np.float32)
    out = np.zeros_like(x)
    tokens = np.zeros(k, np.int64)
    weights = np.full(k, 1.0 / k, np.float32)
    order = np.random.default_rng(seed).permutation(n_bank)
    before = numba.get_num_threads()
    seconds = []
    try:
        if threads is not None:
            numba.set_num_threads(threads)
        for rep in range(repeats + 1):
            experts = np.take(order, np.arange(rep * k, (rep + 1) * k), mode="wrap")
            start = time.perf_counter()
            cpu_moe(x, up, down, tokens, experts, weights, out)
            if rep:  # the first step compiles or loads the kernel
                seconds.append(time.perf_counter() - start)
    finally:
        numba.set_num_threads(before)
    return step_bytes(k, latent, intermediate) / float(np.median(seconds)) / 1e9
