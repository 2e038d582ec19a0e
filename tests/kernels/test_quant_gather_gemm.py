"""Quantized slot-bank MoE: the Triton decode and prefill kernels (interpreter, fp32 compute) against the torch
reference that dequantizes fully, for NVFP4, FP8 and W4A16 banks of expert records, odd sizes and slot tables
with unused slots; the quantized Linear; and the reference against the float reference on dequantized weights."""

from __future__ import annotations

import pytest
import torch
from residency.kernels.moe import GemmTile, MoeConfig
from residency.kernels.moe.quant_formats import ExpertRecordLayout, QuantSpec, QuantWeights
from residency.kernels.moe.quant_gather_gemm import moe_gather_gemm_quant, quant_linear
from residency.kernels.moe.quant_reference import moe_gather_gemm_quant_reference, quant_linear_reference
from residency.kernels.moe.reference import moe_gather_gemm_reference


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    # tiny tensors on a shared 2-core machine: intra-op threads only add barrier waits
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

SMALL = MoeConfig(up=GemmTile(16, 16, GROUP_M=2), down=GemmTile(16, 16), BLOCK_M=16)
PATHS = ["decode", "prefill"]

SPECS = {
    "nvfp4": QuantSpec("nvfp4"),
    "fp8": QuantSpec("fp8"),
    "w4a16-g16": QuantSpec("w4a16", group_size=16, scale_dtype=torch.float32),
    "w4a16-g8-asym": QuantSpec("w4a16", group_size=8, symmetric=False, scale_dtype=torch.float32),
    "w4a16-channel-asym-bf16": QuantSpec("w4a16", group_size=None, symmetric=False, scale_dtype=torch.bfloat16),
    "w4a16-g12": QuantSpec("w4a16", group_size=12, scale_dtype=torch.float32),  # decode falls back to prefill
}
# tokens, latent L, intermediate I, experts, slots, top_k (NVFP4 needs L and I divisible by 16)
SHAPES = {
    "nvfp4": [(1, 16, 48, 8, 10, 2), (5, 32, 80, 12, 16, 3), (17, 48, 16, 9, 9, 4)],
    "fp8": [(1, 24, 40, 8, 8, 1), (5, 37, 19, 12, 16, 3), (18, 16, 33, 9, 13, 4)],
    "w4a16": [(1, 32, 48, 8, 10, 2), (4, 20, 37, 12, 16, 3), (17, 40, 24, 9, 11, 4)],
}


def shapes_for(name):
    return SHAPES[name.split("-")[0]]


def random_bank(layout: ExpertRecordLayout, slots: int, gen: torch.Generator) -> torch.Tensor:
    """Records with random codes and finite, moderate scales (every slot filled, used or not)."""
    bank = torch.randint(0, 256, (slots, layout.record_bytes), generator=gen, dtype=torch.int32).to(torch.uint8)
    spec = layout.spec
    for proj in ("up", "down"):
        w = layout.projection(bank, proj)
        fan_in = w.k
        if spec.format == "nvfp4":
            # E4M3 bytes 0x20..0x3F: 2^-3 .. ~1.9, never NaN
            w.scale.view(torch.uint8).copy_(torch.randint(0x20, 0x40, w.scale.shape, generator=gen,
                                                          dtype=torch.int32).to(torch.uint8))
            w.scale2.copy_(torch.rand(slots, generator=gen) * 0.4 / fan_in**0.5 + 0.05 / fan_in**0.5)
        elif spec.format == "fp8":
            data = w.data.view(torch.uint8)
            data.copy_(torch.where((data & 0x7F) == 0x7F, torch.zeros_like(data), data))  # no NaN codes
            # E4M3 magnitudes reach 448: scale so that weights are ~1/sqrt(fan_in)
            w.scale2.copy_((torch.rand(slots, generator=gen) + 0.5) / (64 * fan_in**0.5))
        else:
            w.scale.copy_(((torch.rand(w.scale.shape, generator=gen) + 0.5) / (4 * fan_in**0.5)).to(w.scale.dtype))
    return bank


