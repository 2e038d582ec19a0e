"""Quantized CPU experts (numba): equal to the torch quantized reference for every format, group size and
shape (vector steps, scalar tails, partial groups), with the formats' extreme and NaN codes; read the packed
records in place; bit-identical across thread counts and however many pairs share an expert; both row
decoders (AVX-512 tables, portable fp16 bits) right; bad inputs refused."""

from __future__ import annotations

import llvmlite.binding as llvm_binding
import numba
import numpy as np
import pytest
import torch
from residency.kernels.moe.quant_formats import ExpertRecordLayout, QuantSpec
from residency.runtime.cpu_quant import (
    _P_GROUPS,
    _P_SKIND,
    _P_SPG,
    _P_STEPS,
    _P_VEC,
    _make_row_dot,
    _projection_params,
    code_tables,
    cpu_moe_quant,
    cpu_moe_quant_reference,
)

SPECS = {
    "nvfp4": QuantSpec("nvfp4"),
    "fp8": QuantSpec("fp8"),
    "w4a16-g16-bf16": QuantSpec("w4a16", group_size=16, scale_dtype=torch.bfloat16),
    "w4a16-g8-asym-fp32": QuantSpec("w4a16", group_size=8, symmetric=False, scale_dtype=torch.float32),
    "w4a16-channel-asym-fp16": QuantSpec("w4a16", group_size=None, symmetric=False, scale_dtype=torch.float16),
}


