"""The runtime's parts on their own: copy ordering, the budget ledger, the host store, policy settling."""

from __future__ import annotations

import threading
import time
import warnings

import numpy as np
import pytest
import torch
from residency.runtime import store as store_module
from residency.runtime.copies import DEMAND, PREFETCH, HostUploads, ThreadCopyEngine
from residency.runtime.ledger import DeviceLedger
from residency.runtime.policy import make_policy
from residency.runtime.store import ExpertLayout, HostExpertStore

from residency.errors import BudgetError
from residency.testing import write_tiny_checkpoint


def test_copy_thread_executes_demand_before_queued_prefetches():
    executed: list[int] = []
    engine = ThreadCopyEngine()
    gate = threading.Event()

    class Probe:
        """A destination whose copy_ records the order in which the thread executed it."""

        def __init__(self, tag: int) -> None:
            self.tag = tag

        def copy_(self, src):
            if self.tag == 0:
                gate.wait(5)
            executed.append(self.tag)

    src = torch.zeros(1)
    try:
        tickets = [engine.copy(Probe(0), src, PREFETCH)]  # the thread blocks inside this one
        time.sleep(0.05)
        for tag, prio in ((1, PREFETCH), (2, DEMAND), (3, PREFETCH), (4, DEMAND)):
            tickets.append(engine.copy(Probe(tag), src, prio))
        gate.set()
        for t in tickets:
            t.wait()
        assert executed == [0, 2, 4, 1, 3]
    finally:
        engine.close()


def test_a_failed_copy_is_reported_to_its_waiter():
    engine = ThreadCopyEngine()
    try:
        ticket = engine.copy(torch.zeros(3), torch.zeros(4), DEMAND)  # shape mismatch
        with pytest.raises(RuntimeError, match="copy failed on the copy thread"):
            ticket.wait()
    finally:
        engine.close()


def test_ledger_refuses_past_the_budget_and_names_what_holds_memory():
    ledger = DeviceLedger(torch.device("cpu"), 1000)
    a = ledger.empty((100,), torch.float32, "dense weights")
    assert a.numel() == 100 and ledger.allocated_bytes == 400
    ledger.charge(500, "staging slots")
    with pytest.raises(BudgetError, match="cannot hold slots .*staging slots 0.00 MiB; dense weights"):
        ledger.empty((50,), torch.float32, "slots")
    assert ledger.allocated_bytes == 900 and ledger.peak_bytes == 900
    ledger.release(500, "staging slots")
    assert ledger.free_bytes == 600


@pytest.mark.parametrize("policy", ["lru", "lfu", "hybrid"])
def test_policy_settle_keys_an_unused_admission_like_a_use(policy):
    """An admitted but unused expert is the last choice of victim (its key is infinite); a look-ahead
    guess is settled so that, if nobody uses it, it is evicted before experts that are in use."""
    plain = make_policy(policy, 8, 2)
    plain.admit(1)
    plain.admit(2)
    assert plain.admit(3)[1] == 1  # both unkeyed: the first slot goes
    settled = make_policy(policy, 8, 2)
    settled.admit(1)
    settled.admit(2)
    settled.settle(2)
    assert settled.admit(3)[1] == 2  # the settled guess has a finite key, the other is still protected


def test_store_records_are_contiguous_and_filled_from_the_checkpoint(tmp_path):
    from residency.model.checkpoint import Checkpoint

    folder = write_tiny_checkpoint(tmp_path / "tiny", seed=3)
    ckpt = Checkpoint(folder)
    c = ckpt.config
    layout = ExpertLayout(c.moe_intermediate_size, c.expert_input_size, torch.float32)
    disk = [[0, 5] if j == 1 else [] for j in range(c.num_moe_layers)]
    store = HostExpertStore(layout, c.num_moe_layers, c.n_routed_experts, disk=disk)
    prefixes = [f"backbone.layers.{layer}.mixer.experts" for layer in c.moe_layers]
    store.fill(ckpt, prefixes)
    assert store.nbytes == (c.num_moe_layers * c.n_routed_experts - 2) * layout.record_bytes
    for j, prefix in enumerate(prefixes):
        for e in (0, 5, c.n_routed_experts - 1):
            up = ckpt.get(f"{prefix}.{e}.up_proj.weight")
            down = ckpt.get(f"{prefix}.{e}.down_proj.weight")
            if store.on_disk(j, e):
                record = torch.full((layout.record_numel,), float("nan"))
                store.read_from_disk(j, e, record)
            else:
                record = store.record(j, e)
                assert record.is_contiguous()
            assert torch.equal(record[: layout.up_numel].view_as(up), up)
            assert torch.equal(record[layout.up_numel:].view_as(down), down)
    with pytest.raises(KeyError, match="on disk"):
        store.record(1, 0)


