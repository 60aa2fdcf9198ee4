"""Run split stages on Open Inference Protocol v2 servers instead of local processes.

Each stage file is served by any OIP v2 (KServe v2 / Triton HTTP) server, typically
``edgeopt serve OUTDIR/stage_k.onnx --host 0.0.0.0`` on the device it was planned for; the
driver (this process) sends an item to stage 0, its output to stage 1, and so on. Tensors cross
as raw bytes with the binary tensor data extension, never as JSON numbers. Several items are in
flight at once (a thread pool, each thread carrying one item through every stage), so stages on
different devices work concurrently.

Before any data is sent every server is checked: live, ready, and serving a model whose inputs
and outputs have the stage's names, datatypes and shapes. Any failure is a one-line
:class:`~edgeopt.errors.BadInput` (before the run) or :class:`PipelineError` (during it) that
names the stage.
"""

from __future__ import annotations

import json
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from edgeopt.data import Dataset
from edgeopt.deps import require
from edgeopt.errors import BadInput, PipelineError, first_line
from edgeopt.model import TensorSpec
from edgeopt.serve.app import parse_model_arg
from edgeopt.serve.protocol import DATATYPES, HEADER_LENGTH, datatype_of, tensor_metadata
from edgeopt.split.plan_file import load_plan
from edgeopt.split.results import PipelineResult, feeds_for_items, latency_summary, max_abs_diff_vs_whole

_LATENCY = "edgeopt_request_latency_seconds"  # serve/metrics.py's request latency histogram
_MODEL_PATH = re.compile(r"^/v2/models/([A-Za-z0-9][A-Za-z0-9_.-]*)(?:/versions/([A-Za-z0-9_.-]+))?/?$")


@dataclass(frozen=True)
class StageTarget:
    """Where one stage runs: the server's base URL and the model name (and version) on it."""

    index: int
    url: str
    model: str
    version: str | None = None

    @property
    def model_url(self) -> str:
        return f"{self.url}/v2/models/{self.model}" + (f"/versions/{self.version}" if self.version else "")

    def __str__(self) -> str:
        return f"stage {self.index} ({self.model_url})"


def parse_stage_urls(urls: str, plan: dict[str, Any]) -> list[StageTarget]:
    """``http://host:port`` or ``http://host:port/v2/models/NAME[/versions/V]``, one per stage.

    Without a path the model name is the stage file's stem (``stage_0``), as ``edgeopt serve
    OUTDIR/stage_0.onnx`` names it.

    Raises:
        BadInput: a count that differs from the plan's stages, a non-http URL, a bad path.
    """
    parts = [u.strip() for u in urls.split(",") if u.strip()]
    stages = plan["stages"]
    if len(parts) != len(stages):
        raise BadInput(f"--stage-urls gave {len(parts)} URL(s) but the plan has {len(stages)} stage(s); "
                       "give one per stage, in pipeline order")
    targets = []
    for k, (raw, stage) in enumerate(zip(parts, stages, strict=True)):
        try:
            split = urlsplit(raw)
            split.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError as exc:
            raise BadInput(f"--stage-urls: stage {k} URL {raw!r} is malformed ({exc})") from None
        if split.scheme not in ("http", "https") or not split.hostname:
            raise BadInput(f"--stage-urls: stage {k} URL {raw!r} must be http://HOST:PORT "
                           "or http://HOST:PORT/v2/models/NAME")
        if split.query or split.fragment:
            raise BadInput(f"--stage-urls: stage {k} URL {raw!r} must not carry a query or fragment")
        base = f"{split.scheme}://{split.netloc}"
        if split.path in ("", "/"):
            targets.append(StageTarget(k, base, parse_model_arg(stage["path"])[0]))
            continue
        match = _MODEL_PATH.match(split.path)
        if not match:
            raise BadInput(f"--stage-urls: stage {k} URL path {split.path!r} must be empty or /v2/models/NAME")
        targets.append(StageTarget(k, base, match.group(1), match.group(2)))
    return targets


