"""A per-model dynamic batcher: a bounded asyncio queue and one worker that merges requests.

Requests with the same non-batch shapes are concatenated along dimension 0 up to ``max_batch``
samples, run once in a worker thread (off the event loop), and the outputs split back. The
worker waits up to ``max_delay`` for more requests only while other requests are still being
received, so a lone client never pays the delay and a busy server fills its batches. A full
queue raises :class:`QueueFull` at once (the server answers 503): memory never grows with load.

While one batch runs, the next is collected and handed to the runtime thread, where it waits:
when the running batch ends, the next starts at once instead of after a round trip through the
event loop (resolve the outputs, collect, submit). That round trip left the runtime idle about
15 % of the time at concurrency 32. The waiting batch still counts towards ``queue_size``.

A lone request pays every hand-off between the event loop and the runtime thread, so there are
few (measured per phase with perf_counter_ns and benchmarks/serve_ab.py): the worker gives a
batch to the thread in the same loop step that collected it, through a plain queue to one
dedicated thread (not an executor and its futures), and that thread hands the outputs back with
one ``call_soon_threadsafe`` that resolves the requests directly. Running the model on the event
loop itself was slower: after a model run the interpreter's caches are cold, and the loop thread
pays for that on its next Python code (about 0.15 ms more per request at ResNet18-64).
A request the server knows is alone (``submit(..., alone=True)``: no other request in flight,
so none could join its batch) skips the queue and worker when the model is idle.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgeopt.serve.protocol import InferRequest

log = logging.getLogger("edgeopt.serve")


class QueueFull(Exception):
    """The model's queue holds ``queue_size`` requests already."""


class ModelRunError(Exception):
    """The runtime failed on a request; the message is one line for the client.

    It never carries the runtime's own text (node names, file paths, library versions): that
    goes to the server log. ``status`` is 400 when the runtime called the input invalid (e.g. a
    token id beyond the vocabulary), else 500.
    """

    def __init__(self, message: str, status: int = 500) -> None:
        super().__init__(message)
        self.status = status


def _run_error(name: str, exc: BaseException) -> ModelRunError:
    log.error("model run failed", extra={"model": name, "error": _one_line(exc), "error_type": type(exc).__name__})
    if type(exc).__name__ in ("InvalidArgument", "InvalidArgumentError"):  # ONNX Runtime / TFLite wording
        return ModelRunError(f"model {name!r} rejected the input values (for example an index out of range); "
                             "the server log has the details", status=400)
    return ModelRunError(f"model {name!r} failed on this input; the server log has the details")


@dataclass
class _Pending:
    request: InferRequest
    future: asyncio.Future[dict[str, np.ndarray]]
    key: tuple[tuple[str, tuple[int, ...]], ...] = field(init=False)

    def __post_init__(self) -> None:
        self.key = self.request.batch_key()