def random_records(layout: ExpertRecordLayout, count: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    bank = torch.randint(0, 256, (count, layout.record_bytes), generator=gen, dtype=torch.int32).to(torch.uint8)
    for proj in ("up", "down"):
        w = layout.projection(bank, proj)
        if layout.spec.format == "nvfp4":
            w.scale.view(torch.uint8).copy_(torch.randint(0x20, 0x40, w.scale.shape, generator=gen).to(torch.uint8))
            w.scale2.copy_(torch.rand(count, generator=gen) * 0.1 + 0.02)
        elif layout.spec.format == "fp8":
            data = w.data.view(torch.uint8)
            data.copy_(torch.where((data & 0x7F) == 0x7F, torch.zeros_like(data), data))
            w.scale2.copy_(torch.rand(count, generator=gen) * 1e-3 + 1e-4)
        else:
            w.scale.copy_((torch.rand(w.scale.shape, generator=gen) * 0.05 + 0.01).to(w.scale.dtype))
    return bank


def problem(spec, tokens=5, latent=32, inter=48, records=7, pairs=12, seed=0):
    layout = ExpertRecordLayout(spec, inter, latent)
    bank = random_records(layout, records, seed)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((tokens, latent)).astype(np.float32)
    tok = rng.integers(0, tokens, pairs)
    rec = rng.integers(0, records, pairs)
    w = rng.random(pairs).astype(np.float32)
    return layout, bank, x, tok, rec, w


@pytest.mark.parametrize("name", list(SPECS))
def test_matches_the_quantized_reference(name):
    layout, bank, x, tok, rec, w = problem(SPECS[name], latent=32, inter=48 if name == "nvfp4" else 40)
    out = np.full_like(x, 0.5)
    ref = np.full_like(x, 0.5)
    norms, ref_norms = np.zeros(len(tok), np.float32), np.zeros(len(tok), np.float32)
    cpu_moe_quant(x, layout, bank, tok, rec, w, out, norms)
    cpu_moe_quant_reference(x, layout, bank, tok, rec, w, ref, ref_norms)
    scale = np.abs(ref).max()
    assert np.abs(out - ref).max() <= 1e-5 * scale
    assert np.abs(norms - ref_norms).max() <= 1e-5 * np.abs(ref_norms).max()
    untouched = sorted(set(range(x.shape[0])) - set(tok.tolist()))
    assert np.all(out[untouched] == 0.5)


def test_deterministic_across_thread_counts_and_reads_records_in_place():
    layout, bank, x, tok, rec, w = problem(SPECS["nvfp4"], tokens=9, pairs=30, records=10)
    before = numba.get_num_threads()
    results = []
    try:
        for threads in (1, max(1, numba.config.NUMBA_NUM_THREADS)):
            numba.set_num_threads(threads)
            out = np.zeros_like(x)
            cpu_moe_quant(x, layout, bank.numpy(), tok, rec, w, out)
            results.append(out)
    finally:
        numba.set_num_threads(before)
    assert np.array_equal(results[0], results[1])
    # a view of a wider buffer (records of a host store) is refused unless its rows are contiguous
    wide = torch.zeros(10, layout.record_bytes + 16, dtype=torch.uint8)
    with pytest.raises(ValueError, match="C-contiguous"):
        cpu_moe_quant(x, layout, wide[:, :layout.record_bytes], tok, rec, w, np.zeros_like(x))


def test_code_tables_are_the_format_values():
    e2m1, e4m3, t16 = code_tables(torch.bfloat16)
    assert e2m1.tolist()[:8] == [0, 0.5, 1, 1.5, 2, 3, 4, 6]
    assert e4m3[0x7E] == 448 and e4m3[0x01] == 2.0**-9 and np.isnan(e4m3[0x7F]) and e4m3[0xB8] == -1.0
    assert t16[0x3F80] == 1.0 and t16[0xBF80] == -1.0
    _, _, f16 = code_tables(torch.float16)
    assert f16[0x3C00] == 1.0 and f16[0xC000] == -2.0


def test_bad_inputs():
    layout, bank, x, tok, rec, w = problem(SPECS["fp8"])
    with pytest.raises(ValueError, match="features"):
        cpu_moe_quant(x[:, :16].copy(), layout, bank, tok, rec, w, np.zeros((5, 16), np.float32))
    with pytest.raises(ValueError, match="outside"):
        cpu_moe_quant(x, layout, bank, tok, rec + 100, w, np.zeros_like(x))
    with pytest.raises(ValueError, match="uint8"):
        cpu_moe_quant(x, layout, bank.float(), tok, rec, w, np.zeros_like(x))
    assert np.all(cpu_moe_quant(x, layout, bank, tok[:0], rec[:0], w[:0], np.zeros_like(x)) == 0)


# ---------------------------------------------------------------------------------------------- the fast paths

FAST_SPECS = {
    **SPECS,
    "w4a16-g128-bf16": QuantSpec("w4a16", group_size=128),
    "w4a16-g32-asym-fp16": QuantSpec("w4a16", group_size=32, symmetric=False, scale_dtype=torch.float16),
    "w4a16-g64-fp32": QuantSpec("w4a16", group_size=64, scale_dtype=torch.float32),
}
# (latent L, intermediate I): whole vector steps, an odd multiple of 16, and (where the format allows)
# K not a multiple of 8 / 16, so the scalar tails and partial groups run too
SHAPES = {"nvfp4": [(64, 96), (48, 80), (272, 144)], "fp8": [(64, 96), (40, 56), (136, 24)],
          "w4a16": [(256, 160), (40, 56), (136, 24), (300, 140)]}


def assert_close(got, want, rel=1e-5):
    scale = np.abs(want).max()
    assert np.abs(got - want).max() <= rel * scale, (np.abs(got - want).max(), scale)


def cases():
    for name, spec in FAST_SPECS.items():
        for latent, inter in SHAPES[spec.format]:
            yield pytest.param(spec, latent, inter, id=f"{name}-L{latent}-I{inter}")


@pytest.mark.parametrize(("spec", "latent", "inter"), cases())
def test_fast_paths_match_the_reference_at_many_shapes(spec, latent, inter):
    layout, bank, x, tok, rec, w = problem(spec, tokens=6, latent=latent, inter=inter, records=5, pairs=13,
                                          seed=latent + inter)
    out, ref = np.full_like(x, 0.25), np.full_like(x, 0.25)
    norms, ref_norms = np.full(len(tok), np.nan, np.float32), np.zeros(len(tok), np.float32)
    cpu_moe_quant(x, layout, bank, tok, rec, w, out, norms)
    cpu_moe_quant_reference(x, layout, bank, tok, rec, w, ref, ref_norms)
    assert_close(out, ref)
    assert_close(norms, ref_norms)
    untouched = sorted(set(range(x.shape[0])) - set(tok.tolist()))
    assert np.all(out[untouched] == 0.25)
    # the vector path takes every group size that is a multiple of 16 (or one group per row)
    group = spec.group_of(latent)
    assert _projection_params(layout, "up")[_P_VEC] == int(group % 16 == 0 or group >= latent)


def exact_records(layout: ExpertRecordLayout, count: int, seed: int) -> torch.Tensor:
    """Records whose weights are multiples of 1/8 below 8 (NVFP4 block scales 0.5 or 1, E4M3 codes in [1, 4),
    W4A16 scale 0.5, per-tensor scales 1): with integer activations every dot product is exact in fp32."""
    gen = torch.Generator().manual_seed(seed)
    bank = torch.randint(0, 256, (count, layout.record_bytes), generator=gen, dtype=torch.int32).to(torch.uint8)
    for proj in ("up", "down"):
        w = layout.projection(bank, proj)
        if layout.spec.format == "nvfp4":
            w.scale.view(torch.uint8).copy_(torch.where(torch.rand(w.scale.shape, generator=gen) < 0.5, 0x30, 0x38))
        elif layout.spec.format == "fp8":
            data = w.data.view(torch.uint8)
            data.copy_((data & 0x87) | torch.where(torch.rand(data.shape, generator=gen) < 0.5, 0x38, 0x40))
        else:
            w.scale.fill_(0.5)
        if w.scale2 is not None:
            w.scale2.fill_(1.0)
    return bank


@pytest.mark.parametrize("name", list(FAST_SPECS))
def test_intermediate_rounded_to_16_bits_as_the_gpu_prefill_kernel_keeps_it(name):
    """``intermediate=``: the quantized kernel rounds relu(up @ x)^2 to bf16 / fp16 as the GPU prefill kernel stores it
    (weights and activations exact, so the rounded bits are the reference's and the rounding shows)."""
    spec = FAST_SPECS[name]
    layout = ExpertRecordLayout(spec, 48, 64)
    bank = exact_records(layout, 5, seed=len(name))
    rng = np.random.default_rng(len(name))
    x = rng.integers(-2, 3, (4, 64)).astype(np.float32)
    tok, rec = rng.integers(0, 4, 11), rng.integers(0, 5, 11)
    w = (rng.integers(1, 8, 11) / 8).astype(np.float32)
    for dtype in (torch.bfloat16, torch.float16):
        got, want, plain = np.zeros_like(x), np.zeros_like(x), np.zeros_like(x)
        cpu_moe_quant(x, layout, bank, tok, rec, w, got, intermediate=dtype)
        cpu_moe_quant_reference(x, layout, bank, tok, rec, w, want, intermediate=dtype)
        cpu_moe_quant(x, layout, bank, tok, rec, w, plain)
        assert_close(got, want, rel=1e-6)
        assert np.abs(plain - want).max() > 1e-5 * np.abs(want).max()  # the rounding is really there


def edge_records(layout: ExpertRecordLayout, count: int) -> torch.Tensor:
    """Random records with the formats' extremes written in: largest and negative codes, zero scales."""
    bank = random_records(layout, count, seed=3)
    fmt = layout.spec.format
    for proj in ("up", "down"):
        w = layout.projection(bank, proj)
        data = w.data.view(torch.uint8)
        data[..., ::7] = {"nvfp4": 0x77, "fp8": 0x7E, "w4a16": 0xFF}[fmt]  # +6 +6 / +448 / codes 15
        data[..., 3::7] = {"nvfp4": 0xFF, "fp8": 0xFE, "w4a16": 0x00}[fmt]  # -6 -6 / -448 / codes 0
        if fmt == "nvfp4":
            scale = w.scale.view(torch.uint8)
            scale[..., ::5] = 0x7E  # 448
            scale[..., 2::5] = 0x00  # a zero block scale
            scale[..., 3::5] = 0x01  # the smallest subnormal, 2**-9
        elif fmt == "w4a16":
            w.scale[:, :, ::3] = 0
        if w.scale2 is not None:
            w.scale2[1] = 0.0  # a record whose per-tensor scale is zero
    return bank


@pytest.mark.parametrize("name", ["nvfp4", "fp8", "w4a16-g128-bf16", "w4a16-g32-asym-fp16", "w4a16-g16-bf16"])
def test_edge_values(name):
    spec = FAST_SPECS[name]
    layout = ExpertRecordLayout(spec, 160, 256)
    bank = edge_records(layout, 4)
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((3, 256)) * 0.1).astype(np.float32)
    tok, rec = np.array([0, 0, 1, 2, 2, 1]), np.array([0, 1, 2, 3, 0, 1])
    w = rng.random(6).astype(np.float32)
    out, ref = np.zeros_like(x), np.zeros_like(x)
    cpu_moe_quant(x, layout, bank, tok, rec, w, out)
    cpu_moe_quant_reference(x, layout, bank, tok, rec, w, ref)
    assert np.isfinite(ref).all()
    assert_close(out, ref)
    if spec.has_scalar:  # the record with a zero per-tensor scale contributes exactly nothing
        y = np.zeros_like(x)
        cpu_moe_quant(x, layout, bank, np.array([0]), np.array([1]), np.ones(1, np.float32), y)
        assert np.all(y == 0)