class _Client:
    """One httpx client per run; every call turns transport and HTTP failures into one line."""

    def __init__(self, timeout_s: float, in_flight: int) -> None:
        httpx = require("httpx", extra="serve")
        self.httpx = httpx
        self.http = httpx.Client(timeout=timeout_s, limits=httpx.Limits(max_connections=4 * in_flight + 8,
                                                                        max_keepalive_connections=4 * in_flight + 8))

    def close(self) -> None:
        self.http.close()

    def get(self, target: StageTarget, url: str) -> Any:
        try:
            return self.http.get(url)
        except self.httpx.HTTPError as exc:
            raise BadInput(f"{target}: cannot reach {url}: {_transport_error(exc)}") from None

    def post(self, url: str, body: bytes, headers: dict[str, str]) -> Any:
        return self.http.post(url, content=body, headers=headers)


def _transport_error(exc: Exception) -> str:
    text = first_line(exc)
    return text if type(exc).__name__ in text else f"{type(exc).__name__}: {text}"


def _server_error(response: Any) -> str:
    try:
        doc = response.json()
        message = doc.get("error") if isinstance(doc, dict) else None
    except ValueError:
        message = None
    return " ".join(str(message or response.text[:200] or response.reason_phrase).split())


def check_stage(client: _Client, target: StageTarget, inputs: list[TensorSpec], outputs: list[TensorSpec]) -> dict[str, Any]:
    """Live, ready and serving the stage's tensors; returns the server's model metadata.

    Raises:
        BadInput: unreachable, not ready, unknown model, or a name / datatype / shape mismatch.
    """
    for path in ("/v2/health/live", "/v2/health/ready"):
        response = client.get(target, target.url + path)
        if response.status_code != 200:
            raise BadInput(f"{target}: {target.url}{path} answered HTTP {response.status_code}; "
                           "is it an OIP v2 server, and has it finished loading?")
    response = client.get(target, target.model_url)
    if response.status_code != 200:
        raise BadInput(f"{target}: the server does not serve model {target.model!r} "
                       f"(HTTP {response.status_code}: {_server_error(response)})")
    try:
        meta = response.json()
        served = {"input": meta["inputs"], "output": meta["outputs"]}
    except (ValueError, KeyError, TypeError):
        raise BadInput(f"{target}: the model metadata is not OIP v2 JSON with inputs and outputs") from None
    for kind, specs in (("input", inputs), ("output", outputs)):
        problem = _mismatch(kind, [tensor_metadata(s) for s in specs], served[kind])
        if problem:
            raise BadInput(f"{target} does not serve this stage: {problem}; check the order of --stage-urls "
                           "and which file each server serves")
    ready = client.get(target, target.model_url + "/ready")
    if ready.status_code != 200:
        raise BadInput(f"{target}: model {target.model!r} is not ready (HTTP {ready.status_code})")
    return meta


def _mismatch(kind: str, want: list[dict[str, Any]], got: Any) -> str | None:
    """What differs between the stage file's tensors and the served model's, or None."""
    try:
        served = {t["name"]: t for t in got}
    except (TypeError, KeyError):
        return f"its {kind} metadata is malformed"
    names, served_names = [t["name"] for t in want], list(served)
    if sorted(names) != sorted(served_names):
        return f"{kind}s are {served_names}, the stage's are {names}"
    for t in want:
        other = served[t["name"]]
        if other.get("datatype") != t["datatype"]:
            return f"{kind} {t['name']!r} is {other.get('datatype')}, the stage's is {t['datatype']}"
        shape = other.get("shape")
        if not isinstance(shape, list) or not all(isinstance(d, int) for d in shape):
            return f"its {kind} {t['name']!r} has no integer shape ({shape!r})"
        if (len(shape) != len(t["shape"])
                or any(a >= 0 and b >= 0 and a != b for a, b in zip(shape, t["shape"], strict=True))):
            return f"{kind} {t['name']!r} has shape {shape}, the stage's is {t['shape']}"
    return None


def encode_infer(feeds: dict[str, np.ndarray], outputs: list[str]) -> tuple[bytes, dict[str, str]]:
    """An ``/infer`` body with every input and output as binary tensor data."""
    meta, chunks = [], []
    for name, array in feeds.items():
        raw = np.ascontiguousarray(array).tobytes()
        meta.append({"name": name, "shape": list(array.shape), "datatype": datatype_of(array.dtype.name),
                     "parameters": {"binary_data_size": len(raw)}})
        chunks.append(raw)
    header = json.dumps({"inputs": meta, "outputs": [{"name": n, "parameters": {"binary_data": True}}
                                                     for n in outputs]}, separators=(",", ":")).encode()
    return header + b"".join(chunks), {"Inference-Header-Content-Length": str(len(header)),
                                       "Content-Type": "application/octet-stream"}


