"""Run split stages as a pipeline (the driver): one process per stage, TCP sockets between them.

The driver (this process) feeds stage 0 and collects from the last stage; stage k sends to
stage k+1 over its own TCP connection, so stage 0 computes item n+1 while stage 1 computes item
n. Each stage sends from a separate thread, and with ``simulate_link`` that thread holds the
link busy for ``bytes * 8 / mbps`` and delivers ``latency_ms`` later, as a real link would
(applied on the sending side, so a stage on another host behaves the same).

Failures are never dropped: a stage that cannot load, gets a bad tensor, or crashes passes an
``error`` frame downstream (or dies), and the driver raises :class:`PipelineError` naming the
stage. Every stage process is terminated when the run ends, whatever happened.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgeopt.data import Dataset
from edgeopt.errors import BadInput, PipelineError
from edgeopt.split import protocol
from edgeopt.split.protocol import Frame, ProtocolError

if TYPE_CHECKING:
    pass
from edgeopt.split.plan_file import load_plan
from edgeopt.split.results import (
    PipelineResult,
    feeds_for_items,
    latency_summary,
    max_abs_diff_vs_whole,
    predicted_latency,
    predicted_throughput,
)
from edgeopt.split.stage import UPSTREAM_CLOSED, stage_main

__all__ = ["run_pipeline"]


class _Stages:
    """Stage processes plus the driver's sockets; ``close`` leaves no process behind."""

    def __init__(self, plan: dict[str, Any], outdir: Path, *, threads: int, host: str,
                 simulate_link: bool, simulate_devices: bool, timeout_s: float) -> None:
        import multiprocessing as mp

        self.plan = plan
        self.timeout_s = timeout_s
        self.procs: list[Any] = []
        self.source: socket.socket | None = None
        self.sink: socket.socket | None = None
        ctx = mp.get_context("spawn")
        link = dict(plan["link"]) if simulate_link else None
        collector = socket.create_server((host, 0))
        collector.settimeout(timeout_s)
        controls = []
        try:
            for k, stage in enumerate(plan["stages"]):
                speed = float(stage.get("relative_speed", 1.0))
                slowdown = 1.0 / speed if simulate_devices and speed < 1.0 else 1.0
                parent_end, child_end = ctx.Pipe()
                proc = ctx.Process(target=stage_main, daemon=True, name=f"edgeopt-stage-{k}",
                                   args=(k, str(outdir / stage["path"]), threads, host, child_end,
                                         link if k < len(plan["stages"]) - 1 else None, slowdown))
                proc.start()
                child_end.close()
                self.procs.append(proc)
                controls.append(parent_end)
            ports = [self._handshake(k, c) for k, c in enumerate(controls)]
            for k, c in enumerate(controls):
                c.send(("downstream", host, ports[k + 1] if k + 1 < len(ports) else collector.getsockname()[1]))
            self.source = socket.create_connection((host, ports[0]), timeout=timeout_s)
            self.sink, _ = collector.accept()
            for sock in (self.source, self.sink):
                sock.settimeout(None)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except BaseException:
            self.close()
            raise
        finally:
            collector.close()
            for c in controls:
                c.close()

    def _handshake(self, k: int, control: Any) -> int:
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            if control.poll(0.1):
                try:
                    kind, value = control.recv()
                except EOFError:
                    break
                if kind == "ready":
                    return int(value)
                raise PipelineError(str(value))
            if not self.procs[k].is_alive():
                break
        raise PipelineError(self.diagnose(f"stage {k} did not start within {self.timeout_s:g} s"))

    def send(self, frame: Frame) -> None:
        assert self.source is not None
        try:
            protocol.send(self.source, frame)
        except OSError as exc:
            raise PipelineError(self.diagnose(f"cannot send to stage 0: {exc}")) from exc

    def receive(self) -> Frame:
        """The next frame from the last stage; PipelineError when a stage failed or went silent."""
        assert self.sink is not None
        deadline = time.monotonic() + self.timeout_s
        while True:
            ready, _, _ = select.select([self.sink], [], [], 0.2)
            if ready:
                try:
                    frame = protocol.recv(self.sink)
                except (ProtocolError, OSError) as exc:
                    raise PipelineError(self.diagnose(f"the last stage stopped sending ({exc})")) from exc
                if frame.kind == "error":
                    raise PipelineError(self.diagnose(frame.message))
                return frame
            dead = [k for k, p in enumerate(self.procs) if p.exitcode is not None]
            if dead:
                time.sleep(0.3)  # a dying stage's error frame may still be on its way
                if select.select([self.sink], [], [], 0)[0]:
                    continue
                raise PipelineError(self.diagnose("a stage exited before the end of the stream"))
            if time.monotonic() > deadline:
                raise PipelineError(f"no result from the pipeline within {self.timeout_s:g} s; "
                                    "a stage is stuck (raise --timeout for slow models)")

    def diagnose(self, message: str) -> str:
        """The most useful account of a failure: a stage killed or crashed beats its neighbours' view."""
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline and any(p.exitcode is None for p in self.procs):
            time.sleep(0.05)
        devices = self.plan.get("devices", [])
        for k, proc in enumerate(self.procs):
            code = proc.exitcode
            where = f"stage {k}" + (f" ({devices[k]})" if k < len(devices) else "") + f", pid {proc.pid}"
            if code is not None and code < 0:
                return f"{where} was killed by signal {-code}; the pipeline stopped ({message})"
            if code not in (None, 0, UPSTREAM_CLOSED) and not message.startswith(f"stage {k}"):
                return f"{where} failed with exit code {code}: {message}"
        return message

    def close(self) -> None:
        for sock in (self.source, self.sink):
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.close()
        for proc in self.procs:
            proc.join(timeout=2.0)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=2.0)
            if proc.is_alive():
                proc.kill()
                proc.join()


