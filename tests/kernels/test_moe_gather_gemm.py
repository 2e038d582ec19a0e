"""Slot-bank MoE: Triton decode and prefill paths against the torch reference, the reference
against a naive per-pair loop, and the prefill alignment metadata."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from residency.kernels import moe_gather_gemm, moe_gather_gemm_reference
from residency.kernels.moe import GemmTile, MoeConfig, align_pairs
from residency.kernels.moe import gather_gemm as gather_gemm_module

# small tiles so the tiny shapes below span several tiles with ragged edges (>= 16 for GPU tl.dot)
SMALL = MoeConfig(up=GemmTile(16, 16, GROUP_M=2), down=GemmTile(16, 16), BLOCK_M=16)
PATHS = ["decode", "prefill"]


def make_problem(tokens, latent, inter, experts, slots, top_k, dtype=torch.float32, device="cpu"):
    """Random inputs; the slot table is a random permutation, so slots - experts slots stay unused."""
    x = torch.randn(tokens, latent)
    up = torch.randn(slots, inter, latent) / latent**0.5
    down = torch.randn(slots, latent, inter) / inter**0.5
    slot_of_expert = torch.randperm(slots)[:experts].to(torch.int32)
    # distinct experts within a token, repeated across tokens
    ids = torch.stack([torch.randperm(experts)[:top_k] for _ in range(tokens)]) if tokens else torch.zeros(0, top_k)
    weights = torch.rand(tokens, top_k)
    tensors = (x.to(dtype), up.to(dtype), down.to(dtype), slot_of_expert, ids.long(), weights)
    return tuple(t.to(device) for t in tensors)


def naive_moe(x, up, down, slot_of_expert, ids, weights, skip=None):
    """One (token, k) pair at a time, in float64."""
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(ids.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if e < 0 or (skip is not None and bool(skip[t, j])):
                continue
            s = int(slot_of_expert[e])
            h = torch.relu(up[s].double() @ x[t].double()) ** 2
            out[t] += float(weights[t, j]) * (down[s].double() @ h)
    return out


def assert_matches(actual, expected, tol=1e-5):
    assert actual.shape == expected.shape
    assert not actual.isnan().any(), "output has unwritten (NaN) elements"
    scale = expected.double().abs().max().clamp_min(1e-30)
    err = float((actual.cpu().double() - expected.cpu().double()).abs().max() / scale)
    assert err <= tol, f"relative error {err:.3g} > {tol}"


def run(problem, path, skip=None, config=SMALL, **kwargs):
    x = problem[0]
    out = torch.full_like(x, float("nan"))
    result = moe_gather_gemm(*problem, skip, out=out, path=path, backend="triton", config=config, **kwargs)
    assert result is out
    return out


SHAPES = [
    # tokens, latent L, intermediate I, experts, slots, top_k
    (1, 16, 24, 8, 8, 1),
    (2, 24, 40, 33, 40, 4),
    (5, 40, 24, 40, 48, 22),
    (17, 24, 40, 33, 33, 4),
    (70, 16, 40, 8, 12, 2),
    (3, 136, 24, 10, 16, 3),
]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shape", SHAPES, ids=["T{}-L{}-I{}-E{}-S{}-k{}".format(*s) for s in SHAPES])
def test_kernel_matches_reference(shape, path, device):
    problem = make_problem(*shape, device=device)
    assert_matches(run(problem, path), moe_gather_gemm_reference(*problem))


@pytest.mark.parametrize("path", PATHS)
def test_skip_mask_and_sentinel(path, device):
    x, up, down, slot_of_expert, ids, weights = make_problem(9, 24, 40, 20, 24, 5)
    skip = torch.rand(ids.shape) < 0.3
    skip[4] = True  # a token computed wholly elsewhere: its row must be zeros
    ids[1, 2] = -1
    ids[6, :] = -1
    # experts reached only through skipped pairs need no slot
    only_skipped = set(ids[skip].tolist()) - set(ids[~skip].tolist()) - {-1}
    slot_of_expert[list(only_skipped)] = -1
    problem = tuple(t.to(device) for t in (x, up, down, slot_of_expert, ids, weights))
    out = run(problem, path, skip.to(device))
    expected = naive_moe(x, up, down, slot_of_expert, ids, weights, skip)
    assert_matches(out, expected)
    assert torch.equal(out[4].cpu(), torch.zeros(24)) and torch.equal(out[6].cpu(), torch.zeros(24))
    assert_matches(moe_gather_gemm_reference(*problem, skip.to(device)), expected)


@pytest.mark.parametrize("path", PATHS)
def test_missing_expert_raises_when_checked(path, device):
    problem = list(make_problem(4, 16, 24, 8, 10, 2, device=device))
    missing = int(problem[4][2, 1])
    problem[3][missing] = -1
    with pytest.raises(ValueError, match=f"no slot.*first: token \\d+, k \\d+, expert {missing};"):
        moe_gather_gemm(*problem, path=path, backend="triton", config=SMALL, check=True)
    with pytest.raises(ValueError, match="no slot"):
        moe_gather_gemm_reference(*problem)


@pytest.mark.parametrize("path", PATHS)
def test_missing_expert_unchecked_poisons_only_its_tokens(path, device):
    x, up, down, slot_of_expert, ids, weights = make_problem(6, 16, 24, 8, 10, 2)
    missing = int(ids[2, 1])
    slot_of_expert[missing] = -1
    hit = (ids == missing).any(-1)
    problem = tuple(t.to(device) for t in (x, up, down, slot_of_expert, ids, weights))
    out = run(problem, path, check=False).cpu()
    assert out[hit].isnan().all()
    skip = ids == missing
    assert_matches(out[~hit], naive_moe(x, up, down, slot_of_expert, ids, weights, skip)[~hit])


@pytest.mark.parametrize("path", PATHS)
def test_all_tokens_on_few_experts_leaves_others_empty(path, device):
    x, up, down, slot_of_expert, ids, weights = make_problem(40, 16, 24, 12, 16, 3)
    ids = torch.tensor([3, 1, 4]).repeat(40, 1)
    ids[::5] = torch.tensor([4, 11, 3])
    problem = tuple(t.to(device) for t in (x, up, down, slot_of_expert, ids, weights))
    assert_matches(run(problem, path), naive_moe(x, up, down, slot_of_expert, ids, weights))


@pytest.mark.parametrize("path", PATHS)
def test_strided_inputs_and_int32_ids(path, device):
    x, up, down, slot_of_expert, ids, weights = make_problem(7, 24, 40, 9, 12, 3)
    wide_x = torch.randn(7, 48)
    wide_x[:, ::2] = x
    big_up, big_down = torch.randn(24, 40, 24), torch.randn(24, 24, 40)
    big_up[1::2], big_down[1::2] = up, down
    problem = tuple(
        t.to(device)
        for t in (wide_x[:, ::2], big_up[1::2], big_down[1::2], slot_of_expert, ids.to(torch.int32), weights)
    )
    assert not problem[0].is_contiguous() and not problem[1].is_contiguous()
    assert_matches(run(problem, path), naive_moe(x, up, down, slot_of_expert, ids, weights))


@pytest.mark.parametrize("path", PATHS)
def test_bf16_storage_is_read_correctly(path, device):
    # the interpreter cannot do bf16 arithmetic; the kernels upcast on load and compute in fp32 there
    problem = make_problem(5, 24, 40, 10, 12, 3, dtype=torch.bfloat16, device=device)
    out = run(problem, path)
    assert out.dtype == torch.bfloat16
    x, up, down, *rest = problem
    exact = moe_gather_gemm_reference(x.float(), up.float(), down.float(), *rest)
    # in the interpreter only the final cast to bf16 errs, by up to one ulp (it truncates rather than
    # rounds); on GPU the prefill path also feeds bf16 operands to the tensor cores
    assert_matches(out.float(), exact, tol=2**-7 if device == "cpu" else 3e-2)


def test_auto_path_and_shipped_defaults(monkeypatch, device):
    chosen = []
    for name in ("decode_pairs", "prefill_pairs"):
        original = getattr(gather_gemm_module, name)
        monkeypatch.setattr(
            gather_gemm_module, name, lambda *a, _f=original, _n=name: chosen.append(_n) or _f(*a)
        )
    for tokens in (1, 17):
        # 40 experts, top-4: decode while tokens * 4 * 4 <= 40
        problem = make_problem(tokens, 24, 40, 40, 40, 4, device=device)
        out = torch.full_like(problem[0], float("nan"))
        moe_gather_gemm(*problem, out=out, backend="triton")
        assert_matches(out, moe_gather_gemm_reference(*problem))
    assert chosen == ["decode_pairs", "prefill_pairs"]


def test_zero_tokens_and_bad_arguments(device):
    problem = make_problem(0, 16, 24, 8, 8, 2, device=device)
    assert moe_gather_gemm(*problem, backend="triton").shape == (0, 16)
    problem = make_problem(2, 16, 24, 8, 8, 2, device=device)
    with pytest.raises(ValueError, match="path"):
        moe_gather_gemm(*problem, path="fast")
    with pytest.raises(ValueError, match="up_bank"):
        moe_gather_gemm(problem[0], problem[2], *problem[2:], backend="triton")
    with pytest.raises(ValueError, match="skip"):
        moe_gather_gemm(*problem, torch.zeros(2, 3, dtype=torch.bool, device=device), backend="triton")
    with pytest.raises(ValueError, match="covers only 8 experts"):
        moe_gather_gemm(*problem[:4], torch.full_like(problem[4], 8), problem[5], backend="triton", check=True)


def test_torch_backend_is_the_reference(device):
    problem = make_problem(3, 16, 24, 8, 8, 2, device=device)
    assert torch.equal(moe_gather_gemm(*problem, backend="torch"), moe_gather_gemm_reference(*problem))


@pytest.mark.parametrize("shape", SHAPES[:4], ids=[f"T{s[0]}-k{s[5]}" for s in SHAPES[:4]])
def test_reference_matches_naive_loop(shape):
    problem = make_problem(*shape)
    skip = torch.rand(problem[4].shape) < 0.25
    assert_matches(moe_gather_gemm_reference(*problem), naive_moe(*problem))
    assert_matches(moe_gather_gemm_reference(*problem, skip), naive_moe(*problem, skip))


def test_workspaces_come_poisoned():
    # the conftest hands out NaN-filled memory, so the tests above see any unwritten element
    assert torch.empty(4).isnan().all() and torch.empty_like(torch.zeros(3)).isnan().all()


@pytest.mark.parametrize("block_m", [1, 4, 16])
def test_align_pairs_groups_by_expert(block_m):
    tokens, top_k, experts = 23, 3, 11
    ids = torch.stack([torch.randperm(experts)[:top_k] for _ in range(tokens)])
    ids[0, 0] = -1
    skip = torch.rand(tokens, top_k) < 0.2
    slot_of_expert = torch.randperm(15)[:experts].to(torch.int32)
    slot_of_expert[7] = -1  # pairs of a non-resident expert are left to the reduction
    aligned = align_pairs(ids, slot_of_expert, block_m, skip)
    num_pairs = ids.numel()
    rows = int(aligned.num_rows)
    assert rows % block_m == 0 and aligned.sorted_pair_ids.numel() == aligned.num_blocks * block_m
    computed = (ids >= 0) & ~skip & (ids != 7)
    pairs = aligned.sorted_pair_ids[:rows]
    real = pairs[pairs < num_pairs].long()
    # every computed pair exactly once, nothing else, ascending within each expert
    assert sorted(real.tolist()) == computed.flatten().nonzero().flatten().tolist()
    assert (aligned.sorted_pair_ids[rows:] == num_pairs).all()
    for b in range(aligned.num_blocks):
        block = aligned.sorted_pair_ids[b * block_m : (b + 1) * block_m].long()
        if b * block_m >= rows:
            assert int(aligned.block_slot[b]) == -1
            continue
        block_ids = ids.flatten()[block[block < num_pairs]]
        assert block_ids.numel() > 0 and (block_ids == block_ids[0]).all()
        assert int(aligned.block_slot[b]) == int(slot_of_expert[block_ids[0]])
        assert torch.equal(block[block < num_pairs], block[block < num_pairs].sort().values)
    assert rows == sum(-(-int(n) // block_m) * block_m for n in torch.bincount(ids[computed], minlength=experts))


@pytest.mark.gpu
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("tokens", [1, 4, 64, 300])
def test_bf16_super_shapes_on_cuda(tokens, path):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    problem = make_problem(tokens, 1024, 2688, 128, 160, 22, dtype=torch.bfloat16, device="cuda")
    out = moe_gather_gemm(*problem, path=path)
    assert out.dtype == torch.bfloat16
    assert_matches(out.float(), moe_gather_gemm_reference(*problem).float(), tol=2e-2)


@pytest.mark.gpu
def test_bf16_prefill_on_cuda_rounds_only_the_intermediate():
    """On a GPU the bf16 prefill path keeps h in bf16 (``intermediate_dtype`` says so) and nothing else is rounded:
    with an fp32 ``out`` it equals the reference that rounds h alike to fp32 summation order, well inside the
    ~1e-3 that rounding h makes (which the runtime's CPU experts reproduce for CPU-computed pairs)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    x, up, down, table, ids, weights = make_problem(300, 1024, 2688, 128, 160, 22, dtype=torch.bfloat16,
                                                    device="cuda")
    assert gather_gemm_module.intermediate_dtype(x, up, down, table, ids) == torch.bfloat16
    out = torch.empty(x.shape, dtype=torch.float32, device="cuda")
    moe_gather_gemm(x, up, down, table, ids, weights, out=out, path="prefill")
    rounded = moe_gather_gemm_reference(x, up, down, table, ids, weights, out=torch.empty_like(out),
                                        intermediate=torch.bfloat16)
    plain = moe_gather_gemm_reference(x, up, down, table, ids, weights, out=torch.empty_like(out))
    assert_matches(out, rounded, tol=2e-4)
    assert float((plain - rounded).abs().max() / rounded.abs().max()) > 1e-3  # what rounding h changes


