"""Where one request's time goes in `edgeopt serve`: perf_counter_ns at each step of its path, A/B.

A lone client (concurrency 1, keep-alive) sends requests one after another; the server runs with
trace points wrapped around its own functions from outside (nothing in src/ changes): HTTP head
begun and body complete (uvicorn protocol), decode start and end, model run start and end (the
runtime thread), outputs resolved, response encoded, response written. The client stamps send
and receive with the same monotonic clock (CLOCK_MONOTONIC is system-wide), so each request gives
its phases end to end, and **latency minus its own model run**: the server's overhead, paired per
request, so the run time's variance under machine load drops out. Two source trees (--a, --b)
are traced in alternating blocks (ABBA) and compared by the median of each phase. When the
runtime thread writes a lone request's answer itself (connections.ThreadAnswer), encode and
"written" are marked on that thread, and "resolved" comes after "written" (the loop's bookkeeping).

``--detail`` adds marks inside the steps (each costs a few us, so compare arms with the same flags):
uvicorn's on_headers_complete, the socket write of the answer, the runtime thread's
call_soon_threadsafe and the moment the event loop runs that callback, and per-request sums of
the time in the connection's deadline timers and in uvicorn's on_response_complete.

``--runtime-alone`` also times the model in this (driver) process after every block, with the
session options the server uses: back to back, and with a 1 ms sleep between runs (the server's
lone runs are about that far apart), so the in-server run can be compared with the runtime alone
in the same run.

Run:
  .venv/bin/python benchmarks/serve_trace.py --a /path/to/old/src --b src --onnx resnet18_64.onnx
Writes benchmarks/results/serve_trace.json (or --out).
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
# (from, to) event pairs reported, in path order
PHASES = [("client_send", "head_begun"), ("head_begun", "body_complete"), ("body_complete", "decode_start"),
          ("decode_start", "decode_end"), ("decode_end", "run_start"), ("run_start", "run_end"),
          ("run_end", "resolved"), ("resolved", "encode_start"), ("encode_start", "encode_end"),
          ("encode_end", "written"), ("written", "client_received"),
          ("run_end", "encode_start")]  # the whole hand-back, also when the runtime thread answers (below)
# with --detail: steps inside those (names as marked in traced_server)
DETAIL = [("head_begun", "headers_start"), ("headers_start", "headers_end"), ("headers_end", "body_complete"),
          ("run_end", "wake_start"), ("wake_start", "wake_end"), ("wake_start", "callback_start"),
          ("callback_start", "resolved"), ("encode_end", "write_start"), ("write_start", "write_end"),
          ("write_end", "written")]
SUMS = ["sum_timers", "sum_on_response_complete"]  # us per request, summed over the calls


# ---------------------------------------------------------------- inside the server process

def traced_server(argv: list[str]) -> None:
    """Install the trace points, then run ``edgeopt serve argv``; events go to $EDGEOPT_TRACE_OUT at exit."""
    events: list[tuple[str, int]] = []
    detail = os.environ.get("EDGEOPT_TRACE_DETAIL") == "1"

    def mark(name: str) -> None:
        events.append((name, time.perf_counter_ns()))

    def timed(name: str, call: Any, *args: Any) -> Any:
        t = time.perf_counter_ns()
        try:
            return call(*args)
        finally:
            events.append((name, time.perf_counter_ns() - t))  # a duration: summed per request

    import edgeopt.serve.app as app
    import edgeopt.serve.batching as batching
    import edgeopt.serve.connections as connections
    import edgeopt.serve.server as server

    make_protocol = connections.guarded_protocol

    def guarded_protocol(**kwargs: Any) -> type:
        base = make_protocol(**kwargs)

        class Traced(base):  # type: ignore[misc, valid-type]
            def on_message_begin(self) -> None:
                mark("head_begun")
                super().on_message_begin()

            def on_message_complete(self) -> None:
                mark("body_complete")
                super().on_message_complete()

            def data_received(self, data: bytes) -> None:
                super().data_received(data)
                mark("data_received")  # after: the chunk that begins a request counts towards it

        if not detail:
            return Traced

        class _MarkedTransport:
            def __init__(self, transport: Any) -> None:
                self._transport = transport

            def write(self, data: bytes) -> None:
                answer = data.startswith(b"HTTP/1.1 200")
                if answer:
                    mark("write_start")
                self._transport.write(data)
                if answer:
                    mark("write_end")

            def writelines(self, parts: list[bytes]) -> None:
                mark("write_start")
                self._transport.writelines(parts)
                mark("write_end")

            def __getattr__(self, name: str) -> Any:
                return getattr(self._transport, name)

        class Detailed(Traced):
            def connection_made(self, transport: Any) -> None:
                super().connection_made(_MarkedTransport(transport))

            def on_headers_complete(self) -> None:
                mark("headers_start")
                super().on_headers_complete()
                mark("headers_end")

            def _arm(self, *args: Any) -> None:
                timed("sum_timers", super()._arm, *args)

            def _disarm(self) -> None:
                timed("sum_timers", super()._disarm)

            def on_response_complete(self) -> None:
                timed("sum_on_response_complete", super().on_response_complete)

        return Detailed

    server.guarded_protocol = guarded_protocol
    parse, encode, send = app.parse_infer_request, app.encode_response, app._send

    def parse_traced(*args: Any, **kwargs: Any) -> Any:
        mark("decode_start")
        try:
            return parse(*args, **kwargs)
        finally:
            mark("decode_end")

    def encode_traced(**kwargs: Any) -> Any:
        mark("encode_start")
        try:
            return encode(**kwargs)
        finally:
            mark("encode_end")

    async def send_traced(*args: Any, **kwargs: Any) -> None:
        await send(*args, **kwargs)
        mark("written")

    app.parse_infer_request, app.encode_response, app._send = parse_traced, encode_traced, send_traced
    init, resolve = batching.Batcher.__init__, batching._resolve

    def init_traced(self: Any, name: str, run: Any, **kwargs: Any) -> None:
        def run_traced(feeds: Any) -> Any:
            mark("run_start")
            try:
                return run(feeds)
            finally:
                mark("run_end")
        init(self, name, run_traced, **kwargs)

    def resolve_traced(p: Any, value: Any) -> None:
        mark("resolved")
        resolve(p, value)

    batching.Batcher.__init__, batching._resolve = init_traced, resolve_traced
    thread_answer = getattr(connections, "ThreadAnswer", None)
    if thread_answer is not None:  # the runtime thread writes a lone request's answer
        thread_send = thread_answer.send

        def thread_send_traced(self: Any, results: Any, *args: Any) -> bool:
            sent = thread_send(self, results, *args)
            if sent:
                mark("written")
            return sent
        thread_answer.send = thread_send_traced
    if detail:
        start = batching.Batcher.start

        def start_traced(self: Any) -> None:
            start(self)
            loop = self._loop

            class MarkedLoop:  # what the runtime thread sees of the event loop
                def call_soon_threadsafe(self, callback: Any, *args: Any) -> Any:
                    def marked(*a: Any) -> None:
                        mark("callback_start")
                        callback(*a)
                    mark("wake_start")
                    try:
                        return loop.call_soon_threadsafe(marked, *args)
                    finally:
                        mark("wake_end")

                def __getattr__(self, name: str) -> Any:
                    return getattr(loop, name)

            self._loop = MarkedLoop()
        batching.Batcher.start = start_traced
    inline = getattr(batching.Batcher, "_run_inline", None)
    if inline is not None:  # a lone request run on the event loop is resolved when the run returns
        def inline_traced(self: Any, request: Any) -> Any:
            try:
                return inline(self, request)
            finally:
                mark("resolved")
        batching.Batcher._run_inline = inline_traced
    out = os.environ["EDGEOPT_TRACE_OUT"]
    atexit.register(lambda: Path(out).write_text(json.dumps(events)))
    from edgeopt.cli import main

    sys.argv = ["edgeopt", "serve", *argv]
    main()


# ---------------------------------------------------------------- the driver

def start(src: Path, model: Path, trace_out: Path, threads: int, detail: bool = False) -> tuple[subprocess.Popen, int]:
    import serve_load as sl

    env = {**os.environ, "PYTHONPATH": f"{src.resolve()}", "OMP_NUM_THREADS": "1",
           "EDGEOPT_TRACE_OUT": str(trace_out), "EDGEOPT_TRACE_DETAIL": "1" if detail else "0"}
    argv = [sys.executable, __file__, "--server", *sl.serve_args("m", model, 16, 2, threads)]
    proc, port = sl.launch(argv, env, what=f"traced server from {src}")
    time.sleep(1.0)
    return proc, port


async def lone_client(port: int, request: bytes, n: int) -> list[tuple[int, int]]:
    import serve_load as sl

    reader, writer = await asyncio.open_connection(sl.HOST, port)
    stamps = []
    try:
        for _ in range(n):
            t0 = time.perf_counter_ns()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            match = sl._LENGTH.search(head)
            await reader.readexactly(int(match.group(1)) if match else 0)
            stamps.append((t0, time.perf_counter_ns()))
            if head[9:12] != b"200":
                raise RuntimeError(f"server answered {head[:60]!r}")
    finally:
        writer.close()
    return stamps


def requests_of(events: list[list[Any]]) -> list[dict[str, int]]:
    """The server's events grouped per inference request (a group starts at a request head).

    "written" and "resolved" may be marked after the next request's head has begun (the runtime
    thread that answered was descheduled before its mark; the loop read the next request before
    running the answer's bookkeeping), so each goes to the oldest request that lacks it."""
    groups: list[dict[str, int]] = []
    late = {"written": 0, "resolved": 0}  # index of the oldest group that may still lack it
    for name, t in events:
        if name == "head_begun":
            groups.append({"reads": 0})
        if groups and name.startswith("sum_"):
            groups[-1][name] = groups[-1].get(name, 0) + t
            continue
        if groups and name == "data_received":
            groups[-1]["reads"] += 1  # socket reads (data_received calls) that carried this request
        if groups and name in late:
            i = late[name]
            while i < len(groups) - 1 and (name in groups[i] or "decode_start" not in groups[i]):
                i += 1
            late[name] = i
            groups[i].setdefault(name, t)
            continue
        if groups and name not in groups[-1]:
            groups[-1][name] = t
    return [g for g in groups if "decode_start" in g and "written" in g]