class Batcher:
    """Queue and worker for one model.

    Args:
        name: the model's name (for logs and metrics).
        run: the session's ``run(feeds) -> list[np.ndarray]``, called from one worker thread.
        output_names: names of ``run``'s outputs, in order.
        max_batch: most samples merged into one call; 1 turns merging off.
        max_delay: seconds to wait for more requests while others are arriving.
        queue_size: most requests waiting; more raise QueueFull.
        on_batch: called with the number of samples of every call (metrics).
        on_depth: called with the queue depth whenever it changes (metrics).
    """

    def __init__(self, name: str, run: Callable[[dict[str, np.ndarray]], list[np.ndarray]], *,
                 output_names: list[str], max_batch: int, max_delay: float, queue_size: int,
                 on_batch: Callable[[int], None] | None = None,
                 on_depth: Callable[[int], None] | None = None) -> None:
        self.name = name
        self._run = run
        self._output_names = list(output_names)
        self.max_batch = max_batch
        self.max_delay = max_delay
        self.queue_size = queue_size
        self._on_batch = on_batch or (lambda n: None)
        self._on_depth = on_depth or (lambda n: None)
        self._queue: asyncio.Queue[_Pending] | None = None
        self._wake: asyncio.Event | None = None
        self._carry: _Pending | None = None
        self._task: asyncio.Task[None] | None = None
        self._handed: list[int] = []  # requests per batch given to the runtime thread, oldest (running) first
        self._last: asyncio.Future[None] | None = None  # the batch handed last: done once it is resolved
        self._collecting = False  # the worker holds requests it has not handed yet
        self._jobs: queue.SimpleQueue[tuple[dict[str, np.ndarray], Callable[..., None]] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.arriving = 0

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue = asyncio.Queue(maxsize=self.queue_size)
        self._wake = asyncio.Event()
        self._thread = threading.Thread(target=self._runtime_thread, name=f"edgeopt-{self.name}", daemon=True)
        self._thread.start()
        self._task = self._loop.create_task(self._worker(), name=f"batcher-{self.name}")

    def _runtime_thread(self) -> None:
        """Run each job in order; its callback gets (outputs, None) or (None, error) on the event loop."""
        assert self._loop is not None
        while (job := self._jobs.get()) is not None:
            feeds, callback = job
            try:
                result: tuple[Any, Any] = (self._run(feeds), None)
            except Exception as exc:
                result = (None, exc)
            try:
                self._loop.call_soon_threadsafe(callback, *result)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                return
            del feeds, callback, result  # hold no arrays while idle

    async def stop(self) -> None:
        """Finish every queued request, then stop the worker and its thread."""
        if self._task is not None and self._queue is not None:
            await self._queue.join()
            if self._last is not None:
                await asyncio.wait([self._last])
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if self._thread is not None:
            self._jobs.put(None)
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join)

    def depth(self) -> int:
        """Requests waiting: queued, carried over, or in a batch waiting behind the running one."""
        waiting_in_runtime = sum(self._handed[1:])
        return (self._queue.qsize() if self._queue is not None else 0) + (self._carry is not None) + waiting_in_runtime

    def arrival_started(self) -> None:
        """A request for this model is being received (the worker may wait for it)."""
        self.arriving += 1

    def arrival_ended(self) -> None:
        self.arriving -= 1
        if self._wake is not None:
            self._wake.set()

    async def submit(self, request: InferRequest, *, alone: bool = False) -> dict[str, np.ndarray]:
        """Queue ``request`` and wait for its outputs (name -> array, batch first).

        ``alone``: the caller knows no other request is in flight (none could join a batch); if the
        model is idle too, the request goes straight to the runtime thread.

        Raises:
            QueueFull: the queue is full (answer 503).
            ModelRunError: the runtime failed on it (answer 500).
        """
        if self._queue is None or self._wake is None:
            raise RuntimeError("Batcher.start() was not called")
        future: asyncio.Future[dict[str, np.ndarray]] = asyncio.get_running_loop().create_future()
        if (alone and not self._handed and not self._collecting and self._carry is None and self.arriving <= 0
                and self._queue.empty()):
            self._handed.append(1)
            self._last = self._hand([_Pending(request, future)], queued=False)
            return await future
        full = QueueFull(f"model {self.name!r} has {self.queue_size} requests queued; retry later")
        if self.depth() >= self.queue_size:
            raise full
        try:
            self._queue.put_nowait(_Pending(request, future))
        except asyncio.QueueFull:
            raise full from None
        self._on_depth(self.depth())
        self._wake.set()
        return await future

    async def _worker(self) -> None:
        assert self._queue is not None
        while True:
            first = self._carry if self._carry is not None else await self._queue.get()
            self._carry = None
            self._collecting = True
            try:
                batch = await self._collect(first)
            finally:
                self._collecting = False
            running = self._last
            self._handed.append(len(batch))
            self._last = self._hand(batch)
            self._on_depth(self.depth())
            if running is not None and not running.done():
                await running  # at most two batches in the runtime thread: one running, one waiting

    def _hand(self, batch: list[_Pending], *, queued: bool = True) -> asyncio.Future[None]:
        """Give ``batch`` to the runtime thread now; the future is done once every request in it is resolved.

        ``queued``: the requests came through the queue (each is marked done there when resolved)."""
        assert self._loop is not None
        finished: asyncio.Future[None] = self._loop.create_future()
        live = [p for p in batch if not p.future.done()]
        try:
            if live:
                feeds, total = self._merge(live)
                self._jobs.put((feeds, lambda outputs, exc: self._ran(batch, live, total, outputs, exc, finished,
                                                                       queued)))
                return finished
        except Exception as exc:  # the worker must outlive anything one batch does
            log.exception("batch failed", extra={"model": self.name})
            for p in batch:
                _resolve_error(p, _run_error(self.name, exc))
        self._settle(batch, finished, queued)
        return finished

    def _ran(self, batch: list[_Pending], live: list[_Pending], total: int, outputs: list[np.ndarray] | None,
             exc: Exception | None, finished: asyncio.Future[None], queued: bool) -> None:
        """On the event loop, when the runtime thread is done with ``batch``: resolve its requests."""
        if exc is not None and len(live) > 1:
            log.warning("batch failed, retrying its requests one by one",
                        extra={"model": self.name, "batch": total, "error": _one_line(exc)})
            retry = asyncio.ensure_future(self._retry_alone(live))
            retry.add_done_callback(lambda _task: self._settle(batch, finished, queued, total))
            return
        try:
            if exc is not None:
                _resolve_error(live[0], _run_error(self.name, exc))
            else:
                self._split(live, total, outputs or [])
        except Exception as err:  # e.g. fewer outputs than names: the requests fail, the server goes on
            log.exception("batch failed", extra={"model": self.name})
            for p in live:
                _resolve_error(p, _run_error(self.name, err))
        # the bookkeeping waits one loop step: the resolved requests' tasks (encode, write) go first
        asyncio.get_running_loop().call_soon(self._settle, batch, finished, queued, total)

    def _settle(self, batch: list[_Pending], finished: asyncio.Future[None], queued: bool, total: int = 0) -> None:
        """A batch is resolved: count it (metrics, queue, depth) and release the worker waiting on it."""
        assert self._queue is not None
        if total:
            self._on_batch(total)
        self._handed.pop(0)
        for _ in batch if queued else ():
            self._queue.task_done()
        self._on_depth(self.depth())
        if not finished.done():
            finished.set_result(None)

    async def _retry_alone(self, live: list[_Pending]) -> None:
        """Run each request of a failed merged call on its own, so one bad input fails only itself."""
        assert self._loop is not None
        for p in live:
            if p.future.done():
                continue
            self._on_batch(p.request.batch)
            done: asyncio.Future[tuple[Any, Any]] = self._loop.create_future()
            self._jobs.put((p.request.feeds, lambda outputs, exc, done=done: done.set_result((outputs, exc))))
            outputs, exc = await done
            if exc is not None:
                _resolve_error(p, _run_error(self.name, exc))
            else:
                _resolve(p, dict(zip(self._output_names, outputs, strict=True)))

    async def _collect(self, first: _Pending) -> list[_Pending]:
        assert self._queue is not None and self._wake is not None
        batch = [first]
        samples = first.request.batch
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_delay
        while samples < self.max_batch:
            try:
                item = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = deadline - loop.time()
                if self.arriving <= 0 or remaining <= 0:
                    break
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), remaining)
                except TimeoutError:
                    break
                continue
            if item.key != first.key or samples + item.request.batch > self.max_batch:
                self._carry = item
                break
            batch.append(item)
            samples += item.request.batch
        return batch

    def _merge(self, live: list[_Pending]) -> tuple[dict[str, np.ndarray], int]:
        """The inputs of ``live`` concatenated along the batch dimension, and their samples."""
        if len(live) == 1:
            feeds = live[0].request.feeds
        else:
            feeds = {name: np.concatenate([p.request.feeds[name] for p in live]) for name in live[0].request.feeds}
        return feeds, sum(p.request.batch for p in live)

    def _split(self, live: list[_Pending], total: int, outputs: list[np.ndarray]) -> None:
        """Resolve each request with its rows of the merged outputs."""
        if len(live) == 1:
            _resolve(live[0], dict(zip(self._output_names, outputs, strict=True)))
            return
        bad = [n for n, o in zip(self._output_names, outputs, strict=True) if o.ndim == 0 or o.shape[0] != total]
        if bad:
            for p in live:
                _resolve_error(p, ModelRunError(f"model {self.name!r}: output {bad[0]!r} has no batch dimension; "
                                                "serve it with --max-batch 1"))
            return
        start = 0
        for p in live:
            end = start + p.request.batch
            _resolve(p, {n: o[start:end] for n, o in zip(self._output_names, outputs, strict=True)})
            start = end


def _resolve(p: _Pending, value: dict[str, np.ndarray]) -> None:
    if not p.future.done():
        p.future.set_result(value)


def _resolve_error(p: _Pending, exc: Exception) -> None:
    if not p.future.done():
        p.future.set_exception(exc)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return (text[:300] + "...") if len(text) > 300 else (text or type(exc).__name__)