def make_problem(spec, tokens, latent, inter, experts, slots, top_k, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    layout = ExpertRecordLayout(spec, inter, latent)
    bank = random_bank(layout, slots, gen).to(device)
    x = torch.randn(tokens, latent, generator=gen).to(device)
    slot_of_expert = torch.randperm(slots, generator=gen)[:experts].to(torch.int32).to(device)  # unused slots
    ids = torch.stack([torch.randperm(experts, generator=gen)[:top_k] for _ in range(tokens)]) if tokens else \
        torch.zeros(0, top_k)
    ids = ids.long().to(device)
    weights = torch.rand(tokens, top_k, generator=gen).to(device)
    return x, layout.up(bank), layout.down(bank), slot_of_expert, ids, weights


def assert_close(actual, expected, tol=1e-5):
    assert actual.shape == expected.shape
    assert not actual.isnan().any(), "output has unwritten (NaN) elements"
    scale = expected.double().abs().max().clamp_min(1e-30)
    err = float((actual.cpu().double() - expected.cpu().double()).abs().max() / scale)
    assert err <= tol, f"relative error {err:.3g} > {tol}"


def run(problem, path, skip=None, **kwargs):
    x = problem[0]
    out = torch.full_like(x, float("nan"))
    result = moe_gather_gemm_quant(*problem, skip, out=out, path=path, backend="triton", config=SMALL, **kwargs)
    assert result is out
    return out


# decode serves a few tokens (the interpreter is slow on many): its large-token cases run with 3 tokens
CASES = [(name, shape if path == "prefill" or shape[0] <= 5 else (3, *shape[1:]), path)
         for name in SPECS for shape in shapes_for(name) for path in PATHS]


@pytest.mark.parametrize("name,shape,path", CASES, ids=[f"{n}-T{s[0]}-L{s[1]}-I{s[2]}-{p}" for n, s, p in CASES])
def test_kernel_matches_reference(name, shape, path, device):
    problem = make_problem(SPECS[name], *shape, device=device)
    assert_close(run(problem, path), moe_gather_gemm_quant_reference(*problem))


@pytest.mark.parametrize("name", ["nvfp4", "fp8", "w4a16-g8-asym"])
def test_reference_equals_float_reference_on_dequantized_weights(name):
    x, up, down, table, ids, weights = make_problem(SPECS[name], *shapes_for(name)[1])
    dense_up, dense_down = up.dequantize(), down.dequantize()
    got = moe_gather_gemm_quant_reference(x, up, down, table, ids, weights)
    # the same fp32 products; BLAS may block the sums differently for differently aligned operands
    assert_close(got, moe_gather_gemm_reference(x, dense_up, dense_down, table, ids, weights), tol=1e-6)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", ["nvfp4", "w4a16-g16"])
def test_skip_mask_sentinels_and_pair_norms(name, path, device):
    x, up, down, table, ids, weights = make_problem(SPECS[name], 7, 32, 48, 20, 24, 3, device=device)
    skip = (torch.rand(ids.shape, generator=torch.Generator().manual_seed(1)) < 0.3).to(device)
    skip[4] = True  # a token computed wholly elsewhere: its row must be zeros
    ids[1, 2] = -1
    ids[6, :] = -1
    problem = (x, up, down, table, ids, weights)
    out = run(problem, path, skip)
    expected = moe_gather_gemm_quant_reference(*problem, skip)
    assert_close(out, expected)
    assert bool((out[4] == 0).all()) and bool((out[6] == 0).all())
    norms = torch.full(ids.shape, -7.0, device=device)
    ref_norms = torch.full(ids.shape, -7.0, device=device)
    run(problem, path, skip, pair_norms=norms)
    moe_gather_gemm_quant_reference(*problem, skip, pair_norms=ref_norms)
    assert_close(norms, ref_norms)
    assert float(norms[4, 0]) == -7.0


@pytest.mark.parametrize("path", PATHS)
def test_missing_expert_raises_when_checked_and_poisons_unchecked(path, device):
    x, up, down, table, ids, weights = make_problem(SPECS["fp8"], 6, 24, 40, 8, 10, 2, device=device)
    missing = int(ids[2, 1])
    table[missing] = -1
    problem = (x, up, down, table, ids, weights)
    with pytest.raises(ValueError, match="no slot"):
        moe_gather_gemm_quant(*problem, path=path, backend="triton", config=SMALL, check=True)
    out = run(problem, path, check=False).cpu()
    hit = (ids == missing).any(-1).cpu()
    assert out[hit].isnan().all() and not out[~hit].isnan().any()


@pytest.mark.parametrize("name", ["w4a16-g8-asym", "w4a16-g12"])
def test_w4a16_groups_no_dot_tile_divides_dequantize_then_dot(name, device, monkeypatch):
    """On a GPU, W4A16 groups that no K tile of at least 16 divides take the dequantize-then-dot tiles (the
    interpreter would take any tile): that branch of the prefill kernel, run here, equals the reference too."""
    import residency.kernels.moe.quant_gather_gemm as quant_gemm

    monkeypatch.setattr(quant_gemm, "_scale_tiles", lambda w, block_k: (block_k, False))
    problem = make_problem(SPECS[name], *shapes_for(name)[1], device=device)
    assert_close(run(problem, "prefill"), moe_gather_gemm_quant_reference(*problem))


def test_banks_the_decode_kernel_cannot_read_take_the_prefill_path_with_its_tiles():
    import residency.kernels.moe.quant_gather_gemm as quant_gemm
    from residency.kernels.moe.tuning import table_for

    x, up, down, table, ids, weights = make_problem(SPECS["w4a16-g12"], 1, 40, 24, 20, 24, 2)
    tuning = table_for(x.device, 40, 24, "w4a16")
    assert quant_gemm._choose_path(x, up, down, table, ids, "auto", None) == ("prefill", tuning.config("prefill", 1))
    assert quant_gemm._choose_path(x, up, down, table, ids, "decode", SMALL) == ("prefill", SMALL)
    x, up, down, table, ids, weights = make_problem(SPECS["w4a16-g16"], 1, 40, 24, 20, 24, 2)  # 1 x 2 x 4 <= 20: decode
    assert quant_gemm._choose_path(x, up, down, table, ids, "auto", None) == ("decode", tuning.config("decode", 1))


def test_prefill_tiles_keep_w4a16_scales_out_of_the_dot(monkeypatch):
    """The K tile of the quantized prefill: W4A16 tiles lie in one scale group where a power of two >= 16 divides
    the group (its scale then multiplies the tile's fp32 product), else the configured tile dequantizes."""
    import residency.kernels.moe.quant_gather_gemm as quant_gemm

    def tiles(spec, block_k, k=256):
        layout = ExpertRecordLayout(spec, 32, k)
        return quant_gemm._scale_tiles(layout.up(torch.zeros(1, layout.record_bytes, dtype=torch.uint8)), block_k)

    w4 = lambda group: QuantSpec("w4a16", group_size=group)  # noqa: E731
    assert tiles(w4(12), 16) == (4, True)  # the interpreter takes any tile
    monkeypatch.setattr(quant_gemm, "interpret_mode", lambda: False)
    assert tiles(w4(128), 64) == (64, True) and tiles(w4(128), 256) == (128, True)
    assert tiles(w4(32), 64) == (32, True) and tiles(w4(48), 64) == (16, True)
    assert tiles(w4(8), 32) == (32, False) and tiles(w4(12), 16) == (16, False)
    assert tiles(w4(None), 64) == (64, True) and tiles(w4(64), 32, k=40) == (32, True)  # one group per row
    assert tiles(QuantSpec("nvfp4"), 64) == (64, False) and tiles(QuantSpec("fp8"), 32) == (32, False)


def test_dequantized_tiles_are_exact_in_16_bits():
    """What the prefill kernel hands a 16-bit ``tl.dot``: every E2M1 x E4M3 product (NVFP4 without its per-tensor
    scale), every E4M3 value (FP8 without its scale) and every q - z (W4A16 without its group scale) is exact in
    bf16 and fp16, so on a GPU only the intermediate is rounded."""
    e2m1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    e2m1 = torch.cat([e2m1, -e2m1])
    e4m3 = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float()
    e4m3 = e4m3[e4m3.isfinite()]
    q_minus_z = torch.arange(-15, 16, dtype=torch.float32)
    for values in ((e2m1[:, None] * e4m3[None, :]).flatten(), e4m3, q_minus_z):
        for dtype in (torch.bfloat16, torch.float16):
            assert torch.equal(values.to(dtype).float(), values)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["nvfp4", "fp8", "w4a16-g16"])
