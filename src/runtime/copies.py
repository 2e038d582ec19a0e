"""Expert copies from the host store into device slots, asynchronous, with a completion ticket per copy.

Two engines with one interface:

- :class:`CudaCopyEngine`: one stream for demand misses and another for look-ahead prefetches and
  background fills, so a demand copy never waits in a stream behind queued guesses (stream
  priorities order kernels, not DMA: the two streams' copies may run at once and share the host
  link, and within the prefetch stream copies land in issue order). Each copy first
  waits for the event that marks the last kernel reading its destination slot (a slot is only
  overwritten once the compute stream is done with its previous expert), then records an event
  when it lands. The compute stream waits on that event before the kernel that reads the slot:
  no host synchronisation.
- :class:`ThreadCopyEngine`: for the ``cpu`` device (also in its unified mode), a real background
  thread that performs the copies from a priority queue (demand before prefetch, FIFO within each), so the ordering
  guarantees are exercised on machines without a GPU. A test hook (``delay``) sleeps a random
  time before each copy.

A :class:`CopyTicket` says whether its copy has landed (``done``), waits for it on the host
(``wait``, which reports the time stalled) or makes the current compute stream wait for it
(``order_before_compute``). :class:`JoinedTicket` joins the tickets of one job's parts;
:class:`DeferredTicket` stands for a copy another thread issues once its sources are ready (the
runtime's look-ahead fills from disk).
"""

from __future__ import annotations

import copy
import heapq
import itertools
import threading
import time
import traceback
import weakref
from collections.abc import Callable
from concurrent.futures import Executor

import numpy as np
import torch

from .control import copy_rows

DEMAND, PREFETCH = 0, 1


class CopyTicket:
    """Completion of one copy. ``nbytes`` is what it moved; ``error``, once done, what made it fail (None: it
    landed)."""

    error: BaseException | None = None

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes

    def done(self) -> bool:  # pragma: no cover - interface
        raise NotImplementedError

    def wait(self) -> float:
        """Block until the copy landed; returns the seconds spent waiting."""
        raise NotImplementedError  # pragma: no cover - interface

    def order_before_compute(self) -> float:
        """Make work queued after this call (on the current stream) run after the copy; returns host stall."""
        return self.wait()


class JoinedTicket(CopyTicket):
    """One job's completion made of several copies' (say, its records in RAM copied at once and those read from
    disk copied later): done when all are; ``error`` the first failed one's."""

    def __init__(self, tickets: list[CopyTicket]) -> None:
        super().__init__(sum(t.nbytes for t in tickets))
        self.tickets = tickets

    def done(self) -> bool:
        return all(t.done() for t in self.tickets)

    @property
    def error(self) -> BaseException | None:  # type: ignore[override]
        return next((t.error for t in self.tickets if t.done() and t.error is not None), None)

    def wait(self) -> float:
        return sum(t.wait() for t in self.tickets)

    def order_before_compute(self) -> float:
        return sum(t.order_before_compute() for t in self.tickets)


def _detached(exc: BaseException) -> BaseException:
    """A copy of ``exc`` without its traceback, whose text it keeps as a note: the traceback's frames would keep
    whoever holds the copy's ticket (the runtime) alive in a reference cycle. A copy, because ``exc`` itself may be
    on its way out (a Ctrl-C re-raised), and Python rebuilds the traceback of what it raises."""
    try:
        kept = copy.copy(exc)
    except Exception:  # (an exception type that cannot be rebuilt from its arguments)
        kept = RuntimeError(repr(exc))
    if exc.__traceback__ is not None:
        kept.add_note("".join(traceback.format_tb(exc.__traceback__)).rstrip())
    return kept.with_traceback(None)


