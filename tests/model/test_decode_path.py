"""The static decode path: preallocated caches, the recurrent Mamba step, SDPA over views of the cache,
the CUDA-graph step logic (run eagerly on CPU), no host syncs, and aten ops per step.

"Current path" below is the decode step as it was before: the chunked scan run on one token
(``Mamba2Mixer.use_step_kernels = False``); "full forward" recomputes the whole sequence without
a cache. All fp32 on CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from residency.kernels.mamba import step as mamba_step

from residency import OffloadedNemotron, kernels
from residency.model.caches import InferenceCache
from residency.model.mamba import Mamba2Mixer
from residency.model.modeling import DecodeGraphs, plan_pieces
from residency.model.moe import MoEObserver
from residency.testing import write_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[2]
# more than one Mamba group, odd head counts, sizes that are not powers of two
ODD = dict(n_groups=3, mamba_num_heads=9, mamba_head_dim=5, ssm_state_size=12, num_attention_heads=6,
           num_key_value_heads=3, head_dim=10, chunk_size=8, pattern="M*MEM*E")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def load(tmp_path: Path, name: str, **overrides):
    folder = write_tiny_checkpoint(tmp_path / name, seed=11, **overrides)
    return OffloadedNemotron.from_pretrained(folder, device="cpu").model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return load(tmp_path_factory.mktemp("decode"), "tiny")


def decode(model, ids: torch.Tensor, prompt: int, cache=None, chunks: int = 1) -> torch.Tensor:
    """Logits of ``ids`` fed as a prompt (in ``chunks`` calls) then one token per call."""
    cache = cache if cache is not None else model.new_cache(ids.shape[0])
    bounds = torch.linspace(0, prompt, chunks + 1).long().tolist()
    parts = [model(ids[:, a:b], cache) for a, b in zip(bounds[:-1], bounds[1:])]
    parts += [model(ids[:, t:t + 1], cache) for t in range(prompt, ids.shape[1])]
    assert cache.pos == ids.shape[1]
    return torch.cat(parts, dim=1)


def set_step_kernels(model, on: bool) -> None:
    for block in model.backbone.layers:
        if isinstance(block.mixer, Mamba2Mixer):
            block.mixer.use_step_kernels = on


@pytest.mark.parametrize("odd", [False, True], ids=["tiny", "groups-3-odd-heads"])
def test_decode_equals_the_current_path_and_the_full_forward(tmp_path, tiny, odd):
    model = load(tmp_path, "odd", **ODD) if odd else tiny
    ids = torch.randint(0, model.config.vocab_size, (2, 9 + 34))
    new = decode(model, ids, 9, chunks=2)
    set_step_kernels(model, False)
    try:
        current = decode(model, ids, 9, chunks=2)
    finally:
        set_step_kernels(model, True)
    full = model(ids)
    assert rel_err(new, current) <= 1e-5
    assert rel_err(new, full) <= 1e-5
    per_step = [rel_err(new[:, t], full[:, t]) for t in range(9, ids.shape[1])]
    assert max(per_step) <= 1e-5, per_step


def test_greedy_generate_matches_transformers_for_40_steps(tmp_path):
    transformers = pytest.importorskip("transformers")
    ours = write_tiny_checkpoint(tmp_path / "ours", seed=7)
    hf = transformers.NemotronHForCausalLM.from_pretrained(ours, dtype=torch.float32).eval()
    folder = tmp_path / "hf"
    hf.save_pretrained(folder)
    (folder / "residency_tokenizer.json").write_bytes((ours / "residency_tokenizer.json").read_bytes())
    model = OffloadedNemotron.from_pretrained(folder, device="cpu")
    prompt = torch.randint(3, 259, (1, 13))
    got = model.generate(prompt, max_new_tokens=40, temperature=0, stop_at_eos=False)
    with torch.no_grad():
        expected = hf.generate(prompt, max_new_tokens=40, do_sample=False, eos_token_id=None, min_new_tokens=40,
                               pad_token_id=0)  # fmt: skip
    assert torch.equal(got, expected)


def test_the_cache_is_preallocated_and_attention_reads_views_of_it(tiny, monkeypatch):
    c = tiny.config
    cache = tiny.new_cache(2, max_len=64)
    assert sorted(cache.kv) == c.attention_layers and sorted(cache.conv) == sorted(cache.ssm) == c.mamba_layers
    k, v = cache.kv[c.attention_layers[0]]
    assert k.shape == (2, c.num_key_value_heads, 64, c.head_dim) and v.dtype == torch.float32
    assert cache.ssm[0].shape == (2, c.mamba_num_heads, c.mamba_head_dim, c.ssm_state_size)
    assert cache.conv[0].shape == (2, c.mamba_conv_dim, c.conv_kernel - 1)
    pointers = {name: [t.data_ptr() for t in ts] for name, ts in
                (("kv", [t for pair in cache.kv.values() for t in pair]), ("conv", cache.conv.values()),
                 ("ssm", cache.ssm.values()))}  # fmt: skip
    storages = {k.untyped_storage().data_ptr() for pair in cache.kv.values() for k in pair}
    seen = []
    sdpa = F.scaled_dot_product_attention

    def recording(q, key, value, *args, **kwargs):
        seen.append((key.untyped_storage().data_ptr(), value.untyped_storage().data_ptr(), key.shape[2]))
        return sdpa(q, key, value, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    ids = torch.randint(0, c.vocab_size, (2, 20))
    decode(tiny, ids, 12, cache, chunks=3)
    # prefill chunks and decode steps read the cache itself (no copy), exactly pos + T entries
    assert len(seen) == 3 + 8 and all(k in storages and v in storages for k, v, _ in seen)
    assert [n for _, _, n in seen] == [4, 8, 12, *range(13, 21)]
    after = {name: [t.data_ptr() for t in ts] for name, ts in
             (("kv", [t for pair in cache.kv.values() for t in pair]), ("conv", cache.conv.values()),
              ("ssm", cache.ssm.values()))}  # fmt: skip
    assert after == pointers and cache.generation == 0
    assert cache.pos == 20 and cache.pos_t.tolist() == [20]
    assert not k[:, :, 20:].any() and k[:, :, :20].abs().sum(-1).all()


def test_max_len_is_enforced_without_losing_the_state(tiny):
    cache = tiny.new_cache(1, max_len=12)
    ids = torch.randint(0, tiny.config.vocab_size, (1, 13))
    decode(tiny, ids[:, :12], 10, cache)
    with pytest.raises(ValueError, match="max_len"):
        tiny(ids[:, 12:13], cache)
    assert cache.pos == 12 and cache.pos_t.tolist() == [12]


def test_without_max_len_the_kv_cache_grows_in_doublings(tmp_path):
    model = load(tmp_path, "short", max_position_embeddings=16)
    cache = model.new_cache(2)
    assert cache.capacity == 16
    ids = torch.randint(0, model.config.vocab_size, (2, 40))
    got = decode(model, ids, 10, cache)
    assert cache.capacity == 64 and cache.generation == 2
    assert rel_err(got, model(ids)) <= 1e-5
    # a cache made directly allocates on first use, the same way
    lazy = InferenceCache(batch=2)
    assert rel_err(decode(model, ids[:, :20], 10, lazy), got[:, :20]) <= 1e-5
    assert sorted(lazy.kv) == model.config.attention_layers and lazy.capacity == 4096


def test_fp8_kv_cache(tiny):
    ids = torch.randint(0, tiny.config.vocab_size, (2, 30))
    cache = tiny.new_cache(2, kv_dtype=torch.float8_e4m3fn)
    assert all(t.dtype == torch.float8_e4m3fn for pair in cache.kv.values() for t in pair)
    full = InferenceCache(batch=2)
    expected = decode(tiny, ids, 10, full)
    got = decode(tiny, ids, 10, cache)
    assert cache.nbytes() < full.nbytes()
    # e4m3 keeps 3 mantissa bits and no scale here: about 8 % on this random model's logits
    assert rel_err(got, expected) <= 0.15
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.8


FORBIDDEN = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "unique", "cpu", "numpy")


def test_the_dense_decode_step_never_reads_a_tensor_on_the_host(tmp_path, monkeypatch):
    # no MoE layer: the expert backend's CPU reference checks its inputs on the host by design
    model = load(tmp_path, "dense", pattern="M*M-M*M", **{k: v for k, v in ODD.items() if k != "pattern"})
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    cache = model.new_cache(2)
    model(ids[:, :8], cache)
    model(ids[:, 8:9], cache)

    def refuse(self, *args, **kwargs):
        raise AssertionError("a decode step read a tensor on the host")

    with monkeypatch.context() as patch:
        for name in FORBIDDEN:
            patch.setattr(torch.Tensor, name, refuse)
        for name in ("nonzero", "unique", "masked_select", "argwhere"):
            patch.setattr(torch, name, refuse)
        for t in range(9, 12):
            model(ids[:, t:t + 1], cache)
    assert cache.pos == 12


def eager_capture(cache: InferenceCache):
    """A stand-in for CUDA-graph capture on CPU: ``fn`` runs once to make its output (state restored
    afterwards, as capture would not have run it), and each replay runs it again into that output."""

    def capture(fn):
        saved = ({i: (k.clone(), v.clone()) for i, (k, v) in cache.kv.items()},
                 {i: t.clone() for i, t in cache.conv.items()}, {i: t.clone() for i, t in cache.ssm.items()},
                 cache.pos_t.clone())  # fmt: skip
        out = fn()
        for i, (k, v) in saved[0].items():
            cache.kv[i][0].copy_(k)
            cache.kv[i][1].copy_(v)
        for store, old in ((cache.conv, saved[1]), (cache.ssm, saved[2])):
            for i, t in old.items():
                store[i].copy_(t)
        cache.pos_t.copy_(saved[3])
        return (lambda: out.copy_(fn())), out

    return capture


@pytest.mark.parametrize("mode", ["auto", "dense"])
def test_graph_step_logic_equals_the_eager_step(tiny, mode):
    ids = torch.randint(0, tiny.config.vocab_size, (2, 5 + 30))
    expected = decode(tiny, ids, 5)
    cache = tiny.new_cache(2)
    cache.graphs = graphs = DecodeGraphs(tiny, cache, mode=mode, min_bucket=8, capture=eager_capture(cache))
    got = decode(tiny, ids, 5, cache)
    assert rel_err(got, expected) <= 1e-5
    assert graphs.resolved_mode() == ("full" if mode == "auto" else "dense")
    # positions 5..34 fall in the buckets 8, 16, 32 and 64: one eager warm-up step and one capture each
    assert sorted(graphs.buckets) == [8, 16, 32, 64]
    assert graphs.counts == {"eager": 4, "captured": 4, "replayed": 26}
    pieces = graphs.buckets[8]
    assert [p.graph for p in pieces] == ([True] if mode == "auto" else [True, False, True, False, True, False, False,
                                                                         True])  # fmt: skip


def test_graphs_fall_back_to_eager_steps_and_are_dropped_when_the_cache_grows(tmp_path):
    model = load(tmp_path, "short", max_position_embeddings=16)
    ids = torch.randint(0, model.config.vocab_size, (1, 6 + 26))
    expected = decode(model, ids, 6)
    cache = model.new_cache(1)
    cache.graphs = graphs = DecodeGraphs(model, cache, mode="full", min_bucket=4, capture=eager_capture(cache))

    class Watch(MoEObserver):
        def on_routing(self, event):
            pass

    remove = model.add_observer(Watch())
    model(ids[:, :6], cache)
    model(ids[:, 6:7], cache)  # an observer needs real routing events: no graph in "full" mode
    assert graphs.resolved_mode() is None and sum(graphs.counts.values()) == 0
    remove()
    parts = [model(ids[:, t:t + 1], cache) for t in range(7, ids.shape[1])]
    assert rel_err(torch.cat(parts, dim=1), expected[:, 7:]) <= 1e-5
    # position 16 does not fit the 16-token cache: that step runs eagerly and grows it; graphs restart
    assert cache.capacity == 32 and cache.generation == 1
    assert sorted(graphs.buckets) == [32]
    assert graphs.counts["captured"] == 2 and graphs.counts["eager"] == 3


def test_pieces_of_super_s_pattern():
    from residency.config import NemotronHConfig

    kinds = NemotronHConfig().layer_kinds
    pieces = plan_pieces(kinds, "dense")
    graphs = [p for p in pieces if p.graph]
    assert sum(not p.graph for p in pieces) == 40 and all(kinds[p.blocks[0]] == "moe" for p in pieces if not p.graph)
    assert sorted(i for p in graphs for i in p.blocks) == [i for i, k in enumerate(kinds) if k != "moe"]
    assert pieces[0].first and pieces[-1].last and pieces[-1].blocks == []  # layer 87 is MoE: logits alone
    assert len(plan_pieces(kinds, "full")) == 1


def test_cuda_graphs_need_a_cuda_device(tiny):
    with pytest.raises(ValueError, match="CUDA"):
        tiny.new_cache(1, cuda_graphs=True)
    with pytest.raises(ValueError, match="mode"):
        DecodeGraphs(tiny, tiny.new_cache(1), mode="sometimes")


def test_triton_kernels_run_the_decode_step(tiny, monkeypatch):
    ids = torch.randint(0, tiny.config.vocab_size, (1, 9))
    calls = {"ssu": 0, "conv": 0}
    for name, key in (("selective_state_update_reference", "ssu"), ("causal_conv1d_update_reference", "conv")):
        original = getattr(mamba_step, name)

        def counted(*args, _original=original, _key=key, **kwargs):
            calls[_key] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(mamba_step, name, counted)
    with kernels.kernel_backend("torch"):
        expected = decode(tiny, ids, 6)
    mamba_layers = len(tiny.config.mamba_layers)
    assert calls == {"ssu": 3 * mamba_layers, "conv": 3 * mamba_layers}
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with kernels.kernel_backend("triton"):
        got = decode(tiny, ids, 6)
    assert calls == {"ssu": 3 * mamba_layers, "conv": 3 * mamba_layers}  # the references did not run again
    assert rel_err(got, expected) <= 1e-5


def test_ops_per_decode_step(load_benchmark):
    bench = load_benchmark("bench_dense_decode")
    counts = bench.tiny_decode_ops()
    recorded = json.loads((ROOT / "docs/benchmarks/decode_ops.json").read_text())
    before, after = recorded["before"], recorded["after"]
    assert counts["per_block"]["mamba"] <= after["per_block"]["mamba"] < before["per_block"]["mamba"]
    assert counts["per_block"]["attention"] <= after["per_block"]["attention"] < before["per_block"]["attention"]
    assert counts["outside_blocks"] <= after["outside_blocks"]
    assert counts["top_level"] < before["top_level"]
    assert "aten::einsum" in counts["ops_by_kind"]["mamba"] and "aten::cumsum" not in counts["ops_by_kind"]["mamba"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA-graph capture needs a CUDA GPU")
def test_cuda_graph_decode_on_gpu_equals_eager_and_never_syncs(tmp_path):
    folder = write_tiny_checkpoint(tmp_path / "gpu", seed=3)
    model = OffloadedNemotron.from_pretrained(folder, device="cuda").model
    ids = torch.randint(0, model.config.vocab_size, (2, 8 + 24), device="cuda")
    expected = decode(model, ids, 8)
    cache = model.new_cache(2, max_len=64, cuda_graphs=True)
    model(ids[:, :8], cache)
    parts = [model(ids[:, 8:9], cache), model(ids[:, 9:10], cache)]  # warm-up, then capture
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        parts += [model(ids[:, t:t + 1], cache) for t in range(10, ids.shape[1])]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert cache.graphs.counts["replayed"] >= 22
    assert rel_err(torch.cat(parts, dim=1), expected[:, 8:]) <= 1e-4


# ---------------------------------------------------------------------- benchmarks/bench_dense_decode.py
def test_bytes_per_step_of_super_match_the_reference_accounting(load_benchmark):
    from residency.config import NemotronHConfig
    from residency.model.modeling import meta_model
    from residency.model.moe import Router

    bench = load_benchmark("bench_dense_decode")
    model = meta_model(NemotronHConfig()).to(torch.bfloat16)
    for module in model.modules():
        if isinstance(module, Router):
            module.float()
    got = bench.step_bytes(model, batch=1, context=1024)
    # shared/reference/nemotron-super.md: dense BF16 weights without the embedding table
    # 14,777,849,856 B; 880 experts per token 9,688,842,240 B; here one embedding row and the
    # routers in fp32 (as loaded) come on top
    assert got["dense_weights"] == 14_777_849_856 + 4096 * 2 + 40 * 512 * 4096 * 2
    assert got["routed_experts"] == 9_688_842_240
    assert got["kv_cache"] == 1024 * 8 * 1024  # 8 KiB per token
    assert got["mamba_state"] == 2 * 40 * (4 * 2**20 + 60 * 2**10)  # read and written
    assert got["total"] == sum(v for k, v in got.items() if k != "total")


def test_kernel_counting_of_profiler_events(load_benchmark):
    bench = load_benchmark("bench_dense_decode")

    class Event:
        def __init__(self, name, device):
            self.name, self.device_type = name, type("D", (), {"name": device})()

    events = [Event("ampere_bf16_gemv", "CUDA"), Event("selective_state_update_fwd_kernel", "CUDA"),
              Event("Memcpy DtoD (Device -> Device)", "CUDA"), Event("Memset (Device)", "CUDA"),
              Event("cudaLaunchKernel", "CPU"), Event("cuLaunchKernel", "CPU"), Event("cudaGraphLaunch", "CPU"),
              Event("aten::mm", "CPU")]  # fmt: skip
    assert bench.count_kernels(events) == {"kernels": 2, "copies": 2, "host_launches": 2, "graph_launches": 1}


def test_the_gpu_benchmark_runs_its_steps_on_cpu(load_benchmark, monkeypatch):
    # the GPU-only parts (CUDA events, sync debug mode, CUDA profiler, graph capture) replaced by CPU stand-ins
    import argparse
    import time

    from residency.testing import tiny_config

    bench = load_benchmark("bench_dense_decode")
    monkeypatch.setattr(bench, "DEVICE", "cpu")

    def cpu_time(fn, warmup, repeats):
        for _ in range(warmup):
            fn()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - start) / repeats * 1e3

    monkeypatch.setattr(bench, "cuda_time", cpu_time)
    monkeypatch.setattr(bench, "host_syncs", lambda fn: (fn(), None)[1])
    monkeypatch.setattr(bench, "profile_step", lambda fn: (fn(), bench.count_kernels([]))[1])
    monkeypatch.setattr(bench, "make_graphs", lambda model, cache: DecodeGraphs(
        model, cache, mode="full", min_bucket=128, capture=eager_capture(cache)))
    args = argparse.Namespace(batch=2, context=20, steps=3, seed=0)
    with kernels.kernel_backend("torch"):
        row = bench.bench_variant("dense", args, copy_gb_per_s=100.0, config=tiny_config(n_routed_experts=4,
                                                                                      num_experts_per_tok=2))
    assert row["graph_vs_eager_error"] <= 1e-5
    assert row["captures"]["captured"] == 1 and row["captures"]["replayed"] >= 3 + 3 + 1
    assert row["floor_ms"] == pytest.approx(row["bytes"]["total"] / 100e9 * 1e3)
    result = {"environment": {"device": "cpu", "torch": "x", "triton": "y", "cuda": None, "commit": "c", "date": "d"},
              "batch": 2, "context": 20, "steps": 3, "copy_gb_per_s": 100.0, "rows": [row], "target": bench.TARGET}
    text = bench.markdown(result)
    assert "| dense (4 experts, top-2) |" in text and "of the floor" in text


def test_gpu_validation_runs_the_dense_decode_benchmark(load_benchmark, tmp_path):
    gv = load_benchmark("gpu_validation")
    step = {s.name: s for s in gv.validation_steps(tmp_path, "abc")}["bench_dense_decode"]
    assert "benchmarks/bench_dense_decode.py" in step.command and str(tmp_path / "dense_decode") in step.command
    assert step.env == {"RESIDENCY_COMMIT": "abc"} and step.limit_s <= 300
