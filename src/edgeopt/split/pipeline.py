"""Run split stages as a pipeline: one process per stage, TCP sockets between them.

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
import heapq
import math
import queue
import select
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgeopt.data import Dataset
from edgeopt.errors import BadInput, EdgeoptError, ModelError, first_line
from edgeopt.split import protocol
from edgeopt.split.protocol import Frame, ProtocolError

if TYPE_CHECKING:
    from edgeopt.model import Model

UPSTREAM_CLOSED = 3  # a stage's exit code when its input went away (it is not the culprit)


class PipelineError(EdgeoptError):
    """A stage failed (could not load, got a bad tensor, died) or stopped answering."""


@dataclass
class PipelineResult:
    """Measured end-to-end latency per item (one in flight), throughput (streamed), fidelity."""

    stages: int
    devices: list[str]
    items: int
    latency_ms: dict[str, float]
    throughput_ips: float
    max_abs_diff: float | None
    predicted_latency_ms: float
    predicted_throughput_ips: float
    simulate_link: bool
    simulate_devices: bool
    link: dict[str, float]
    threads: int
    latencies_ms: list[float] = field(default_factory=list, repr=False)
    in_flight: int | None = None
    remote: list[dict[str, Any]] | None = None

    @property
    def latency_error(self) -> float:
        """(predicted - measured) / measured for the median item (the profile's statistic too)."""
        return (self.predicted_latency_ms - self.latency_ms["p50"]) / self.latency_ms["p50"]

    def to_dict(self) -> dict[str, Any]:
        return {"stages": self.stages, "devices": self.devices, "items": self.items,
                "latency_ms": self.latency_ms, "throughput_ips": self.throughput_ips,
                "max_abs_diff": self.max_abs_diff, "predicted_latency_ms": self.predicted_latency_ms,
                "predicted_throughput_ips": self.predicted_throughput_ips,
                "latency_prediction_error": self.latency_error, "simulate_link": self.simulate_link,
                "simulate_devices": self.simulate_devices, "link": self.link, "threads": self.threads,
                **({"in_flight": self.in_flight, "remote": self.remote} if self.remote is not None else {})}


# -- stage process ------------------------------------------------------------------------------
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


# -- driver -------------------------------------------------------------------------------------
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


def load_plan(outdir: str | Path) -> dict[str, Any]:
    """Read OUTDIR/plan.json and check every stage file is there.

    Raises:
        BadInput: not a split directory, or a malformed plan.
    """
    from edgeopt.devices import MAX_THREADS
    from edgeopt.fileio import read_json

    folder = Path(outdir)
    path = folder / "plan.json"
    if not path.is_file():
        raise BadInput(f"{folder} has no plan.json: make one with edgeopt split MODEL --devices A,B -o {folder}")
    plan = read_json(path, "split plan")
    try:
        stages = plan["stages"]
        if not isinstance(stages, list) or not stages:
            raise ValueError("no stages")
        for stage in stages:
            _check_stage_path(stage["path"])
            if not (folder / stage["path"]).is_file():
                raise BadInput(f"{folder / stage['path']} is missing; re-run edgeopt split")
        if not math.isfinite(float(plan["link"]["mbps"])):
            raise ValueError("link mbps is not finite")
        threads = plan.get("threads")
        if threads is not None and not (isinstance(threads, int) and 1 <= threads <= MAX_THREADS):
            raise ValueError(f"threads must be an integer in [1, {MAX_THREADS}], got {threads!r}")
        source = (plan.get("model") or {}).get("path")
        if source is not None and not (isinstance(source, str) and source.lower().endswith(".onnx")
                                       and ".py:" not in source):
            raise ValueError(f"model.path must name the .onnx model that was split, got {str(source)[:80]!r}")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise BadInput(f"{path} is not a valid split plan ({first_line(exc)})") from exc
    return plan


def _check_stage_path(name: object) -> None:
    """A stage is an .onnx file inside the split directory, named plainly (no folders, no factory)."""
    if not isinstance(name, str) or Path(name).name != name or name in ("", ".", "..") \
            or not name.lower().endswith(".onnx") or ":" in name:
        raise ValueError(f"stage path {str(name)[:80]!r} must be an .onnx file name inside the split directory")


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
        predicted_latency_ms=_predicted_latency(plan, simulate_link, simulate_devices),
        predicted_throughput_ips=_predicted_throughput(plan, simulate_link, simulate_devices),
        simulate_link=simulate_link, simulate_devices=simulate_devices,
        link={k: float(v) for k, v in plan["link"].items()}, threads=n_threads, latencies_ms=latencies)