def test_benchmark_baselines_match_reference(load_benchmark):
    bench = load_benchmark("bench_kernels")
    problem = make_problem(9, 24, 40, 12, 16, 3)
    expected = naive_moe(*problem)
    assert_matches(bench.torch_loop_moe(*problem), expected)
    assert_matches(bench.gathered_bmm_moe(*problem), expected)


def test_benchmark_report_and_cpu_refusal(capsys, tmp_path, load_benchmark):
    bench = load_benchmark("bench_kernels")
    if not torch.cuda.is_available():
        assert bench.main(["--out", str(tmp_path / "k")]) == 2
        assert "needs a CUDA GPU" in capsys.readouterr().err
        assert not list(tmp_path.iterdir())
    rows = [
        {"tokens": 1, "auto_path": "decode", "distinct_experts": 22, "auto_ms": 0.1, "prefill_ms": 0.3,
         "gb_per_s": 2500.0, "copy_fraction": 0.85, "tflops": 0.5, "torch_loop_ms": 1.0, "speedup_vs_loop": 10.0,
         "bmm_ms": 0.5, "speedup_vs_bmm": 5.0, "route_ms": 0.01, "route_torch_ms": 0.05, "tuning_table": "/x/d.json",
         "floor_ms": 0.085, "bound": "memory", "floor_fraction": 0.85},
        {"tokens": 2048, "auto_path": "prefill", "distinct_experts": 512, "auto_ms": 5.0, "gb_per_s": 1000.0,
         "copy_fraction": 0.3, "tflops": 400.0, "matmul_tflops": 600.0, "matmul_fraction": 0.66,
         "torch_loop_ms": 30.0, "speedup_vs_loop": 6.0, "bmm_ms": 20.0, "speedup_vs_bmm": 4.0, "route_ms": 0.1,
         "route_torch_ms": 0.2, "tuning_table": "/x/d.json", "flops": 2.0e12, "floor_ms": 4.0, "bound": "memory",
         "floor_fraction": 0.8},
    ]  # fmt: skip
    env = {"device": "GPU", "torch": "t", "triton": "t", "cuda": "c", "commit": "abc", "date": "today"}
    result = {"environment": env, "warmup": 1, "repeats": 2, "floors": {"copy_gb_per_s": 3000.0}, "rows": rows,
              "targets": bench.targets(rows)}  # fmt: skip
    assert [t["met"] for t in result["targets"]] == [True, True, True]
    # 2 TFLOP in a 4 ms floor is 500 TFLOP/s: at best 83% of the 600 TFLOP/s matmul rate
    assert result["targets"][2]["attainable"] == pytest.approx(500 / 600)
    text = bench.markdown(result)
    assert "| 1 | decode | 22 | 0.100 | 0.085 (memory) | 85% |" in text and "0.300 (prefill)" in text
    assert "66% of 600" in text and "| 0.50 | 0.66 | yes | 0.83 |" in text


