"""Quantized routed experts computed on the CPU straight from their packed host records (numba).

The quantized counterpart of :mod:`residency.runtime.cpu_experts`: for each routed pair ``p`` =
(token ``t``, record ``r``, weight ``w``)::

    out[t] += sum_p  w * down[r] @ relu(up[r] @ x[t]) ** 2        (fp32 accumulation)

where ``up[r]`` / ``down[r]`` are read from record ``r`` of a bank ``[R, record_bytes]`` uint8 laid
out by :class:`residency.kernels.moe.quant_formats.ExpertRecordLayout` (NVFP4, FP8 or W4A16), in
place: no dequantized copy of an expert is ever made. Each weight row is decoded once per call into
a row-sized fp32 scratch with exactly the reference's products (NVFP4 ``(e2m1 * e4m3_scale) *
global``, FP8 ``e4m3 * scale``, W4A16 ``(q - z) * scale``; E2M1, E4M3 and 16-bit scale values come
from small code tables, so every decoded weight is the reference's bits) and reused for every token
routed to that expert; dot products are the float kernel's fixed-order 16-lane fp32 vector dot
(``cpu_experts._row_dot``), so results do not depend on the numba thread count. Work split as in
``cpu_experts``: pairs grouped by record (stable), the up projection parallel over (record, block
of ``I`` rows), the down projection over (record, block of ``L`` rows), then norms and the
weighted sum per token, serially, in pair order.

Measured on the 2-core development VM (Super's shapes, k = 22, one token): 2.5 GB/s of NVFP4
records, 4.2 GB/s FP8, 1.2 GB/s W4A16 g128 (``measure_quant_throughput``); the float kernel reads
26.5 GB/s of BF16. The per-weight decode is scalar; vectorising it is the next step.

:func:`cpu_moe_quant_reference` computes the same through the torch reference
(:func:`residency.kernels.moe.quant_reference.moe_gather_gemm_quant_reference`).
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np
import torch

from ..kernels.moe.quant_formats import E2M1_VALUES, ExpertRecordLayout

# the float CPU kernel's fixed-order 16-lane fp32 dot product, run grouping, token sum and input reading
from .cpu_experts import _add_pairs_by_token, _as_array, _group_starts, _row_dot

__all__ = ["cpu_moe_quant", "cpu_moe_quant_reference", "code_tables", "measure_quant_throughput"]

_FORMAT_ID = {"nvfp4": 0, "fp8": 1, "w4a16": 2}
_TASK_BYTES = 64 * 1024


def code_tables(scale_dtype: torch.dtype = torch.bfloat16) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """fp32 values of every E2M1 code ``[16]``, every E4M3 byte ``[256]`` and every 16-bit scale ``[65536]``
    (bf16 or fp16 bits; zeros for fp32 scales, which are read directly)."""
    e2m1 = np.array(E2M1_VALUES, dtype=np.float32)
    e4m3 = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float().numpy()
    if scale_dtype in (torch.bfloat16, torch.float16):
        bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
        t16 = bits.view(scale_dtype).float().numpy()
        t16 = np.roll(t16, -32768)  # index by the unsigned 16-bit pattern
    else:
        t16 = np.zeros(1, np.float32)
    return e2m1, e4m3, np.ascontiguousarray(t16, dtype=np.float32)


@numba.njit(cache=True, nogil=True)
def _decode_row(bank: np.ndarray, words: np.ndarray, floats: np.ndarray, halves: np.ndarray, base: int, fmt: int,
                r: int, k: int, data_off: int, scale_off: int, zero_off: int, scalar_at: int, group: int,
                groups: int, symmetric: bool, scale_bits: int, e2m1: np.ndarray, e4m3: np.ndarray,
                t16: np.ndarray, row: np.ndarray) -> None:
    """Row ``r`` (``k`` inputs) of one projection of the record at byte ``base``, dequantized into ``row``.

    (Byte and word values are widened to int64 first: numba types uint8/int32 mixed with int64 as float.)
    """
    if fmt == 0:  # nvfp4: a block of 16 inputs is 8 bytes and one scale
        g = floats[(base + scalar_at) // 4]
        ds = base + data_off + r * (k // 2)
        ss = base + scale_off + r * (k // 16)
        for b in range(k // 16):
            s = e4m3[np.int64(bank[ss + b])]
            for j in range(8):
                byte = np.int64(bank[ds + 8 * b + j])
                row[16 * b + 2 * j] = (e2m1[byte & 15] * s) * g
                row[16 * b + 2 * j + 1] = (e2m1[byte >> 4] * s) * g
    elif fmt == 1:  # fp8
        s = floats[(base + scalar_at) // 4]
        ds = base + data_off + r * k
        for c in range(k):
            row[c] = e4m3[np.int64(bank[ds + c])] * s
    else:  # w4a16: a word is 8 inputs
        per_row = (k + 7) // 8
        ws = (base + data_off) // 4 + r * per_row
        zs = (base + zero_off) // 4 + (r // 8) * groups
        zshift = 4 * (r % 8)
        whole_words = group % 8 == 0
        gi = 0
        s = np.float32(0.0)
        z = 8
        for wj in range(per_row):
            word = np.int64(words[ws + wj])
            for i in range(8):
                c = 8 * wj + i
                if c >= k:
                    break
                if i == 0 or not whole_words:
                    gi = c // group
                    if scale_bits == 32:
                        s = floats[(base + scale_off) // 4 + r * groups + gi]
                    else:
                        s = t16[np.int64(halves[(base + scale_off) // 2 + r * groups + gi])]
                    if not symmetric:
                        z = (np.int64(words[zs + gi]) >> zshift) & 15
                row[c] = np.float32(((word >> (4 * i)) & 15) - z) * s


@numba.njit(parallel=True, fastmath=False, cache=True, nogil=True)
def _cpu_moe_quant_kernel(x: np.ndarray, bank: np.ndarray, words: np.ndarray, floats: np.ndarray,
                          halves: np.ndarray, record_bytes: int, fmt: int, inter: int, offs: np.ndarray,
                          group_up: int, group_down: int, symmetric: bool, scale_bits: int, e2m1: np.ndarray,
                          e4m3: np.ndarray, t16: np.ndarray, tok: np.ndarray, rec: np.ndarray, wgt: np.ndarray,
                          out: np.ndarray, norms: np.ndarray, rows_up: int, rows_down: int) -> None:
    """``offs``: up data, up scale, up zero, down data, down scale, down zero, scalars (byte offsets in a record)."""
    num_pairs = tok.shape[0]
    latent = x.shape[1]
    xf = x.ravel()
    by_rec = np.argsort(rec, kind="mergesort")
    starts = _group_starts(rec, by_rec)
    num_groups = starts.shape[0] - 1
    groups_up = (latent + group_up - 1) // group_up
    groups_down = (inter + group_down - 1) // group_down

    h = np.empty((num_pairs, inter), np.float32)
    blocks_up = (inter + rows_up - 1) // rows_up
    for task in numba.prange(num_groups * blocks_up):
        g, block = task // blocks_up, task % blocks_up
        base = rec[by_rec[starts[g]]] * record_bytes
        row = np.empty(latent, np.float32)
        for i in range(block * rows_up, min(inter, (block + 1) * rows_up)):
            _decode_row(bank, words, floats, halves, base, fmt, i, latent, offs[0], offs[1], offs[2], offs[6],
                        group_up, groups_up, symmetric, scale_bits, e2m1, e4m3, t16, row)
            for q in range(starts[g], starts[g + 1]):
                p = by_rec[q]
                a = _row_dot(row, 0, xf, tok[p] * latent, latent)
                if a < 0:  # relu that keeps NaN, like torch.relu
                    a = np.float32(0.0)
                h[p, i] = a * a

    hf = h.ravel()
    y = np.empty((num_pairs, latent), np.float32)
    blocks_down = (latent + rows_down - 1) // rows_down
    for task in numba.prange(num_groups * blocks_down):
        g, block = task // blocks_down, task % blocks_down
        base = rec[by_rec[starts[g]]] * record_bytes
        row = np.empty(inter, np.float32)
        for l in range(block * rows_down, min(latent, (block + 1) * rows_down)):
            _decode_row(bank, words, floats, halves, base, fmt, l, inter, offs[3], offs[4], offs[5], offs[6] + 4,
                        group_down, groups_down, symmetric, scale_bits, e2m1, e4m3, t16, row)
            for q in range(starts[g], starts[g + 1]):
                p = by_rec[q]
                y[p, l] = _row_dot(row, 0, hf, p * inter, inter)

    if norms.shape[0] == num_pairs:
        for p in range(num_pairs):
            acc = np.float32(0.0)
            for l in range(latent):
                acc += y[p, l] * y[p, l]
            norms[p] = np.sqrt(acc)
    _add_pairs_by_token(tok, wgt, y, out)


def _check(x: Any, layout: ExpertRecordLayout, records: Any, pairs_token: Any, pairs_record: Any,
           pairs_weight: Any, out: Any) -> tuple[np.ndarray, ...]:
    x, out = _as_array(x, "x"), _as_array(out, "out")
    for a, n in ((x, "x"), (out, "out")):
        if a.ndim != 2 or a.dtype != np.float32 or not a.flags.c_contiguous:
            raise ValueError(f"{n} must be a C-contiguous float32 [tokens, latent] array, got {a.shape} {a.dtype}")
    if out.shape != x.shape or not out.flags.writeable:
        raise ValueError(f"out must be a writeable array shaped like x {x.shape}, got {out.shape}")
    if x.shape[1] != layout.width:
        raise ValueError(f"x has {x.shape[1]} features, the experts take {layout.width}")
    bank = _as_array(records, "records")
    if bank.ndim != 2 or bank.dtype != np.uint8 or bank.shape[1] != layout.record_bytes or not bank.flags.c_contiguous:
        raise ValueError(f"records must be a C-contiguous [records, {layout.record_bytes}] uint8 array, got "
                         f"{bank.shape} {bank.dtype}")
    if bank.ctypes.data % 16:
        raise ValueError("records must start at a 16-byte aligned address (the runtime's buffers are)")
    tokens, recs, weights = (np.asarray(_as_array(a, n)) for a, n in
                             ((pairs_token, "pairs_token"), (pairs_record, "pairs_record"),
                              (pairs_weight, "pairs_weight")))
    if not tokens.ndim == recs.ndim == weights.ndim == 1 or not len(tokens) == len(recs) == len(weights):
        raise ValueError("pairs_token, pairs_record and pairs_weight must be 1-D with one entry per pair")
    for a, n, bound in ((tokens, "pairs_token", x.shape[0]), (recs, "pairs_record", bank.shape[0])):
        if a.dtype.kind not in "iu":
            raise ValueError(f"{n} must hold integers, got {a.dtype}")
        if len(a) and (a.min() < 0 or a.max() >= bound):
            raise ValueError(f"{n} has entries outside [0, {bound})")
    return (x, out, bank, np.array(tokens, dtype=np.int64), np.array(recs, dtype=np.int64),
            np.array(weights, dtype=np.float32))


def cpu_moe_quant(x: Any, layout: ExpertRecordLayout, records: Any, pairs_token: Any, pairs_record: Any,
                  pairs_weight: Any, out: Any, pair_norms: Any = None) -> np.ndarray:
    """Compute routed pairs on the CPU from quantized host records and add them into ``out`` in place.

    Args:
        x: latent activations ``[T, L]`` float32, C-contiguous.
        layout: the records' :class:`ExpertRecordLayout` (``width`` = L, ``inner`` = I).
        records: ``[R, record_bytes]`` uint8, C-contiguous, 16-byte aligned (a host store buffer);
            read in place.
        pairs_token, pairs_record: ``[P]`` integers: token (row of ``x``) and record (row of
            ``records``) of each pair; pairs_weight: ``[P]`` routing weights.
        out: ``[T, L]`` float32; receives ``out[t] += sum_p w_p * y_p``.
        pair_norms: optional ``[P]`` float32; receives ``||y_p||`` (unweighted expert output).

    Returns ``out`` as the numpy array written.
    """
    x, out, bank, tokens, recs, weights = _check(x, layout, records, pairs_token, pairs_record, pairs_weight, out)
    norms = np.empty(0, np.float32)
    if pair_norms is not None:
        norms = _as_array(pair_norms, "pair_norms")
        if norms.shape != (len(tokens),) or norms.dtype != np.float32 or not norms.flags.c_contiguous:
            raise ValueError(f"pair_norms must be a contiguous float32 [{len(tokens)}] array")
    if len(tokens) == 0:
        return out
    spec = layout.spec
    sec = layout.sections

    def off(name: str) -> int:
        return sec[name].offset if name in sec else 0

    offs = np.array([off("up.data"), off("up.scale"), off("up.zero"), off("down.data"), off("down.scale"),
                     off("down.zero"), off("scalars")], dtype=np.int64)
    flat = bank.reshape(-1)
    words = flat.view(np.int32)
    floats = flat.view(np.float32)
    halves = flat.view(np.uint16)
    scale_bits = 32 if spec.format != "w4a16" or spec.scale_dtype == torch.float32 else 16
    e2m1, e4m3, t16 = code_tables(spec.scale_dtype if spec.format == "w4a16" else torch.float32)
    inter, latent = layout.inner, layout.width
    rows_up = max(1, min(inter, _TASK_BYTES // max(1, layout.record_bytes // (2 * inter))))
    rows_down = max(1, min(latent, _TASK_BYTES // max(1, layout.record_bytes // (2 * latent))))
    _cpu_moe_quant_kernel(x, flat, words, floats, halves, layout.record_bytes, _FORMAT_ID[spec.format], inter, offs,
                          spec.group_of(latent), spec.group_of(inter), spec.symmetric, scale_bits, e2m1, e4m3, t16,
                          tokens, recs, weights, out, norms, rows_up, rows_down)
    return out


def cpu_moe_quant_reference(x: Any, layout: ExpertRecordLayout, records: Any, pairs_token: Any, pairs_record: Any,
                            pairs_weight: Any, out: Any, pair_norms: Any = None) -> np.ndarray:
    """:func:`cpu_moe_quant` through the torch quantized reference (same arguments, same in-place effect)."""
    from ..kernels.moe.quant_reference import moe_gather_gemm_quant_reference

    x, out, bank, tokens, recs, weights = _check(x, layout, records, pairs_token, pairs_record, pairs_weight, out)
    if len(tokens) == 0:
        return out
    t_bank = torch.from_numpy(bank)
    table = torch.arange(bank.shape[0], dtype=torch.int32)
    norms = torch.zeros((len(tokens), 1), dtype=torch.float32)
    rows = moe_gather_gemm_quant_reference(
        torch.from_numpy(x)[torch.from_numpy(tokens)], layout.up(t_bank), layout.down(t_bank), table,
        torch.from_numpy(recs)[:, None], torch.from_numpy(weights)[:, None], pair_norms=norms)
    total = torch.zeros(x.shape, dtype=torch.float32).index_add_(0, torch.from_numpy(tokens), rows)
    touched = np.unique(tokens)
    out[touched] += total.numpy()[touched]
    if pair_norms is not None:
        _as_array(pair_norms, "pair_norms")[:] = norms[:, 0].numpy()
    return out


def measure_quant_throughput(spec: Any, k: int = 22, *, latent: int = 1024, intermediate: int = 2688,
                             bank_records: int | None = None, repeats: int = 3, seed: int = 0) -> float:
    """GB/s (1e9 bytes) of quantized records one decode step of ``k`` experts processes on this host.

    ``spec``: a :class:`~residency.kernels.moe.quant_formats.QuantSpec`. Random codes with finite
    scales, Super's expert shape by default; each step takes the next ``k`` records of a rotation
    through ``bank_records`` (default ``max(2 k, 8)``); the median of ``repeats`` steps after one
    warm-up step (which compiles or loads the kernel). For ``benchmarks/bench_cpu_experts.py``.
    """
    import time

    layout = ExpertRecordLayout(spec, intermediate, latent)
    n_bank = bank_records if bank_records is not None else max(2 * k, 8)
    rng = np.random.default_rng(seed)
    bank = rng.integers(0, 256, size=(n_bank, layout.record_bytes), dtype=np.uint8)
    t_bank = torch.from_numpy(bank)
    for proj in ("up", "down"):
        w = layout.projection(t_bank, proj)
        if spec.format == "nvfp4":
            w.scale.view(torch.uint8).copy_(torch.from_numpy(rng.integers(0x20, 0x40, size=tuple(w.scale.shape),
                                                                         dtype=np.uint8)))
        if w.scale2 is not None:
            w.scale2.fill_(1e-3)
        if spec.format == "fp8":
            w.data.view(torch.uint8).bitwise_and_(0x77)  # no NaN codes
        if spec.format == "w4a16":
            w.scale.fill_(1e-3)
    x = rng.standard_normal((1, latent)).astype(np.float32)
    out = np.zeros_like(x)
    tokens = np.zeros(k, np.int64)
    weights = np.full(k, 1.0 / k, np.float32)
    seconds = []
    for rep in range(repeats + 1):
        records = np.arange(rep * k, (rep + 1) * k) % n_bank
        start = time.perf_counter()
        cpu_moe_quant(x, layout, bank, tokens, records, weights, out)
        if rep:
            seconds.append(time.perf_counter() - start)
    return k * layout.record_bytes / float(np.median(seconds)) / 1e9
