"""Measuring on a remote device over SSH: what it costs, and whether a constrained device's figures
(and optimize's choice) differ from the host's.

Starts its own OpenSSH server on 127.0.0.1 (free port, fresh host and user keys in a temp folder;
needs sshd: apt-get install openssh-server) and reaches two "devices" through it, both this
interpreter (numpy + onnxruntime), so nothing but the constraint differs:
  - ``loopback``: unconstrained, for the runner's overhead and equality with a local run;
  - ``one-core``: wrapped in ``taskset -c 0``: one usable core, so the runner uses 1 intra-op thread.
The host side runs with 2 threads. Models: the bundled digits CNN (real weights, real held-out
digits) and its INT8/FP16 variants; MobileNetV2 with random weights (speed figures only).

Sections:
  overhead    ssh round trip; the wall time of `compare` on the device, cold (runner copied, model
              uploaded) and warm (nothing copied), against the same `compare` run locally, alternated;
              p50 and outputs of the device run against the local run.
  constrained the same models timed on the host (2 threads) and on `one-core`, alternated 3 times.
  optimize    `optimize` on the digits CNN, ONNX Runtime recipes, on the host (2 threads) and on
              `one-core`: each chooses by its own figures; the JSON says whether the choices differ.

The machine is shared and loaded (load average recorded): trust ratios over milliseconds.

Run: .venv/bin/python benchmarks/remote_device.py [--seconds 1.0]
Writes benchmarks/results/remote_device.json
"""

from __future__ import annotations

import argparse
import getpass
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "examples" / "digits"