@pytest.mark.parametrize(("fmt", "where"), [("fp8", "vector"), ("fp8", "tail"), ("nvfp4", "block scale")])
def test_nan_codes_make_nan_like_the_reference(fmt, where):
    # up rows of 40 FP8 inputs (2 steps and a tail of 8), of 272 NVFP4 inputs (8 steps, their scales decoded
    # together, and a tail block)
    layout = ExpertRecordLayout(QuantSpec(fmt), 48, 40 if fmt == "fp8" else 272)
    bank = random_records(layout, 3, seed=5)
    up = layout.up(bank)
    if where == "block scale":
        up.scale.view(torch.uint8)[1, 7, 5] = 0x7F
    else:
        up.data.view(torch.uint8)[1, 7, 3 if where == "vector" else 36] = 0xFF
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, layout.width)).astype(np.float32)
    tok, rec, w = np.array([0, 1, 1]), np.array([0, 1, 2]), np.ones(3, np.float32)
    out, ref = np.zeros_like(x), np.zeros_like(x)
    cpu_moe_quant(x, layout, bank, tok, rec, w, out)
    cpu_moe_quant_reference(x, layout, bank, tok, rec, w, ref)
    assert np.isnan(ref[1]).all() and np.isfinite(ref[0]).all()
    assert np.isnan(out[1]).all()
    assert_close(out[0], ref[0])