def test_failed_pinning_warns_and_falls_back_to_pageable(monkeypatch):
    class FakeCudart:
        def cudaHostRegister(self, ptr, size, flags):
            return 2  # cudaErrorMemoryAllocation

        def cudaHostUnregister(self, ptr):
            return 0

    cleared = []
    monkeypatch.setattr(store_module.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(store_module.torch.cuda, "cudart", lambda: FakeCudart())
    monkeypatch.setattr(store_module, "_clear_cuda_error", lambda: cleared.append(1))
    layout = ExpertLayout(4, 4, torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        store = HostExpertStore(layout, 2, 3, pin=True)
    assert not store.pinned and "cudaHostRegister failed" in store.pin_problem
    assert any("pageable memory" in str(w.message) for w in caught)
    # the failed call's error is taken off the CUDA runtime, or torch's next kernel launch would raise it
    assert cleared == [1]


def test_the_cuda_error_is_cleared_in_the_runtime_library_found(monkeypatch):
    import ctypes

    opened, cleared = [], []

    class Library:
        def cudaGetLastError(self):
            cleared.append(1)

    def cdll(name):
        opened.append(name)
        if name != "libcudart.so.12":
            raise OSError(f"{name}: cannot open shared object file")
        return Library()

    monkeypatch.setattr(ctypes, "CDLL", cdll)
    monkeypatch.setattr(store_module.torch.version, "cuda", None)  # (a CPU build of torch: the usual names in turn)
    store_module._clear_cuda_error()
    assert opened == ["libcudart.so.13", "libcudart.so.12"] and cleared == [1]
    opened.clear()
    monkeypatch.setattr(store_module.torch.version, "cuda", "12.8")  # torch's own runtime first
    store_module._clear_cuda_error()
    assert opened == ["libcudart.so.12"] and cleared == [1, 1]
    def missing(name):
        opened.append(name)
        raise OSError(f"{name}: cannot open shared object file")

    opened.clear()
    monkeypatch.setattr(ctypes, "CDLL", missing)
    store_module._clear_cuda_error()  # no CUDA runtime at all: every name tried, nothing raised
    assert len(opened) == 5


def test_pinning_registers_each_buffer_at_its_exact_size(monkeypatch):
    calls = []

    class FakeCudart:
        def cudaHostRegister(self, ptr, size, flags):
            calls.append(size)
            return 0

        def cudaHostUnregister(self, ptr):
            return 0

    monkeypatch.setattr(store_module.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(store_module.torch.cuda, "cudart", lambda: FakeCudart())
    layout = ExpertLayout(3, 5, torch.bfloat16)  # 60 bytes per record: no power-of-two rounding
    store = HostExpertStore(layout, 2, 7, pin=True)
    assert store.pinned and calls == [7 * 60, 7 * 60]
    store.unpin()
    assert not store.pinned


def test_unpinning_waits_for_the_copy_device_first(monkeypatch):
    """A pinned store is unregistered only after the copy streams reading it are done, in whichever order the
    garbage collector takes the store and the runtime apart."""
    events = []

    class FakeCudart:
        def cudaHostRegister(self, ptr, size, flags):
            return 0

        def cudaHostUnregister(self, ptr):
            events.append("unregister")
            return 0

    monkeypatch.setattr(store_module.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(store_module.torch.cuda, "cudart", lambda: FakeCudart())
    monkeypatch.setattr(store_module.torch.cuda, "synchronize", lambda device=None: events.append(("sync", device)))
    store = HostExpertStore(ExpertLayout(2, 2, torch.float32), 2, 3, pin=True)
    store.copy_device = torch.device("cuda", 1)
    store.unpin()
    assert events == [("sync", torch.device("cuda", 1)), "unregister", "unregister"]
    store.unpin()  # nothing registered any more: no wait either
    assert len(events) == 3


def test_unpinning_unregisters_even_when_waiting_for_the_copy_device_fails(monkeypatch):
    """A sticky CUDA error in the wait must not leave the buffers registered when they are freed (a later store at
    the same address could not be registered)."""
    unregistered = []

    class FakeCudart:
        def cudaHostRegister(self, ptr, size, flags):
            return 0

        def cudaHostUnregister(self, ptr):
            unregistered.append(ptr)
            return 0

    def failing_sync(device=None):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(store_module.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(store_module.torch.cuda, "cudart", lambda: FakeCudart())
    monkeypatch.setattr(store_module.torch.cuda, "synchronize", failing_sync)
    store = HostExpertStore(ExpertLayout(2, 2, torch.float32), 2, 3, pin=True)
    store.copy_device = torch.device("cuda", 0)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        store.unpin()
    assert len(unregistered) == 2 and not store.pinned
    store.unpin()  # nothing registered any more
    assert len(unregistered) == 2


def test_host_uploads_to_a_cpu_device_stage_nothing():
    src = torch.arange(6, dtype=torch.int32)
    up = HostUploads(torch.device("cpu"))
    assert up(src) is src and not up.pin
    out = torch.full((6,), -1, dtype=torch.int32)
    assert up(src, out=out) is out and torch.equal(out, src)
    assert not up.host_empty((2, 3), torch.float32).is_pinned()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_host_uploads_keep_what_the_host_held_when_it_changes_right_after():
    """Tables and masks are host workspaces rewritten right after their upload is queued: each upload goes through
    a page-locked block, so the device gets what the host held at the call, on every platform, while the compute
    stream is still busy."""
    up = HostUploads(torch.device("cuda"))
    host = np.zeros(1 << 16, dtype=np.int32)
    src = torch.from_numpy(host)
    busy = torch.randn(4096, 4096, device="cuda")
    outs = []
    for i in range(32):
        busy = busy @ busy.T / 4096  # keeps the stream busy, so the copies queue behind it
        host[:] = i
        outs.append(up(src))
        host[:] = -1  # overwritten at once
    into = torch.empty(1 << 16, dtype=torch.int32, device="cuda")
    host[:] = 7
    up(src, out=into)
    host[:] = -1
    block = up.host_empty((3,), torch.float32)
    assert up.pin and block.is_pinned()
    torch.cuda.synchronize()
    assert all(bool((o == i).all()) for i, o in enumerate(outs)) and bool((into == 7).all())


def test_rows_of_disk_experts_are_minus_one():
    layout = ExpertLayout(2, 2, torch.float32)
    store = HostExpertStore(layout, 1, 6, disk=[[1, 4]])
    assert np.array_equal(store.row_of_expert[0], [0, -1, 1, 2, -1, 3])


class _Work:
    """What an MoE layer hands the runtime (the attributes of residency.model.moe.ExpertWork)."""

    def __init__(self, ids, weights, latent):
        self.ids, self.weights, self.latent, self.hidden = ids, weights, latent, latent
        self.pair_norms = None
        self.is_decode = True


@pytest.mark.parametrize("tokens", [(3, 3), (3, 5)], ids=["same-size", "workspace-grows"])
def test_cpu_parts_of_calls_submitted_before_either_is_collected_keep_their_own_pairs(tokens):
    """A CPU part reads the pair lists in a workspace the next call reuses (or replaces, when it needs more room):
    a call submitted before the previous one is collected must not change what that one computes."""
    from residency.runtime.backend import LayerSlotPlan, OffloadRuntime, RuntimeOptions

    layers, experts, k = 2, 12, 3
    layout = ExpertLayout(6, 5, torch.float32)
    gen = torch.Generator().manual_seed(0)
    works = [_Work(torch.stack([torch.randperm(experts, generator=gen)[:k] for _ in range(t)]),
                   torch.rand(t, k, generator=gen), torch.randn(t, 5, generator=gen)) for t in tokens]

    def runtime():
        store = HostExpertStore(layout, layers, experts)
        g = torch.Generator().manual_seed(1)
        for buf in store.buffers:
            buf.copy_(torch.randn(buf.shape, generator=g))
        plans = [LayerSlotPlan((), 0, "cpu") for _ in range(layers)]
        return OffloadRuntime(store, plans, DeviceLedger(torch.device("cpu"), None),
                              RuntimeOptions(mode="cpu", prefetch=False, cpu_experts=True), None, k)

    one_by_one, interleaved = runtime(), runtime()
    try:
        expect = [one_by_one.collect(j, one_by_one.submit(j, w), w).clone() for j, w in enumerate(works)]
        pending = [interleaved.submit(j, w) for j, w in enumerate(works)]
        got = [interleaved.collect(j, p, w) for j, (p, w) in enumerate(zip(pending, works))]
        assert one_by_one.stats()["cpu_computed"] > 0 and expect[0].abs().sum() > 0
        for a, b in zip(expect, got):
            torch.testing.assert_close(b, a, rtol=0, atol=0)
    finally:
        one_by_one.close()
        interleaved.close()


def test_record_copies_through_copy_many_use_each_matrix_rows_made_once():
    """The CUDA engine's record copies (the base CopyEngine.copy_records) copy the right rows, through row views
    made once per bank or buffer, and never serve one matrix's views for another."""
    from residency.runtime.copies import CopyEngine, CopyTicket

    class Synchronous(CopyEngine):
        def __init__(self):
            self.sources = []

        def copy_many(self, jobs, priority=DEMAND):
            for dst, src, _ in jobs:
                dst.copy_(src)
                self.sources.append(src)
            return CopyTicket(0)

    engine = Synchronous()
    src = torch.arange(40 * 6, dtype=torch.float32).reshape(40, 6)
    for _ in range(2):
        dst = torch.full((5, 6), float("nan"))
        engine.copy_records(dst, src, np.array([4, 0, 2]), np.array([7, 39, 0]))
        assert torch.equal(dst[[4, 0, 2]], src[[7, 39, 0]]) and dst[[1, 3]].isnan().all()
    assert engine.sources[0] is engine.sources[3]  # the same row view both times
    other = src + 1000  # another buffer: its own rows
    engine.copy_records(dst, other, np.array([1]), np.array([7]))
    assert torch.equal(dst[1], other[7])


def _done_ticket():
    from residency.runtime.copies import CopyTicket

    class Done(CopyTicket):
        def done(self) -> bool:
            return True

        def wait(self) -> float:
            return 0.0

    return Done(8)


def test_a_deferred_copy_not_started_yet_is_issued_by_its_waiter_not_waited_behind_the_queue():
    from concurrent.futures import ThreadPoolExecutor

    from residency.runtime.copies import DeferredTicket, JoinedTicket

    pool = ThreadPoolExecutor(1)
    gate, ran_on = threading.Event(), {}
    try:
        first = DeferredTicket(pool, lambda by_caller: (gate.wait(10), _done_ticket())[1], 8)  # occupies the thread

        def issue(by_caller):
            ran_on["thread"], ran_on["by_caller"] = threading.current_thread(), by_caller
            return _done_ticket()

        second = DeferredTicket(pool, issue, 8)
        assert not second.done() and second.error is None
        joined = JoinedTicket([_done_ticket(), second])
        assert not joined.done()
        joined.wait()  # the queue's thread is still busy with the first: the waiter issues the second itself
        assert ran_on["thread"] is threading.current_thread() and ran_on["by_caller"]
        assert second.done() and joined.done()
        gate.set()
        first.wait()
        assert first.done() and first.error is None
    finally:
        gate.set()
        pool.shutdown()


def test_a_deferred_copy_that_failed_is_done_with_its_error_and_raises_when_waited_for():
    from concurrent.futures import ThreadPoolExecutor

    from residency.runtime.copies import DeferredTicket

    def failing(by_caller):
        raise OSError("disk gone")

    with ThreadPoolExecutor(1) as pool:
        ticket = DeferredTicket(pool, failing, 8)
        with pytest.raises(RuntimeError, match="disk gone"):
            ticket.wait()
        assert ticket.done() and isinstance(ticket.error, OSError)
        # a Ctrl-C while the waiter issues the copy itself is raised as it is
        gate = threading.Event()
        DeferredTicket(pool, lambda by_caller: (gate.wait(10), _done_ticket())[1], 8)

        def interrupted(by_caller):
            raise KeyboardInterrupt

        stopped = DeferredTicket(pool, interrupted, 8)
        with pytest.raises(KeyboardInterrupt):
            stopped.wait()
        assert stopped.done() and isinstance(stopped.error, KeyboardInterrupt)
        gate.set()


def test_a_deferred_copy_keeps_its_failure_without_the_frames_of_whoever_waited():
    """A Ctrl-C (or an error) while the waiter issues the copy itself: the ticket keeps a detached copy of it (its
    traceback as text), so the frames that waited, and what they hold, are freed with the last reference."""
    import gc
    import weakref
    from concurrent.futures import ThreadPoolExecutor

    from residency.runtime.copies import DeferredTicket

    class Holder:  # stands for the runtime, which holds its tickets
        pass

    def stop(by_caller):
        raise KeyboardInterrupt

    gate = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        DeferredTicket(pool, lambda by_caller: (gate.wait(10), _done_ticket())[1], 8)  # occupies the thread
        holder = Holder()
        holder.ticket = DeferredTicket(pool, stop, 8)

        def waits(h):
            h.ticket.wait()

        with pytest.raises(KeyboardInterrupt):
            waits(holder)
        kept = holder.ticket.error
        assert isinstance(kept, KeyboardInterrupt) and kept.__traceback__ is None
        assert "in stop" in "".join(getattr(kept, "__notes__", []))  # where it happened, as text
        alive = weakref.ref(holder)
        gc.disable()
        try:
            del holder
            assert alive() is None
        finally:
            gc.enable()
        gate.set()
