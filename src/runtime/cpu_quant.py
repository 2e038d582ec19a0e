"""Quantized routed experts computed on the CPU straight from their packed host records (numba).

The quantized counterpart of :mod:`residency.runtime.cpu_experts`: for each routed pair ``p`` =
(token ``t``, record ``r``, weight ``w``)::

    out[t] += sum_p  w * down[r] @ relu(up[r] @ x[t]) ** 2        (fp32 accumulation)

where ``up[r]`` / ``down[r]`` are read from record ``r`` of a bank ``[R, record_bytes]`` uint8 laid
out by :class:`residency.kernels.moe.quant_formats.ExpertRecordLayout` (NVFP4, FP8 or W4A16), in
place: no dequantized copy of an expert is ever made, not even of a row. Work split as in
``cpu_experts``: pairs grouped by record (stable), the up projection parallel over (record, block
of ``I`` rows), the down projection over (record, block of ``L`` rows), then norms and the
weighted sum per token, serially, in pair order.

Each row is decoded and dotted in one pass over its packed bytes: LLVM vector IR (16 fp32 lanes,
fused multiply-adds where the target has FMA, the bytes prefetched 2 KB ahead), for up to four
pairs of the same expert at once (a row is decoded once per four tokens). Per format:

- NVFP4: a step is 16 bytes = 32 weights = two blocks. E2M1 codes become fp32 by an AVX-512
  permute of a 16-entry table (``vpermps``; without AVX-512, through fp16 bits and ``fpext``).
  Even and odd inputs are kept apart (the activations are staged with each 32 inputs reordered
  even-first), so a lane holds two products ``e2m1 * x`` of one block; the lane sums are
  multiplied by their block's E4M3 scale (16 scales decoded at once per 8 steps, through fp16
  bits) and the global scale is applied once per row.
- FP8: 16 weights a step, E4M3 -> fp16 bits by a shift and mask -> fp32; the largest low seven
  bits seen make a row holding a NaN code (0x7F, 0xFF) NaN, as in the reference; the per-tensor
  scale is applied once per row.
- W4A16 with groups of a multiple of 32 inputs, or one group per row: per group a 16-entry table
  of ``(q - z) * scale`` (the reference's dequantized values) looked up by permute as for NVFP4
  (without AVX-512: ``q - z`` converted and summed per group, then scaled); groups of 16: ``q - z``
  converted, the lane sums scaled by the step's two group scales. Other group sizes take the
  exact scalar path: the row dequantized into fp32 scratch, then the float kernel's dot.

Inputs past a row's last whole step (K not a multiple of 32, or of 16 for FP8) are added in order
by scalar code with their exact weights. Factoring the scales out of the block / group sums makes
results differ from dequantize-then-dot by rounding only (~1e-7 relative); the decoders leave
exact powers of two on the weights (``2**-14`` for E2M1, ``2**-8`` for E4M3) that the staged
activations (``* 2**14``, ``* 2**8``) and the row scale cancel. Every output element is computed by
one thread in a fixed order and a pair's arithmetic does not depend on how many other pairs share
its expert, so results are bit-identical across runs, numba thread counts and batch compositions
(on one machine: the AVX-512 and portable decodes differ in rounding). The kernel is compiled once
per format (the format is a compile-time tag: behind a run-time test the FP8 and W4A16 rows ran a
third slower), about 10 s each on first use, then loaded from numba's cache.

Measured on the 2-core development VM (AMD EPYC Zen 4, AVX-512; shared, load 0.4-0.9) with
``benchmarks/bench_cpu_experts.py --ks 22`` (Super's shapes L=1024, I=2688; one token, k = 22 records
of a 64-record bank per step; medians of three runs of 9 repetitions, each timing the kernel, a read
of the same bytes and a BF16 step of ``cpu_experts`` at the same k and threads, in turn):

==========  ====================================  ====================================
format      2 threads                             1 thread
==========  ====================================  ====================================
NVFP4       16.7 GB/s, 0.52 of read, 0.48 x BF16  9.0 GB/s, 0.31 of read, 0.81 x BF16
FP8         21.4 GB/s, 0.69 of read, 0.59 x BF16  13.9 GB/s, 0.46 of read, 0.84 x BF16
W4A16 g128  16.1 GB/s, 0.50 of read, 0.48 x BF16  9.0 GB/s, 0.29 of read, 0.71 x BF16
==========  ====================================  ====================================

(GB/s of packed records; per expert NVFP4 0.19 / 0.34 ms, FP8 0.26 / 0.40, W4A16 0.18 / 0.32
at two / one threads; BF16 took 0.36-0.44 ms per expert interleaved so, about 0.33 alone at two
threads. The scalar decode-to-scratch kernel before this one: 2.1, 3.9 and 0.7 GB/s at two threads,
6, 6 and 16 times the BF16 time.) The quantized kernels are compute-bound (a core decodes and
dots 16-20 G weights/s from cache), the BF16 one memory-bound, so they gain more from a second core.

:func:`cpu_moe_quant_reference` computes the same through the torch reference
(:func:`residency.kernels.moe.quant_reference.moe_gather_gemm_quant_reference`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import llvmlite.binding as llvm_binding
import numba
import numpy as np
import torch
from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic, overload

from ..kernels.moe.quant_formats import E2M1_VALUES, ExpertRecordLayout

# the float CPU kernel's fixed-order 16-lane fp32 dot product, run grouping, token sum and input reading
from .cpu_experts import (
    LANES,
    ROUND_NONE,
    _add_pairs_by_token,
    _as_array,
    _group_starts,
    _pair_lists,
    _row_dot,
    check_prepared_call,
    pair_array,
    round_intermediate,
    rounding_code,
)
from .jit import njit

__all__ = ["cpu_moe_quant", "cpu_moe_quant_prepared", "prepare_records", "PreparedRecords", "cpu_moe_quant_reference",
           "code_tables", "measure_quant_throughput"]

_FORMAT_ID = {"nvfp4": 0, "fp8": 1, "w4a16": 2}
_NVFP4, _FP8, _W4A16 = 0, 1, 2
_TASK_BYTES = 64 * 1024
#: an empty array per format whose dtype tells the kernel, at compile time, which format it computes
_FORMAT_TAGS = {_NVFP4: np.empty(0, np.uint8), _FP8: np.empty(0, np.int8), _W4A16: np.empty(0, np.int16)}
_TAG_FORMAT = {types.uint8: _NVFP4, types.int8: _FP8, types.int16: _W4A16}
#: pairs of one expert computed together (one decode of a row for this many dot products)
_PAIRS_PER_PASS = 4
#: inputs per vector step: 16 packed bytes
_STEP = {_NVFP4: 32, _FP8: 16, _W4A16: 32}
#: fp32 vector accumulators per pair (steps alternate between them)
_NACC = {_NVFP4: 2, _FP8: 4, _W4A16: 2}
#: NVFP4 steps whose block scales are decoded together (16 scales = one 16-lane vector)
_SCALE_BATCH = 8
#: how far ahead of the step being read the packed bytes are prefetched (into all cache levels)
_PREFETCH_BYTES = 2048
#: W4A16 steps per group given their own unrolled code (groups of 128)
_UNROLLED_GROUP = 4
#: exact powers of two the decoders leave on the weights (E2M1 and E4M3 through fp16 bits)
_E2M1_SHIFT = 2.0**-14
_E4M3_SHIFT = 2.0**-8

# per-projection parameters of the compiled kernel (int64 array indices)
(_P_DATA, _P_SCALE, _P_ZERO, _P_SCALAR, _P_K, _P_GROUP, _P_GROUPS, _P_STEPS, _P_SPG, _P_SKIND, _P_SBYTES, _P_SYM,
 _P_VEC, _P_PERM, _P_TAIL_GROUPS) = range(15)
_P_LEN = _P_TAIL_GROUPS + 32  # then the group of each input past the last whole step


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


_TABLES: dict[torch.dtype, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}


def _tables(scale_dtype: torch.dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`code_tables`, built once per scale dtype (building the 16-bit table costs about a millisecond)."""
    if scale_dtype not in _TABLES:
        _TABLES[scale_dtype] = code_tables(scale_dtype)
    return _TABLES[scale_dtype]


