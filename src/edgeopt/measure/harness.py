"""The one timing harness, in a file that needs only the standard library and numpy.

``bench.py`` times models on this host with these functions; for a remote device (SSH) edgeopt
copies this very file to the device and runs it there (``python runner.py probe|run``), so a
figure from a Raspberry Pi and one from the host come from the same loop: warm-up, peak RSS,
rounds interleaved A, B, A, B, per-round medians for the speed-up interval. Nothing here may
import edgeopt (the device has no edgeopt) and numpy/onnxruntime are imported inside functions
(so ``probe`` can report them missing instead of crashing).

Device side layout (WORKDIR is where this file was copied to):
  WORKDIR/runner-<sha>.py      this file, named by its content
  WORKDIR/models/<sha256>.onnx models, named by their content: a re-run copies nothing
  WORKDIR/data/<sha256>.npz    inputs, likewise
  WORKDIR/tmp/<pid>-<token>/   uploads in flight; a file reaches models/ or data/ only by a rename
                               after its sha256 checked, and a dead run's folder is swept
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

RUNNER_VERSION = 1
_CHUNK = 1 << 20
# ISA features that decide which int8/fp16 kernels a runtime can use, by /proc/cpuinfo name.
_ISA_FLAGS = {
    "asimd": "NEON", "neon": "NEON", "asimddp": "dotprod", "i8mm": "i8mm", "asimdhp": "fp16",
    "sve": "SVE", "sve2": "SVE2", "bf16": "bf16", "avx2": "AVX2", "fma": "FMA", "f16c": "F16C",
    "avx512f": "AVX-512", "avx512_vnni": "AVX-512 VNNI", "avx_vnni": "AVX-VNNI", "avx512_bf16": "AVX-512 BF16",
    "avx512_fp16": "AVX-512 FP16", "amx_tile": "AMX", "amx_int8": "AMX-INT8",
}
_RUNTIME_PACKAGES = {"onnxruntime": ("onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino"),
                     "openvino": ("openvino",), "litert": ("ai-edge-litert", "tflite-runtime")}


# ----------------------------------------------------------------------------- timing (host and device)

def rss_mb(field_name: str) -> float:
    """``VmRSS`` / ``VmHWM`` of this process in MB (Linux), else the rusage high-water mark."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def reset_peak_rss() -> bool:
    """Reset the kernel's high-water mark (Linux), so peak RSS is this model's, not the process's past."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def open_warm(open_session: Callable[[], Any], run: Callable[[Any], Any], warmup: int) -> tuple[Any, float, float]:
    """Open a session, run it ``warmup`` times (at least once); ``(session, peak RSS MB, model MB)``."""
    gc.collect()
    base = rss_mb("VmRSS")
    exact = reset_peak_rss()
    session = open_session()
    for _ in range(max(1, warmup)):
        run(session)
    peak = rss_mb("VmHWM") if exact else rss_mb("VmRSS")
    return session, peak, max(0.0, peak - base)


def interleaved(runs: Sequence[Callable[[], Any]], *, min_runs: int, min_seconds: float, max_seconds: float,
                round_seconds: float) -> tuple[list[list[float]], list[list[float]]]:
    """Time every callable in rounds (A, B, A, B, ...) until each has ``min_runs`` runs and
    ``min_seconds`` apiece (or ``max_seconds`` apiece passed).

    Returns ``(times, rounds)``: every run's seconds, and each round's median in ms, per callable.
    """
    import numpy as np

    times: list[list[float]] = [[] for _ in runs]
    rounds: list[list[float]] = [[] for _ in runs]
    clock = time.perf_counter
    start = clock()
    while True:
        for run, own, medians in zip(runs, times, rounds):  # noqa: B905 - the device may run Python < 3.10
            round_start = clock()
            first = len(own)
            while True:
                t0 = clock()
                run()
                own.append(clock() - t0)
                if clock() - round_start >= round_seconds:
                    break
            medians.append(float(np.median(own[first:])) * 1000.0)
        elapsed = clock() - start
        done = all(len(t) >= min_runs for t in times) and elapsed >= min_seconds * len(runs)
        if done or elapsed >= max_seconds * len(runs):
            return times, rounds


def predict_arrays(run: Callable[[dict[str, Any]], list[Any]], inputs: dict[str, Any], *, step: int,
                   fixed: bool) -> Any:
    """The first output for every sample, stacked: batches of ``step``; with a ``fixed`` batch size
    the last batch is padded with its last sample and the padding dropped again."""
    import numpy as np

    n_total = len(next(iter(inputs.values())))
    chunks = []
    for begin in range(0, n_total, step):
        feeds = {k: v[begin:begin + step] for k, v in inputs.items()}
        n = len(next(iter(feeds.values())))
        if fixed and n < step:
            feeds = {k: np.concatenate([v, np.repeat(v[-1:], step - n, axis=0)]) for k, v in feeds.items()}
            chunks.append(np.asarray(run(feeds)[0])[:n])
        else:
            chunks.append(np.asarray(run(feeds)[0]))
    return np.concatenate(chunks, axis=0)


# ----------------------------------------------------------------------------- ONNX Runtime settings

ORT_OPT_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC",
                  "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}


def ort_session_options(ort: Any, threads: int | None, graph_optimization: str = "all") -> Any:
    """The SessionOptions edgeopt times with, on the host and on a device alike."""
    so = ort.SessionOptions()
    if threads is not None:
        so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, ORT_OPT_LEVELS[graph_optimization])
    so.log_severity_level = 3
    return so


# ----------------------------------------------------------------------------- where a figure comes from

def _cpuinfo() -> tuple[str, list[str]]:
    names: dict[str, str] = {}
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                key, value = key.strip().lower(), value.strip()
                if key in ("flags", "features"):
                    flags.update(value.split())
                elif value and key not in names:
                    names[key] = value
    except OSError:
        pass
    # x86: "model name"; Raspberry Pi: "Model" (the board), older ARM kernels: "Hardware"
    board = names.get("model", "")
    model = names.get("model name") or (board if board and not board.isdigit() else "") \
        or names.get("hardware") or names.get("cpu model") or ""
    isa = sorted({_ISA_FLAGS[f] for f in flags if f in _ISA_FLAGS})
    if platform.machine().lower() in ("aarch64", "arm64") and "NEON" not in isa:
        isa.insert(0, "NEON")  # mandatory in AArch64
    return model or platform.processor() or platform.machine(), isa


def _meminfo() -> dict[str, float]:
    out: dict[str, float] = {}
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key in ("MemTotal", "MemAvailable"):
                    out[key] = int(value.split()[0]) / 1024.0
    except OSError:
        pass
    return out


def package_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def device_info() -> dict[str, Any]:
    """CPU, usable cores, ISA flags, memory, Python and runtime versions of the machine this runs on."""
    cpu, isa = _cpuinfo()
    mem = _meminfo()
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count() or 1
    runtimes = {}
    for runtime, packages in _RUNTIME_PACKAGES.items():
        found = [(p, package_version(p)) for p in packages]
        found = [(p, v) for p, v in found if v]
        runtimes[runtime] = {"package": found[0][0], "version": found[0][1]} if found else None
    return {
        "hostname": platform.node(), "machine": platform.machine(), "system": platform.system(),
        "cpu": cpu, "cores": os.cpu_count() or 1, "usable_cores": usable, "isa": isa,
        "memory_mb": round(mem["MemTotal"]) if "MemTotal" in mem else None,
        "memory_available_mb": round(mem["MemAvailable"]) if "MemAvailable" in mem else None,
        "python": platform.python_version(), "python_executable": sys.executable,
        "numpy": package_version("numpy"), "runtimes": runtimes, "runner_version": RUNNER_VERSION,
    }


# ----------------------------------------------------------------------------- the device side

class JobError(Exception):
    """A failure the runner reports as JSON: ``kind`` tells the host what to say."""

    def __init__(self, kind: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.kind = kind
        self.extra = extra


def _workdir() -> str:
    return os.path.dirname(os.path.abspath(__file__))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep(workdir: str) -> int:
    """Remove upload folders of runs that are no longer alive (killed mid-way); how many went."""
    root = os.path.join(workdir, "tmp")
    removed = 0
    for name in os.listdir(root) if os.path.isdir(root) else []:
        pid_text = name.split("-", 1)[0]
        path = os.path.join(root, name)
        if not pid_text.isdigit():
            shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)
            removed += 1
        elif not _alive(int(pid_text)):
            shutil.rmtree(path, ignore_errors=True)
            removed += 1
    return removed


def content_path(workdir: str, kind: str, sha: str) -> str:
    ext = {"models": ".onnx", "data": ".npz"}[kind]
    return os.path.join(workdir, kind, sha + ext)


def receive(stream: Any, workdir: str) -> dict[str, Any]:
    """Read the job tar from ``stream``: ``job.json`` first, then content-addressed files.

    Each file is written to this run's tmp folder, its sha256 checked against its name, then
    renamed into place; a truncated or altered upload never reaches models/ or data/.
    """
    import tarfile

    staging = os.path.join(workdir, "tmp", f"{os.getpid()}-{os.urandom(4).hex()}")
    os.makedirs(staging)
    job: dict[str, Any] | None = None
    try:
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                src = tar.extractfile(member)
                if member.name == "job.json":
                    job = json.loads(src.read().decode())
                    continue
                kind, _, filename = member.name.partition("/")
                sha = filename.split(".", 1)[0]
                if kind not in ("models", "data") or len(sha) != 64 or "/" in filename:
                    raise JobError("bad_job", f"unexpected file in the upload: {member.name}")
                tmp = os.path.join(staging, filename)
                digest = hashlib.sha256()
                with open(tmp, "wb") as out:
                    while chunk := src.read(_CHUNK):
                        digest.update(chunk)
                        out.write(chunk)
                    out.flush()
                    os.fsync(out.fileno())
                if digest.hexdigest() != sha:
                    raise JobError("upload", f"{member.name} arrived damaged (sha256 differs); run again")
                os.makedirs(os.path.join(workdir, kind), exist_ok=True)
                os.replace(tmp, content_path(workdir, kind, sha))
    except tarfile.TarError as exc:
        raise JobError("upload", f"the upload was cut short ({exc}); run again") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if job is None:
        raise JobError("bad_job", "the upload held no job.json")
    return job


def _require(module: str, pip_name: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise JobError("missing_module", f"{pip_name} is not installed for {sys.executable} ({exc})",
                       package=pip_name) from exc


def _is_oom(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, MemoryError) or "bad_alloc" in text or "failed to allocate" in text \
        or "out of memory" in text


def _open_ort(path: str, threads: int | None, options: dict[str, Any]) -> Any:
    ort = _require("onnxruntime", "onnxruntime")
    opts = dict(options)
    level = str(opts.pop("graph_optimization", "all"))
    if opts or level not in ORT_OPT_LEVELS:
        raise JobError("bad_job", f"unsupported onnxruntime options {options}")
    try:
        return ort.InferenceSession(path, sess_options=ort_session_options(ort, threads, level),
                                    providers=["CPUExecutionProvider"])
    except Exception as exc:
        if _is_oom(exc):
            raise JobError("oom", f"out of memory loading {os.path.basename(path)}: {str(exc).splitlines()[0]}") \
                from exc
        raise JobError("model", f"ONNX Runtime on the device cannot load the model: {str(exc).splitlines()[0]}") \
            from exc


def _missing(workdir: str, job: dict[str, Any]) -> list[str]:
    wanted = [("models", m["sha"]) for m in job.get("models", [])] + [("data", s) for s in job.get("data", [])]
    return sorted({f"{k}/{s}" for k, s in wanted if not os.path.exists(content_path(workdir, k, s))})


def _threads(requested: int | None) -> int:
    if requested:
        return int(requested)
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _encode(array: Any) -> str:
    import base64
    import io

    import numpy as np

    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def run_job(job: dict[str, Any], workdir: str) -> dict[str, Any]:
    """Run a ``bench`` or ``predict`` job on files already in ``workdir``; the JSON-able reply."""
    np = _require("numpy", "numpy")
    missing = _missing(workdir, job)
    if missing:
        raise JobError("missing_files", f"not on the device: {', '.join(missing)}", missing=missing)
    data = {sha: np.load(content_path(workdir, "data", sha), allow_pickle=False) for sha in job.get("data", [])}
    if job["kind"] == "predict":
        spec = job["models"][0]
        threads = _threads(spec.get("threads"))
        session = _open_ort(content_path(workdir, "models", spec["sha"]), threads, spec.get("options", {}))
        names = [o.name for o in session.get_outputs()]
        arrays = data[job["data"][0]]
        inputs = {k: arrays[k] for k in arrays.files}
        outputs = predict_arrays(lambda feeds: session.run(names, feeds), inputs, step=int(job["step"]),
                                 fixed=bool(job["fixed"]))
        return {"outputs": _encode(outputs), "threads": threads}
    if job["kind"] != "bench":
        raise JobError("bad_job", f"unknown job kind {job['kind']!r}")
    cfg = job["settings"]
    feeds_file = data[job["data"][0]]
    entries = []
    for i, spec in enumerate(job["models"]):
        feeds = {k.split("/", 1)[1]: feeds_file[k] for k in feeds_file.files if k.split("/", 1)[0] == str(i)}
        threads = _threads(spec.get("threads"))
        path = content_path(workdir, "models", spec["sha"])
        session, peak, model_mb = open_warm(lambda p=path, t=threads, s=spec: _open_ort(p, t, s.get("options", {})),
                                            lambda sess, f=feeds: sess.run(None, f), int(cfg["warmup"]))
        entries.append((session, feeds, threads, peak, model_mb))
    times, rounds = interleaved([lambda s=s, f=f: s.run(None, f) for s, f, *_ in entries],
                                min_runs=int(cfg["min_runs"]), min_seconds=float(cfg["min_seconds"]),
                                max_seconds=float(cfg["max_seconds"]), round_seconds=float(cfg["round_seconds"]))
    return {"results": [{"times_ms": [t * 1000.0 for t in own], "round_p50_ms": med, "threads": e[2],
                         "peak_rss_mb": e[3], "model_memory_mb": e[4]}
                        for own, med, e in zip(times, rounds, entries)]}  # noqa: B905 - the device may run Python < 3.10


def main(argv: list[str]) -> int:
    """``probe [sha...]``: device facts and which of the files named are present.
    ``run``: receive the job tar on stdin, run it, print one JSON line."""
    workdir = _workdir()
    command = argv[1] if len(argv) > 1 else ""
    try:
        if command == "probe":
            present = [name for name in argv[2:]
                       if os.path.exists(content_path(workdir, *name.split("/", 1)))]
            reply: dict[str, Any] = {"ok": True, "info": device_info(), "present": present}
        elif command == "run":
            sweep(workdir)
            job = receive(sys.stdin.buffer, workdir)
            reply = {"ok": True, **run_job(job, workdir), "info": device_info()}
        else:
            raise JobError("bad_job", f"usage: {os.path.basename(__file__)} probe|run")
    except JobError as exc:
        reply = {"ok": False, "kind": exc.kind, "error": str(exc), **exc.extra}
    except Exception as exc:  # noqa: BLE001 - every failure goes back as one JSON line
        kind = "oom" if _is_oom(exc) else "error"
        reply = {"ok": False, "kind": kind, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
    sys.stdout.write(json.dumps(reply) + "\n")
    sys.stdout.flush()
    return 0 if reply["ok"] else 3


if __name__ == "__main__":
    sys.exit(main(sys.argv))
