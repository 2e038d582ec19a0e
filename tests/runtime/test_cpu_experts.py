"""CPU expert kernel (numba) against the torch reference of the slot-bank MoE."""

from __future__ import annotations

import json

import numba
import numpy as np
import pytest
import torch
from residency.runtime import cpu_experts
from residency.runtime.cpu_experts import bank_view, cpu_moe, cpu_moe_reference, measure_throughput

# (tokens, experts in the bank, I, L): multiples of the 16 lanes and of the 64-term steps, sizes
# that are neither, and sizes below one vector (all tail).
SHAPES = [(1, 6, 64, 32), (3, 5, 37, 23), (4, 7, 100, 70), (2, 3, 9, 7), (2, 4, 130, 81)]


def make_case(tokens: int, experts: int, inter: int, latent: int, *, bf16: bool, seed: int, pairs: int | None = None):
    """Random banks, activations and pairs; bf16 banks as uint16 bits."""
    gen = torch.Generator().manual_seed(seed)
    up = torch.randn(experts, inter, latent, generator=gen) / latent ** 0.5
    down = torch.randn(experts, latent, inter, generator=gen) / inter ** 0.5
    if bf16:
        up, down = bank_view(up.bfloat16()), bank_view(down.bfloat16())
    else:
        up, down = up.numpy(), down.numpy()
    x = torch.randn(tokens, latent, generator=gen).numpy()
    rng = np.random.default_rng(seed)
    n = pairs if pairs is not None else tokens * min(experts, 3)
    tok = rng.integers(0, tokens, n)
    exp = rng.integers(0, experts, n)
    w = rng.random(n).astype(np.float32) + 0.1
    return x, up, down, tok, exp, w


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def run_both(x, up, down, tok, exp, w, base=None):
    """Kernel and reference from the same starting ``out``; pair norms start as NaN (must be written)."""
    base = np.zeros_like(x) if base is None else base
    out, ref = base.copy(), base.copy()
    norms, ref_norms = np.full(len(tok), np.nan, np.float32), np.zeros(len(tok), np.float32)
    cpu_moe(x, up, down, tok, exp, w, out, norms)
    cpu_moe_reference(x, up, down, tok, exp, w, ref, ref_norms)
    return out, ref, norms, ref_norms


@pytest.mark.parametrize("small_tasks", [False, True], ids=["tasks", "small-tasks"])
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}-E{}-I{}-L{}".format(*s))
def test_matches_reference(shape, bf16, small_tasks, monkeypatch):
    if small_tasks:  # row blocks that end inside the matrices
        monkeypatch.setattr(cpu_experts, "_TASK_BYTES", 100)
    x, up, down, tok, exp, w = make_case(*shape, bf16=bf16, seed=sum(shape))
    out, ref, norms, ref_norms = run_both(x, up, down, tok, exp, w)
    assert rel_err(out, ref) <= 1e-5
    assert np.all(np.isfinite(norms)) and rel_err(norms, ref_norms) <= 1e-5


def test_decode_step_at_odd_super_like_sizes():
    # One token, 22 experts, I not a multiple of 64 and L a multiple: the decode case.
    x, up, down, tok, exp, w = make_case(1, 24, 168, 64, bf16=True, seed=1, pairs=22)
    exp = np.random.default_rng(1).permutation(24)[:22]
    out, ref, norms, ref_norms = run_both(x, up, down, np.zeros(22, np.int64), exp, w)
    assert rel_err(out, ref) <= 1e-5 and rel_err(norms, ref_norms) <= 1e-5


def test_bf16_bank_gives_the_bits_of_its_fp32_upcast():
    x, up, down, tok, exp, w = make_case(3, 5, 37, 23, bf16=True, seed=3)
    up32 = (up.astype(np.uint32) << 16).view(np.float32)
    down32 = (down.astype(np.uint32) << 16).view(np.float32)
    a, b = np.zeros_like(x), np.zeros_like(x)
    cpu_moe(x, up, down, tok, exp, w, a)
    cpu_moe(x, up32, down32, tok, exp, w, b)
    assert np.array_equal(a, b)