class DeferredTicket(CopyTicket):
    """A copy issued later, once its sources are ready (experts read from disk): ``issue(False)`` (which returns
    the copy's own ticket) runs on ``executor``'s thread; a caller that needs the copy before that thread started
    it runs ``issue(True)`` itself rather than wait behind the thread's queue. Done when the copy has landed, or
    when preparing it failed (``error``; waiting then raises a RuntimeError from it, as a failed copy does).

    A failure is kept detached from its traceback (:func:`_detached`): the traceback's frames would reach back
    to whoever holds this ticket (the runtime, through its slot caches), a reference cycle that delays freeing a
    deleted model to a garbage-collector pass, which may then run on any thread.
    """

    def __init__(self, executor: Executor, issue: Callable[[bool], CopyTicket], nbytes: int) -> None:
        super().__init__(nbytes)
        self._issue = issue
        self._copy: CopyTicket | None = None  # the copy's ticket, once issued
        self._failed: BaseException | None = None  # what preparing it raised, once it did
        self.future = executor.submit(issue, False)

    def _settled(self) -> bool:
        """Whether the copy was issued or failed to be (taking the thread's outcome once it has one)."""
        if self._copy is not None or self._failed is not None:
            return True
        if not self.future.done() or self.future.cancelled():
            return False
        exc = self.future.exception()
        if exc is None:
            self._copy = self.future.result()
        else:
            self._failed = _detached(exc)
        return True

    def _issued(self) -> CopyTicket:
        """The copy's ticket, issued here if the thread has not started it; raises what preparing it raised."""
        if not self._settled():
            try:
                if self.future.cancel():  # not started: no point waiting behind the queue
                    self._copy = self._issue(True)
                else:
                    self.future.exception()  # (waits)
                    self._settled()
            except BaseException as exc:
                if self.future.cancelled() and self._copy is None:  # ours to issue, and it did not get issued
                    self._failed = _detached(exc)
                if not isinstance(exc, Exception):  # (a Ctrl-C is raised as it is; the slots get repaired)
                    raise
        if self._failed is not None:
            raise RuntimeError(f"reading an expert for a copy failed: {self._failed!r}") from self._failed
        return self._copy

    def done(self) -> bool:
        if not self._settled():
            return False
        return self._failed is not None or self._copy.done()

    @property
    def error(self) -> BaseException | None:  # type: ignore[override]
        if not self._settled():
            return None
        if self._failed is not None:
            return self._failed
        return self._copy.error if self._copy.done() else None

    def wait(self) -> float:
        t0 = time.perf_counter()
        issued = self._issued()
        return time.perf_counter() - t0 + issued.wait()

    def order_before_compute(self) -> float:
        t0 = time.perf_counter()
        issued = self._issued()
        return time.perf_counter() - t0 + issued.order_before_compute()