def run_pipeline(outdir: str | Path, *, data: Dataset | None = None, items: int = 32, warmup: int = 2,
                 simulate_link: bool = False, simulate_devices: bool = False, threads: int | None = None,
                 reference: str | Path | None = None, host: str = "127.0.0.1",
                 timeout_s: float = 60.0) -> PipelineResult:
    """Run the stages of a split as processes connected by TCP and measure them.

    Items go through twice: one at a time (end-to-end latency per item), then streamed
    back to back (throughput, stages overlapping). Every output is compared with the whole
    model (``reference``, default the model the plan was made from).

    Args:
        outdir: a directory written by ``edgeopt split``.
        data: inputs for the whole model (default: random inputs of its input shape).
        items: items per pass (the data is cycled when shorter).
        warmup: items run first and not timed.
        simulate_link: apply the plan's link bandwidth and latency between stages.
        simulate_devices: slow each stage down to its device's ``relative_speed`` (< 1 only).
        threads: intra-op threads per stage (default: the plan's).
        reference: the whole model for the max-abs-diff check.
        host: address the stages listen on.
        timeout_s: how long to wait for a stage before declaring it stuck.

    Returns:
        Latency percentiles, throughput, max abs diff and the plan's predictions.

    Raises:
        BadInput: a bad directory or inputs. PipelineError: a stage failed.

    Example:
        >>> r = run_pipeline("out/", simulate_link=True)  # doctest: +SKIP
        >>> r.latency_ms["mean"], r.predicted_latency_ms
    """
    from edgeopt.model import load_model

    if items < 1:
        raise BadInput(f"--items must be >= 1, got {items}")
    folder = Path(outdir)
    plan = load_plan(folder)
    n_threads = int(threads or plan.get("threads") or 1)
    if n_threads < 1:
        raise BadInput(f"--threads must be >= 1, got {n_threads}")
    inputs = feeds_for_items(load_model(folder / plan["stages"][0]["path"]), data, items)

    stages = _Stages(plan, folder, threads=n_threads, host=host, simulate_link=simulate_link,
                     simulate_devices=simulate_devices, timeout_s=timeout_s)
    outputs: dict[int, dict[str, np.ndarray]] = {}
    try:
        for i in range(warmup):
            stages.send(Frame("data", seq=i, tensors=inputs[i % items]))
            stages.receive()
        latencies = []
        for i, feeds in enumerate(inputs):
            start = time.perf_counter()
            stages.send(Frame("data", seq=warmup + i, tensors=feeds))
            frame = stages.receive()
            latencies.append((time.perf_counter() - start) * 1000.0)
            if frame.seq != warmup + i:
                raise PipelineError(f"the pipeline returned item {frame.seq} when item {warmup + i} was expected")
            outputs[i] = frame.tensors
        throughput, streamed = _stream(stages, inputs, first_seq=warmup + items)
        stages.send(Frame("end"))
        end = _receive_end(stages)
        if end.kind != "end":
            raise PipelineError(stages.diagnose("the pipeline did not finish cleanly"))
    finally:
        stages.close()
    for k, proc in enumerate(stages.procs):
        if proc.exitcode not in (0, None):
            raise PipelineError(stages.diagnose(f"stage {k} exited with code {proc.exitcode} after the run"))

    diff = max_abs_diff_vs_whole(plan, folder, reference, inputs, [outputs, streamed])
    return PipelineResult(
        stages=len(plan["stages"]), devices=list(plan.get("devices", [])), items=items,
        latency_ms=latency_summary(latencies),
        throughput_ips=throughput, max_abs_diff=diff,
        predicted_latency_ms=predicted_latency(plan, simulate_link, simulate_devices),
        predicted_throughput_ips=predicted_throughput(plan, simulate_link, simulate_devices),
        simulate_link=simulate_link, simulate_devices=simulate_devices,
        link={k: float(v) for k, v in plan["link"].items()}, threads=n_threads, latencies_ms=latencies)


def _stream(stages: _Stages, inputs: list[dict[str, np.ndarray]], *, first_seq: int
            ) -> tuple[float, dict[int, dict[str, np.ndarray]]]:
    """Send every item back to back from a thread while collecting results: items per second."""
    failure: list[BaseException] = []

    def feed() -> None:
        try:
            for i, feeds in enumerate(inputs):
                stages.send(Frame("data", seq=first_seq + i, tensors=feeds))
        except BaseException as exc:  # surfaced by the collector below
            failure.append(exc)

    start = time.perf_counter()
    thread = threading.Thread(target=feed, daemon=True)
    thread.start()
    streamed: dict[int, dict[str, np.ndarray]] = {}
    try:
        for _ in inputs:
            frame = stages.receive()
            streamed[frame.seq - first_seq] = frame.tensors
    except PipelineError:
        if failure and isinstance(failure[0], PipelineError):
            raise failure[0] from None
        raise
    elapsed = time.perf_counter() - start
    thread.join()
    if failure:
        raise failure[0]
    if sorted(streamed) != list(range(len(inputs))):
        raise PipelineError(f"the pipeline returned items {sorted(streamed)[:5]}... instead of 0..{len(inputs) - 1}")
    return len(inputs) / elapsed, streamed


def _receive_end(stages: _Stages) -> Frame:
    assert stages.sink is not None
    try:
        return protocol.recv(stages.sink)
    except (ProtocolError, OSError) as exc:
        raise PipelineError(stages.diagnose(f"the pipeline did not finish cleanly ({exc})")) from exc