class LoopbackSshd:
    """sshd -D on 127.0.0.1 with its own config and keys; key login for the current user only."""

    def __init__(self, root: Path) -> None:
        self.root, self.user = root, getpass.getuser()
        sshd = shutil.which("sshd") or "/usr/sbin/sshd"
        if not os.path.exists(sshd):
            raise SystemExit("sshd not found: apt-get install openssh-server")
        for name in ("host_key", "user_key"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(root / name)], check=True)
        (root / "authorized_keys").write_text((root / "user_key.pub").read_text())
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        (root / "sshd_config").write_text("\n".join([
            f"Port {self.port}", "ListenAddress 127.0.0.1", f"HostKey {root / 'host_key'}",
            f"AuthorizedKeysFile {root / 'authorized_keys'}", "StrictModes no", "UsePAM no",
            "PasswordAuthentication no", "KbdInteractiveAuthentication no", "PidFile none", "LogLevel ERROR",
            f"AllowUsers {self.user}", ""]))
        if os.geteuid() == 0:
            os.makedirs("/run/sshd", exist_ok=True)
        self.proc = subprocess.Popen([sshd, "-D", "-e", "-f", str(root / "sshd_config")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                break
            except OSError:
                time.sleep(0.05)
        host_pub = (root / "host_key.pub").read_text().split()
        self.known_hosts = root / "known_hosts"
        self.known_hosts.write_text(f"[127.0.0.1]:{self.port} {host_pub[0]} {host_pub[1]}\n")

    def add(self, name: str, python: str, workdir: Path) -> str:
        from edgeopt.devices import add_device

        add_device(name, ssh=f"{self.user}@127.0.0.1:{self.port}", ssh_key=str(self.root / "user_key"),
                   python=python, workdir=str(workdir), known_hosts=str(self.known_hosts), replace=True)
        return name

    def roundtrip_s(self) -> float:
        argv = ["ssh", "-p", str(self.port), "-i", str(self.root / "user_key"), "-o", "BatchMode=yes",
                "-o", f"UserKnownHostsFile={self.known_hosts}", f"{self.user}@127.0.0.1", "true"]
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            subprocess.run(argv, check=True, capture_output=True)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=10)


def timed(fn):
    t0 = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - t0


def variants(model, data):
    """INT8 (QDQ and QOperator, U8S8 per-channel) and FP16 variants, built the way optimize builds them."""
    from edgeopt.devices import get_device
    from edgeopt.search.recipe import apply_recipe
    from edgeopt.search.space import post_training_recipes
    from edgeopt.transforms.config import TransformContext

    wanted = ("int8-qdq-u8s8-perchannel", "int8-qoperator-u8s8-perchannel", "fp16")
    out = []
    for recipe in post_training_recipes(model, get_device("host"), runtimes=("onnxruntime",)):
        if recipe.name in wanted:
            out.append((recipe.name, apply_recipe(model, recipe, TransformContext(calibration=data))))
    return out


def overhead(sshd: LoopbackSshd, work: Path, seconds: float) -> dict:
    from edgeopt.data import load_data
    from edgeopt.measure.bench import BenchSettings, compare
    from edgeopt.measure.evaluate import predict
    from edgeopt.model import load_model
    from edgeopt.runtimes.remote import runner_source
    from edgeopt.runtimes.sessions import resolve_settings

    model = load_model(DIGITS / "digits_cnn.onnx")
    data = load_data(DIGITS / "test.npz")
    device = sshd.add("loopback", sys.executable, work / "loopback")
    cfg = BenchSettings(warmup=10, min_runs=100, min_seconds=seconds, max_seconds=20)
    cold, cold_s = timed(lambda: compare([model], settings=cfg, device=device, threads=2))
    remote_s, local_s, remote_p50, local_p50 = [], [], [], []
    for _ in range(3):  # alternated, so both see the same load
        r, s = timed(lambda: compare([model], settings=cfg, device=device, threads=2))
        remote_s.append(s)
        remote_p50.append(r[0].latency_ms["p50"])
        r, s = timed(lambda: compare([model], settings=cfg, threads=2))
        local_s.append(s)
        local_p50.append(r[0].latency_ms["p50"])
    out_remote = predict(model, data, settings=resolve_settings(model, device=device, threads=2))
    out_local = predict(model, data, settings=resolve_settings(model, threads=2))
    local_med = statistics.median(local_s)
    return {
        "model": "examples/digits/digits_cnn.onnx", "model_bytes": model.size_bytes,
        "runner_bytes": len(runner_source()), "timed_seconds_per_model": seconds,
        "ssh_roundtrip_s": round(sshd.roundtrip_s(), 3),
        "local_compare_wall_s": [round(s, 3) for s in local_s],
        "remote_cold_compare_wall_s": round(cold_s, 3),
        "remote_warm_compare_wall_s": [round(s, 3) for s in remote_s],
        "overhead_cold_s": round(cold_s - local_med, 3),
        "overhead_warm_s": round(statistics.median(remote_s) - local_med, 3),
        "p50_ms_remote": [round(v, 4) for v in remote_p50], "p50_ms_local": [round(v, 4) for v in local_p50],
        "p50_ratio_remote_over_local": round(statistics.median(remote_p50) / statistics.median(local_p50), 3),
        "cold_measured_on": cold[0].measured_on,
        "eval_outputs_max_abs_diff": float(np.max(np.abs(out_remote - out_local))),
        "eval_top1_equal": bool(np.array_equal(out_remote.argmax(1), out_local.argmax(1))),
    }


def constrained(sshd: LoopbackSshd, work: Path, seconds: float) -> tuple[str, dict]:
    from edgeopt.data import load_data
    from edgeopt.measure.bench import BenchSettings, compare
    from edgeopt.model import load_model

    wrapper = work / "one-core-python"
    wrapper.write_text(f"#!/bin/sh\nexec taskset -c 0 {sys.executable} \"$@\"\n")
    wrapper.chmod(0o755)
    device = sshd.add("one-core", str(wrapper), work / "one-core")
    cfg = BenchSettings(warmup=5, min_runs=50, min_seconds=seconds, max_seconds=20)
    cases = {}
    digits = load_model(DIGITS / "digits_cnn.onnx")
    cases["digits_cnn"] = [("fp32", digits), *variants(digits, load_data(DIGITS / "test.npz"))]
    mobilenet = mobilenet_v2(work)
    if mobilenet is not None:
        calib = load_data_from(np.random.default_rng(0).standard_normal((32, 3, 96, 96)).astype(np.float32), work)
        cases["mobilenet_v2_random_96"] = [("fp32", mobilenet), *variants(mobilenet, calib)]
    result = {}
    for name, models in cases.items():
        runs = {"host_2_threads": [], "one_core_device": []}
        for _ in range(3):
            runs["host_2_threads"].append(compare([m for _, m in models], settings=cfg, threads=2))
            runs["one_core_device"].append(compare([m for _, m in models], settings=cfg, device=device))
        summary = {}
        for where, repeats in runs.items():
            p50 = {label: statistics.median(r[i].latency_ms["p50"] for r in repeats)
                   for i, (label, _) in enumerate(models)}
            summary[where] = {"threads": repeats[0][0].threads, "usable_cores": repeats[0][0].measured_on.get("usable_cores"),
                              "p50_ms": {k: round(v, 4) for k, v in p50.items()},
                              "speedup_vs_fp32": {k: round(p50["fp32"] / v, 3) for k, v in p50.items()},
                              "fastest": min(p50, key=p50.get)}
        summary["device_over_host_p50"] = {k: round(summary["one_core_device"]["p50_ms"][k] /
                                                    summary["host_2_threads"]["p50_ms"][k], 3) for k, _ in models}
        result[name] = summary
    return device, result


def mobilenet_v2(work: Path):
    try:
        import torch
        import torchvision
    except ImportError:
        return None
    from edgeopt.model import load_model

    torch.manual_seed(0)
    net = torchvision.models.mobilenet_v2(num_classes=10).eval()
    path = work / "mobilenet_v2.onnx"
    torch.onnx.export(net, torch.randn(1, 3, 96, 96), str(path), input_names=["input"], output_names=["logits"],
                      dynamo=False, opset_version=17)
    return load_model(path)


def load_data_from(x: np.ndarray, work: Path):
    from edgeopt.data import load_data

    np.savez(work / "calib.npz", x=x)
    return load_data(work / "calib.npz")


def optimize_both(device: str, work: Path, seconds: float) -> dict:
    from edgeopt.devices import get_device
    from edgeopt.measure.bench import BenchSettings
    from edgeopt.model import load_model
    from edgeopt.search.optimize import optimize
    from edgeopt.search.space import post_training_recipes

    model = load_model(DIGITS / "digits_cnn.onnx")
    recipes = post_training_recipes(model, get_device("host"), runtimes=("onnxruntime",))
    bench = BenchSettings(warmup=10, min_runs=100, min_seconds=seconds, max_seconds=20)
    out = {}
    for label, kwargs in (("host_2_threads", {"device": "host", "threads": 2}), ("one_core_device", {"device": device})):
        result, wall = timed(lambda kw=kwargs, lb=label: optimize(model, DIGITS / "test.npz", out_dir=work / f"opt-{lb}",
                                                              recipes=recipes, bench=bench, progress=False, **kw))
        out[label] = {
            "chosen": result.chosen.name if result.chosen else None,
            "chosen_speedup": result.chosen.speedup if result.chosen else None,
            "chosen_interval": result.chosen.speedup_interval if result.chosen else None,
            "speedups": {r.name: r.speedup for r in result.results if r.speedup},
            "baseline_p50_ms": result.baseline.latency_ms.get("p50"), "threads": result.baseline.threads,
            "measured_on": result.measured_on, "wall_s": round(wall, 1),
        }
    out["same_choice"] = out["host_2_threads"]["chosen"] == out["one_core_device"]["chosen"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="timed seconds per model per run")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "remote_device.json")
    args = parser.parse_args()
    from edgeopt.fileio import write_json

    with tempfile.TemporaryDirectory(prefix="edgeopt-remote-bench-") as tmp:
        work = Path(tmp)
        os.environ["EDGEOPT_DEVICES_DIR"] = str(work / "devices")
        (work / "sshd").mkdir()
        sshd = LoopbackSshd(work / "sshd")
        try:
            started = time.time()
            payload = {"host": os.uname().nodename, "cpus": os.cpu_count(), "load_average_start": os.getloadavg()}
            payload["overhead"] = overhead(sshd, work, args.seconds)
            print("overhead", payload["overhead"], flush=True)
            device, payload["constrained"] = constrained(sshd, work, args.seconds)
            print("constrained", payload["constrained"], flush=True)
            payload["optimize"] = optimize_both(device, work, args.seconds)
            print("optimize", payload["optimize"], flush=True)
            payload["load_average_end"] = os.getloadavg()
            payload["wall_s"] = round(time.time() - started, 1)
        finally:
            sshd.stop()
    write_json(args.out, payload)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