# ---------------------------------------------------------------------------------------------- vector IR


def _target_features(context: Any) -> set[str]:
    """The features the code being generated may use (numba's target: the host's, or NUMBA_CPU_FEATURES)."""
    try:
        features = context.codegen()._tm_features
    except AttributeError:  # pragma: no cover - other numba versions
        features = llvm_binding.get_host_cpu_features().flatten()
    return {f[1:] for f in features.split(",") if f.startswith("+")}


def _make_row_dot(fmt: int, nvec: int, native: bool | None = None) -> Any:
    """An intrinsic ``dot(bank, doff, soff, zoff, zshift, nsteps, spg, skind, xs, x0, x1, x2, x3, res)``:
    the vector steps of one row of ``fmt`` dotted with ``nvec`` staged activation vectors.

    ``bank`` uint8 (the records, flat): the row's packed data at byte ``doff``, its block / group
    scales at ``soff``; W4A16 zero points: the zero word of group ``g`` at ``zoff + 4 g``, this row's
    code at bit ``zshift`` (``zshift < 0``: symmetric, ``z = 8``; the words are still read, so
    ``zoff`` must point at readable ones). ``nsteps`` vector steps of
    :data:`_STEP` inputs. W4A16: ``spg`` steps per group (0: groups of 16, two per step),
    ``skind`` the scale dtype (0 bf16, 1 fp16, 2 fp32). ``xs`` fp32: vector ``v`` at ``x0..x3``
    (staged: scaled, and reordered even-first per 32 inputs for NVFP4 / W4A16). Writes
    ``res[v]``: the sum over the steps of the products with the block / group scales applied, the
    per-tensor scale not. ``native``: the AVX-512 table decode (None: when the target has it).
    """
    nacc = _NACC[fmt]
    name = ("nvfp4", "fp8", "w4a16")[fmt]

    def typer(typingctx: Any, bank: Any, doff: Any, soff: Any, zoff: Any, zshift: Any, nsteps: Any, spg: Any,
              skind: Any, xs: Any, x0: Any, x1: Any, x2: Any, x3: Any, res: Any) -> Any:
        if not (isinstance(bank, types.Array) and bank.dtype == types.uint8):
            return None
        if not all(isinstance(a, types.Array) and a.dtype == types.float32 for a in (xs, res)):
            return None
        ints = (doff, soff, zoff, zshift, nsteps, spg, skind, x0, x1, x2, x3)
        if not all(isinstance(a, types.Integer) for a in ints):
            return None
        ip = types.intp
        return types.void(bank, ip, ip, ip, ip, ip, ip, ip, xs, ip, ip, ip, ip, res), codegen

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> None:
        bank, doff, soff, zoff, zshift, nsteps, spg, skind, xs, x0, x1, x2, x3, res = args
        features = _target_features(context)
        use_table = "avx512f" in features if native is None else native
        use_fma = "fma" in features if native is None else native
        intp = context.get_value_type(types.intp)
        i8, i16, i32, f16, f32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.HalfType(), ir.FloatType()
        v_i8, v_i16, v_i32, v_f32 = (ir.VectorType(t, LANES) for t in (i8, i16, i32, f32))
        bank_data = context.make_array(signature.args[0])(context, builder, bank).data
        x_data = context.make_array(signature.args[8])(context, builder, xs).data
        res_data = context.make_array(signature.args[13])(context, builder, res).data
        if use_table:
            permute = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v_f32, [v_f32, v_i32]),
                                                     "llvm.x86.avx512.permvar.sf.512")

        def c(value: int) -> Any:
            return ir.Constant(intp, value)

        def splat(value: Any, ty: Any = v_i16) -> Any:
            return ir.Constant(ty, [value] * ty.count)

        def mask(values: list[int]) -> Any:
            return ir.Constant(ir.VectorType(i32, len(values)), values)

        def broadcast(scalar: Any, ty: Any) -> Any:  # a run-time scalar in every lane
            one = builder.insert_element(ir.Constant(ir.VectorType(ty.element, 1), ir.Undefined), scalar,
                                         ir.Constant(i32, 0))
            return builder.shuffle_vector(one, one, mask([0] * ty.count))

        def halves(a: Any, b: Any, ty: Any) -> Any:  # lanes 0-7 a, lanes 8-15 b
            two = ir.Constant(ir.VectorType(ty.element, 2), ir.Undefined)
            two = builder.insert_element(two, a, ir.Constant(i32, 0))
            two = builder.insert_element(two, b, ir.Constant(i32, 1))
            return builder.shuffle_vector(two, two, mask([0] * (ty.count // 2) + [1] * (ty.count // 2)))

        w_base = builder.gep(bank_data, [doff])
        s_base = builder.gep(bank_data, [soff])
        x_bases = [builder.gep(x_data, [xo]) for xo in (x0, x1, x2, x3)[:nvec]]
        zero = ir.Constant(v_f32, [0.0] * LANES)
        accs = [[cgutils.alloca_once_value(builder, zero) for _ in range(nacc)] for _ in range(nvec)]

        def load_vec(base: Any, index: Any, ty: Any, align: int) -> Any:
            return builder.load(builder.bitcast(builder.gep(base, [index]), ty.as_pointer()), align=align)

        prefetch_fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [
            i8.as_pointer(), i32, i32, i32]), "llvm.prefetch.p0")

        def prefetch(ci: Any) -> None:  # the packed bytes _PREFETCH_BYTES ahead of step ci (the next rows)
            if _PREFETCH_BYTES:
                ptr = builder.gep(w_base, [builder.add(builder.mul(ci, c(16)), c(_PREFETCH_BYTES))])
                builder.call(prefetch_fn, [ptr, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])

        def packed(ci: Any, ty: Any) -> Any:  # the 16 bytes of step ci, zero-extended to ty lanes
            return builder.zext(load_vec(w_base, builder.mul(ci, c(16)), v_i8, 1), ty)

        def half_to_f32(bits: Any) -> Any:  # fp16 bits -> fp32, exactly
            n = bits.type.count
            return builder.fpext(builder.bitcast(bits, ir.VectorType(f16, n)), ir.VectorType(f32, n))

        def e4m3_half(b: Any) -> Any:
            """E4M3 codes zero-extended to i16 lanes -> fp16 bits of value * 2**-8 (NaN codes -> NaN)."""
            ty = b.type
            sign = builder.and_(builder.shl(b, splat(8, ty)), splat(0x8000, ty))
            mag = builder.and_(builder.shl(b, splat(7, ty)), splat(0x3F80, ty))
            nan = builder.icmp_unsigned("==", mag, splat(0x3F80, ty))
            return builder.select(nan, splat(0x7E00, ty), builder.or_(sign, mag))

        def e2m1_pair(ci: Any) -> tuple[Any, Any]:
            """The 32 E2M1 weights of step ci as fp32 * 2**-14: (low nibbles = even inputs, high = odd)."""
            if use_table:
                table = ir.Constant(v_f32, [v * _E2M1_SHIFT for v in E2M1_VALUES])
                b = packed(ci, v_i32)
                return (builder.call(permute, [table, builder.and_(b, splat(15, v_i32))]),
                        builder.call(permute, [table, builder.lshr(b, splat(4, v_i32))]))
            b = packed(ci, v_i16)

            def nibble(sign_shift: int, mag_shift: int) -> Any:  # E2M1 -> fp16 bits of value * 2**-14
                sign = builder.and_(builder.shl(b, splat(sign_shift)), splat(0x8000))
                return half_to_f32(builder.or_(sign, builder.and_(builder.shl(b, splat(mag_shift)), splat(0x0E00))))

            return nibble(12, 9), nibble(8, 5)

        if use_fma:
            fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v_f32, [v_f32] * 3),
                                                 "llvm.fma.v16f32")

        def mul_add(a: Any, b: Any, addend: Any) -> Any:  # a * b + addend (fused where the target has FMA)
            return builder.call(fma, [a, b, addend]) if use_fma else builder.fadd(builder.fmul(a, b), addend)

        def add_to(acc: Any, value: Any) -> None:
            builder.store(builder.fadd(builder.load(acc), value), acc)

        def add_product(acc: Any, a: Any, b: Any) -> None:
            builder.store(mul_add(a, b, builder.load(acc)), acc)

        def x_pair(v: int, ci: Any) -> tuple[Any, Any]:
            base = builder.mul(ci, c(32))
            return (load_vec(x_bases[v], base, v_f32, 4), load_vec(x_bases[v], builder.add(base, c(16)), v_f32, 4))

        def pair_products(v: int, ci: Any, w_even: Any, w_odd: Any) -> Any:
            """w_even * x_even + w_odd * x_odd of step ci for vector v (lane j: inputs 2j and 2j + 1)."""
            x_even, x_odd = x_pair(v, ci)
            return mul_add(w_even, x_even, builder.fmul(w_odd, x_odd))

        def run_steps(start: Any, stop: Any, step: Any) -> None:
            """step(ci, a) for ci in [start, stop): nacc at a time into accumulators 0..nacc-1, the rest into 0."""
            whole = builder.add(start, builder.mul(builder.sdiv(builder.sub(stop, start), c(nacc)), c(nacc)))
            with cgutils.for_range_slice(builder, start, whole, c(nacc)) as (ci, _):
                for a in range(nacc):
                    step(builder.add(ci, c(a)), a)
            with cgutils.for_range_slice(builder, whole, stop, c(1)) as (ci, _):
                step(ci, 0)

        if fmt == _NVFP4:
            def nvfp4_step(ci: Any, a: int, scales: Any) -> None:
                w_even, w_odd = e2m1_pair(ci)
                for v in range(nvec):
                    add_product(accs[v][a], pair_products(v, ci, w_even, w_odd), scales)

            def batch(ci: Any) -> None:  # _SCALE_BATCH steps, their 16 block scales decoded at once
                raw = builder.zext(load_vec(s_base, builder.mul(ci, c(2)), v_i8, 1), v_i16)
                scales = half_to_f32(e4m3_half(raw))
                for j in range(_SCALE_BATCH):
                    if j % 4 == 0:
                        prefetch(builder.add(ci, c(j)))
                    lanes = builder.shuffle_vector(scales, scales, mask([2 * j] * 8 + [2 * j + 1] * 8))
                    nvfp4_step(builder.add(ci, c(j)), j % nacc, lanes)

            def single(ci: Any, a: int) -> None:  # one step, its two block scales decoded alone
                two = builder.zext(load_vec(s_base, builder.mul(ci, c(2)), ir.VectorType(i8, 2), 1),
                                   ir.VectorType(i16, 2))
                nvfp4_step(ci, a, half_to_f32(e4m3_half(builder.shuffle_vector(two, two, mask([0] * 8 + [1] * 8)))))

            batched = builder.mul(builder.sdiv(nsteps, c(_SCALE_BATCH)), c(_SCALE_BATCH))
            with cgutils.for_range_slice(builder, c(0), batched, c(_SCALE_BATCH)) as (ci, _):
                batch(ci)
            run_steps(batched, nsteps, single)
        elif fmt == _FP8:
            # NaN codes (0x7F, 0xFF: all seven low bits set) are not decoded as NaN; the largest low seven
            # bits seen tell at the end whether the row held one (its dot is then NaN, as the reference's)
            low_max = cgutils.alloca_once_value(builder, ir.Constant(v_i8, [0] * LANES))

            def fp8_step(ci: Any, a: int) -> None:
                if a == 0:
                    prefetch(ci)
                raw = load_vec(w_base, builder.mul(ci, c(16)), v_i8, 1)
                low = builder.and_(raw, splat(0x7F, v_i8))
                seen = builder.load(low_max)
                builder.store(builder.select(builder.icmp_unsigned(">", low, seen), low, seen), low_max)
                # (sign-extended byte << 7) & 0xBF80: fp16 bits of value * 2**-8 (sign, 4 + 3 bits)
                bits = builder.and_(builder.shl(builder.sext(raw, v_i16), splat(7)), splat(0xBF80))
                w = half_to_f32(bits)
                for v in range(nvec):
                    add_product(accs[v][a], w, load_vec(x_bases[v], builder.mul(ci, c(16)), v_f32, 4))

            run_steps(c(0), nsteps, fp8_step)
            umax = cgutils.get_or_insert_function(builder.module, ir.FunctionType(i8, [v_i8]),
                                                  "llvm.vector.reduce.umax.v16i8")
            row_nan = builder.icmp_unsigned("==", builder.call(umax, [builder.load(low_max)]), ir.Constant(i8, 0x7F))
        else:
            # branch-free (all loads in bounds): fp32 scales are two 16-bit halves, 16-bit ones read twice
            scale_bytes = builder.select(builder.icmp_signed("==", skind, c(2)), c(4), c(2))
            symmetric = builder.icmp_signed("<", zshift, c(0))
            zero_shift = builder.trunc(builder.select(symmetric, c(0), zshift), i32)

            def scale_at(g: Any) -> Any:  # group g's scale as fp32
                at = builder.mul(g, scale_bytes)
                low = builder.load(builder.bitcast(builder.gep(s_base, [at]), i16.as_pointer()), align=2)
                high_at = builder.add(at, builder.sub(scale_bytes, c(2)))
                high = builder.load(builder.bitcast(builder.gep(s_base, [high_at]), i16.as_pointer()), align=2)
                low32 = builder.zext(low, i32)
                high32 = builder.shl(builder.zext(high, i32), ir.Constant(i32, 16))
                fp32 = builder.bitcast(builder.or_(low32, high32), f32)
                bf16 = builder.bitcast(builder.shl(low32, ir.Constant(i32, 16)), f32)
                fp16 = builder.fpext(builder.bitcast(low, f16), f32)
                sixteen_bits = builder.select(builder.icmp_signed("==", skind, c(0)), bf16, fp16)
                return builder.select(builder.icmp_signed("==", skind, c(2)), fp32, sixteen_bits)

            def zero_at(g: Any) -> Any:  # group g's zero point of this row as i32 (8 when symmetric)
                ptr = builder.gep(bank_data, [builder.add(zoff, builder.mul(g, c(4)))])
                word = builder.load(builder.bitcast(ptr, i32.as_pointer()), align=4)
                code = builder.and_(builder.lshr(word, zero_shift), ir.Constant(i32, 15))
                return builder.select(symmetric, ir.Constant(i32, 8), code)

            def codes_minus(ci: Any, z: Any) -> tuple[Any, Any]:  # (q - z) of step ci as fp32: even, odd inputs
                b = packed(ci, v_i16)
                return (builder.sitofp(builder.sub(builder.and_(b, splat(15)), z), v_f32),
                        builder.sitofp(builder.sub(builder.lshr(b, splat(4)), z), v_f32))

            with builder.if_else(builder.icmp_signed(">", spg, c(0))) as (grouped, sixteen):
                with grouped:  # groups of whole steps
                    group_accs = [cgutils.alloca_once_value(builder, zero) for _ in range(nvec)]

                    def group(g: Any, first: Any, end: Any, unrolled: int = 0) -> None:
                        """Steps [first, end) of group g (``unrolled``: exactly that many, without a loop)."""
                        s, z = scale_at(g), zero_at(g)

                        def steps(step: Any) -> None:
                            if unrolled:
                                for j in range(unrolled):
                                    step(builder.add(first, c(j)), j % nacc)
                            else:
                                run_steps(first, end, step)

                        if use_table:  # the group's 16 dequantized values (q - z) * s, looked up per code
                            iota = ir.Constant(v_i32, list(range(16)))
                            table = builder.fmul(builder.sitofp(builder.sub(iota, broadcast(z, v_i32)), v_f32),
                                                 broadcast(s, v_f32))

                            def table_step(ci: Any, a: int) -> None:
                                if a == 0:
                                    prefetch(ci)
                                b = packed(ci, v_i32)
                                w_even = builder.call(permute, [table, builder.and_(b, splat(15, v_i32))])
                                w_odd = builder.call(permute, [table, builder.lshr(b, splat(4, v_i32))])
                                for v in range(nvec):
                                    x_even, x_odd = x_pair(v, ci)
                                    acc = builder.load(accs[v][a])
                                    builder.store(mul_add(w_odd, x_odd, mul_add(w_even, x_even, acc)), accs[v][a])

                            steps(table_step)
                        else:  # sum the group's (q - z) * x, then scale it
                            z16 = broadcast(builder.trunc(z, i16), v_i16)
                            for v in range(nvec):
                                builder.store(zero, group_accs[v])

                            def codes_step(ci: Any, a: int) -> None:
                                w_even, w_odd = codes_minus(ci, z16)
                                for v in range(nvec):
                                    add_to(group_accs[v], pair_products(v, ci, w_even, w_odd))

                            steps(codes_step)
                            sv = broadcast(s, v_f32)
                            for v in range(nvec):
                                add_product(accs[v][0], builder.load(group_accs[v]), sv)

                    with builder.if_else(builder.icmp_signed("==", spg, c(_UNROLLED_GROUP))) as (short, other):
                        with short:  # groups of 128 (the usual size): each group's steps without a loop
                            full = builder.sdiv(nsteps, c(_UNROLLED_GROUP))
                            with cgutils.for_range_slice(builder, c(0), full, c(1)) as (g, _):
                                first = builder.mul(g, c(_UNROLLED_GROUP))
                                group(g, first, builder.add(first, c(_UNROLLED_GROUP)), _UNROLLED_GROUP)
                            last = builder.mul(full, c(_UNROLLED_GROUP))
                            with builder.if_then(builder.icmp_signed("<", last, nsteps)):
                                group(full, last, nsteps)
                        with other:
                            ngroups = builder.sdiv(builder.add(nsteps, builder.sub(spg, c(1))), spg)
                            with cgutils.for_range_slice(builder, c(0), ngroups, c(1)) as (g, _):
                                first = builder.mul(g, spg)
                                end = builder.add(first, spg)
                                group(g, first, builder.select(builder.icmp_signed("<", end, nsteps), end, nsteps))
                with sixteen:  # groups of 16 inputs: two per step
                    def sixteen_step(ci: Any, a: int) -> None:
                        ga = builder.mul(ci, c(2))
                        gb = builder.add(ga, c(1))
                        sv = halves(scale_at(ga), scale_at(gb), v_f32)
                        z16 = halves(builder.trunc(zero_at(ga), i16), builder.trunc(zero_at(gb), i16), v_i16)
                        w_even, w_odd = codes_minus(ci, z16)
                        for v in range(nvec):
                            add_product(accs[v][a], pair_products(v, ci, w_even, w_odd), sv)

                    run_steps(c(0), nsteps, sixteen_step)

        for v in range(nvec):  # (a0 + a1) + (a2 + a3), then halving the vector: a fixed order
            loaded = [builder.load(acc) for acc in accs[v]]
            while len(loaded) > 1:
                loaded = [builder.fadd(loaded[i], loaded[i + 1]) for i in range(0, len(loaded), 2)]
            total, width = loaded[0], LANES
            while width > 1:
                width //= 2
                total = builder.fadd(builder.shuffle_vector(total, total, mask(list(range(width)))),
                                     builder.shuffle_vector(total, total, mask(list(range(width, 2 * width)))))
            total = builder.extract_element(total, ir.Constant(i32, 0))
            if fmt == _FP8:
                total = builder.select(row_nan, ir.Constant(f32, float("nan")), total)
            builder.store(total, builder.gep(res_data, [c(v)]))

    typer.__name__ = f"_dot_{name}_{nvec}{'' if native is None else '_native' if native else '_portable'}"
    return intrinsic(typer)