class HostUploads:
    """Small host-to-device copies of data the host reuses or frees right after (slot and staging tables,
    skip masks, a CPU part's sum, norms), asynchronous and safe on every platform.

    Each goes through a page-locked block of PyTorch's caching host allocator, which hands a block out
    again only after the copy reading it has completed, so the host may overwrite or free its own
    array at once. An asynchronous copy straight from pageable memory is safe only where the driver
    stages the source before the call returns, which CUDA does not promise (systems whose GPU reads
    pageable memory directly, such as unified-memory machines, may read it later). Where page-locked
    memory cannot be had, the copies run from pageable memory synchronously (warned once). For a CPU
    device nothing is staged.
    """

    _warned = False

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.pin = device.type == "cuda"

    def host_empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A host tensor to fill and then upload with ``staged=True`` (page-locked when that works)."""
        if self.pin:
            try:
                return torch.empty(shape, dtype=dtype, pin_memory=True)
            except RuntimeError as exc:
                self._no_pinning(exc)
        return torch.empty(shape, dtype=dtype)

    def __call__(self, src: torch.Tensor, out: torch.Tensor | None = None, *, staged: bool = False) -> torch.Tensor:
        """``src`` (host) on the device: copied into ``out`` when given, else into a new tensor. ``staged``: ``src``
        came from :meth:`host_empty` and is not changed after this call (it is not copied again)."""
        if self.device.type != "cuda":
            return src if out is None else out.copy_(src)
        if not staged and self.pin:
            block = self.host_empty(tuple(src.shape), src.dtype)
            src = block.copy_(src) if self.pin else src
        if out is None:
            return src.to(self.device, non_blocking=self.pin)
        return out.copy_(src, non_blocking=self.pin)

    def _no_pinning(self, exc: BaseException) -> None:
        self.pin = False
        if not HostUploads._warned:
            import warnings

            HostUploads._warned = True
            warnings.warn(f"page-locked host memory could not be allocated ({exc}); small host-to-device copies "
                          "run synchronously from pageable memory", RuntimeWarning, stacklevel=4)


class CopyEngine:
    """Issues ``dst.copy_(src)`` asynchronously; see the module docstring.

    :meth:`copy_many` issues several copies as one job with one ticket (the runtime batches the
    copies of one layer call: one queue entry, one event), :meth:`copy` one copy.
    """

    def copy_many(self, jobs: list[tuple[torch.Tensor, torch.Tensor, object | None]],
                  priority: int = DEMAND) -> CopyTicket:  # pragma: no cover - interface
        """``(dst, src, after)`` per copy; ``after`` is a release marker the copy must wait for, or None."""
        raise NotImplementedError

    def copy(self, dst: torch.Tensor, src: torch.Tensor, priority: int = DEMAND,
             after: object | None = None) -> CopyTicket:
        return self.copy_many([(dst, src, after)], priority)

    def copy_records(self, dst: torch.Tensor, src: torch.Tensor, dst_rows: np.ndarray, src_rows: np.ndarray,
                     priority: int = DEMAND, after: object | None = None) -> CopyTicket:
        """``dst[dst_rows[i]] = src[src_rows[i]]`` for record matrices (slot bank <- store buffer) as one job.

        The caller may reuse the row arrays once this returns (an engine that copies later keeps its own)."""
        d, s = self.row_views(dst), self.row_views(src)
        return self.copy_many([(d[i], s[r], after) for i, r in zip(dst_rows.tolist(), src_rows.tolist())], priority)

    def row_views(self, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The rows of record matrix ``t`` as tensors, made once per matrix (banks, staging slots and store
        buffers live as long as the runtime): indexing both rows anew costs about 2 µs of host time per record
        (torch 2.13 on the project's CPU VM), once per record the CUDA engine issues."""
        cache = self.__dict__.setdefault("_row_views", {})
        hit = cache.get(id(t))
        if hit is None or hit[0] is not t:  # (a new tensor may reuse a freed one's id)
            hit = cache[id(t)] = (t, t.unbind(0))
        return hit[1]

    def release_marker(self) -> object | None:
        """A marker of "compute queued so far"; a copy given it as ``after`` starts only after that work."""
        return None

    def synchronize(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def close(self) -> None:
        pass


# ---------------------------------------------------------------------- CUDA


class _CudaTicket(CopyTicket):
    def __init__(self, nbytes: int, event: torch.cuda.Event, device: torch.device) -> None:
        super().__init__(nbytes)
        self.event = event
        self.device = device  # the compute stream that must wait is this device's, not the current device's

    def done(self) -> bool:
        return bool(self.event.query())

    def wait(self) -> float:
        if self.event.query():
            return 0.0
        t0 = time.perf_counter()
        self.event.synchronize()
        return time.perf_counter() - t0

    def order_before_compute(self) -> float:
        torch.cuda.current_stream(self.device).wait_event(self.event)
        return 0.0


class CudaCopyEngine(CopyEngine):
    """Copies on dedicated CUDA streams (demand: high priority; prefetch: low priority)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.streams = {
            DEMAND: torch.cuda.Stream(device=device, priority=-1),
            PREFETCH: torch.cuda.Stream(device=device, priority=0),
        }

    def release_marker(self) -> torch.cuda.Event:
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event

    def copy_many(self, jobs: list[tuple[torch.Tensor, torch.Tensor, object | None]],
                  priority: int = DEMAND) -> CopyTicket:
        stream = self.streams[priority]
        waited: set[int] = set()
        for _, _, after in jobs:
            if after is not None and id(after) not in waited:
                stream.wait_event(after)
                waited.add(id(after))
        with torch.cuda.stream(stream):
            for dst, src, _ in jobs:
                dst.copy_(src, non_blocking=True)
            event = torch.cuda.Event()
            event.record(stream)
        return _CudaTicket(sum(src.numel() * src.element_size() for _, src, _ in jobs), event, self.device)

    def synchronize(self) -> None:
        for stream in self.streams.values():
            stream.synchronize()


# ---------------------------------------------------------------------- background thread (cpu device)


class _CopyQueue:
    """What the copy thread holds: the priority queue and its condition, not the engine (a thread that held the
    engine would keep it, and the record views it keeps, alive for the life of the process)."""

    def __init__(self, delay: Callable[[], float] | None) -> None:
        self.delay = delay
        self.items: list[tuple[int, int, Callable[[], None], _ThreadTicket]] = []
        self.order = itertools.count()
        self.cond = threading.Condition()
        self.pending = 0
        self.closed = False

    def run(self) -> None:
        while True:
            with self.cond:
                while not self.items and not self.closed:
                    self.cond.wait()
                if not self.items:
                    return
                _, _, run, ticket = heapq.heappop(self.items)
            try:
                if self.delay is not None:
                    time.sleep(self.delay())
                run()
            except BaseException as exc:  # reported to whoever waits on the ticket
                ticket.error = exc
            with self.cond:
                ticket.landed = True
                self.pending -= 1
                self.cond.notify_all()

    def close(self) -> None:
        """Let the thread finish what is queued and end."""
        with self.cond:
            self.closed = True
            self.cond.notify_all()


class _ThreadTicket(CopyTicket):
    __slots__ = ("nbytes", "landed", "error", "_cond")

    def __init__(self, nbytes: int, cond: threading.Condition) -> None:
        self.nbytes = nbytes
        self.landed = False  # set by the copy thread under the queue's condition
        self.error: BaseException | None = None
        self._cond = cond

    def done(self) -> bool:
        return self.landed

    def wait(self) -> float:
        if not self.landed:
            t0 = time.perf_counter()
            with self._cond:
                while not self.landed:
                    self._cond.wait()
            stalled = time.perf_counter() - t0
        else:
            stalled = 0.0
        if self.error is not None:
            raise RuntimeError(f"an expert copy failed on the copy thread: {self.error}") from self.error
        return stalled


class ThreadCopyEngine(CopyEngine):
    """Copies between CPU tensors on a background thread, demand before prefetch.

    ``delay``: optional callable returning seconds to sleep before each copy job (test hook for
    random copy latency). Record copies (:meth:`copy_records`) run as one compiled loop that
    releases the GIL, so the calling thread keeps running while the copy thread works. The thread
    ends at :meth:`close`, or once the engine is garbage (it holds the queue only, so dropping the
    runtime frees the engine and the record views it keeps).
    """

    def __init__(self, delay: Callable[[], float] | None = None) -> None:
        self._queue = _CopyQueue(delay)
        self._bytes_views: dict[int, tuple[torch.Tensor, np.ndarray]] = {}
        self._thread = threading.Thread(target=self._queue.run, name="residency-copies", daemon=True)
        self._thread.start()
        weakref.finalize(self, self._queue.close)

    @property
    def delay(self) -> Callable[[], float] | None:
        return self._queue.delay

    def _push(self, run: Callable[[], None], nbytes: int, priority: int) -> CopyTicket:
        q = self._queue
        ticket = _ThreadTicket(nbytes, q.cond)
        with q.cond:
            if q.closed:
                raise RuntimeError("the copy engine is closed")
            heapq.heappush(q.items, (priority, next(q.order), run, ticket))
            q.pending += 1
            q.cond.notify_all()
        return ticket

    def copy_many(self, jobs: list[tuple[torch.Tensor, torch.Tensor, object | None]],
                  priority: int = DEMAND) -> CopyTicket:
        # compute on the cpu device is synchronous: every release marker has passed already
        pairs = [(dst, src) for dst, src, _ in jobs]

        def run() -> None:
            for dst, src in pairs:
                dst.copy_(src)

        return self._push(run, sum(src.numel() * src.element_size() for _, src in pairs), priority)

    def _bytes(self, t: torch.Tensor) -> np.ndarray:
        """``[rows, record bytes]`` uint8 view of a record matrix (kept per tensor: banks and buffers live long)."""
        hit = self._bytes_views.get(id(t))
        if hit is None or hit[0] is not t:
            hit = (t, t.view(torch.uint8).numpy())
            self._bytes_views[id(t)] = hit
        return hit[1]

    def copy_records(self, dst: torch.Tensor, src: torch.Tensor, dst_rows: np.ndarray, src_rows: np.ndarray,
                     priority: int = DEMAND, after: object | None = None) -> CopyTicket:
        d, s = self._bytes(dst), self._bytes(src)
        if d.shape[1] != s.shape[1]:
            raise ValueError(f"records of {s.shape[1]} bytes cannot be copied into slots of {d.shape[1]} bytes")
        dst_rows = np.array(dst_rows, dtype=np.int64)  # own copies: the copy runs later, the caller reuses its arrays
        src_rows = np.array(src_rows, dtype=np.int64)
        return self._push(lambda: copy_rows(d, s, dst_rows, src_rows), dst_rows.size * s.shape[1], priority)

    def synchronize(self) -> None:
        q = self._queue
        with q.cond:
            while q.pending:
                q.cond.wait()

    def close(self) -> None:
        self._queue.close()
        self._thread.join(timeout=10)
