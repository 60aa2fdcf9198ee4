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

The worker gives a batch to the runtime thread in the same loop step that collected it (a task
then waits for the outputs): one event-loop hand-off less per request, which a lone request
pays in full (benchmarks/serve_ab.py). Requests that arrive in the same step still batch.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
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


_Started = tuple[list[_Pending], "asyncio.Future[Any] | None", int]


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
        self._last: asyncio.Future[None] | None = None  # the batch handed last (stop() waits for it)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"edgeopt-{name}")
        self.arriving = 0

    def start(self) -> None:
        self._queue = asyncio.Queue(maxsize=self.queue_size)
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._worker(), name=f"batcher-{self.name}")

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
        self._executor.shutdown(wait=True)

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

    async def submit(self, request: InferRequest) -> dict[str, np.ndarray]:
        """Queue ``request`` and wait for its outputs (name -> array, batch first).

        Raises:
            QueueFull: the queue is full (answer 503).
            ModelRunError: the runtime failed on it (answer 500).
        """
        if self._queue is None or self._wake is None:
            raise RuntimeError("Batcher.start() was not called")
        future: asyncio.Future[dict[str, np.ndarray]] = asyncio.get_running_loop().create_future()
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
            batch = await self._collect(first)
            running = self._last
            self._handed.append(len(batch))
            self._last = asyncio.ensure_future(self._run_batch(batch, self._start_batch(batch)))
            self._on_depth(self.depth())
            if running is not None and not running.done():
                await running  # at most two batches in the runtime thread: one running, one waiting

    def _start_batch(self, batch: list[_Pending]) -> _Started | Exception:
        """Give ``batch`` to the runtime thread now: (live requests, the call, samples), or what went wrong."""
        live = [p for p in batch if not p.future.done()]
        try:
            return (live, *self._call(live)) if live else (live, None, 0)
        except Exception as exc:  # the worker must outlive anything one batch does
            return exc

    async def _run_batch(self, batch: list[_Pending], started: _Started | Exception) -> None:
        assert self._queue is not None
        try:
            if isinstance(started, Exception):
                raise started
            live, call, total = started
            if call is not None:
                await self._finish(live, call, total)
        except Exception as exc:  # the worker must outlive anything one batch does
            log.exception("batch failed", extra={"model": self.name})
            for p in batch:
                _resolve_error(p, _run_error(self.name, exc))
        finally:
            self._handed.pop(0)
            for _ in batch:
                self._queue.task_done()
            self._on_depth(self.depth())

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

    def _call(self, live: list[_Pending]) -> tuple[asyncio.Future[Any], int]:
        """Start one runtime call on the merged inputs of ``live``; (its future, samples)."""
        if len(live) == 1:
            feeds = live[0].request.feeds
        else:
            feeds = {name: np.concatenate([p.request.feeds[name] for p in live]) for name in live[0].request.feeds}
        total = sum(p.request.batch for p in live)
        self._on_batch(total)
        return asyncio.get_running_loop().run_in_executor(self._executor, self._run, feeds), total

    async def _execute(self, batch: list[_Pending]) -> None:
        live = [p for p in batch if not p.future.done()]
        if live:
            await self._finish(live, *self._call(live))

    async def _finish(self, live: list[_Pending], call: asyncio.Future[Any], total: int) -> None:
        """Wait for a runtime call and resolve its requests (one by one again if a merged call failed)."""
        try:
            outputs = await call
        except Exception as exc:  # a runtime failure must never take the server down
            if len(live) > 1:
                log.warning("batch failed, retrying its requests one by one",
                            extra={"model": self.name, "batch": total, "error": _one_line(exc)})
                for p in live:
                    await self._execute([p])
                return
            _resolve_error(live[0], _run_error(self.name, exc))
            return
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