_dot_nvfp4_1, _dot_nvfp4_4 = _make_row_dot(_NVFP4, 1), _make_row_dot(_NVFP4, _PAIRS_PER_PASS)
_dot_fp8_1, _dot_fp8_4 = _make_row_dot(_FP8, 1), _make_row_dot(_FP8, _PAIRS_PER_PASS)
_dot_w4a16_1, _dot_w4a16_4 = _make_row_dot(_W4A16, 1), _make_row_dot(_W4A16, _PAIRS_PER_PASS)


# ---------------------------------------------------------------------------------------------- rows


@njit
def _decode_row(bank: np.ndarray, words: np.ndarray, floats: np.ndarray, halves: np.ndarray, base: int, fmt: int,
                r: int, k: int, data_off: int, scale_off: int, zero_off: int, scalar_at: int, group: int,
                groups: int, symmetric: bool, scale_bits: int, e2m1: np.ndarray, e4m3: np.ndarray,
                t16: np.ndarray, row: np.ndarray) -> None:
    """Row ``r`` (``k`` inputs) of one projection of the record at byte ``base``, dequantized into ``row``
    exactly as the reference does (the scalar path of W4A16 group sizes the vector code does not take).

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


def _nvfp4_rows(tag, bank, words, floats, halves, base, r, pj, e2m1, e4m3, t16, xs, xo, nv, res):  # noqa: ANN001, ANN202
    k = pj[_P_K]
    nsteps = pj[_P_STEPS]
    doff = base + pj[_P_DATA] + r * (k // 2)
    soff = base + pj[_P_SCALE] + r * (k // 16)
    if nv == 1:
        _dot_nvfp4_1(bank, doff, soff, 0, 0, nsteps, 0, 0, xs, xo[0], 0, 0, 0, res)
    else:
        _dot_nvfp4_4(bank, doff, soff, 0, 0, nsteps, 0, 0, xs, xo[0], xo[1], xo[2], xo[3], res)
    # a last block of 16 (K an odd multiple of 16): its exact weights (e2m1 * s), times the same powers of two.
    # (Sums straight into res: a scalar carried through loops here makes numba's inliner warn.)
    for b in range(2 * nsteps, k // 16):
        s = e4m3[np.int64(bank[soff + b])] * np.float32(_E2M1_SHIFT * _E4M3_SHIFT)
        for j in range(16):
            w = e2m1[(np.int64(bank[doff + 8 * b + j // 2]) >> (4 * (j % 2))) & 15] * s
            for v in range(nv):
                res[v] += w * xs[xo[v] + 16 * b + j]
    g = floats[(base + pj[_P_SCALAR]) // 4] * np.float32(1.0 / _E4M3_SHIFT)
    for v in range(nv):
        res[v] *= g


def _fp8_rows(tag, bank, words, floats, halves, base, r, pj, e2m1, e4m3, t16, xs, xo, nv, res):  # noqa: ANN001, ANN202
    k = pj[_P_K]
    nsteps = pj[_P_STEPS]
    doff = base + pj[_P_DATA] + r * k
    if nv == 1:
        _dot_fp8_1(bank, doff, 0, 0, 0, nsteps, 0, 0, xs, xo[0], 0, 0, 0, res)
    else:
        _dot_fp8_4(bank, doff, 0, 0, 0, nsteps, 0, 0, xs, xo[0], xo[1], xo[2], xo[3], res)
    for c in range(16 * nsteps, k):  # the inputs past the last whole step
        w = e4m3[np.int64(bank[doff + c])] * np.float32(_E4M3_SHIFT)
        for v in range(nv):
            res[v] += w * xs[xo[v] + c]
    s = floats[(base + pj[_P_SCALAR]) // 4]
    for v in range(nv):
        res[v] *= s


def _w4a16_rows(tag, bank, words, floats, halves, base, r, pj, e2m1, e4m3, t16, xs, xo, nv, res):  # noqa: ANN001, ANN202
    # (no conditional expressions nor loop-carried scalars here: numba's inliner warns about their phis)
    k = pj[_P_K]
    nsteps = pj[_P_STEPS]
    groups = pj[_P_GROUPS]
    symmetric = pj[_P_SYM]
    doff = base + pj[_P_DATA] + 4 * r * ((k + 7) // 8)
    soff = base + pj[_P_SCALE] + r * groups * pj[_P_SBYTES]
    zoff = base + pj[_P_ZERO] + 4 * (r // 8) * groups  # symmetric: inside the data (read, never used)
    zshift = 4 * (r % 8) * (1 - symmetric)
    spg, skind = pj[_P_SPG], pj[_P_SKIND]
    if nv == 1:
        _dot_w4a16_1(bank, doff, soff, zoff, zshift - symmetric, nsteps, spg, skind, xs, xo[0], 0, 0, 0, res)
    else:
        _dot_w4a16_4(bank, doff, soff, zoff, zshift - symmetric, nsteps, spg, skind, xs, xo[0], xo[1], xo[2], xo[3],
                     res)
    # inputs past the last whole step: their exact weights (q - z) * s, their groups looked up in pj (a
    # run-time divisor in this inlined code would cost the vector loops half their speed)
    first = 32 * nsteps
    for c in range(first, k):
        gi = pj[_P_TAIL_GROUPS + c - first]
        z = 8 * symmetric + (1 - symmetric) * ((np.int64(words[zoff // 4 + gi]) >> zshift) & 15)
        q = (np.int64(words[doff // 4 + c // 8]) >> (4 * (c % 8))) & 15
        if skind == 2:
            for v in range(nv):
                res[v] += (np.float32(q - z) * floats[soff // 4 + gi]) * xs[xo[v] + c]
        else:
            for v in range(nv):
                res[v] += (np.float32(q - z) * t16[np.int64(halves[soff // 2 + gi])]) * xs[xo[v] + c]


def _row_dots(tag: np.ndarray, bank: np.ndarray, words: np.ndarray, floats: np.ndarray, halves: np.ndarray,
              base: int, r: int, pj: np.ndarray, e2m1: np.ndarray, e4m3: np.ndarray, t16: np.ndarray, xs: np.ndarray,
              xo: np.ndarray, nv: int, res: np.ndarray) -> None:
    """``res[v]`` = row ``r`` of a projection (parameters ``pj``) of the record at byte ``base`` dotted with
    the staged activations ``xs[xo[v]:]``, for ``v < nv`` (``xo`` has four entries, padded); the vector path
    of the format ``tag`` stands for (:data:`_FORMAT_TAGS`). Compiled code only (an overload)."""
    raise NotImplementedError("_row_dots is compiled into the kernel")


@overload(_row_dots, inline="always")
def _row_dots_of_format(tag, bank, words, floats, halves, base, r, pj, e2m1, e4m3, t16, xs, xo, nv, res):  # noqa: ANN001, ANN202
    # (no annotations: numba requires the implementations' parameters to match these exactly)
    # one format per compiled kernel: with all three behind a run-time test, FP8 and W4A16 rows lose a third
    fmt = _TAG_FORMAT.get(getattr(tag, "dtype", None))
    return {_NVFP4: _nvfp4_rows, _FP8: _fp8_rows, _W4A16: _w4a16_rows}.get(fmt)


@njit
def _exact_row_dots(fmt: int, bank: np.ndarray, words: np.ndarray, floats: np.ndarray, halves: np.ndarray, base: int,
                    r: int, pj: np.ndarray, symmetric: bool, scale_bits: int, e2m1: np.ndarray, e4m3: np.ndarray,
                    t16: np.ndarray, xs: np.ndarray, xo: np.ndarray, nv: int, res: np.ndarray, row: np.ndarray) -> None:
    """:func:`_row_dots` by the scalar path: the row dequantized exactly as the reference does, then the
    float kernel's dot (W4A16 group sizes the vector code does not take)."""
    k = pj[_P_K]
    _decode_row(bank, words, floats, halves, base, fmt, r, k, pj[_P_DATA], pj[_P_SCALE], pj[_P_ZERO],
                pj[_P_SCALAR], pj[_P_GROUP], pj[_P_GROUPS], symmetric, scale_bits, e2m1, e4m3, t16, row)
    for v in range(nv):
        res[v] = _row_dot(row, 0, xs, xo[v], k)