def test_accumulates_into_out_and_leaves_other_tokens_alone():
    x, up, down, _, _, w = make_case(4, 5, 37, 23, bf16=False, seed=4, pairs=3)
    tok, exp = np.array([0, 2, 0]), np.array([1, 4, 3])
    base = np.random.default_rng(4).standard_normal(x.shape).astype(np.float32)
    base[[1, 3]] = np.nan  # tokens without pairs: must not be touched
    out, ref, *_ = run_both(x, up, down, tok, exp, w, base)
    assert np.isnan(out[[1, 3]]).all()
    assert rel_err(out[[0, 2]], ref[[0, 2]]) <= 1e-5
    contribution = cpu_moe(x, up, down, tok, exp, w, np.zeros_like(x))
    assert np.allclose(out[[0, 2]], base[[0, 2]] + contribution[[0, 2]], rtol=1e-6, atol=1e-6)


def test_repeated_experts_across_tokens_and_duplicate_pairs():
    x, up, down, _, _, _ = make_case(4, 3, 40, 24, bf16=True, seed=5)
    tok = np.array([0, 1, 2, 3, 0, 1, 2, 3, 2, 2])
    exp = np.array([1, 1, 1, 1, 0, 2, 0, 2, 1, 1])  # expert 1 for every token, (2, 1) three times
    w = np.linspace(0.5, 1.5, len(tok)).astype(np.float32)
    out, ref, norms, ref_norms = run_both(x, up, down, tok, exp, w)
    assert rel_err(out, ref) <= 1e-5 and rel_err(norms, ref_norms) <= 1e-5
    assert norms[2] == norms[8] == norms[9]  # same token, same expert: same output


def test_pairs_in_any_order_give_the_same_result_up_to_summation_order():
    x, up, down, tok, exp, w = make_case(3, 6, 50, 30, bf16=True, seed=6, pairs=9)
    perm = np.random.default_rng(6).permutation(len(tok))
    a = cpu_moe(x, up, down, tok, exp, w, np.zeros_like(x))
    b = cpu_moe(x, up, down, tok[perm], exp[perm], w[perm], np.zeros_like(x))
    assert rel_err(b, a) <= 1e-6


def test_deterministic_across_runs_thread_counts_and_task_sizes(monkeypatch):
    x, up, down, tok, exp, w = make_case(3, 6, 70, 45, bf16=True, seed=7, pairs=12)
    before = numba.get_num_threads()
    results = []
    try:
        for task_bytes in (64, 1000, cpu_experts._TASK_BYTES):
            monkeypatch.setattr(cpu_experts, "_TASK_BYTES", task_bytes)
            for threads in sorted({1, min(2, numba.config.NUMBA_NUM_THREADS), min(3, numba.config.NUMBA_NUM_THREADS)}):
                numba.set_num_threads(threads)
                for _ in range(2):
                    norms = np.empty(len(tok), np.float32)
                    results.append((cpu_moe(x, up, down, tok, exp, w, np.zeros_like(x), norms), norms))
    finally:
        numba.set_num_threads(before)
    for out, norms in results[1:]:
        assert np.array_equal(out, results[0][0]) and np.array_equal(norms, results[0][1])


def test_torch_inputs_and_per_expert_record_views():
    # The host store may keep each expert as one record [up | down]; the kernel reads views of it.
    experts, inter, latent = 4, 33, 20
    gen = torch.Generator().manual_seed(8)
    records = (torch.randn(experts, 2 * inter * latent, generator=gen) * 0.1).bfloat16()
    up = records[:, :inter * latent].view(experts, inter, latent)
    down = records[:, inter * latent:].view(experts, latent, inter)
    x = torch.randn(2, latent, generator=gen)
    out = torch.zeros(2, latent)
    tok, exp, w = torch.tensor([0, 1, 1]), torch.tensor([3, 0, 3]), torch.tensor([0.5, 1.0, 2.0])
    returned = cpu_moe(x, up, down, tok, exp, w, out)
    assert np.shares_memory(returned, out.numpy())
    ref = cpu_moe_reference(x.numpy(), up.contiguous().float().numpy(), down.contiguous().float().numpy(),
                            tok.numpy(), exp.numpy(), w.numpy(), np.zeros((2, latent), np.float32))
    assert rel_err(out.numpy(), ref) <= 1e-5


