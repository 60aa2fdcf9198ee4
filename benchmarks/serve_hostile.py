"""Hostile clients against `edgeopt serve` on 127.0.0.1: idle sockets and endless headers (issue 21).

Starts `edgeopt serve` on a tiny CNN with `--queue-size 8` from a given source tree (default: this
one; pass `--src /path/to/old/src` to measure another version the same way), then:
1. opens 520 TCP connections that never send a byte and asks `/v2/health/ready` and `/infer`
   (status and seconds to the answer), then checks how many of the idle sockets the server closed
   within `--header-timeout` + 3 s;
2. four clients stream one unterminated header of up to 48 MB each: bytes sent before the server
   hung up (this includes what the kernel's socket buffers took), seconds, and the server's RSS
   before and after.

Writes benchmarks/results/serve_hostile.json (or --out).
Run: .venv/bin/python benchmarks/serve_hostile.py [--src DIR] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
READY = b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"


def exchange(port: int, payload: bytes, timeout: float = 30.0) -> bytes:
    with socket.create_connection((HOST, port), timeout=timeout) as s:
        s.sendall(payload)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        return next(int(line.split()[1]) / 1024.0 for line in fh if line.startswith("VmRSS:"))


def is_closed(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", default=str(ROOT / "src"), help="the edgeopt source tree to run")
    parser.add_argument("--idle", type=int, default=520)
    parser.add_argument("--header-mb", type=int, default=48)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve_hostile.json"))
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT))
    from tests.conftest import make_onnx_cnn

    result: dict[str, Any] = {"src": args.src}
    with tempfile.TemporaryDirectory() as tmp:
        tiny = make_onnx_cnn(Path(tmp) / "tiny.onnx")
        env = {**os.environ, "PYTHONPATH": args.src, "OMP_NUM_THREADS": "1"}
        proc = subprocess.Popen([sys.executable, "-m", "edgeopt", "serve", str(tiny), "--port", "0", "--threads", "1",
                                 "--queue-size", "8", "--log-level", "error"],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
        try:
            port = int(proc.stdout.readline().split(f"{HOST}:")[1].split()[0])
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                try:
                    if exchange(port, READY, 2).startswith(b"HTTP/1.1 200"):
                        break
                except OSError:
                    time.sleep(0.1)
            body = json.dumps({"inputs": [{"name": "input", "shape": [1, 1, 16, 16], "datatype": "FP32",
                                           "data": [0.5] * 256}]}).encode()
            infer = (f"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
                     "Connection: close\r\n\r\n").encode() + body

            idle = [socket.create_connection((HOST, port), timeout=10) for _ in range(args.idle)]
            time.sleep(0.5)
            t0 = time.monotonic()
            ready = exchange(port, READY)[:12].decode()
            t1 = time.monotonic()
            answer = exchange(port, infer)[:12].decode()
            t2 = time.monotonic()
            time.sleep(13.0)  # the default --header-timeout is 10 s
            closed = sum(is_closed(s) for s in idle)
            for s in idle:
                s.close()
            result["idle_sockets"] = {"count": args.idle, "ready_status": ready, "ready_seconds": round(t1 - t0, 3),
                                      "infer_status": answer, "infer_seconds": round(t2 - t1, 3),
                                      "closed_by_server_after_13_s": closed}
            print("idle sockets:", result["idle_sockets"], flush=True)

            before = rss_mb(proc.pid)
            sent = [0] * 4

            def stream(i: int) -> None:
                try:
                    with socket.create_connection((HOST, port), timeout=30) as s:
                        s.sendall(b"GET /v2 HTTP/1.1\r\nHost: x\r\nX-Big: ")
                        while sent[i] < args.header_mb * 1024 * 1024:
                            s.sendall(b"a" * 65536)
                            sent[i] += 65536
                except OSError:
                    pass

            threads = [threading.Thread(target=stream, args=(i,)) for i in range(4)]
            t0 = time.monotonic()
            for t in threads:
                t.start()
            for t in threads:
                t.join(300)
            result["endless_headers"] = {
                "clients": 4, "offered_mb_each": args.header_mb,
                "sent_before_hangup_mb_each": [round(n / 2**20, 2) for n in sent], "seconds": round(time.monotonic() - t0, 1),
                "server_rss_mb_before": round(before, 1), "server_rss_mb_after": round(rss_mb(proc.pid), 1),
                "ready_after": exchange(port, READY)[:12].decode()}
            print("endless headers:", result["endless_headers"], flush=True)
        finally:
            proc.terminate()
            proc.wait(30)
    result["machine_loadavg_at_end"] = os.getloadavg()
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