@njit(inline="always")
def _staged_index(i: int, pj: np.ndarray) -> int:
    """Where input ``i`` of a projection sits in its staged activations (even-first per whole 32 when permuted)."""
    if pj[_P_PERM] == 0 or i >= 32 * pj[_P_STEPS]:
        return i
    r = i % 32
    return i - r + (r >> 1) + 16 * (r & 1)


@njit(parallel=True, fastmath=False)
def _cpu_moe_quant_kernel(x: np.ndarray, bank: np.ndarray, words: np.ndarray, floats: np.ndarray,
                          halves: np.ndarray, record_bytes: int, tag: np.ndarray, fmt: int, inter: int,
                          pj_up: np.ndarray,
                          pj_down: np.ndarray, symmetric: bool, scale_bits: int, e2m1: np.ndarray,
                          e4m3: np.ndarray, t16: np.ndarray, pairs: np.ndarray, num_pairs: int, weights: np.ndarray,
                          out: np.ndarray, norms: np.ndarray, rows_up: int, rows_down: int,
                          x_scale: np.float32, h_round: int) -> None:
    """The module docstring's phases; ``pj_up`` / ``pj_down``: each projection's parameters (``_P_*``);
    ``pairs``, ``num_pairs``, ``weights``: the pairs (records in the expert row), see
    :func:`residency.runtime.cpu_experts._pair_lists`; ``h_round``:
    :func:`~residency.runtime.cpu_experts.rounding_code` of the intermediate."""
    tok, rec, wgt = _pair_lists(pairs, num_pairs, weights)
    latent = x.shape[1]
    by_rec = np.argsort(rec, kind="mergesort")
    starts = _group_starts(rec, by_rec)
    num_groups = starts.shape[0] - 1
    lanes = _PAIRS_PER_PASS

    # activations staged as the up projection reads them (scaled by x_scale, maybe reordered)
    xs = np.empty((x.shape[0], latent), np.float32)
    for t in range(x.shape[0]):
        for i in range(latent):
            xs[t, _staged_index(i, pj_up)] = x[t, i] * x_scale
    xsf = xs.ravel()

    h = np.empty((num_pairs, inter), np.float32)  # staged for the down projection likewise
    blocks_up = (inter + rows_up - 1) // rows_up
    for task in numba.prange(num_groups * blocks_up):
        g, block = task // blocks_up, task % blocks_up
        base = rec[by_rec[starts[g]]] * record_bytes
        res = np.empty(lanes, np.float32)
        xo = np.empty(lanes, np.int64)
        row = np.empty(latent if pj_up[_P_VEC] == 0 else 1, np.float32)
        first, end = block * rows_up, min(inter, (block + 1) * rows_up)
        q = starts[g]
        while q < starts[g + 1]:  # up to four pairs of this expert at a time
            nv = min(lanes, starts[g + 1] - q)
            for v in range(lanes):
                xo[v] = tok[by_rec[q + min(v, nv - 1)]] * latent
            for i in range(first, end):
                if pj_up[_P_VEC]:
                    _row_dots(tag, bank, words, floats, halves, base, i, pj_up, e2m1, e4m3, t16, xsf, xo, nv, res)
                else:
                    _exact_row_dots(fmt, bank, words, floats, halves, base, i, pj_up, symmetric, scale_bits, e2m1,
                                    e4m3, t16, xsf, xo, nv, res, row)
                at = _staged_index(i, pj_down)
                for v in range(nv):
                    a = res[v]
                    if a < 0:  # relu that keeps NaN, like torch.relu
                        a = np.float32(0.0)
                    h[by_rec[q + v], at] = round_intermediate(a * a, h_round) * x_scale
            q += nv

    hf = h.ravel()
    y = np.empty((num_pairs, latent), np.float32)
    blocks_down = (latent + rows_down - 1) // rows_down
    for task in numba.prange(num_groups * blocks_down):
        g, block = task // blocks_down, task % blocks_down
        base = rec[by_rec[starts[g]]] * record_bytes
        res = np.empty(lanes, np.float32)
        xo = np.empty(lanes, np.int64)
        row = np.empty(inter if pj_down[_P_VEC] == 0 else 1, np.float32)
        first, end = block * rows_down, min(latent, (block + 1) * rows_down)
        q = starts[g]
        while q < starts[g + 1]:
            nv = min(lanes, starts[g + 1] - q)
            for v in range(lanes):
                xo[v] = by_rec[q + min(v, nv - 1)] * inter
            for l in range(first, end):
                if pj_down[_P_VEC]:
                    _row_dots(tag, bank, words, floats, halves, base, l, pj_down, e2m1, e4m3, t16, hf, xo, nv, res)
                else:
                    _exact_row_dots(fmt, bank, words, floats, halves, base, l, pj_down, symmetric, scale_bits, e2m1,
                                    e4m3, t16, hf, xo, nv, res, row)
                for v in range(nv):
                    y[by_rec[q + v], l] = res[v]
            q += nv

    if norms.shape[0] == num_pairs:
        for p in range(num_pairs):
            acc = np.float32(0.0)
            for l in range(latent):
                acc += y[p, l] * y[p, l]
            norms[p] = np.sqrt(acc)
    _add_pairs_by_token(tok, wgt, y, out)