@pytest.mark.parametrize("name", ["nvfp4", "fp8", "w4a16-g128-bf16", "w4a16-g16-bf16", "w4a16-g8-asym-fp32"])
def test_pairs_of_one_expert_batch_invariant_and_thread_count_independent(name):
    """Up to four pairs of an expert share one decode of each row; a pair's result must not depend on
    how many others share it, nor on the thread count."""
    spec = FAST_SPECS[name]
    layout, bank, x, _, _, _ = problem(spec, tokens=9, latent=64, inter=96, records=3, seed=4)
    tok = np.arange(9)
    rec = np.array([2, 2, 0, 2, 2, 2, 1, 2, 2])  # seven pairs on record 2: passes of four and three
    w = np.linspace(0.2, 1.0, 9).astype(np.float32)
    before = numba.get_num_threads()
    runs = []
    try:
        for threads in (1, 2):
            numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
            out = np.zeros_like(x)
            norms = np.full(9, np.nan, np.float32)
            cpu_moe_quant(x, layout, bank, tok, rec, w, out, norms)
            runs.append((out, norms))
    finally:
        numba.set_num_threads(before)
    assert np.array_equal(runs[0][0], runs[1][0]) and np.array_equal(runs[0][1], runs[1][1])
    out, norms = runs[0]
    for t in (0, 4, 8):  # each token alone gives the same bits as in the batch
        alone = np.zeros_like(x)
        one_norm = np.full(1, np.nan, np.float32)
        cpu_moe_quant(x, layout, bank, tok[t:t + 1], rec[t:t + 1], w[t:t + 1], alone, one_norm)
        assert np.array_equal(alone[t], out[t]) and one_norm[0] == norms[t]
    ref = np.zeros_like(x)
    cpu_moe_quant_reference(x, layout, bank, tok, rec, w, ref)
    assert_close(out, ref)