def decode_infer(body: bytes, header_length: str | None) -> dict[str, np.ndarray]:
    """The outputs of an ``/infer`` response, binary or JSON.

    Raises:
        ValueError: a body that is not a well-formed OIP v2 response.
    """
    n = int(header_length) if header_length is not None else len(body)
    doc = json.loads(body[:n])
    binary, offset = body[n:], 0
    result: dict[str, np.ndarray] = {}
    for out in doc["outputs"]:
        dtype = np.dtype(DATATYPES[out["datatype"]])
        shape = [int(d) for d in out["shape"]]
        size = (out.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            if size != int(np.prod(shape)) * dtype.itemsize or offset + size > len(binary):
                raise ValueError(f"output {out['name']!r}: binary_data_size {size} does not fit shape {shape}")
            result[out["name"]] = np.frombuffer(binary, dtype=dtype, count=int(np.prod(shape)),
                                                offset=offset).reshape(shape)
            offset += size
        else:
            result[out["name"]] = np.asarray(out["data"], dtype=dtype).reshape(shape)
    return result


class _RemoteStages:
    """The checked stage servers; ``run`` carries one item through every stage."""

    def __init__(self, targets: list[StageTarget], client: _Client, outputs: list[list[str]]) -> None:
        self.targets = targets
        self.client = client
        self.outputs = outputs
        self.stage_ms: list[list[float]] = [[] for _ in targets]
        self._lock = threading.Lock()

    def run(self, feeds: dict[str, np.ndarray], *, record: bool) -> dict[str, np.ndarray]:
        tensors = feeds
        times = []
        for target, names in zip(self.targets, self.outputs, strict=True):
            body, headers = encode_infer(tensors, names)
            start = time.perf_counter()
            try:
                response = self.client.post(target.model_url + "/infer", body, headers)
            except self.client.httpx.HTTPError as exc:
                raise PipelineError(f"{target} failed: {_transport_error(exc)}") from None
            times.append((time.perf_counter() - start) * 1000.0)
            if response.status_code != 200:
                raise PipelineError(f"{target} failed: HTTP {response.status_code}: {_server_error(response)}")
            try:
                tensors = decode_infer(response.content, response.headers.get(HEADER_LENGTH))
            except (ValueError, KeyError, TypeError) as exc:
                raise PipelineError(f"{target} sent a malformed response: {first_line(exc)}") from None
            if sorted(tensors) != sorted(names):
                raise PipelineError(f"{target} returned {sorted(tensors)} instead of {names}")
        if record:
            with self._lock:
                for k, ms in enumerate(times):
                    self.stage_ms[k].append(ms)
        return tensors


def _server_seconds(client: _Client, target: StageTarget) -> tuple[float, float] | None:
    """(sum, count) of edgeopt serve's request latency histogram for the model, or None elsewhere."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        response = client.http.get(target.url + "/metrics")
    except client.httpx.HTTPError:
        return None
    if response.status_code != 200:
        return None
    values = {}
    try:
        for family in text_string_to_metric_families(response.text):
            for sample in family.samples:
                if sample.name in (f"{_LATENCY}_sum", f"{_LATENCY}_count") and sample.labels == {"model": target.model}:
                    values[sample.name] = sample.value
    except ValueError:  # not Prometheus text: another kind of server
        return None
    return (values[f"{_LATENCY}_sum"], values[f"{_LATENCY}_count"]) if len(values) == 2 else None


def run_remote(outdir: str | Path, stage_urls: str, *, data: Dataset | None = None, items: int = 32,
               warmup: int = 2, in_flight: int | None = None, reference: str | Path | None = None,
               timeout_s: float = 60.0) -> PipelineResult:
    """Run a split's stages on OIP v2 servers, one URL per stage, and measure them.

    Items go through twice, as in :func:`~edgeopt.split.pipeline.run_pipeline`: one at a time
    (latency per item), then ``in_flight`` at a time (throughput, stages overlapping). Every
    output is compared with the whole model.

    Args:
        outdir: a directory written by ``edgeopt split``.
        stage_urls: comma-separated ``http://host:port[/v2/models/NAME]``, one per stage in order.
        data: inputs for the whole model (default: random inputs of its input shape).
        items: items per pass (the data is cycled when shorter).
        warmup: items run first and not timed.
        in_flight: items in flight in the streamed pass (default: stages + 1).
        reference: the whole model for the max-abs-diff check.
        timeout_s: longest wait for one server answer.

    Returns:
        Latency, throughput and max abs diff, plus per-stage round-trip and server times in
        ``remote``; predictions are the plan's (its devices and link).

    Raises:
        BadInput: bad URLs, a server that is unreachable, not ready or serves another model.
        PipelineError: a server failed during the run.

    Example:
        >>> r = run_remote("out/", "http://board:8000,http://gateway:8000")  # doctest: +SKIP
        >>> r.latency_ms["p50"], r.throughput_ips
    """
    from edgeopt.model import load_model

    if items < 1:
        raise BadInput(f"--items must be >= 1, got {items}")
    if timeout_s <= 0:
        raise BadInput(f"--timeout must be > 0, got {timeout_s:g}")
    folder = Path(outdir)
    plan = load_plan(folder)
    targets = parse_stage_urls(stage_urls, plan)
    n_flight = in_flight if in_flight is not None else len(targets) + 1
    if n_flight < 1:
        raise BadInput(f"--in-flight must be >= 1, got {n_flight}")
    models = [load_model(folder / stage["path"]) for stage in plan["stages"]]
    inputs = feeds_for_items(models[0], data, items)

    client = _Client(timeout_s, n_flight)
    try:
        metas = [check_stage(client, t, m.inputs, m.outputs) for t, m in zip(targets, models, strict=True)]
        stages = _RemoteStages(targets, client, [[o.name for o in m.outputs] for m in models])
        for i in range(warmup):
            stages.run(inputs[i % items], record=False)
        before = [_server_seconds(client, t) for t in targets]
        latencies, outputs = [], {}
        for i, feeds in enumerate(inputs):
            start = time.perf_counter()
            outputs[i] = stages.run(feeds, record=True)
            latencies.append((time.perf_counter() - start) * 1000.0)
        after = [_server_seconds(client, t) for t in targets]
        start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=n_flight, thread_name_prefix="edgeopt-oip") as pool:
            futures = [pool.submit(stages.run, feeds, record=False) for feeds in inputs]
            try:
                streamed = {i: f.result() for i, f in enumerate(futures)}
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
        throughput = len(inputs) / (time.perf_counter() - start)
    finally:
        client.close()

    remote = []
    for k, (target, meta) in enumerate(zip(targets, metas, strict=True)):
        server_ms = None
        if before[k] is not None and after[k] is not None and after[k][1] > before[k][1]:
            server_ms = 1000.0 * (after[k][0] - before[k][0]) / (after[k][1] - before[k][1])
        params = meta.get("parameters") if isinstance(meta.get("parameters"), dict) else {}
        remote.append({"url": target.model_url, "round_trip_ms": latency_summary(stages.stage_ms[k]),
                       "server_mean_ms": server_ms, "runtime": params.get("runtime"),
                       "threads": params.get("threads")})
    threads = {r["threads"] for r in remote}
    same_threads = threads.pop() if len(threads) == 1 else None
    return PipelineResult(
        stages=len(targets), devices=list(plan.get("devices", [])), items=items,
        latency_ms=latency_summary(latencies), throughput_ips=throughput,
        max_abs_diff=max_abs_diff_vs_whole(plan, folder, reference, inputs, [outputs, streamed]),
        predicted_latency_ms=float(plan["predicted_latency_ms"]),
        predicted_throughput_ips=float(plan["predicted_throughput_ips"]),
        simulate_link=False, simulate_devices=False, link={k: float(v) for k, v in plan["link"].items()},
        threads=same_threads if isinstance(same_threads, int) else 0,
        latencies_ms=latencies, in_flight=n_flight, remote=remote)