# ---------------------------------------------------------------------------------------------- entry points


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
    bank = _check_records(layout, records)
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


def _projection_params(layout: ExpertRecordLayout, proj: str) -> np.ndarray:
    """The kernel's ``_P_*`` parameters of the up or down projection: offsets, shape, and which path takes it."""
    spec, sec = layout.spec, layout.sections
    fmt = _FORMAT_ID[spec.format]
    k = layout.width if proj == "up" else layout.inner
    group = spec.group_of(k)
    pj = np.zeros(_P_LEN, np.int64)
    for index, part in ((_P_DATA, "data"), (_P_SCALE, "scale"), (_P_ZERO, "zero")):
        name = f"{proj}.{part}"
        pj[index] = sec[name].offset if name in sec else 0
    pj[_P_SCALAR] = (sec["scalars"].offset if "scalars" in sec else 0) + (0 if proj == "up" else 4)
    pj[_P_K], pj[_P_GROUP], pj[_P_GROUPS] = k, group, max(spec.groups(k), 1)
    pj[_P_STEPS] = k // _STEP[fmt]
    pj[_P_VEC] = 1
    pj[_P_SYM] = int(spec.symmetric)
    if fmt == _W4A16:
        pj[_P_SKIND] = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}[spec.scale_dtype]
        if group >= k:  # one group per row
            pj[_P_SPG] = max(pj[_P_STEPS], 1)
        elif group % 32 == 0:  # whole steps per group
            pj[_P_SPG] = group // 32
        elif group == 16:
            pj[_P_SPG] = 0
        else:
            pj[_P_VEC] = 0
            pj[_P_STEPS] = 0
    pj[_P_PERM] = int(fmt != _FP8 and pj[_P_VEC] == 1)
    if pj[_P_VEC]:
        first = _STEP[fmt] * pj[_P_STEPS]
        for c in range(first, k):  # fewer than 32
            pj[_P_TAIL_GROUPS + c - first] = c // group
    if fmt == _W4A16:
        pj[_P_SBYTES] = spec.scale_dtype.itemsize
        if spec.symmetric:
            pj[_P_ZERO] = pj[_P_DATA]  # any readable words: the kernel reads, never uses them
    return pj


