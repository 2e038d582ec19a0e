"""The offloaded model gives the resident model's answers for every budget, and keeps its promises.

All on the ``cpu`` device: slots are CPU tensors under a budget the runtime enforces and copies
run on a real background thread, so ordering bugs show up here; fp32 weights, so "the same
answer" is checked to 1e-5 relative.
"""

from __future__ import annotations

import gc
import json
import random
import weakref

import numpy as np
import pytest
import torch
from residency.runtime.copies import DEMAND

from residency import OffloadedNemotron
from residency.errors import BudgetError
from residency.offload import fixed_bytes
from residency.testing import offloaded_on_cpu, relative_error, write_tiny_checkpoint

CONFIGS = {
    "tiny": dict(moe_intermediate_size=128, moe_latent_size=64),
    # another expert count, top-k and layer pattern (a dense MLP layer, no latent projection)
    "48-experts-top-6": dict(n_routed_experts=48, num_experts_per_tok=6, pattern="EM*E-ME", moe_latent_size=None,
                             moe_intermediate_size=96),
}
CONTEXT = 256
NEW_TOKENS = 16


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def case(request, tmp_path_factory):
    """(folder, resident model, prompt, resident logits, resident greedy tokens) per config."""
    folder = write_tiny_checkpoint(tmp_path_factory.mktemp(request.param) / "ckpt", seed=5, **CONFIGS[request.param])
    resident = OffloadedNemotron.from_pretrained(folder, device="cpu")
    ids = torch.randint(3, 256, (1, 21), generator=torch.Generator().manual_seed(0))
    logits = resident(ids)
    tokens = resident.generate(ids, max_new_tokens=NEW_TOKENS, temperature=0, stop_at_eos=False)
    return folder, resident, ids, logits, tokens