# ---------------------------------------------------------------------------------------------- both decoders

_RUNNERS = {}


def row_dot(fmt: int, native: bool):
    """A compiled caller of the four-vector row intrinsic of ``fmt`` with the decoder chosen."""
    if (fmt, native) not in _RUNNERS:
        dot = _make_row_dot(fmt, 4, native)

        @numba.njit
        def run(bank, doff, soff, zoff, zshift, nsteps, spg, skind, xs, xo, res):
            dot(bank, doff, soff, zoff, zshift, nsteps, spg, skind, xs, xo[0], xo[1], xo[2], xo[3], res)

        _RUNNERS[fmt, native] = run
    return _RUNNERS[fmt, native]


@pytest.mark.parametrize("native", [False, True], ids=["portable", "avx512"])
@pytest.mark.parametrize("name", ["nvfp4", "fp8", "w4a16-g128-bf16", "w4a16-g32-asym-fp16", "w4a16-g64-fp32",
                                  "w4a16-g16-bf16", "w4a16-channel-asym-fp16"])
def test_row_decoders_portable_and_avx512(name, native):
    """The vector steps of every up row, through the AVX-512 table decode and the portable fp16 / convert
    decode (the one machines without AVX-512 run), against the dequantized weights."""
    if native and "avx512f" not in llvm_binding.get_host_cpu_features().flatten():
        pytest.skip("this CPU has no AVX-512")
    spec = FAST_SPECS[name]
    fmt = {"nvfp4": 0, "fp8": 1, "w4a16": 2}[spec.format]
    latent, inter = 256, 32
    layout = ExpertRecordLayout(spec, inter, latent)
    bank = random_records(layout, 1, seed=6)
    weights = layout.up(bank).dequantize()[0].double().numpy()  # [inter, latent]
    pj = _projection_params(layout, "up")
    rng = np.random.default_rng(7)
    x = rng.standard_normal((4, latent)).astype(np.float32)
    staged = np.empty_like(x)
    for i in range(latent):  # even inputs first in every 32 for the nibble formats, scaled as the kernel does
        c, r = divmod(i, 32)
        at = i if fmt == 1 else 32 * c + r // 2 + 16 * (r % 2)
        staged[:, at] = x[:, i] * {0: 2.0**14, 1: 2.0**8, 2: 1.0}[fmt]
    flat = bank.numpy().reshape(-1)
    sec = layout.sections
    res = np.empty(4, np.float32)
    scalar = float(layout.up(bank).scale2[0]) if spec.has_scalar else 1.0
    for r in range(inter):
        if fmt == 0:
            doff, soff = sec["up.data"].offset + r * latent // 2, sec["up.scale"].offset + r * latent // 16
            zoff, zshift, factor = 0, -1, scalar * 2.0**8
        elif fmt == 1:
            doff, soff, zoff, zshift, factor = sec["up.data"].offset + r * latent, 0, 0, -1, scalar
        else:
            groups = pj[_P_GROUPS]
            doff = sec["up.data"].offset + r * latent // 2
            soff = sec["up.scale"].offset + r * groups * spec.scale_dtype.itemsize
            zoff = sec["up.zero"].offset + 4 * (r // 8) * groups if not spec.symmetric else doff
            zshift, factor = (-1 if spec.symmetric else 4 * (r % 8)), 1.0
        row_dot(fmt, native)(flat, doff, soff, zoff, zshift, pj[_P_STEPS], pj[_P_SPG], pj[_P_SKIND],
                 staged.reshape(-1), np.arange(4) * latent, res)
        want = x.astype(np.float64) @ weights[r]
        assert np.abs(res * factor - want).max() <= 1e-5 * np.abs(want).max() + 1e-30, r


HASWELL = ("+64bit,+avx,+avx2,+bmi,+bmi2,+cmov,+cx16,+f16c,+fma,+fsgsbase,+lzcnt,+mmx,+movbe,+popcnt,+rdrnd,+sse,"
           "+sse2,+sse3,+sse4.1,+sse4.2,+ssse3,+xsave,+xsaveopt")
CHILD = """
import json, numpy as np, torch
from residency.runtime import cpu_quant
from residency.kernels.moe.quant_formats import ExpertRecordLayout, QuantSpec
errors = {}
for spec in (QuantSpec("nvfp4"), QuantSpec("fp8"), QuantSpec("w4a16", group_size=128)):
    layout = ExpertRecordLayout(spec, 96, 272)
    rng = np.random.default_rng(0)
    bank = rng.integers(0, 256, (3, layout.record_bytes), dtype=np.uint8)
    t = torch.from_numpy(bank)
    for proj in ("up", "down"):
        w = layout.projection(t, proj)
        if spec.format == "nvfp4":
            w.scale.view(torch.uint8).copy_(torch.randint(0x20, 0x40, tuple(w.scale.shape), dtype=torch.uint8))
            w.scale2.fill_(1 / 16)
        elif spec.format == "fp8":
            w.data.view(torch.uint8).bitwise_and_(0x77)
            w.scale2.fill_(1 / 64)
        else:
            w.scale.fill_(1 / 64)
    x = rng.standard_normal((2, 272)).astype(np.float32)
    args = (np.array([0, 1, 1]), np.array([0, 2, 1]), np.array([0.5, 0.3, 0.2], np.float32))
    out, ref = np.zeros_like(x), np.zeros_like(x)
    cpu_quant.cpu_moe_quant(x, layout, bank, *args, out)
    cpu_quant.cpu_moe_quant_reference(x, layout, bank, *args, ref)
    errors[spec.format] = float(np.abs(out - ref).max() / np.abs(ref).max())
print(json.dumps(errors))
"""


@pytest.mark.slow
def test_kernels_compiled_for_a_cpu_without_avx512_match_the_reference(tmp_path):
    """Most desktop Intel CPUs have AVX2 but no AVX-512: compiled for such a target (Haswell features, a
    fresh numba cache), every format takes the portable decode and still equals the reference."""
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path), "NUMBA_CPU_NAME": "haswell", "NUMBA_CPU_FEATURES": HASWELL}
    run = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    errors = json.loads(run.stdout.strip().splitlines()[-1])
    assert set(errors) == {"nvfp4", "fp8", "w4a16"} and max(errors.values()) <= 1e-5, errors