def main() -> None:
    import numpy as np
    import serve_load as sl

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--a", required=True, help="source tree of arm A (the folder holding edgeopt/)")
    parser.add_argument("--b", help="source tree of arm B (omit to trace A alone)")
    parser.add_argument("--model", default="resnet18_64", choices=sorted(sl.MODELS))
    parser.add_argument("--onnx", help="use this exported model file instead of exporting --model")
    parser.add_argument("--encoding", default="binary", choices=["binary", "json"])
    parser.add_argument("--requests", type=int, default=200, help="measured requests per arm and block")
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve_trace.json"))
    parser.add_argument("--rows", action="store_true", help="also write every request's event times (ns)")
    parser.add_argument("--detail", action="store_true", help="also mark steps inside the steps (see the docstring)")
    parser.add_argument("--runtime-alone", action="store_true",
                        help="also time the model alone in this process after each block (see the docstring)")
    args = parser.parse_args()
    arms = {"A": Path(args.a)} | ({"B": Path(args.b)} if args.b else {})
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(args.onnx) if args.onnx else sl.model_file(args.model, Path(tmp))
        x = np.random.default_rng(0).standard_normal((1, *sl.MODELS[args.model][1])).astype(np.float32)
        servers = {arm: start(src, model, Path(tmp) / f"{arm}.json", args.threads, args.detail) for arm, src in arms.items()}
        stamps: dict[str, list[tuple[int, int]]] = {arm: [] for arm in arms}
        blocks: dict[str, list[tuple[int, int]]] = {arm: [] for arm in arms}  # measured index ranges
        counts = dict.fromkeys(arms, 0)
        alone: dict[str, list[float]] = {"back_to_back": [], "gap_1ms": []}  # per-block p50 (ms)
        if args.runtime_alone:
            from edgeopt.model import load_model
            from edgeopt.runtimes.sessions import open_session, resolve_settings

            loaded = load_model(model)  # as `edgeopt serve` opens it (load_served): same runtime and options
            session = open_session(loaded, resolve_settings(loaded, threads=args.threads))
            feeds = {loaded.inputs[0].name: x}
            from runtime_gap import block  # the timing loop of benchmarks/runtime_gap.py

            block(session, feeds, "back_to_back", 20)
        try:
            for i in range(args.blocks):
                for arm in (list(arms) if i % 2 == 0 else list(arms)[::-1]):
                    _proc, port = servers[arm]
                    request = sl.infer_request(port, "m", x, binary=args.encoding == "binary")
                    got = asyncio.run(lone_client(port, request, args.requests + 20))  # 20 warm-up
                    blocks[arm].append((counts[arm] + 20, counts[arm] + len(got)))
                    counts[arm] += len(got)
                    stamps[arm] += got
                if args.runtime_alone:
                    for key, mode in (("back_to_back", "back_to_back"), ("gap_1ms", "sleep_1ms")):
                        alone[key].append(block(session, feeds, mode, args.requests))
        finally:
            for proc, _port in servers.values():
                proc.send_signal(signal.SIGTERM)
                proc.wait(60)
        result: dict[str, Any] = {}
        for arm in arms:
            groups = requests_of(json.loads((Path(tmp) / f"{arm}.json").read_text()))
            if len(groups) != len(stamps[arm]):
                raise RuntimeError(f"arm {arm}: {len(groups)} traced requests for {len(stamps[arm])} sent")
            rows = []
            for lo, hi in blocks[arm]:
                for g, (t0, t1) in zip(groups[lo:hi], stamps[arm][lo:hi], strict=True):
                    rows.append({**g, "client_send": t0, "client_received": t1})
            steps = PHASES + (DETAIL if args.detail else [])
            phases = {f"{a} -> {b}": round(float(np.median([(r[b] - r[a]) / 1e3 for r in rows if a in r and b in r])), 1)
                      for a, b in steps}
            if args.detail:
                phases |= {k: round(float(np.median([r.get(k, 0) / 1e3 for r in rows])), 1) for k in SUMS}
            overhead = [(r["client_received"] - r["client_send"] - (r["run_end"] - r["run_start"])) / 1e6 for r in rows]
            per_block, run_block = [], []
            for lo, hi in blocks[arm]:
                part = [(s[1] - s[0] - (g["run_end"] - g["run_start"])) / 1e6
                        for g, s in zip(groups[lo:hi], stamps[arm][lo:hi], strict=True)]
                per_block.append(round(float(np.median(part)), 3))
                run_block.append(round(float(np.median([(g["run_end"] - g["run_start"]) / 1e6
                                                         for g in groups[lo:hi]])), 3))
            result[arm] = {"source": str(arms[arm]), "requests": len(rows),
                           "latency_p50_ms": round(float(np.median([(r["client_received"] - r["client_send"]) / 1e6
                                                                    for r in rows])), 3),
                           "run_p50_ms": round(float(np.median([(r["run_end"] - r["run_start"]) / 1e6 for r in rows])), 3),
                           "overhead_p50_ms": round(float(np.median(overhead)), 3),
                           "overhead_p50_ms_per_block": per_block, "run_p50_ms_per_block": run_block,
                           "phases_p50_us": phases,
                           "socket_reads_per_request_p50": float(np.median([r["reads"] for r in rows]))}
            if args.rows:
                result[arm]["rows"] = rows
    print(f"{'phase (median, us)':<36}" + "".join(f"{arm:>10}" for arm in arms))
    for key in result[next(iter(arms))]["phases_p50_us"]:
        print(f"{key:<36}" + "".join(f"{result[arm]['phases_p50_us'][key]:>10}" for arm in arms))
    for what in ("latency_p50_ms", "run_p50_ms", "overhead_p50_ms", "socket_reads_per_request_p50"):
        print(f"{what:<36}" + "".join(f"{result[arm][what]:>10}" for arm in arms))
    for arm in arms:
        print(f"overhead per block {arm}: {result[arm]['overhead_p50_ms_per_block']}")
        print(f"run p50 per block {arm}: {result[arm]['run_p50_ms_per_block']}")
    if args.runtime_alone:
        for key, values in alone.items():
            print(f"runtime alone p50 per block ({key}): {values} -> median {np.median(values):.3f}")
    payload = {"benchmark": "serve_trace", "command": "python benchmarks/serve_trace.py " + " ".join(sys.argv[1:]),
               "settings": {"model": args.model, "encoding": args.encoding, "requests_per_block": args.requests,
                            "blocks": args.blocks, "threads": args.threads, "concurrency": 1,
                            "detail": args.detail, "runtime_alone": args.runtime_alone},
               "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "loadavg_at_start": load_start,
                           "loadavg_at_end": os.getloadavg(),
                           "note": "shared 2-core machine; overhead = latency minus the request's own model run"},
               "arms": result, "runtime_alone_p50_ms_per_block": alone if args.runtime_alone else None}
    from edgeopt.fileio import write_json

    write_json(args.out, payload)


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    if len(sys.argv) > 1 and sys.argv[1] == "--server":
        traced_server(sys.argv[2:])
    else:
        main()
