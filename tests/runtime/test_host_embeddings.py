"""The embedding table in host memory: the offloaded model's answers do not change, the device ledger pays
exactly the table less, and the placement follows the plan (plans of format 1: on the device) or, without
one, the same rule as the planner.

All on the ``cpu`` device, as tests/runtime/test_offload.py: fp32 weights, answers checked to 1e-5 relative.
"""

from __future__ import annotations

import json

import pytest
import torch

from residency import OffloadedNemotron
from residency.errors import InputError
from residency.model.modeling import HostEmbedding
from residency.offload import embeddings_on_host, fixed_bytes
from residency.planning.plan import Plan, plan_residency
from residency.testing import offloaded_on_cpu, relative_error, tiny_config, write_tiny_checkpoint

TINY = dict(moe_intermediate_size=128, moe_latent_size=64)
CONTEXT = 256
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """(folder, resident model, prompt, resident logits, resident greedy tokens)."""
    folder = write_tiny_checkpoint(tmp_path_factory.mktemp("host-table") / "ckpt", seed=5, **TINY)
    resident = OffloadedNemotron.from_pretrained(folder, device="cpu")
    ids = torch.randint(3, 256, (1, 21), generator=torch.Generator().manual_seed(0))
    logits = resident(ids)
    tokens = resident.generate(ids, max_new_tokens=NEW_TOKENS, temperature=0, stop_at_eos=False)
    return folder, resident, ids, logits, tokens


def load(folder, budget, **kwargs):
    return offloaded_on_cpu(folder, budget, context=CONTEXT, **kwargs)


rel = relative_error


def table_bytes(config) -> int:
    return config.vocab_size * config.hidden_size * 4  # fp32 checkpoint


@pytest.mark.parametrize("cpu", [False, True], ids=["copy", "cpu"])
def test_host_table_gives_the_resident_answers_and_the_ledger_pays_the_table_less(case, cpu):
    folder, resident, ids, logits, tokens = case
    c = resident.config
    fixed_device = fixed_bytes(c, torch.float32, context=CONTEXT, embeddings_on_host=False)
    fixed_host = fixed_bytes(c, torch.float32, context=CONTEXT, embeddings_on_host=True)
    assert fixed_device.total - fixed_host.total == fixed_host.host_embeddings == table_bytes(c)
    assert fixed_bytes(c, torch.float32, context=CONTEXT) == fixed_host  # what load_offloaded does by default
    slots = 3 * c.num_experts_per_tok * fixed_host.layout.record_bytes  # a few slots: most experts miss
    allocated = {}
    for where, fixed in (("device", fixed_device), ("host", fixed_host)):
        model = load(folder, fixed.total + slots, embeddings=where, cpu_experts=cpu)
        try:
            emb = model.model.backbone.embeddings
            assert model.model.embeddings_on_host == (where == "host")
            assert isinstance(emb, HostEmbedding) == (where == "host")
            assert rel(model(ids), logits) <= 1e-5
            got = model.generate(ids, max_new_tokens=NEW_TOKENS, temperature=0, stop_at_eos=False)
            assert torch.equal(got, tokens)
            memory = model.stats()["memory"]
            assert memory["device_peak_bytes"] <= memory["device_budget_bytes"]
            assert memory["host_embedding_bytes"] == (table_bytes(c) if where == "host" else 0)
            assert model.stats()["experts"]["misses"] > 0
            allocated[where] = (memory["device_allocated_bytes"], model.slots.slots,
                                model.runtime.ledger.items["dense weights"])
            if where == "host":
                assert emb.weight.device.type == "cpu" and emb.weight.dtype == torch.float32
                assert torch.equal(emb.weight, resident.model.backbone.embeddings.weight)
                assert "embedding table 64.75 KiB in host memory" in model.plan_summary()
        finally:
            model.runtime.close()
    (dev_bytes, dev_slots, dev_dense), (host_bytes, host_slots, host_dense) = allocated["device"], allocated["host"]
    assert dev_slots == host_slots
    assert dev_bytes - host_bytes == dev_dense - host_dense == table_bytes(c)


def test_without_a_plan_the_table_goes_where_the_planner_would_put_it(case):
    folder, resident, ids, logits, _ = case
    c = resident.config
    fixed_device = fixed_bytes(c, torch.float32, context=CONTEXT, embeddings_on_host=False)
    every_expert = c.num_moe_layers * c.n_routed_experts * fixed_device.layout.record_bytes
    roomy = fixed_device.total + every_expert  # every expert fits with the table on the device: keep it there
    cases = [(fixed_device.total, {}, True), (roomy - 1, {}, True), (roomy, {}, False),
             (fixed_device.total, {"embeddings": "device"}, False),
             (fixed_device.total, {"runtime_options": {"mode": "unified"}}, False)]
    for budget, kwargs, host in cases:
        model = load(folder, budget, **kwargs)
        try:
            assert model.model.embeddings_on_host == host, (budget, kwargs)
            assert rel(model(ids), logits) <= 1e-5
        finally:
            model.runtime.close()
    with pytest.raises(InputError, match="embeddings must be one of"):
        load(folder, roomy, embeddings="gpu")
    with pytest.raises(InputError, match="applies to offloaded models"):
        OffloadedNemotron.from_pretrained(folder, device="cpu", embeddings="host")


def test_tied_embeddings_stay_on_the_device():
    tied = tiny_config(tie_word_embeddings=True)
    assert not embeddings_on_host(tied, "cuda") and not embeddings_on_host(tied, "cpu")
    assert embeddings_on_host(tiny_config(), "cuda") and not embeddings_on_host(tiny_config(), "unified")
    with pytest.raises(InputError, match="ties its word embeddings to lm_head"):
        embeddings_on_host(tied, "cuda", choice="host")


