"""One stage of a split pipeline, in its own process: receive tensors, run its part, send downstream.

A stage sends from a separate thread, and with a simulated link that thread holds the link busy
for ``bytes * 8 / mbps`` and delivers ``latency_ms`` later, as a real link would (applied on the
sending side, so a stage on another host behaves the same). A stage that cannot load, gets a bad
tensor or fails passes an ``error`` frame downstream instead of dropping the item.
"""

from __future__ import annotations

import contextlib
import heapq
import queue
import socket
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgeopt.errors import BadInput, first_line
from edgeopt.split import protocol
from edgeopt.split.protocol import Frame, ProtocolError

if TYPE_CHECKING:
    pass

UPSTREAM_CLOSED = 3  # a stage's exit code when its input went away (it is not the culprit)


class _LinkSender:
    """Sends frames downstream from its own threads, optionally as a link of ``mbps`` and ``latency_ms``."""

    def __init__(self, sock: socket.socket, link: dict[str, float] | None) -> None:
        self.sock = sock
        self.link = link
        self.error: str | None = None
        self._queue: queue.Queue[Frame | None] = queue.Queue(maxsize=2)
        self._delayed: list[tuple[float, int, list[Any] | None]] = []
        self._cond = threading.Condition()
        self._count = 0
        self._wire = threading.Thread(target=self._wire_loop, daemon=True)
        self._wire.start()
        self._deliver: threading.Thread | None = None
        if link and link.get("latency_ms", 0) > 0:
            self._deliver = threading.Thread(target=self._deliver_loop, daemon=True)
            self._deliver.start()

    def put(self, frame: Frame) -> None:
        if self.error:
            raise ProtocolError(self.error)
        self._queue.put(frame)

    def close(self) -> None:
        self._queue.put(None)
        self._wire.join()
        if self._deliver is not None:
            self._deliver.join()

    def _sendall(self, parts: list[Any]) -> None:
        try:
            for part in parts:
                self.sock.sendall(part)
        except OSError as exc:
            self.error = f"cannot send downstream: {exc}"

    def _wire_loop(self) -> None:
        free = time.perf_counter()
        while True:
            frame = self._queue.get()
            if frame is None:
                self._schedule(time.perf_counter(), None)
                return
            parts = protocol.encode(frame)
            if not self.link or frame.kind != "data":
                self._schedule(time.perf_counter(), parts)
                continue
            wire = sum(len(p) for p in parts) * 8 / (self.link["mbps"] * 1e6)
            free = max(time.perf_counter(), free) + wire
            _sleep_until(free)
            self._schedule(free + self.link.get("latency_ms", 0.0) / 1000.0, parts)

    def _schedule(self, when: float, parts: list[Any] | None) -> None:
        if self._deliver is None:
            if parts is not None and not self.error:
                self._sendall(parts)
            return
        with self._cond:
            self._count += 1
            heapq.heappush(self._delayed, (when, self._count, parts))
            self._cond.notify()

    def _deliver_loop(self) -> None:
        while True:
            with self._cond:
                while not self._delayed:
                    self._cond.wait()
                when, _, parts = heapq.heappop(self._delayed)
            _sleep_until(when)
            if parts is None:
                return
            if not self.error:
                self._sendall(parts)


def _sleep_until(when: float) -> None:
    delay = when - time.perf_counter()
    if delay > 0:
        time.sleep(delay)


def _check_feeds(tensors: dict[str, np.ndarray], specs: list[Any]) -> dict[str, np.ndarray]:
    names = [s.name for s in specs]
    if sorted(tensors) != sorted(names):
        raise BadInput(f"it expects tensor(s) {names} but got {sorted(tensors)}")
    for spec in specs:
        array = tensors[spec.name]
        want = _ORT_TYPES.get(spec.type)
        if want is not None and array.dtype != np.dtype(want):
            raise BadInput(f"tensor {spec.name!r} has dtype {array.dtype}, expected {want}")
        shape = list(spec.shape)
        if len(shape) != array.ndim or any(isinstance(d, int) and d != a for d, a in zip(shape, array.shape,
                                                                                          strict=True)):
            raise BadInput(f"tensor {spec.name!r} has shape {list(array.shape)}, expected {shape}")
    return tensors


_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
              "tensor(int8)": "int8", "tensor(uint8)": "uint8", "tensor(int16)": "int16",
              "tensor(int32)": "int32", "tensor(int64)": "int64", "tensor(bool)": "bool"}


def stage_main(index: int, model_path: str, threads: int, host: str, control: Any,
               link: dict[str, float] | None, slowdown: float) -> None:
    """Entry point of one stage process: load, connect, then receive -> run -> send until ``end``."""
    try:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        session = ort.InferenceSession(model_path, sess_options=options, providers=["CPUExecutionProvider"])
        specs = session.get_inputs()
        out_names = [o.name for o in session.get_outputs()]
        listener = socket.create_server((host, 0))
        listener.settimeout(60)
        control.send(("ready", listener.getsockname()[1]))
        _, down_host, down_port = control.recv()
        down = socket.create_connection((down_host, down_port), timeout=60)
        up, _ = listener.accept()
        listener.close()
        for sock in (up, down):
            sock.settimeout(None)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except Exception as exc:  # report anything that stops the stage from starting
        with contextlib.suppress(OSError):
            control.send(("error", f"stage {index} ({Path(model_path).name}) cannot start: {first_line(exc)}"))
        sys.exit(1)
    sender = _LinkSender(down, link)
    code = 0
    try:
        while True:
            try:
                frame = protocol.recv(up)
            except ProtocolError as exc:
                closed = "connection closed" in str(exc)
                code = UPSTREAM_CLOSED if closed else 1
                what = "its input connection closed before the end of the stream" if closed else str(exc)
                sender.put(Frame("error", message=f"stage {index}: {what}"))
                break
            if frame.kind != "data":
                sender.put(frame)
                code = 0 if frame.kind == "end" else UPSTREAM_CLOSED
                break
            try:
                feeds = _check_feeds(frame.tensors, specs)
            except BadInput as exc:
                raise BadInput(f"rejected item {frame.seq}: {exc}") from None
            start = time.perf_counter()
            try:
                outputs = session.run(out_names, feeds)
            except Exception as exc:  # ORT's own error types
                raise RuntimeError(f"failed on item {frame.seq}: {first_line(exc)}") from None
            if slowdown > 1.0:
                time.sleep((time.perf_counter() - start) * (slowdown - 1.0))
            sender.put(Frame("data", seq=frame.seq, tensors=dict(zip(out_names, outputs, strict=True))))
    except Exception as exc:  # a bad tensor or a runtime failure: tell downstream, then exit
        code = 1
        with contextlib.suppress(Exception):
            sender.put(Frame("error", message=f"stage {index}: {first_line(exc)}"))
    finally:
        sender.close()
        with contextlib.suppress(OSError):
            down.shutdown(socket.SHUT_WR)
    sys.exit(code)
