"""Quantized CPU experts (numba): equal to the torch quantized reference for every format, read the packed
records in place, deterministic across thread counts; bad inputs refused."""

from __future__ import annotations

import numba
import numpy as np
import pytest
import torch
from residency.kernels.moe.quant_formats import ExpertRecordLayout, QuantSpec
from residency.runtime.cpu_quant import code_tables, cpu_moe_quant, cpu_moe_quant_reference

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