def test_the_plan_decides_and_a_format_1_plan_keeps_the_table_on_the_device(case, tmp_path):
    folder, resident, ids, logits, tokens = case
    c = resident.config
    base = plan_residency(c, "RTX 4090", expert_dtype="bf16", context=CONTEXT, embeddings="device")
    fixed = base.budget.vram_bytes - base.budget.expert_bytes + 2 * c.num_experts_per_tok * c.expert_bytes("bf16")
    plan = plan_residency(c, "RTX 4090", vram=fixed + 3 * c.num_moe_layers * c.expert_bytes("bf16"),
                          expert_dtype="bf16", context=CONTEXT)
    assert plan.settings.embeddings_on_host and plan.budget.expert_slots < c.num_moe_layers * c.n_routed_experts
    new_path = plan.save(tmp_path / "plan.json")
    raw = json.loads(new_path.read_text())
    raw["format_version"] = 1  # the same plan as written before plans said where the table lives
    del raw["settings"]["embeddings_on_host"]
    old_path = tmp_path / "plan-v1.json"
    old_path.write_text(json.dumps(raw, indent=2))
    allocated = {}
    for name, path in (("new", new_path), ("old", old_path)):
        loaded = Plan.load(path, config=c)
        model = OffloadedNemotron.from_pretrained(folder, device="cpu", plan=loaded, vram_budget="64MiB",
                                                  context=CONTEXT, quiet=True, runtime_options={"verify": True})
        try:
            assert model.model.embeddings_on_host == (name == "new")
            assert rel(model(ids), logits) <= 1e-5
            assert torch.equal(model.generate(ids, max_new_tokens=NEW_TOKENS, temperature=0, stop_at_eos=False),
                               tokens)
            allocated[name] = model.stats()["memory"]["device_allocated_bytes"]
        finally:
            model.runtime.close()
    assert allocated["old"] - allocated["new"] == table_bytes(c)  # same slots: only the table moved
    # an explicit choice overrides the plan's
    model = OffloadedNemotron.from_pretrained(folder, device="cpu", plan=plan, vram_budget="64MiB", context=CONTEXT,
                                              quiet=True, embeddings="device")
    try:
        assert not model.model.embeddings_on_host
    finally:
        model.runtime.close()


def _eager_capture(cache):
    """CUDA-graph capture stood in for on CPU (as tests/model/test_decode_path.py): ``fn`` runs once to make
    its output with the cache state restored afterwards, and each replay runs it again into that output."""

    def capture(fn):
        kv = {i: (k.clone(), v.clone()) for i, (k, v) in cache.kv.items()}
        conv, ssm = {i: t.clone() for i, t in cache.conv.items()}, {i: t.clone() for i, t in cache.ssm.items()}
        pos = cache.pos_t.clone()
        out = fn()
        for i, (k, v) in kv.items():
            cache.kv[i][0].copy_(k)
            cache.kv[i][1].copy_(v)
        for store, old in ((cache.conv, conv), (cache.ssm, ssm)):
            for i, t in old.items():
                store[i].copy_(t)
        cache.pos_t.copy_(pos)
        return (lambda: out.copy_(fn())), out

    return capture


def test_graph_decode_steps_copy_the_rows_in_before_the_replay(case):
    """The decode-step graphs ("dense" mode, what an offloaded model gets) cannot capture a host gather:
    the rows are gathered and copied before the replay into the first piece's static input."""
    from residency.model.modeling import DecodeGraphs

    folder, resident, ids, *_ = case
    c = resident.config
    fixed = fixed_bytes(c, torch.float32, context=CONTEXT)
    model = load(folder, fixed.total + 3 * c.num_experts_per_tok * fixed.layout.record_bytes, prefetch=False)
    try:
        net = model.model
        assert net.embeddings_on_host
        steps = torch.randint(3, 256, (1, 20), generator=torch.Generator().manual_seed(4))
        eager = net.new_cache(1)
        net(ids, eager)
        want = torch.cat([net(steps[:, t:t + 1], eager) for t in range(steps.shape[1])], dim=1)
        cache = net.new_cache(1)
        cache.graphs = graphs = DecodeGraphs(net, cache, mode="dense", min_bucket=32, capture=_eager_capture(cache))
        net(ids, cache)
        got = torch.cat([net(steps[:, t:t + 1], cache) for t in range(steps.shape[1])], dim=1)
        assert graphs.counts["captured"] >= 1 and graphs.counts["replayed"] >= 10
        first = graphs.buckets[32][0]
        assert first.first and first.inp is not None  # the rows' static input
        assert rel(got, want) <= 1e-5
    finally:
        model.runtime.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_the_rows_come_from_page_locked_memory_and_stay_right_under_reuse():
    """Ids on the device, rows copied without blocking from page-locked buffers that PyTorch's caching
    host allocator hands out again only once their copy has completed: 64 calls in a row stay exact."""
    table = torch.randn(300, 64).to(torch.bfloat16)
    with torch.device("meta"):
        emb = HostEmbedding(300, 64, "cuda")
    emb.weight = torch.nn.Parameter(table, requires_grad=False)
    ids = torch.randint(0, 300, (2, 7), device="cuda")
    out = emb(ids)
    assert out.device.type == "cuda" and out.shape == (2, 7, 64) and emb.pin and emb.pin_problem is None
    assert torch.equal(out.cpu(), table[ids.cpu()])
    steps = [torch.randint(0, 300, (1, 1), device="cuda") for _ in range(64)]
    outs = [emb(i) for i in steps]
    for o, i in zip(outs, steps):
        assert torch.equal(o.cpu(), table[i.cpu()])