def test_bf16_prefill_on_cuda_rounds_only_the_intermediate(name):
    """bf16 activations on a GPU: the prefill kernel rounds h to bf16 and no weight (its scales multiply the fp32
    products), so with an fp32 ``out`` it equals the reference that rounds h alike, far inside the ~1e-3 that rounding
    the dequantized weights to bf16 would give."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from residency.kernels.moe.quant_gather_gemm import quant_intermediate_dtype

    x, up, down, table, ids, weights = make_problem(SPECS[name], 64, 256, 512, 16, 20, 4, device="cuda")
    x = x.to(torch.bfloat16)
    assert quant_intermediate_dtype(x, up, down, table, ids) == torch.bfloat16
    out = torch.empty(x.shape, dtype=torch.float32, device="cuda")
    moe_gather_gemm_quant(x, up, down, table, ids, weights, out=out, path="prefill")
    rounded = moe_gather_gemm_quant_reference(x, up, down, table, ids, weights, out=torch.empty_like(out),
                                              intermediate=torch.bfloat16)
    assert_close(out, rounded, tol=3e-4)


@pytest.mark.parametrize("path", PATHS)
def test_bf16_activations(path, device):
    x, up, down, table, ids, weights = make_problem(SPECS["nvfp4"], 5, 32, 48, 10, 12, 3, device=device)
    out = run((x.to(torch.bfloat16), up, down, table, ids, weights), path)
    assert out.dtype == torch.bfloat16
    exact = moe_gather_gemm_quant_reference(x.to(torch.bfloat16).float(), up, down, table, ids, weights)
    assert_close(out.float(), exact, tol=2**-7 if device == "cpu" else 3e-2)


def test_auto_path_zero_tokens_and_bad_arguments(device):
    problem = make_problem(SPECS["nvfp4"], 2, 16, 48, 40, 40, 4, device=device)
    out = moe_gather_gemm_quant(*problem, backend="triton")
    assert_close(out, moe_gather_gemm_quant_reference(*problem))
    empty = make_problem(SPECS["nvfp4"], 0, 16, 48, 8, 8, 2, device=device)
    assert moe_gather_gemm_quant(*empty, backend="triton").shape == (0, 16)
    x, up, down, *rest = problem
    with pytest.raises(ValueError, match="up weights must be"):
        moe_gather_gemm_quant(x, down, up, *rest, backend="triton")
    with pytest.raises(TypeError, match="QuantWeights"):
        moe_gather_gemm_quant(x, up.dequantize(), down, *rest, backend="triton")
    fp8 = make_problem(SPECS["fp8"], 2, 16, 48, 40, 40, 4, device=device)
    with pytest.raises(ValueError, match="different formats"):
        moe_gather_gemm_quant(x, up, fp8[2], *rest, backend="triton")


def test_torch_backend_is_the_reference(device):
    problem = make_problem(SPECS["w4a16-g16"], 3, 32, 48, 8, 8, 2, device=device)
    assert torch.equal(moe_gather_gemm_quant(*problem, backend="torch"), moe_gather_gemm_quant_reference(*problem))


def test_weights_are_validated():
    spec = QuantSpec("nvfp4")
    data = torch.zeros(2, 4, 8, dtype=torch.uint8)
    with pytest.raises(ValueError, match="need scale"):
        QuantWeights(spec, 4, 16, data)
    with pytest.raises(ValueError, match="scale must be"):
        QuantWeights(spec, 4, 16, data, torch.zeros(2, 4, 2, dtype=torch.uint8), torch.ones(2))
    with pytest.raises(ValueError, match="divisible by 16"):
        QuantWeights(spec, 4, 24, torch.zeros(2, 4, 12, dtype=torch.uint8),
                     torch.zeros(2, 4, 2, dtype=torch.float8_e4m3fn), torch.ones(2))


@pytest.mark.parametrize("rows", [1, 3, 21])
@pytest.mark.parametrize("name", ["nvfp4", "fp8", "w4a16-g8-asym", "w4a16-g12"])
def test_quant_linear_matches_reference(name, rows, device):
    gen = torch.Generator().manual_seed(rows)
    spec = SPECS[name]
    k = 48 if name == "nvfp4" else 40
    layout = ExpertRecordLayout(spec, 32 if name == "nvfp4" else 19, k)
    bank = random_bank(layout, 1, gen).to(device)
    weight = layout.up(bank)
    x = torch.randn(rows, k, generator=gen).to(device)
    bias = torch.randn(weight.n, generator=gen).to(device)
    got = quant_linear(x, weight, bias, backend="triton", config=SMALL)
    assert_close(got, quant_linear_reference(x, weight, bias))
    x3 = x.reshape(1, rows, k)
    assert quant_linear(x3, weight, backend="triton", config=SMALL).shape == (1, rows, weight.n)


@pytest.mark.parametrize("fmt", ["nvfp4", "fp8", "w4a16"])
def test_quant_benchmark_records_are_finite_and_the_kernel_matches_its_reference_on_them(load_benchmark, fmt):
    """The GPU benchmark's random records (small shapes here, on the CPU) dequantize to finite values, the
    kernel equals the reference on them, and the bytes it counts are one record per distinct expert."""
    bench = load_benchmark("bench_quant_kernels")
    layout = ExpertRecordLayout(bench.FORMATS[fmt], 48, 256)
    records = bench.random_records(layout, 6, torch.Generator().manual_seed(0), "cpu")
    for w in (layout.up(records), layout.down(records)):
        assert torch.isfinite(w.dequantize()).all()
    ids = torch.tensor([[0, 2], [2, 5], [5, 0]])
    weights = torch.full((3, 2), 0.5)
    x = torch.randn(3, 256)
    table = torch.tensor([3, -1, 0, -1, -1, 5], dtype=torch.int32)
    ref = moe_gather_gemm_quant_reference(x, layout.up(records), layout.down(records), table, ids, weights)
    got = moe_gather_gemm_quant(x, layout.up(records), layout.down(records), table, ids, weights)
    assert torch.isfinite(ref).all() and torch.allclose(got, ref, rtol=1e-4, atol=1e-4 * ref.abs().max())
    assert bench.moved_bytes(layout, ids, x) == 3 * layout.record_bytes + 2 * x.numel() * 4


def test_quant_benchmark_report_and_cpu_refusal(capsys, tmp_path, load_benchmark):
    bench = load_benchmark("bench_quant_kernels")
    if not torch.cuda.is_available():
        assert bench.main(["--out", str(tmp_path / "q")]) == 2
        assert "needs a CUDA GPU" in capsys.readouterr().err and not list(tmp_path.iterdir())
    rows = [{"format": f, "tokens": 1, "routings": 8, "distinct_experts": 22.0, "record_bytes": 3096592,
             "bytes": 68e6, "error": 1e-3, "ms": 0.03, "host_ms": 0.02, "gb_per_s": gb, "copy_fraction": gb / 4000,
             "bf16_ms": 0.1, "speedup_vs_bf16": 3.3}
            for f, gb in (("nvfp4", 3000.0), ("fp8", 2000.0), ("w4a16", 1000.0))]
    env = {"device": "GPU", "torch": "t", "triton": "t", "cuda": "c", "commit": "abc", "date": "today"}
    result = {"environment": env, "warmup": 1, "repeats": 2, "routings": 8, "floors": {"copy_gb_per_s": 4000.0},
              "rows": rows, "targets": bench.targets(rows)}
    assert [(t["target"].split()[0], t["met"]) for t in result["targets"]] == [("nvfp4", True), ("fp8", False)]
    text = bench.markdown(result)
    assert "| nvfp4 | 1 | 22.0 | 3.10 | 0.030 | 0.020 | 3000 | 75% | 0.100 | 3.30 |" in text
    assert "2 rounds of 8 routings" in text


@pytest.mark.parametrize("fmt", ["nvfp4", "w4a16"])
def test_quant_benchmark_times_each_routing_in_turn(load_benchmark, fmt):
    """The program's rows on the CPU at small shapes, with a timer that records what it was given: every routing of a
    token count is timed in one call (so the GPU timer runs them in turn), each call computes its own routing's
    result, and bytes and distinct experts are their means."""
    import argparse

    bench = load_benchmark("bench_quant_kernels")
    shapes = {"latent": 256, "inter": 128, "experts": 12, "top_k": 3, "scaling": 1.0}
    given = []

    def timer(calls, warmup, repeats):
        given.append([call() for call in calls])
        return {"ms": 0.5, "host_ms": 0.25, "rounds_with_gaps": 0}

    args = argparse.Namespace(routings=3, warmup=1, repeats=2)
    rows = bench.bench_format(fmt, bench.FORMATS[fmt], [1, 4], {"copy_gb_per_s": 100.0},
                              torch.Generator().manual_seed(0), args, device="cpu", shapes=shapes, timer=timer)
    assert [(r["tokens"], r["routings"]) for r in rows] == [(1, 3), (4, 3)]
    assert len(given) == 4 and all(len(outs) == 3 for outs in given)  # quantized and BF16 per token count
    for outs in given:  # three different routings, three different results
        assert not torch.equal(outs[0], outs[1]) and not torch.equal(outs[1], outs[2])
    layout = ExpertRecordLayout(bench.FORMATS[fmt], shapes["inter"], shapes["latent"])
    for r in rows:
        assert r["ms"] == 0.5 and r["host_ms"] == 0.25 and r["speedup_vs_bf16"] == 1.0
        activations = 2 * r["tokens"] * shapes["latent"] * 2  # bf16 in and out
        assert r["bytes"] == pytest.approx(r["distinct_experts"] * layout.record_bytes + activations)
        assert shapes["top_k"] <= r["distinct_experts"] <= min(shapes["experts"], r["tokens"] * shapes["top_k"])