def exact_case(seed: int, *, tokens=3, experts=5, inter=40, latent=48, pairs=9):
    """Integer weights and activations: ``relu(up @ x)^2`` is exact in fp32 in any summation order, so rounding it
    to 16 bits gives the same bits in the kernel and the reference, and any rounding left out shows."""
    rng = np.random.default_rng(seed)
    up = bank_view(torch.from_numpy(rng.integers(-5, 6, (experts, inter, latent)).astype(np.float32)).bfloat16())
    down = bank_view(torch.from_numpy(rng.integers(-3, 4, (experts, latent, inter)).astype(np.float32)).bfloat16())
    x = rng.integers(-3, 4, (tokens, latent)).astype(np.float32)
    return (x, up, down, rng.integers(0, tokens, pairs), rng.integers(0, experts, pairs),
            (rng.integers(1, 8, pairs) / 8).astype(np.float32))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_intermediate_rounded_to_16_bits_as_the_gpu_prefill_kernel_keeps_it(dtype):
    """``intermediate=``: h rounded to bf16 / fp16 (nearest even) before the down projection, the arithmetic of the
    Triton prefill path on a GPU, so CPU-computed pairs of such a call follow the GPU's (see runtime.backend)."""
    for seed in range(3):
        x, up, down, tok, exp, w = exact_case(seed)
        got, want, plain = (np.zeros_like(x) for _ in range(3))
        norms, want_norms = np.zeros(len(tok), np.float32), np.zeros(len(tok), np.float32)
        cpu_moe(x, up, down, tok, exp, w, got, norms, intermediate=dtype)
        cpu_moe_reference(x, up, down, tok, exp, w, want, want_norms, intermediate=dtype)
        cpu_moe(x, up, down, tok, exp, w, plain)
        assert rel_err(got, want) <= 1e-6 and rel_err(norms, want_norms) <= 1e-6
        assert rel_err(plain, want) > 1e-5  # the rounding is really there: h reaches 10^4, past 8 and 11 bits
    cpu_moe(x, up, down, tok, exp, w, np.zeros_like(x), intermediate=torch.float32)  # fp32: nothing to round
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        cpu_moe(x, up, down, tok, exp, w, np.zeros_like(x), intermediate=torch.float64)


def test_rounding_to_16_bits_is_torchs_on_every_kind_of_value():
    """The kernels' rounding (``round_intermediate``) gives torch's conversion bits: ties to even, the largest
    values to infinity, fp16 subnormals, NaN kept."""
    rng = np.random.default_rng(0)
    bits = np.concatenate([rng.integers(0, 1 << 32, 20000, dtype=np.uint64).astype(np.uint32),
                           np.array([0x3F808000, 0x3F818000, 0x7F7FFFFF, 0x477FF000, 0x33000001, 0x7FC00000,
                                     0xFF800000, 0x80000000, 0x477FE000, 0x477FEFFF, 0x477FF000, 0x38800000,
                                     0x387FFFFF, 0x33000000, 0x33400000, 0xB3400000, 0x00000001],
                                    np.uint32)])  # ... 65504, 65519.99, 65520, 2**-14, 2**-25 (a tie), 1.5 * 2**-25
    values = bits.view(np.float32)

    @numba.njit
    def apply(v, code):
        out = np.empty_like(v)
        for i in range(v.shape[0]):
            out[i] = cpu_experts.round_intermediate(v[i], code)
        return out

    for dtype in (torch.bfloat16, torch.float16):
        got = apply(values, cpu_experts.rounding_code(dtype))
        want = torch.from_numpy(values).to(dtype).float().numpy()
        nan = np.isnan(want)
        assert np.array_equal(np.isnan(got), nan)
        assert np.array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32))
    assert np.array_equal(apply(values, cpu_experts.ROUND_NONE).view(np.uint32), bits)