def cpu_moe_quant(x: Any, layout: ExpertRecordLayout, records: Any, pairs_token: Any, pairs_record: Any,
                  pairs_weight: Any, out: Any, pair_norms: Any = None, *,
                  intermediate: torch.dtype | None = None) -> np.ndarray:
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
        intermediate: as :func:`~residency.runtime.cpu_experts.cpu_moe`'s (a GPU prefill kernel's 16-bit ``h``).

    Returns ``out`` as the numpy array written.
    """
    h_round = rounding_code(intermediate)
    x, out, bank, tokens, recs, weights = _check(x, layout, records, pairs_token, pairs_record, pairs_weight, out)
    norms = np.empty(0, np.float32)
    if pair_norms is not None:
        norms = _as_array(pair_norms, "pair_norms")
        if norms.shape != (len(tokens),) or norms.dtype != np.float32 or not norms.flags.c_contiguous:
            raise ValueError(f"pair_norms must be a contiguous float32 [{len(tokens)}] array")
    if len(tokens) == 0:
        return out
    cpu_moe_quant_prepared(_prepare(layout, bank), x, tokens, recs, weights, out, norms, h_round)
    return out


@dataclass(frozen=True)
class PreparedRecords:
    """One layer's quantized records with everything the kernel needs besides the pairs (:func:`prepare_records`)."""

    layout: ExpertRecordLayout
    flat: np.ndarray
    words: np.ndarray
    floats: np.ndarray
    halves: np.ndarray
    num_records: int
    fmt: int
    scale_bits: int
    tables: tuple[np.ndarray, np.ndarray, np.ndarray]
    up_params: np.ndarray
    down_params: np.ndarray
    rows_up: int
    rows_down: int
    x_scale: np.float32

    @cached_property
    def kernel_args(self) -> tuple[tuple, tuple]:
        """The kernel's arguments from these records, before and after the pair arguments (made once, see
        :attr:`residency.runtime.cpu_experts.PreparedBanks.kernel_args`)."""
        e2m1, e4m3, t16 = self.tables
        lay = self.layout
        return ((self.flat, self.words, self.floats, self.halves, lay.record_bytes, _FORMAT_TAGS[self.fmt], self.fmt,
                 lay.inner, self.up_params, self.down_params, lay.spec.symmetric, self.scale_bits, e2m1, e4m3, t16),
                (self.rows_up, self.rows_down, self.x_scale))