def budgets(config):
    """Smallest feasible (no slots at all), a few dynamic slots, about half, and every expert resident."""
    fixed = fixed_bytes(config, torch.float32, context=CONTEXT)
    record = fixed.layout.record_bytes
    total = config.num_moe_layers * config.n_routed_experts
    return {"smallest": fixed.total, "few": fixed.total + 3 * config.num_experts_per_tok * record,
            "half": fixed.total + total // 2 * record, "all": fixed.total + total * record}


def load(folder, budget, **kwargs):
    return offloaded_on_cpu(folder, budget, context=CONTEXT, **kwargs)


rel = relative_error


@pytest.mark.parametrize("size", ["smallest", "few", "half", "all"])
@pytest.mark.parametrize("cpu", [False, True], ids=["copy", "cpu"])
@pytest.mark.parametrize("prefetch", [True, False], ids=["prefetch", "no-prefetch"])
def test_offloaded_equals_resident(case, size, cpu, prefetch):
    folder, resident, ids, logits, tokens = case
    budget = budgets(resident.config)[size]
    model = load(folder, budget, cpu_experts=cpu, prefetch=prefetch)
    try:
        assert rel(model(ids), logits) <= 1e-5
        got = model.generate(ids, max_new_tokens=NEW_TOKENS, temperature=0, stop_at_eos=False)
        assert torch.equal(got, tokens)
        stats = model.stats()
        experts, memory = stats["experts"], stats["memory"]
        assert memory["device_peak_bytes"] <= memory["device_budget_bytes"] == budget
        assert memory["device_allocated_bytes"] <= budget
        if size == "all":
            assert experts["misses"] == 0 and experts["h2d_bytes"] == 0
        else:
            assert experts["misses"] > 0
        if cpu and size != "all":
            assert experts["cpu_computed"] == experts["misses"]
        if not cpu:
            assert experts["cpu_computed"] == 0
            # every byte moved is one record per demand copy (staging included) or look-ahead copy, per layer too
            record = model.runtime.layout.record_bytes
            for counts in [experts, *experts["per_layer"]]:
                assert counts["h2d_bytes"] == (counts["demand_copies"] + counts["prefetch_issued"]) * record
        else:  # ... plus the background copies of admitted CPU misses
            assert experts["h2d_bytes"] >= (experts["demand_copies"] + experts["prefetch_issued"]) * (
                model.runtime.layout.record_bytes)
        if not prefetch:
            assert experts["prefetch_issued"] == 0
        # batch-1 decode: every step looks up top_k distinct experts per MoE layer
        decode = experts["by_phase"]["decode"]
        c = resident.config
        assert decode["hits"] + decode["misses"] == c.num_experts_per_tok * c.num_moe_layers * (NEW_TOKENS - 1)
        assert len(experts["per_layer"]) == c.num_moe_layers
        assert sum(layer["misses"] for layer in experts["per_layer"]) == experts["misses"]
    finally:
        model.runtime.close()


@pytest.mark.parametrize("size", ["smallest", "few"])
def test_profiling_an_offloaded_model_whose_misses_run_on_the_cpu_gives_the_resident_profile(case, size):
    """REAP saliency needs each pair's expert-output norm: the CPU kernels write those of the pairs they compute,
    at their top-k positions, so the offloaded profile equals the resident one."""
    folder, resident, ids, _, _ = case
    prompts = [ids[0].tolist(), list(range(40, 52))]
    want = resident.profile(prompts, decode_tokens=6)
    model = load(folder, budgets(resident.config)[size], cpu_experts=True, prefetch=False)
    try:
        got = model.profile(prompts, decode_tokens=6)
        assert model.stats()["experts"]["cpu_computed"] > 0
    finally:
        model.runtime.close()
    assert torch.equal(got.counts, want.counts)
    assert torch.allclose(got.gate_mass, want.gate_mass, rtol=1e-5, atol=0)
    assert torch.allclose(got.saliency, want.saliency, rtol=1e-5, atol=1e-7)
    assert (got.saliency[want.counts > 0] > 0).all()


@pytest.mark.parametrize("cpu_experts", ["auto", True])
def test_unified_mode_reads_the_store_in_place_and_equals_resident(case, cpu_experts):
    """cpu_experts=True changes nothing on unified memory: RAM experts are read in place, disk experts staged."""
    folder, resident, ids, logits, tokens = case
    model = load(folder, budgets(resident.config)["half"], cpu_experts=cpu_experts, runtime_options={"mode": "unified"})
    try:
        assert max(model.runtime._cpu_limits) == 0.0
        assert model.runtime.options.mode == "unified"
        assert rel(model(ids), logits) <= 1e-5
        assert torch.equal(model.generate(ids, max_new_tokens=NEW_TOKENS, temperature=0, stop_at_eos=False), tokens)
        experts = model.stats()["experts"]
        assert experts["misses"] > 0 and experts["disk_bytes"] > 0  # the rest is read from the checkpoint
        assert experts["cpu_computed"] == 0
        assert all(c is None for c in model.runtime.caches)  # no second copy of RAM experts
    finally:
        model.runtime.close()


def test_unified_decode_with_every_expert_in_ram_reads_no_routing_on_the_host(case, monkeypatch):
    """With every expert in RAM a unified-memory decode step needs no host decision: its MoE layers read no
    routing ids on the host (on a GPU, no device-to-host wait per layer), count the token's top-k experts as
    hits and still give the resident answers."""
    folder, resident, ids, logits, tokens = case
    record = fixed_bytes(resident.config, torch.float32, context=CONTEXT).layout.record_bytes
    model = load(folder, budgets(resident.config)["all"] + 8 * record, runtime_options={"mode": "unified"})
    try:
        runtime = model.runtime
        assert all(runtime._in_place)  # (the budget holds every expert)
        read, real = [], runtime._ids_on_host
        monkeypatch.setattr(runtime, "_ids_on_host", lambda t: read.append(tuple(t.shape)) or real(t))
        assert rel(model(ids), logits) <= 1e-5
        assert torch.equal(model.generate(ids, max_new_tokens=NEW_TOKENS, temperature=0, stop_at_eos=False), tokens)
        assert read and all(shape[0] > 1 for shape in read)  # only the prompt's calls read their ids
        decode = model.stats()["experts"]["by_phase"]["decode"]
        c = resident.config
        assert decode["hits"] == c.num_experts_per_tok * c.num_moe_layers * (NEW_TOKENS - 1)
        assert decode["misses"] == decode["h2d_bytes"] == decode["disk_bytes"] == 0
    finally:
        runtime.close()


def test_a_budget_below_the_smallest_feasible_is_refused_with_the_breakdown(case):
    folder, resident, *_ = case
    smallest = budgets(resident.config)["smallest"]
    with pytest.raises(BudgetError, match="dense weights .* staging slots .* in all. Give at least"):
        load(folder, smallest - 1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_copy_delays_never_break_residency(case, seed):
    """Copies land late and out of step: nothing is computed before its copy landed (verify=True checks
    every slot before each launch), no slot in use is evicted, and the answers stay exact."""
    folder, resident, ids, logits, tokens = case
    rng = random.Random(seed)
    # seed 1 keeps host copies of the slot tables and copies them to the kernels' tables, as on CUDA
    delays = {"copy_delay": lambda: rng.random() * 0.003 if rng.random() < 0.5 else 0.0, "mirror_tables": seed == 1}
    model = load(folder, budgets(resident.config)["few"], cpu_experts=seed == 2, runtime_options=delays)
    try:
        long = resident.generate(ids, max_new_tokens=120, temperature=0, stop_at_eos=False)
        got = model.generate(ids, max_new_tokens=120, temperature=0, stop_at_eos=False)
        assert torch.equal(got, long)
        experts = model.stats()["experts"]
        assert experts["prefetch_issued"] > 0 and experts["demand_copies"] + experts["cpu_computed"] > 0
        # precision and recall of the look-ahead, in total and per layer, from the counts
        for counts in [experts, *experts["per_layer"]]:
            used, issued, misses = counts["prefetch_used"], counts["prefetch_issued"], counts["misses"]
            assert used <= issued
            assert counts["prefetch_precision"] == (used / issued if issued else None)
            assert counts["prefetch_recall"] == (used / (used + misses) if used + misses else None)
        assert experts["prefetch_used"] > 0 and 0 < experts["prefetch_recall"] < 1
    finally:
        model.runtime.close()


@pytest.mark.parametrize("failure", ["raised at issue", "failed on the copy thread", "interrupted"])
def test_after_a_failed_or_interrupted_copy_the_model_still_gives_the_resident_answers(case, failure):
    """An error or Ctrl-C between a slot's admission and its copy, or a copy that fails on the copy thread, is
    reported, and the slots it left without their expert are filled again: a notebook that catches it and
    carries on still gets exact answers."""
    folder, resident, ids, logits, tokens = case
    model = load(folder, budgets(resident.config)["few"])
    engine = model.runtime.copies
    real = engine.copy_records
    calls = [0]

    def failing(dst, src, dst_rows, src_rows, priority=DEMAND, after=None):
        if dst is not model.runtime.staging:  # a copy into a layer's slots (staging slots are refilled every round)
            calls[0] += 1
        if calls[0] == 3 and dst is not model.runtime.staging:
            if failure == "raised at issue":
                raise OSError("injected copy error")
            if failure == "interrupted":
                raise KeyboardInterrupt
            return engine.copy(torch.zeros(3), torch.zeros(4), priority)  # fails on the copy thread; slots unfilled
        return real(dst, src, dst_rows, src_rows, priority, after)

    engine.copy_records = failing
    try:
        expected = {"raised at issue": (OSError, "injected copy error"), "interrupted": (KeyboardInterrupt, None),
                    "failed on the copy thread": (RuntimeError, "copy failed")}[failure]
        with pytest.raises(expected[0], match=expected[1]):
            model.generate(ids, max_new_tokens=NEW_TOKENS, temperature=0, stop_at_eos=False)
        assert calls[0] >= 3
        engine.copy_records = real
        assert rel(model(ids), logits) <= 1e-5
        assert torch.equal(model.generate(ids, max_new_tokens=NEW_TOKENS, temperature=0, stop_at_eos=False), tokens)
    finally:
        model.runtime.close()


def test_a_closed_runtime_says_so(case):
    folder, resident, ids, *_ = case
    model = load(folder, budgets(resident.config)["few"])
    model.runtime.close()
    with pytest.raises(RuntimeError, match="runtime was closed"):
        model(ids)


def test_a_repair_interrupted_by_a_second_ctrl_c_is_finished_at_the_next_step(case):
    """A copy error starts a repair and a Ctrl-C stops the repair's own copy: the slots it had taken over are
    repaired at the next step, before anything reads them, so the same model still gives the resident answers."""
    folder, resident, ids, logits, tokens = case
    model = load(folder, budgets(resident.config)["few"], runtime_options={"verify": True})
    engine = model.runtime.copies
    real = engine.copy_records
    calls = [0]

    def failing(dst, src, dst_rows, src_rows, priority=DEMAND, after=None):
        if dst is not model.runtime.staging:
            calls[0] += 1
            if calls[0] == 3:
                raise OSError("injected copy error")
            if calls[0] == 4:  # the repair's copy of the slots the error left without their expert
                raise KeyboardInterrupt
        return real(dst, src, dst_rows, src_rows, priority, after)

    engine.copy_records = failing
    try:
        with pytest.raises(KeyboardInterrupt):
            model.generate(ids, max_new_tokens=NEW_TOKENS, temperature=0, stop_at_eos=False)
        assert calls[0] == 4
        engine.copy_records = real
        assert rel(model(ids), logits) <= 1e-5
        assert torch.equal(model.generate(ids, max_new_tokens=NEW_TOKENS, temperature=0, stop_at_eos=False), tokens)
    finally:
        model.runtime.close()


@pytest.mark.parametrize("misses", ["copied", "cpu with copy delays"])
def test_runtime_counts_equal_the_simulator_on_its_own_trace(case, misses):
    """Replay the routing trace the offloaded model recorded through `simulate` with the same plan and
    policy: per-layer decode hits and misses are identical, with prompts fed in chunks, and with misses computed on
    the CPU while the copies that fill their slots for later land late (look-ahead off: its admissions are the
    runtime's own)."""
    from residency.planning.plan import plan_residency
    from residency.planning.simulate import simulate

    folder, resident, *_ = case
    c = resident.config
    base = plan_residency(c, "RTX 4090", expert_dtype="bf16", context=CONTEXT)
    # what the planner keeps besides slots when not every expert is resident: + staging of 2 x top_k experts
    fixed = base.budget.vram_bytes - base.budget.expert_bytes + 2 * c.num_experts_per_tok * c.expert_bytes("bf16")
    for policy in ("lru", "lfu", "hybrid", "static"):
        plan = plan_residency(c, "RTX 4090", vram=fixed + 3 * c.num_moe_layers * c.expert_bytes("bf16"),
                              expert_dtype="bf16", context=CONTEXT, policy=policy)
        assert sum(lp.dynamic_slots for lp in plan.layers) > 0
        rng = random.Random(policy)
        late = {"copy_delay": lambda rng=rng: rng.random() * 0.004} if misses != "copied" else {}
        model = OffloadedNemotron.from_pretrained(folder, device="cpu", plan=plan, vram_budget="64MiB", prefetch=False,
                                                  cpu_experts=misses != "copied", context=CONTEXT, quiet=True,
                                                  prefill_chunk=8, runtime_options=late)
        try:
            prompts = [list(range(5, 30)), list(range(40, 52))]
            _, trace = model.profile(prompts, decode_tokens=24, trace=True)
            sim = simulate(plan, trace, policy=policy, decode_only=True)
            per_layer = model.stats()["experts"]["by_phase"]["decode"]["per_layer"]
            assert [layer["hits"] for layer in per_layer] == sim.counters["hits"].tolist(), policy
            assert [layer["misses"] for layer in per_layer] == sim.counters["misses"].tolist(), policy
            # 24 decode steps per prompt; prompts fed in chunks of 8 (the 25-token one ends in a 1-token chunk): prefill
            assert int(trace.is_decode.sum()) == 2 * 24
            if misses != "copied":
                assert model.stats()["experts"]["cpu_computed"] > 0
        finally:
            model.runtime.close()


def freed_without_gc(held: list) -> bool:
    """Drop ``held``'s one item, the last reference to an offloaded model, with the garbage collector off: whether
    its host store went with it (no reference cycle keeps the runtime alive)."""
    store = weakref.ref(held[0].runtime.store)
    gc.disable()
    try:
        held.clear()
        return store() is None
    finally:
        gc.enable()


def disk_tier_plan(config):
    """A plan for a host with RAM for half the experts (the rest on disk) and a few dynamic slots per layer."""
    from residency.planning.hardware import HostSpec
    from residency.planning.plan import plan_residency

    record = config.expert_bytes("bf16")
    base = plan_residency(config, "RTX 4090", expert_dtype="bf16", context=CONTEXT)
    fixed = base.budget.vram_bytes - base.budget.expert_bytes + 2 * config.num_experts_per_tok * record
    total = config.num_moe_layers * config.n_routed_experts
    host = HostSpec(name="small host", memory_bytes=total * record // 2, reserve_bytes=0)
    plan = plan_residency(config, "RTX 4090", vram=fixed + 3 * config.num_moe_layers * record, expert_dtype="bf16",
                          context=CONTEXT, policy="lru", host=host)
    assert sum(len(lp.disk) for lp in plan.layers) > 0
    return plan


@pytest.mark.parametrize("readers", [1, 4])
def test_experts_on_disk_are_read_several_at_once_and_the_answers_stay_exact(case, readers, monkeypatch):
    """A copy job with several experts on disk reads them on ``disk_readers`` threads at once (positioned reads of
    the shared checkpoint file); the records are the same as read one after another, so the tokens are exact."""
    import threading
    import time

    from residency.runtime.store import HostExpertStore

    folder, resident, ids, logits, tokens = case
    real = HostExpertStore.read_from_disk
    lock, state = threading.Lock(), {"now": 0, "most": 0, "reads": 0}

    def slow_read(self, layer, expert, out):
        with lock:
            state["now"] += 1
            state["most"] = max(state["most"], state["now"])
            state["reads"] += 1
        time.sleep(0.002)  # long enough for the other reads of the job to start meanwhile
        try:
            real(self, layer, expert, out)
        finally:
            with lock:
                state["now"] -= 1

    monkeypatch.setattr(HostExpertStore, "read_from_disk", slow_read)
    model = OffloadedNemotron.from_pretrained(folder, device="cpu", plan=disk_tier_plan(resident.config),
                                              vram_budget="64MiB", prefetch=False, cpu_experts=False,
                                              context=CONTEXT, quiet=True,
                                              runtime_options={"verify": True, "disk_readers": readers})
    try:
        assert rel(model(ids), logits) <= 1e-5
        assert torch.equal(model.generate(ids, max_new_tokens=NEW_TOKENS, temperature=0, stop_at_eos=False), tokens)
    finally:
        model.runtime.close()
    assert state["reads"] > 0 and state["now"] == 0
    assert state["most"] == 1 if readers == 1 else 1 < state["most"] <= readers


def test_a_failed_disk_read_among_parallel_ones_leaves_the_model_exact(case, monkeypatch):
    """One read of a job fails: the error reaches the caller once the job's other reads are done, and the same
    model then gives the resident answers (the slots admitted for the job are repaired)."""
    from residency.runtime.store import HostExpertStore

    folder, resident, ids, logits, tokens = case
    real = HostExpertStore.read_from_disk
    calls = {"n": 0}

    def failing_once(self, layer, expert, out):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("injected read error")
        real(self, layer, expert, out)

    model = OffloadedNemotron.from_pretrained(folder, device="cpu", plan=disk_tier_plan(resident.config),
                                              vram_budget="64MiB", prefetch=False, cpu_experts=False,
                                              context=CONTEXT, quiet=True,
                                              runtime_options={"verify": True, "disk_readers": 4})
    try:
        monkeypatch.setattr(HostExpertStore, "read_from_disk", failing_once)
        with pytest.raises(OSError, match="injected read error"):
            model(ids)
        assert calls["n"] >= 2
        assert rel(model(ids), logits) <= 1e-5
        assert torch.equal(model.generate(ids, max_new_tokens=NEW_TOKENS, temperature=0, stop_at_eos=False), tokens)
    finally:
        model.runtime.close()
    # the read error left no reference cycle (through its traceback) that would keep the runtime alive
    held = [model]
    del model
    assert freed_without_gc(held)


def test_a_look_ahead_fill_from_disk_is_read_and_copied_without_the_call_waiting(case, monkeypatch):
    """A prefetch-priority fill with a record in RAM and one on disk: issuing it returns while the disk read is
    still blocked (it cannot finish before the test lets it), the RAM record lands meanwhile, and once the read is
    let go the job lands with both records in their slots."""
    import threading

    from residency.runtime.copies import PREFETCH
    from residency.runtime.store import HostExpertStore

    folder, resident, *_ = case
    model = OffloadedNemotron.from_pretrained(folder, device="cpu", plan=disk_tier_plan(resident.config),
                                              vram_budget="64MiB", prefetch=False, cpu_experts=False,
                                              context=CONTEXT, quiet=True)
    runtime, store = model.runtime, model.runtime.store
    release, started = threading.Event(), threading.Event()
    try:
        j = next(j for j, c in enumerate(runtime.caches) if c.num_slots - len(c.static) >= 2
                 and (store.row_of_expert[j] < 0).any() and (store.row_of_expert[j] >= 0).any())
        cache = runtime.caches[j]
        rows = store.row_of_expert[j]
        ram, disk = int(np.flatnonzero(rows >= 0)[0]), int(np.flatnonzero(rows < 0)[0])
        free = len(cache.static)
        real = HostExpertStore.read_from_disk

        def held_read(self, layer, expert, out):
            started.set()
            assert release.wait(10)
            real(self, layer, expert, out)

        monkeypatch.setattr(HostExpertStore, "read_from_disk", held_read)
        experts = np.array([ram, disk], dtype=np.int64)
        ticket = runtime._issue(j, cache, np.array([free, free + 1], dtype=np.int64), experts, rows[experts], 1,
                                cache.new_job(), PREFETCH)
        assert started.wait(10) and not ticket.done()  # issued, and the read still held
        runtime.copies.synchronize()  # the RAM record's copy lands without the disk read
        assert torch.equal(cache.bank[free], store.record(j, ram))
        release.set()
        ticket.wait()
        assert ticket.done() and ticket.error is None
        want = torch.empty_like(cache.bank[free + 1])
        real(store, j, disk, want)
        assert torch.equal(cache.bank[free + 1], want)
    finally:
        release.set()
        runtime.close()


def test_deleting_a_model_with_a_fill_still_reading_waits_for_it_then_frees_the_store(case, monkeypatch):
    """A pending look-ahead fill holds what it needs, not the runtime: deleting the model runs the runtime's
    clean-up on this thread, which lets the fill finish (its copy lands before the banks go) and then frees the host
    store, without a garbage-collector pass."""
    import threading

    from residency.runtime.copies import PREFETCH
    from residency.runtime.store import HostExpertStore

    folder, resident, *_ = case
    model = OffloadedNemotron.from_pretrained(folder, device="cpu", plan=disk_tier_plan(resident.config),
                                              vram_budget="64MiB", prefetch=False, cpu_experts=False,
                                              context=CONTEXT, quiet=True)
    release, started = threading.Event(), threading.Event()
    real = HostExpertStore.read_from_disk
    copied = []

    def held_read(self, layer, expert, out):
        started.set()
        assert release.wait(10)
        real(self, layer, expert, out)
        copied.append(expert)

    monkeypatch.setattr(HostExpertStore, "read_from_disk", held_read)
    runtime = model.runtime
    j = next(j for j, c in enumerate(runtime.caches) if c.num_slots > len(c.static)
             and (runtime.store.row_of_expert[j] < 0).any())
    cache = runtime.caches[j]
    disk = int(np.flatnonzero(runtime.store.row_of_expert[j] < 0)[0])
    runtime._issue(j, cache, np.array([len(cache.static)], np.int64), np.array([disk], np.int64),
                   np.array([-1], np.int64), 1, cache.new_job(), PREFETCH)
    assert started.wait(10)
    store = weakref.ref(runtime.store)
    del runtime, cache
    timer = threading.Timer(0.3, release.set)
    gc.disable()
    try:
        timer.start()
        del model
        assert copied == [disk]  # the fill finished before the clean-up returned
        assert store() is None
    finally:
        gc.enable()
        release.set()
        timer.join()


def test_look_ahead_with_experts_on_disk_stays_exact_with_slow_reads_and_copies(case, monkeypatch):
    """Look-ahead on a plan with a disk tier: fills from disk are read and copied behind the calls (slow reads,
    random copy delays) and every launch still finds its slots landed; the answers equal the resident run's."""
    import random
    import time

    from residency.runtime.backend import OffloadRuntime
    from residency.runtime.store import HostExpertStore

    folder, resident, ids, logits, tokens = case
    real_read, real_fill = HostExpertStore.read_from_disk, OffloadRuntime._fill_after_reads
    fills = []

    def slow_read(self, layer, expert, out):
        time.sleep(0.001)
        real_read(self, layer, expert, out)

    def counted_fill(self, *args):
        fills.append(args[0])
        return real_fill(self, *args)

    monkeypatch.setattr(HostExpertStore, "read_from_disk", slow_read)
    monkeypatch.setattr(OffloadRuntime, "_fill_after_reads", counted_fill)
    rng = random.Random(3)
    model = OffloadedNemotron.from_pretrained(folder, device="cpu", plan=disk_tier_plan(resident.config),
                                              vram_budget="64MiB", prefetch=True, cpu_experts=False,
                                              context=CONTEXT, quiet=True,
                                              runtime_options={"verify": True,
                                                               "copy_delay": lambda: rng.random() * 0.002})
    try:
        assert rel(model(ids), logits) <= 1e-5
        assert torch.equal(model.generate(ids, max_new_tokens=NEW_TOKENS, temperature=0, stop_at_eos=False), tokens)
    finally:
        model.runtime.close()
    assert fills  # look-ahead fills from disk did run
    assert model.stats()["experts"]["prefetch_issued"] > 0


def test_a_look_ahead_fill_whose_disk_read_fails_leaves_the_model_exact(case, monkeypatch):
    """The read of a fill fails on the fills thread: the error is reported by a later call or step boundary, the
    slots it was to fill are repaired, and the same model gives the resident answers."""
    import threading

    from residency.runtime.backend import DiskReader

    folder, resident, ids, logits, tokens = case
    real = DiskReader.sources
    failed = []

    def failing_on_the_fills_thread(self, j, experts):
        if threading.current_thread().name.startswith("residency-disk-fills") and not failed:
            failed.append(j)
            raise OSError("injected read error")
        return real(self, j, experts)

    model = OffloadedNemotron.from_pretrained(folder, device="cpu", plan=disk_tier_plan(resident.config),
                                              vram_budget="64MiB", prefetch=True, cpu_experts=False,
                                              context=CONTEXT, quiet=True, runtime_options={"verify": True})
    try:
        monkeypatch.setattr(DiskReader, "sources", failing_on_the_fills_thread)
        with pytest.raises(RuntimeError, match="injected read error"):
            model.generate(ids, max_new_tokens=NEW_TOKENS, temperature=0, stop_at_eos=False)
        assert failed
        assert rel(model(ids), logits) <= 1e-5
        assert torch.equal(model.generate(ids, max_new_tokens=NEW_TOKENS, temperature=0, stop_at_eos=False), tokens)
    finally:
        model.runtime.close()
    held = [model]  # (no reference cycle left by the fill's error either)
    del model
    assert freed_without_gc(held)


def test_a_plans_disk_tier_stays_on_disk_and_its_reads_equal_the_simulators(case):
    """A plan made for a host without RAM for every expert leaves some on disk: the host store has no record of
    them, misses read them from the checkpoint, the answers stay exact, and decode disk reads per layer equal the
    simulator's on the same trace."""
    from residency.planning.simulate import simulate

    folder, resident, ids, logits, tokens = case
    c = resident.config
    plan = disk_tier_plan(c)
    total = c.num_moe_layers * c.n_routed_experts
    model = OffloadedNemotron.from_pretrained(folder, device="cpu", plan=plan, vram_budget="64MiB", prefetch=False,
                                              cpu_experts=False, context=CONTEXT, quiet=True,
                                              runtime_options={"verify": True})
    try:
        store = model.runtime.store
        for j, lp in enumerate(plan.layers):
            on_disk = {int(e) for e in np.flatnonzero(store.row_of_expert[j] < 0)}
            assert on_disk == set(lp.disk) - set(model.slots.layers[j].static), j
        assert store.nbytes < total * model.runtime.layout.record_bytes
        _, trace = model.profile([list(range(5, 30))], decode_tokens=16, trace=True)  # from the empty cache
        sim = simulate(plan, trace, policy="lru", decode_only=True)
        per_layer = model.stats()["experts"]["by_phase"]["decode"]["per_layer"]
        reads = [layer["disk_bytes"] // model.runtime.layout.record_bytes for layer in per_layer]
        assert reads == sim.counters["disk_reads"].tolist() and sum(reads) > 0
        assert [layer["misses"] for layer in per_layer] == sim.counters["misses"].tolist()
        assert rel(model(ids), logits) <= 1e-5
        assert torch.equal(model.generate(ids, max_new_tokens=NEW_TOKENS, temperature=0, stop_at_eos=False), tokens)
    finally:
        model.runtime.close()


def test_the_kv_cache_fits_the_budgets_reserve_for_its_context_and_batch(case):
    """The budget reserves the KV cache, Mamba state and chunk activations of ``max_batch`` sequences of ``context``
    tokens: the cache generate makes holds exactly that context, within the reserve; a larger batch, or a prompt
    and max_new_tokens past the context, are refused before any compute, naming the fixes."""
    from residency.errors import BudgetError, InputError
    from residency.offload import reserve_bytes

    folder, resident, ids, logits, tokens = case
    c = resident.config
    row = reserve_bytes(c, CONTEXT, 512, act_bytes=4)  # (the test models compute in fp32)
    made = []

    def cache_bytes(cache):
        tensors = [t for pair in cache.kv.values() for t in pair] + list(cache.conv.values()) + list(cache.ssm.values())
        return sum(t.numel() * t.element_size() for t in tensors)

    for max_batch in (None, 3):
        model = load(folder, budgets(c)["few"] + 2 * row, max_batch=max_batch)
        new_cache = model.model.new_cache
        model.model.new_cache = lambda *a, new_cache=new_cache, **k: made.append(new_cache(*a, **k)) or made[-1]
        try:
            assert model.runtime.ledger.items["KV cache, Mamba state, activations (reserved)"] == (max_batch or 1) * row
            batch = max_batch or 1
            got = model.generate(ids.repeat(batch, 1), max_new_tokens=NEW_TOKENS, temperature=0, stop_at_eos=False)
            assert torch.equal(got, tokens.repeat(batch, 1))
            assert made[-1].capacity == CONTEXT and cache_bytes(made[-1]) <= batch * row
            with pytest.raises(BudgetError, match=f"fewer sequences at once, or load with max_batch={batch + 1}"):
                model.generate(ids.repeat(batch + 1, 1), max_new_tokens=2, temperature=0, stop_at_eos=False)
            with pytest.raises(InputError, match="larger context="):
                model.generate(ids, max_new_tokens=CONTEXT, temperature=0, stop_at_eos=False)
            assert model.context_length == CONTEXT
        finally:
            model.runtime.close()
    with pytest.raises(InputError, match="max_batch must be a positive number of sequences"):
        load(folder, budgets(c)["few"], max_batch=0)


def test_prefill_does_not_wipe_the_decode_working_set(case):
    """A long prompt's misses go through staging, not the cache, in one forward call and fed in chunks alike (every
    chunk is prefill, the later ones too); decode telemetry counts decode steps only."""
    folder, resident, ids, *_ = case
    model = load(folder, budgets(resident.config)["few"], prefetch=False, prefill_chunk=16)
    try:
        model.generate(ids, max_new_tokens=8, temperature=0, stop_at_eos=False)
        before = [dict(cache.policy.resident()) for cache in model.runtime.caches]
        c = resident.config
        phases = model.stats()["experts"]["by_phase"]
        looked_up = phases["decode"]["hits"] + phases["decode"]["misses"]
        assert looked_up == c.num_experts_per_tok * c.num_moe_layers * 7  # 8 tokens: a prefill, then 7 decode steps
        long_prompt = torch.randint(3, 256, (1, 193), generator=torch.Generator().manual_seed(9))
        model(long_prompt)  # one forward call
        assert [dict(cache.policy.resident()) for cache in model.runtime.caches] == before
        # 12 chunks of 16 and a last one of one token (prefill too), no decode step
        model.generate(long_prompt, max_new_tokens=1, temperature=0, stop_at_eos=False)
        assert [dict(cache.policy.resident()) for cache in model.runtime.caches] == before
        after = model.stats()["experts"]["by_phase"]
        assert after["decode"]["hits"] + after["decode"]["misses"] == looked_up
        assert after["decode"]["demand_copies"] == phases["decode"]["demand_copies"]
        assert after["prefill"]["misses"] > phases["prefill"]["misses"]
    finally:
        model.runtime.close()


def test_profile_guided_layout_puts_hot_experts_in_static_slots(case):
    folder, resident, ids, *_ = case
    profile = resident.profile([ids[0].tolist()], decode_tokens=8)
    counts = np.asarray(profile.counts)
    model = load(folder, budgets(resident.config)["half"], profile=profile, prefetch=False)
    try:
        layers_with_static = 0
        for j, lp in enumerate(model.slots.layers):
            if lp.static:
                layers_with_static += 1
                rest = np.setdiff1d(np.arange(counts.shape[1]), lp.static)
                assert counts[j, list(lp.static)].min() >= counts[j, rest].max()
        assert layers_with_static > 0
    finally:
        model.runtime.close()


def test_bf16_offloaded_parts_are_summed_in_fp32_and_rounded_once(tmp_path):
    """In bf16 the offloaded layer adds its parts (slots, staging rounds, CPU) in fp32 and rounds once,
    as the resident kernel does, so the logits stay within bf16 rounding of the resident model's."""
    folder = write_tiny_checkpoint(tmp_path / "bf16", seed=1, dtype=torch.bfloat16, **CONFIGS["tiny"])
    resident = OffloadedNemotron.from_pretrained(folder, device="cpu")
    ids = torch.randint(3, 256, (1, 32), generator=torch.Generator().manual_seed(0))
    want = resident(ids)
    for cpu in (False, True):
        model = load(folder, budgets(resident.config)["few"], cpu_experts=cpu)
        try:
            assert rel(model(ids), want) <= 2e-3
        finally:
            model.runtime.close()


def test_cpu_pairs_round_their_intermediate_as_the_gpu_prefill_kernel_does(tmp_path, monkeypatch):
    """bf16 on a GPU: the Triton prefill path keeps relu(up @ x)^2 in bf16, the CPU expert kernel in fp32 unless told.
    Here the GPU's arithmetic is emulated on the cpu device (the slot-bank kernel rounds h on prefill-sized calls,
    the runtime asks for it as on CUDA): CPU-computed misses then give the resident run's logits and greedy tokens;
    left in fp32, the prompt's CPU pairs already differ from it by far more than bf16 summation order."""
    import residency.kernels.moe.gather_gemm as gather_gemm
    from residency.kernels.moe.reference import moe_gather_gemm_reference

    def prefill_sized(ids, table):  # the default tuning table's path choice
        return ids.shape[0] * ids.shape[1] * 4 > table.shape[0]

    def gpu_like(x, up, down, table, ids, weights, skip=None, **kwargs):
        kwargs["intermediate"] = torch.bfloat16 if prefill_sized(ids, table) else None
        return moe_gather_gemm_reference(x, up, down, table, ids, weights, skip, **kwargs)

    monkeypatch.setattr(gather_gemm, "moe_gather_gemm_reference", gpu_like)
    folder = write_tiny_checkpoint(tmp_path / "ckpt", seed=5, dtype=torch.bfloat16, **CONFIGS["tiny"])
    resident = OffloadedNemotron.from_pretrained(folder, device="cpu")
    ids = torch.randint(3, 256, (1, 21), generator=torch.Generator().manual_seed(0))
    logits = resident(ids)
    tokens = resident.generate(ids, max_new_tokens=48, temperature=0, stop_at_eos=False)
    fixed = fixed_bytes(resident.config, torch.bfloat16, context=CONTEXT)
    errors = {}
    for as_gpu in (True, False):
        model = OffloadedNemotron.from_pretrained(folder, device="cpu", vram_budget=f"{fixed.total}B",
                                                  context=CONTEXT, cpu_experts=True, quiet=True)
        runtime = model.runtime
        runtime._gpu_kernels = as_gpu  # ask the kernels' rounding, as on CUDA
        runtime._intermediate_dtype = lambda x, up, down, table, ids: (
            torch.bfloat16 if prefill_sized(ids, table) else torch.float32)
        try:
            errors[as_gpu] = rel(model(ids).float(), logits.float())
            got = model.generate(ids, max_new_tokens=48, temperature=0, stop_at_eos=False)
            assert model.stats()["experts"]["cpu_computed"] > 0
            if as_gpu:
                assert torch.equal(got, tokens)
        finally:
            runtime.close()
    assert errors[True] <= 2e-3 and errors[False] > 10 * 2e-3, errors  # (measured: 0 and 0.11)


def test_the_cpu_rate_of_the_automatic_miss_choice_is_measured_in_the_stores_format(monkeypatch):
    """On CUDA, ``cpu_experts="auto"`` weighs copying a miss against computing it at this host's measured CPU rate:
    for a quantized store that of the packed records' kernel (fewer GB/s than BF16's), at the model's shapes."""
    import residency.runtime.cpu_experts as cpu_experts
    import residency.runtime.cpu_quant as cpu_quant
    from residency.kernels.moe.quant_formats import ExpertRecordLayout, QuantSpec
    from residency.runtime.store import ExpertLayout

    import residency.offload as offload

    calls = []
    monkeypatch.setattr(cpu_experts, "measure_throughput", lambda k, **kw: calls.append(("bf16", k, kw)) or 30.0)
    monkeypatch.setattr(cpu_quant, "measure_quant_throughput",
                        lambda spec, k, **kw: calls.append((spec.format, k, kw)) or 12.0)
    cuda = torch.device("cuda")
    assert offload.miss_rates(None, "cuda", "auto", cuda, ExpertLayout(96, 64, torch.bfloat16))[1] == 30.0
    quant = ExpertRecordLayout(QuantSpec("nvfp4"), 96, 64)
    assert offload.miss_rates(None, "cuda", "auto", cuda, quant)[1] == 12.0
    assert calls == [("bf16", 4, dict(latent=64, intermediate=96, bank_experts=16, repeats=3)),
                     ("nvfp4", 4, dict(latent=64, intermediate=96, bank_records=16, repeats=3))]
    offload.miss_rates(None, "cuda", True, cuda, quant)  # a fixed choice measures nothing
    offload.miss_rates(None, "cpu", "auto", torch.device("cpu"), quant)
    assert len(calls) == 2


def test_intermediate_dtype_is_the_one_the_triton_kernels_keep(monkeypatch):
    """``intermediate_dtype`` / ``quant_intermediate_dtype``: fp32 for the torch reference, the interpreter and the
    decode path; the 16-bit dtype on a GPU's prefill path (the choice the kernels make, from the tuning table)."""
    import residency.kernels.moe.gather_gemm as gather_gemm
    import residency.kernels.moe.quant_gather_gemm as quant_gemm
    from residency.kernels.moe.quant_formats import ExpertRecordLayout, QuantSpec

    x = torch.zeros(3, 16, dtype=torch.bfloat16)
    up, down = torch.zeros(4, 32, 16, dtype=torch.bfloat16), torch.zeros(4, 16, 32, dtype=torch.bfloat16)
    table = torch.arange(8, dtype=torch.int32) % 4
    prompt, step = torch.zeros(3, 2, dtype=torch.long), torch.zeros(1, 2, dtype=torch.long)  # 3*2*4 > 8 >= 1*2*4
    layout = ExpertRecordLayout(QuantSpec("nvfp4"), 32, 16)
    bank = torch.zeros(4, layout.record_bytes, dtype=torch.uint8)
    qup, qdown = layout.up(bank), layout.down(bank)
    for ids in (prompt, step):  # on the cpu device: the torch reference, fp32
        assert gather_gemm.intermediate_dtype(x, up, down, table, ids) == torch.float32
        assert quant_gemm.quant_intermediate_dtype(x, qup, qdown, table, ids) == torch.float32
    for module in (gather_gemm, quant_gemm):  # as on a GPU
        monkeypatch.setattr(module, "use_triton", lambda backend, *tensors: True)
        monkeypatch.setattr(module, "interpret_mode", lambda: False)
    assert gather_gemm.intermediate_dtype(x, up, down, table, prompt) == torch.bfloat16
    assert gather_gemm.intermediate_dtype(x, up, down, table, step) == torch.float32
    assert gather_gemm.intermediate_dtype(x, up, down, table, step, path="prefill") == torch.bfloat16
    assert gather_gemm.intermediate_dtype(x.float(), up.float(), down.float(), table, prompt) == torch.float32
    assert quant_gemm.quant_intermediate_dtype(x, qup, qdown, table, prompt) == torch.bfloat16
    assert quant_gemm.quant_intermediate_dtype(x.half(), qup, qdown, table, prompt) == torch.float16
    assert quant_gemm.quant_intermediate_dtype(x, qup, qdown, table, step) == torch.float32
    assert quant_gemm.quant_intermediate_dtype(x.float(), qup, qdown, table, prompt) == torch.float32
    # W4A16 groups the decode kernel cannot read (not a multiple of 8) take the prefill kernel even for one token
    odd = ExpertRecordLayout(QuantSpec("w4a16", group_size=12), 32, 48)
    odd_bank = torch.zeros(4, odd.record_bytes, dtype=torch.uint8)
    x48 = torch.zeros(1, 48, dtype=torch.bfloat16)
    assert quant_gemm.quant_intermediate_dtype(x48, odd.up(odd_bank), odd.down(odd_bank), table, step) == torch.bfloat16


def cuda_reference(tmp_path, new_tokens):
    """The tiny checkpoint in bf16, resident on CUDA: (folder, prompt, its logits, ``new_tokens`` greedy tokens, the
    logits of every position of prompt + tokens, ``budget_for(share)``: the bytes that hold that share of all experts
    besides what runs anyway)."""
    folder = write_tiny_checkpoint(tmp_path / "ckpt", seed=5, dtype=torch.bfloat16, **CONFIGS["tiny"])
    resident = OffloadedNemotron.from_pretrained(folder, device="cuda")
    ids = torch.randint(3, 256, (1, 21), generator=torch.Generator().manual_seed(0))
    logits = resident(ids)
    tokens = resident.generate(ids, max_new_tokens=new_tokens, temperature=0, stop_at_eos=False).cpu()
    forced = resident(tokens).float().cpu()
    fixed = fixed_bytes(resident.config, torch.bfloat16, context=CONTEXT)
    total = resident.config.num_moe_layers * resident.config.n_routed_experts
    return (folder, ids, logits, tokens, forced,
            lambda share: fixed.total + int(share * total) * fixed.layout.record_bytes)


def assert_greedy_matches(model, got, tokens, forced, prompt):
    """``got`` (the offloaded run's greedy tokens) equals ``tokens`` (the resident run's), but for a flip at a near tie.

    In bf16 on a GPU the offloaded run sums a layer's experts in another order than the resident run (slot bank and
    staging rounds, or the CPU), so a logit may move by a bf16 rounding step; where the resident run's best two
    tokens are that close, greedy decoding may take the other and the texts part there. So: the teacher-forced
    logits of every position agree to bf16 tolerance, and at the first differing token the resident run's top two
    logits are within 1 % of the largest logit and the offloaded run took one of them.
    """
    mine = model(tokens).float().cpu()
    assert rel(mine, forced) <= 5e-3
    n = min(got.shape[1], tokens.shape[1])
    differs = (got[0, :n] != tokens[0, :n]).nonzero()
    assert got.shape == tokens.shape
    if not len(differs):
        return
    at = int(differs[0])
    assert at >= prompt
    scores = forced[0, at - 1]
    top = scores.topk(2)
    assert float(top.values[0] - top.values[1]) <= 1e-2 * float(scores.abs().max()), (
        f"token {at - prompt} differs where the resident run had no near tie")
    assert int(got[0, at]) in top.indices.tolist()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_a_disk_tier_with_look_ahead_equals_the_resident_run(tmp_path):
    """The CUDA path with experts on disk: demand reads several at once into pinned records, look-ahead fills read
    and copied on the fills thread (its copies issued from that thread on the prefetch stream, after the bank's
    release marker); bf16, compared as in the test above."""
    folder, ids, logits, tokens, forced, _ = cuda_reference(tmp_path, 48)
    from residency.model.checkpoint import Checkpoint

    model = OffloadedNemotron.from_pretrained(folder, device="cuda", plan=disk_tier_plan(Checkpoint(folder).config),
                                              vram_budget="64MiB", context=CONTEXT, prefetch=True, cpu_experts=False,
                                              quiet=True)
    try:
        assert sum(int((rows < 0).sum()) for rows in model.runtime.store.row_of_expert) > 0
        assert rel(model(ids).float().cpu(), logits.float().cpu()) <= 2e-3
        got = model.generate(ids, max_new_tokens=48, temperature=0, stop_at_eos=False).cpu()
        experts = model.stats()["experts"]
        assert experts["disk_bytes"] > 0 and experts["prefetch_issued"] > 0
        assert_greedy_matches(model, got, tokens, forced, ids.shape[1])
    finally:
        model.runtime.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("cpu_experts", [False, True])
def test_on_cuda_offloaded_tokens_equal_the_resident_run(tmp_path, cpu_experts):
    """The CUDA path: copy streams and events, release markers, slot tables copied from their host copies,
    staging rounds and look-ahead; bf16, so logits are compared to bf16 tolerance and greedy tokens up to a flip at a
    near tie (:func:`assert_greedy_matches`)."""
    folder, ids, logits, tokens, forced, budget_for = cuda_reference(tmp_path, 48)
    for share in (0.0, 0.25, 1.0):
        budget = budget_for(share)
        model = OffloadedNemotron.from_pretrained(folder, device="cuda", vram_budget=f"{budget}B", context=CONTEXT,
                                                  cpu_experts=cpu_experts, quiet=True)
        try:
            assert rel(model(ids).float().cpu(), logits.float().cpu()) <= 2e-3, share
            got = model.generate(ids, max_new_tokens=48, temperature=0, stop_at_eos=False).cpu()
            experts = model.stats()["experts"]
            assert (experts["misses"] > 0) == (share < 1.0)
            assert model.stats()["memory"]["device_allocated_bytes"] <= budget
            assert_greedy_matches(model, got, tokens, forced, ids.shape[1])
        finally:
            model.runtime.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_verify_checks_every_launch_and_finds_nothing_wrong(tmp_path):
    """``verify=True`` on CUDA: before each launch the host waits for the copies into the slots it reads (the
    compute stream is ordered after them on the device, which the host cannot see) and checks what the slots and
    the table hold; a correctly ordered run raises nothing and gives the resident answers."""
    folder, ids, logits, tokens, forced, budget_for = cuda_reference(tmp_path, 16)
    model = OffloadedNemotron.from_pretrained(folder, device="cuda", vram_budget=f"{budget_for(0.25)}B",
                                              context=CONTEXT, cpu_experts=False, prefetch=True, quiet=True,
                                              runtime_options={"verify": True})
    try:
        assert model.runtime.options.verify
        assert rel(model(ids).float().cpu(), logits.float().cpu()) <= 2e-3
        got = model.generate(ids, max_new_tokens=16, temperature=0, stop_at_eos=False).cpu()
        assert model.stats()["experts"]["misses"] > 0
        assert_greedy_matches(model, got, tokens, forced, ids.shape[1])
    finally:
        model.runtime.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_unified_mode_equals_the_resident_run_and_decodes_without_host_routing(tmp_path, monkeypatch):
    """Unified mode on a CUDA device (on a discrete GPU the store is device memory; the code path is DGX Spark's):
    with part of the experts on disk it stages them; with every expert in RAM its decode steps read no routing
    ids on the host. bf16: logits to bf16 tolerance, greedy tokens as :func:`assert_greedy_matches` says."""
    folder, ids, logits, tokens, forced, budget_for = cuda_reference(tmp_path, 32)
    for share in (0.5, 1.5):  # (with margin: unified mode keeps the embedding table in the one pool)
        model = OffloadedNemotron.from_pretrained(folder, device="unified", vram_budget=f"{budget_for(share)}B",
                                                  context=CONTEXT, quiet=True)
        runtime = model.runtime
        try:
            assert runtime.options.mode == "unified" and all(runtime._in_place) == (share > 1)
            read, real = [], runtime._ids_on_host
            monkeypatch.setattr(runtime, "_ids_on_host",
                                lambda t, read=read, real=real: read.append(tuple(t.shape)) or real(t))
            assert rel(model(ids).float().cpu(), logits.float().cpu()) <= 2e-3, share
            got = model.generate(ids, max_new_tokens=32, temperature=0, stop_at_eos=False).cpu()
            assert any(shape[0] == 1 for shape in read) == (share < 1), share  # one-token calls read ids?
            monkeypatch.setattr(runtime, "_ids_on_host", real)
            assert_greedy_matches(model, got, tokens, forced, ids.shape[1])
        finally:
            runtime.close()


def test_offload_benchmark_reports_each_run_as_it_goes(load_benchmark, tmp_path, monkeypatch, capsys):
    """``bench_offload.py`` on the cpu device (the program, not a GPU figure): one row per run with the comparison
    to the resident run recorded in it, and its report rewritten after every row, so a run cut short keeps what it
    measured."""
    bench = load_benchmark("bench_offload")
    monkeypatch.setattr(bench, "MODELS", {"tiny (32 experts, top-4)": bench.MODELS["tiny (32 experts, top-4)"]})
    out = tmp_path / "offload"
    bench.main(["--device", "cpu", "--tokens", "4", "--out", str(out)])
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["complete"] and [r["run"] for r in report["rows"]][:2] == ["resident", "offloaded 10 %"]
    assert len(report["rows"]) == 6 and all(r["tokens_equal"] and r["prompt_logits_rel_err"] <= 2e-3
                                            for r in report["rows"][1:])
    printed = capsys.readouterr().out
    assert printed.count("| tiny (32 experts, top-4) |") == 6 and "incomplete" not in out.with_suffix(".md").read_text()

    calls = []
    real = bench.decode_rate

    def failing(model, ids, tokens):  # the third model's run fails
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("cut short")
        return real(model, ids, tokens)

    monkeypatch.setattr(bench, "decode_rate", failing)
    with pytest.raises(RuntimeError, match="cut short"):
        bench.main(["--device", "cpu", "--tokens", "4", "--out", str(out)])
    report = json.loads(out.with_suffix(".json").read_text())
    assert not report["complete"] and len(report["rows"]) == 2
    assert "incomplete" in out.with_suffix(".md").read_text()


def test_first_difference_names_the_first_generated_token_that_differs(load_benchmark):
    bench = load_benchmark("bench_offload")
    want = torch.tensor([[5, 6, 7, 8, 9]])
    assert bench.first_difference(want.clone(), want, prompt=2) is None
    assert bench.first_difference(torch.tensor([[5, 6, 7, 0, 9]]), want, prompt=2) == 1
    assert bench.first_difference(torch.tensor([[5, 6, 7]]), want, prompt=2) == 1  # stopped early


@pytest.mark.parametrize("option, value, message", [
    ("cpu_experts", 1, "cpu_experts must be 'auto', True or False, got 1"),
    ("cpu_experts", "yes", "cpu_experts must be 'auto', True or False"),
    ("prefetch", "no", "prefetch must be True or False"),
    ("policy", "fifo", "policy must be one of static, lru, lfu, hybrid"),
])
def test_offloading_options_of_the_wrong_kind_are_refused_before_loading(case, monkeypatch, option, value, message):
    import residency.offload
    from residency.errors import InputError

    folder, resident, *_ = case
    monkeypatch.setattr(residency.offload, "load_offloaded", lambda *a, **k: pytest.fail("loading started"))
    with pytest.raises(InputError, match=message):
        OffloadedNemotron.from_pretrained(folder, device="cpu", vram_budget="64MiB", quiet=True, **{option: value})


def test_float16_experts_are_copied_not_computed_on_the_cpu(tmp_path):
    """The CPU expert kernels read bfloat16 / float32 records: with float16 experts ``"auto"`` copies every miss
    (the answers stay the resident model's) and ``cpu_experts=True`` is refused before loading, naming the fixes."""
    from residency.errors import InputError

    folder = write_tiny_checkpoint(tmp_path / "ckpt", seed=5, **CONFIGS["tiny"])
    resident = OffloadedNemotron.from_pretrained(folder, device="cpu", dtype="float16")
    ids = torch.randint(3, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    want = resident.generate(ids, max_new_tokens=8, temperature=0, stop_at_eos=False)
    model = load(folder, budgets(resident.config)["few"], dtype="float16", cpu_experts="auto")
    try:
        assert torch.equal(model.generate(ids, max_new_tokens=8, temperature=0, stop_at_eos=False), want)
        experts = model.stats()["experts"]
        assert experts["misses"] > 0 and experts["cpu_computed"] == 0
    finally:
        model.runtime.close()
    with pytest.raises(InputError, match="dtype='bfloat16', or cpu_experts=False"):
        load(folder, budgets(resident.config)["few"], dtype="float16", cpu_experts=True)


def test_a_plan_gives_the_context_and_batch_it_accounted_for_unless_asked_otherwise(case):
    from residency.planning.plan import plan_residency

    folder, resident, *_ = case
    plan = plan_residency(resident.config, "RTX 4090", expert_dtype="bf16", context=300, batch=2)
    for kwargs, want in (({}, (300, 2)), ({"context": 200, "max_batch": 1}, (200, 1))):
        model = OffloadedNemotron.from_pretrained(folder, device="cpu", plan=plan, vram_budget="64MiB", quiet=True,
                                                  **kwargs)
        try:
            assert (model.context, model.max_batch) == want
        finally:
            model.runtime.close()


def test_profiling_refuses_a_prompt_past_the_context_before_any_runs(case, monkeypatch):
    from residency.errors import InputError

    folder, resident, *_ = case
    model = load(folder, budgets(resident.config)["few"])
    ran = []
    real = model.generate
    monkeypatch.setattr(model, "generate", lambda *a, **k: ran.append(1) or real(*a, **k))
    try:
        prompts = [list(range(5, 30)), list(range(3, 3 + CONTEXT - 8))]  # the second has room for 7 decoded tokens
        with pytest.raises(InputError, match=r"prompt 'prompt-1' has 248 tokens, which with decode_tokens \(\+ 1\) 9 "
                                             r"exceed the model's context of 256 tokens; lower decode_tokens \(\+ 1\) "
                                             r"or shorten prompt 'prompt-1', or load the model with a larger context="):
            model.profile(prompts, decode_tokens=8)
        assert ran == []
        model.profile(prompts, decode_tokens=7)
        assert len(ran) == 2
    finally:
        model.runtime.close()


def test_deleting_an_offloaded_model_frees_its_host_store_and_ends_its_copy_thread(case):
    """No reference cycle between the model and the runtime, and no copy thread holding the engine: the host store
    (most of a checkpoint's bytes) is freed when the last reference goes, without a garbage-collector pass."""
    import threading

    folder, resident, ids, _, _ = case
    gc.collect()
    before = {t for t in threading.enumerate() if t.name == "residency-copies"}
    model = load(folder, budgets(resident.config)["few"])
    model.generate(ids, max_new_tokens=2, temperature=0, stop_at_eos=False)  # look-ahead and copies ran
    threads = {t for t in threading.enumerate() if t.name == "residency-copies"} - before
    assert len(threads) == 1
    held = [model]
    del model
    assert freed_without_gc(held)
    thread = threads.pop()
    thread.join(timeout=10)
    assert not thread.is_alive()