GENERIC_CHILD = """
import json, numpy as np, torch
from residency.runtime.cpu_experts import cpu_moe, cpu_moe_reference, bank_view
rng = np.random.default_rng(0)
up = bank_view(torch.from_numpy(rng.integers(-5, 6, (4, 24, 40)).astype(np.float32)).bfloat16())
down = bank_view(torch.from_numpy(rng.integers(-3, 4, (4, 40, 24)).astype(np.float32)).bfloat16())
x = rng.integers(-3, 4, (2, 40)).astype(np.float32)
tok, exp, w = rng.integers(0, 2, 6), rng.integers(0, 4, 6), np.full(6, 0.5, np.float32)
errors = {}
for name, dtype in (("fp32", None), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
    got, want = np.zeros_like(x), np.zeros_like(x)
    cpu_moe(x, up, down, tok, exp, w, got, intermediate=dtype)
    cpu_moe_reference(x, up, down, tok, exp, w, want, intermediate=dtype)
    errors[name] = float(np.abs(got - want).max() / np.abs(want).max())
print(json.dumps(errors))
"""


def test_kernel_compiled_for_a_generic_x86_target_matches_the_reference(tmp_path):
    """Compiled for a target with SSE2 only (no AVX, no F16C half-precision conversions; a fresh numba cache), the
    kernel still runs, rounding included, and equals the reference."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path), "NUMBA_CPU_NAME": "generic"}
    run = subprocess.run([sys.executable, "-c", GENERIC_CHILD], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    errors = json.loads(run.stdout.strip().splitlines()[-1])
    assert set(errors) == {"fp32", "bf16", "fp16"} and max(errors.values()) <= 1e-6, errors


def test_no_pairs_is_a_no_op():
    x, up, down, *_ = make_case(2, 3, 16, 16, bf16=False, seed=9)
    out = np.ones_like(x)
    cpu_moe(x, up, down, np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32), out)
    assert (out == 1).all()


def bad_inputs():
    x, up, down, tok, exp, w = make_case(2, 3, 12, 10, bf16=True, seed=10, pairs=4)
    out, norms = np.zeros_like(x), np.zeros(4, np.float32)
    good = dict(x=x, up_bank=up, down_bank=down, pairs_token=tok, pairs_expert=exp, pairs_weight=w, out=out)
    yield {"x": x.astype(np.float64)}, "x must be a C-contiguous float32"
    yield {"x": np.asfortranarray(np.ones((2, 10), np.float32))}, "not contiguous"
    yield {"out": np.zeros((3, 10), np.float32)}, "out must match x's shape"
    yield {"out": np.zeros((2, 10))}, "out must be a C-contiguous float32"
    yield {"up_bank": up[:, :, :9]}, r"up_bank must be a non-empty \[experts, I, L=10\]"
    yield {"down_bank": down[:2]}, r"down_bank must be a non-empty \[experts=3, L=10, I=12\]"
    yield {"down_bank": down.astype(np.float32)}, "same dtype"
    yield {"up_bank": up.astype(np.float16)}, "bf16 bits .* or float32, got float16"
    yield {"up_bank": np.repeat(up, 2, axis=2)[:, :, ::2]}, "rows must be contiguous"
    yield {"up_bank": torch.zeros(3, 12, 10, dtype=torch.float64)}, "bfloat16 or float32, got torch.float64"
    yield {"pairs_token": np.array([0, 1, 2, 0])}, r"pairs_token\[2\] = 2 is out of range: there are 2 tokens"
    yield {"pairs_expert": np.array([0, -1, 0, 0])}, r"pairs_expert\[1\] = -1 is out of range: there are 3 experts"
    yield {"pairs_expert": exp[:3]}, "one entry per pair, got lengths 4, 3, 4"
    yield {"pairs_weight": np.ones(4, np.int64)}, "pairs_weight must be a 1-D float"
    yield {"pairs_token": tok.astype(np.float32)}, "pairs_token must be a 1-D integer"
    yield {"pair_norms": np.zeros(3, np.float32)}, r"pair_norms must be a writeable contiguous float32 \[4\]"
    yield {"x": [[0.0] * 10] * 2}, "x must be a numpy array or a CPU torch tensor, got list"
    readonly = out.copy()
    readonly.flags.writeable = False
    yield {"out": readonly}, "out must be writeable"
    yield {"pair_norms": norms.astype(np.float64)}, "pair_norms must be"
    yield good, None


@pytest.mark.parametrize("case", list(bad_inputs()), ids=lambda c: c[1] or "good")
def test_bad_inputs_raise_clear_errors(case):
    x, up, down, tok, exp, w = make_case(2, 3, 12, 10, bf16=True, seed=10, pairs=4)
    kwargs = dict(x=x, up_bank=up, down_bank=down, pairs_token=tok, pairs_expert=exp, pairs_weight=w,
                  out=np.zeros_like(x))
    change, message = case
    kwargs.update(change)
    if message is None:
        cpu_moe(**kwargs)
        return
    with pytest.raises(ValueError, match=message):
        cpu_moe(**kwargs)


def test_measure_throughput_is_positive_and_checks_arguments():
    before = numba.get_num_threads()
    gbps = measure_throughput(k=2, latent=32, intermediate=48, bank_experts=4, repeats=2, threads=1)
    assert gbps > 0 and numba.get_num_threads() == before
    bits = cpu_experts.random_bf16_bits((1000,))
    values = np.abs((bits.astype(np.uint32) << 16).view(np.float32))
    assert values.min() >= 2.0 ** -7 and values.max() < 2.0 ** -6
    with pytest.raises(ValueError, match="at least k"):
        measure_throughput(k=4, latent=32, intermediate=48, bank_experts=2)


def test_benchmark_runs_small_and_prints_the_summary_line(load_benchmark, tmp_path, capsys):
    bench = load_benchmark("bench_cpu_experts")
    assert bench.main(["--experts", "6", "--latent", "32", "--inter", "48", "--ks", "1,3", "--repeats", "1",
                       "--warmup", "0", "--out", str(tmp_path / "cpu_experts.json")]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("cpu experts: ") and " of memory read " in last and last.endswith(" x torch")
    report = (tmp_path / "cpu_experts.json").read_text()
    assert '"rel_err"' in report and (tmp_path / "cpu_experts.md").read_text().rstrip().endswith("`" + last + "`")
    quantized = json.loads(report)["quantized"]
    assert [q["format"] for q in quantized] == ["nvfp4", "fp8", "w4a16"] and all(q["gbps"] > 0 for q in quantized)
    assert "| nvfp4 | 3 |" in (tmp_path / "cpu_experts.md").read_text()


def test_prepared_banks_give_the_same_result_and_refuse_bad_inputs():
    from residency.runtime.cpu_experts import cpu_moe, cpu_moe_prepared, prepare_banks

    gen = torch.Generator().manual_seed(3)
    up = torch.randn(6, 40, 24, generator=gen).to(torch.bfloat16)
    down = torch.randn(6, 24, 40, generator=gen).to(torch.bfloat16)
    x = torch.randn(3, 24, generator=gen).numpy()
    tokens, experts = np.array([0, 2, 2, 1], np.int64), np.array([5, 0, 3, 5], np.int64)
    weights = np.array([0.4, 0.3, 0.2, 0.1], np.float32)
    expected, got = np.full_like(x, 0.5), np.full_like(x, 0.5)
    norms_a, norms_b = np.full(4, np.nan, np.float32), np.full(4, np.nan, np.float32)
    cpu_moe(x, up, down, tokens, experts, weights, expected, norms_a)
    banks = prepare_banks(up, down)
    cpu_moe_prepared(banks, x, tokens, experts, weights, got, norms_b)
    assert np.array_equal(got, expected) and np.array_equal(norms_a, norms_b)
    with pytest.raises(ValueError, match="C-contiguous float32"):
        cpu_moe_prepared(banks, x[:, :20].copy(), tokens, experts, weights, got)
    with pytest.raises(ValueError, match="int64 tokens"):
        cpu_moe_prepared(banks, x, tokens.astype(np.int32), experts, weights, got)
    with pytest.raises(ValueError, match="same dtype"):
        prepare_banks(up, down.float())