def _prepare(layout: ExpertRecordLayout, bank: np.ndarray) -> PreparedRecords:
    spec = layout.spec
    fmt = _FORMAT_ID[spec.format]
    flat = bank.reshape(-1)
    inter, latent = layout.inner, layout.width
    return PreparedRecords(
        layout, flat, flat.view(np.int32), flat.view(np.float32), flat.view(np.uint16), bank.shape[0], fmt,
        32 if spec.format != "w4a16" or spec.scale_dtype == torch.float32 else 16,
        _tables(spec.scale_dtype if spec.format == "w4a16" else torch.float32),
        _projection_params(layout, "up"), _projection_params(layout, "down"),
        max(1, min(inter, _TASK_BYTES // max(1, layout.record_bytes // (2 * inter)))),
        max(1, min(latent, _TASK_BYTES // max(1, layout.record_bytes // (2 * latent)))),
        np.float32({_NVFP4: 1.0 / _E2M1_SHIFT, _FP8: 1.0 / _E4M3_SHIFT, _W4A16: 1.0}[fmt]))


def _check_records(layout: ExpertRecordLayout, records: Any) -> np.ndarray:
    """``records`` as the C-contiguous, 16-byte aligned ``[records, record_bytes]`` uint8 array the kernel reads."""
    bank = _as_array(records, "records")
    if bank.ndim != 2 or bank.dtype != np.uint8 or bank.shape[1] != layout.record_bytes or not bank.flags.c_contiguous:
        raise ValueError(f"records must be a C-contiguous [records, {layout.record_bytes}] uint8 array, got "
                         f"{bank.shape} {bank.dtype}")
    if bank.ctypes.data % 16:
        raise ValueError("records must start at a 16-byte aligned address (the runtime's buffers are)")
    return bank


def prepare_records(layout: ExpertRecordLayout, records: Any) -> PreparedRecords:
    """Check a layer's records once (as :func:`cpu_moe_quant` does every call) and derive the kernel's
    constants, for repeated :func:`cpu_moe_quant_prepared` calls: a store's buffers never change, and
    the checks and set-up cost about 25 µs a call."""
    return _prepare(layout, _check_records(layout, records))


def cpu_moe_quant_prepared(records: PreparedRecords, x: np.ndarray, pairs_token: np.ndarray,
                           pairs_record: np.ndarray, pairs_weight: np.ndarray, out: np.ndarray,
                           pair_norms: np.ndarray | None = None, h_round: int = ROUND_NONE) -> None:
    """:func:`cpu_moe_quant` on prepared records, for a caller that built its inputs itself (the runtime);
    ``h_round``: :func:`~residency.runtime.cpu_experts.rounding_code` of ``cpu_moe_quant``'s ``intermediate``.

    Only cheap checks run (``x`` / ``out`` C-contiguous float32 ``[T, width]``, pair arrays int64 /
    int64 / float32 of one length); indices are *not* range-checked: the caller guarantees
    ``0 <= token < T`` and ``0 <= record < num_records``.
    """
    norms = check_prepared_call(x, out, records.layout.width, pairs_token, pairs_record, pairs_weight, pair_norms)
    if norms is not None:
        run_prepared_quant(records, x, pair_array(pairs_token, pairs_record), pairs_token.shape[0],
                           pairs_weight[None, :], out, norms, h_round)


def run_prepared_quant(records: PreparedRecords, x: np.ndarray, pairs: np.ndarray, num_pairs: int,
                       weights: np.ndarray, out: np.ndarray, norms: np.ndarray, h_round: int = ROUND_NONE) -> None:
    """:func:`cpu_moe_quant_prepared` without its checks, for the offload runtime, whose inputs have those types
    by construction (pairs as :func:`~residency.runtime.cpu_experts.run_prepared` takes them): at least one
    pair, ``norms`` empty when not wanted. Wrong types or shapes here read or write out of bounds."""
    head, tail = records.kernel_args
    _cpu_moe_quant_kernel(x, *head, pairs, num_pairs, weights, out, norms, *tail, h_round)


def cpu_moe_quant_reference(x: Any, layout: ExpertRecordLayout, records: Any, pairs_token: Any, pairs_record: Any,
                            pairs_weight: Any, out: Any, pair_norms: Any = None, *,
                            intermediate: torch.dtype | None = None) -> np.ndarray:
    """:func:`cpu_moe_quant` through the torch quantized reference (same arguments, same in-place effect)."""
    from residency.kernels.moe.quant_reference import moe_gather_gemm_quant_reference

    x, out, bank, tokens, recs, weights = _check(x, layout, records, pairs_token, pairs_record, pairs_weight, out)
    if len(tokens) == 0:
        return out
    t_bank = torch.from_numpy(bank)
    table = torch.arange(bank.shape[0], dtype=torch.int32)
    norms = torch.zeros((len(tokens), 1), dtype=torch.float32)
    rows = moe_gather_gemm_quant_reference(
        torch.from_numpy(x)[torch.from_numpy(tokens)], layout.up(t_bank), layout.down(t_bank), table,
        torch.from_numpy(recs)[:, None], torch.from_numpy(weights)[:, None], pair_norms=norms,
        intermediate=intermediate)
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