def feeds_for_items(first: Model, data: Dataset | None, items: int) -> list[dict[str, np.ndarray]]:
    """``items`` batch-1 feeds for the first stage: rows of ``data`` (cycled), else random inputs."""
    from edgeopt.measure.bench import example_feeds

    if data is None:
        return [example_feeds(first, batch=1, seed=i) for i in range(items)]
    fitted = data.feeds_for(first)
    if len(fitted) == 0:
        raise BadInput(f"{data.source} is empty")
    return [{k: np.ascontiguousarray(v[i % len(fitted): i % len(fitted) + 1]) for k, v in fitted.inputs.items()}
            for i in range(items)]


def latency_summary(latencies_ms: list[float]) -> dict[str, float]:
    """p50, p90, mean and min of per-item times in ms."""
    ms = np.array(latencies_ms)
    return {"p50": float(np.percentile(ms, 50)), "p90": float(np.percentile(ms, 90)),
            "mean": float(ms.mean()), "min": float(ms.min())}


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


def max_abs_diff_vs_whole(plan: dict[str, Any], folder: Path, reference: str | Path | None,
                          inputs: list[dict[str, np.ndarray]],
                          runs: list[dict[int, dict[str, np.ndarray]]]) -> float | None:
    """Largest |pipeline - whole model| over every item of every run; inf on a missing or misshapen output."""
    from edgeopt.measure.sessions import open_session, resolve_settings
    from edgeopt.model import load_model

    source = reference if reference is not None else plan.get("model", {}).get("path")
    if source is None or not Path(source).is_file():
        return None
    whole = load_model(source)
    if whole.format != "onnx":
        raise ModelError(f"reference {source} must be the ONNX model that was split")
    session = open_session(whole, resolve_settings(whole, runtime="onnxruntime", threads=1))
    worst = 0.0
    for i, feeds in enumerate(inputs):
        expected = dict(zip(session.output_names, session.run(feeds), strict=True))
        for run in runs:
            for name, value in run[i].items():
                if name not in expected or expected[name].shape != value.shape:
                    return float("inf")
                worst = max(worst, float(np.max(np.abs(expected[name].astype(np.float64) - value))))
    return worst


def _run_ms(stage: dict[str, Any], simulate_devices: bool) -> float:
    """What a stage's compute should take in this run: host time, slowed to the device when simulated."""
    speed = float(stage.get("relative_speed", 1.0))
    return float(stage["host_ms"]) * (1.0 / speed if simulate_devices and speed < 1.0 else 1.0)


def _predicted_latency(plan: dict[str, Any], simulate_link: bool, simulate_devices: bool) -> float:
    total = 0.0
    for stage in plan["stages"]:
        total += _run_ms(stage, simulate_devices)
        if simulate_link:
            total += stage["transfer_ms"]
    return total


def _predicted_throughput(plan: dict[str, Any], simulate_link: bool, simulate_devices: bool) -> float:
    worst = 0.0
    for stage in plan["stages"]:
        worst = max(worst, _run_ms(stage, simulate_devices))
        if simulate_link:
            worst = max(worst, stage["wire_ms"])
    return 1000.0 / worst if worst > 0 else float("inf")