def test_benchmark_floor_is_the_slower_of_memory_and_compute(load_benchmark):
    bench = load_benchmark("bench_kernels")
    # 3 GB at 3000 GB/s is 1 ms; 500 GFLOP at 1000 TFLOP/s is 0.5 ms
    assert bench.floor_ms(3e9, 5e11, 3000.0, 1000.0) == (pytest.approx(1.0), "memory")
    assert bench.floor_ms(3e9, 5e12, 3000.0, 1000.0) == (pytest.approx(5.0), "compute")
    assert bench.floor_ms(3e9, 5e12, 3000.0, None) == (pytest.approx(1.0), "memory")


def test_kernels_compile_for_gpus_without_one():
    # the interpreter accepts code a GPU backend rejects; compile every kernel to a cubin (sm_90, sm_80)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run(
        [sys.executable, "-m", "residency.kernels.compile_check"], capture_output=True, text=True, env=env, timeout=300
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads(run.stdout)
    # 31 kernel variants (13 float, 18 quantized: compile_check._quant_variants) x 2 archs
    assert len(report["results"]) == 62 and report["problems"] == []


def naive_pair_norms(x, up, down, slot_of_expert, ids):
    """``||down[s] @ relu(up[s] @ x[t])^2||`` for every pair, in float64."""
    norms = torch.zeros(ids.shape, dtype=torch.float64)
    for t in range(ids.shape[0]):
        for j in range(ids.shape[1]):
            s = int(slot_of_expert[int(ids[t, j])])
            h = torch.relu(up[s].double() @ x[t].double()) ** 2
            norms[t, j] = (down[s].double() @ h).norm()
    return norms


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shape", SHAPES[:4], ids=["T{}-L{}-I{}-E{}-S{}-k{}".format(*s) for s in SHAPES[:4]])
def test_pair_norms_are_unweighted_output_norms_and_leave_the_result_unchanged(shape, path, device):
    problem = make_problem(*shape, device=device)
    expected = naive_pair_norms(*(t.cpu() for t in problem[:5]))
    for backend in ("triton", "torch"):
        norms = torch.full(problem[4].shape, float("nan"), device=device)
        with_norms = moe_gather_gemm(*problem, path=path, backend=backend, config=SMALL, pair_norms=norms)
        without = moe_gather_gemm(*problem, path=path, backend=backend, config=SMALL)
        assert torch.equal(with_norms, without), backend  # bit for bit: the weight is applied the same way
        assert_matches(norms, expected)