@pytest.mark.parametrize("fmt", ["nvfp4", "fp8"])
def test_prepared_records_give_the_same_result_and_refuse_bad_inputs(fmt):
    from residency.runtime.cpu_quant import cpu_moe_quant_prepared, prepare_records

    layout = ExpertRecordLayout(QuantSpec(fmt), 48, 64)
    rng = np.random.default_rng(1)
    bank = rng.integers(0, 256, (3, layout.record_bytes), dtype=np.uint8)
    for proj in ("up", "down"):
        w = layout.projection(torch.from_numpy(bank), proj)
        if fmt == "nvfp4":
            w.scale.view(torch.uint8).copy_(torch.randint(0x20, 0x40, tuple(w.scale.shape), dtype=torch.uint8))
        else:
            w.data.view(torch.uint8).bitwise_and_(0x77)
        w.scale2.fill_(1 / 32)
    x = rng.standard_normal((2, 64)).astype(np.float32)
    tokens, recs = np.array([0, 1, 1], np.int64), np.array([2, 0, 2], np.int64)
    weights = np.array([0.5, 0.3, 0.2], np.float32)
    expected, got = np.zeros_like(x), np.zeros_like(x)
    cpu_moe_quant(x, layout, bank, tokens, recs, weights, expected)
    records = prepare_records(layout, bank)
    cpu_moe_quant_prepared(records, x, tokens, recs, weights, got)
    assert np.array_equal(got, expected) and np.abs(expected).max() > 0
    with pytest.raises(ValueError, match="int64 tokens"):
        cpu_moe_quant_prepared(records, x, tokens, recs, weights.astype(np.float64), got)
    with pytest.raises(ValueError, match="uint8"):
        prepare_records(layout, bank[:, :-16].copy())