@pytest.mark.parametrize("path", PATHS)
def test_pair_norms_of_skipped_pairs_are_left_alone(path, device):
    problem = make_problem(6, 16, 24, 8, 10, 3, device=device)
    skip = torch.zeros(problem[4].shape, dtype=torch.bool, device=device)
    skip[1, 2] = skip[4, 0] = True
    for backend in ("triton", "torch"):
        norms = torch.full(skip.shape, -7.0, device=device)
        moe_gather_gemm(*problem, skip, path=path, backend=backend, config=SMALL, pair_norms=norms)
        assert float(norms[1, 2]) == float(norms[4, 0]) == -7.0, backend
        assert bool((norms[~skip] >= 0).all()), backend


def test_fp32_out_keeps_the_sum_unrounded_for_bf16_inputs(device):
    """Callers adding partial results (the offload runtime) pass an fp32 ``out``: no bf16 rounding."""
    x, up, down, slots, ids, weights = make_problem(5, 24, 40, 10, 12, 3, device=device)
    bf = [t.to(torch.bfloat16) for t in (x, up, down)]
    exact = moe_gather_gemm_reference(*(t.float() for t in bf), slots, ids, weights)
    out = torch.full(x.shape, float("nan"), device=device)
    result = moe_gather_gemm(*bf, slots, ids, weights, out=out, backend="torch")
    assert result is out and out.dtype == torch.float32
    assert_matches(out, exact, tol=1e-6)
    assert not torch.equal(out, out.to(torch.bfloat16).float())  # really unrounded
    with pytest.raises(ValueError, match="in x's dtype torch.bfloat16 or fp32"):
        moe_gather_gemm(*bf, slots, ids, weights, out=torch.empty(x.shape, dtype=torch.float16, device=device))
    # the Triton launchers take an fp32 out too (checked in fp32, the interpreter's exact dtype)
    out32 = torch.full(x.shape, float("nan"), device=device)
    moe_gather_gemm(x, up, down, slots, ids, weights, out=out32, backend="triton", config=SMALL)
    assert_matches(out32, moe_gather_gemm_reference(x, up, down, slots, ids, weights))
