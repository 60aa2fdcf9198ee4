"""Open a Session for a model the same way everywhere: runtime, threads and options resolved once."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from edgeopt.devices import MAX_THREADS, DeviceProfile, get_device
from edgeopt.errors import BadInput
from edgeopt.model import METADATA_PREFIX, Model
from edgeopt.runtimes import Session, runtime_for


@dataclass(frozen=True)
class RunSettings:
    """Where and how a model runs: runtime name, intra-op threads, runtime options, and the remote
    device profile (SSH) when it runs on a device rather than here.

    ``threads`` 0 on a remote device means "every core the device lets the runner use".
    """

    runtime: str
    threads: int
    options: dict[str, Any]
    remote: DeviceProfile | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {"runtime": self.runtime, "threads": self.threads, "options": dict(self.options)}
        if self.remote is not None:
            out["device"] = self.remote.name
        return out


def check_threads(threads: int | None, *, remote: bool) -> None:
    """Intra-op threads for a run here are capped at 4 x this host's CPUs; a remote device may have more
    cores than this host (the flag's own bound, 1024, is checked where it is parsed)."""
    if threads is not None and threads < 1:
        raise BadInput(f"--threads must be >= 1, got {threads}")
    if threads is not None and threads > MAX_THREADS and not remote:
        raise BadInput(f"--threads must be in [1, {MAX_THREADS}] (4 x the {os.cpu_count() or 1} CPU(s) here; a "
                       f"remote --device may take more), got {threads}")


def resolve_settings(model: Model, *, runtime: str | None = None, threads: int | None = None,
                     device: str | DeviceProfile | None = None,
                     options: dict[str, Any] | None = None) -> RunSettings:
    """Explicit arguments win, then the model's stored ``edgeopt.*`` metadata, then the device profile."""
    profile = get_device(device)
    check_threads(threads, remote=bool(profile.ssh))
    rt = runtime_for(model, runtime, device_runtime=profile.runtime)
    merged: dict[str, Any] = {}
    if runtime is None or runtime == model.runtime_hint():
        stored = model.metadata.get(METADATA_PREFIX + "runtime_options")
        if stored:
            try:
                merged.update(json.loads(stored))
            except json.JSONDecodeError as exc:
                raise BadInput(f"{model.source}: metadata edgeopt.runtime_options is not JSON") from exc
        if rt.name == "onnxruntime":
            merged = {k: v for k, v in merged.items() if k == "graph_optimization"}
    if rt.name == profile.runtime:
        for key, value in profile.runtime_options.items():
            merged.setdefault(key, value)
    merged.update(options or {})
    n_threads = threads
    if n_threads is None:
        stored_threads = model.metadata.get(METADATA_PREFIX + "threads")
        n_threads = _stored_threads(model, stored_threads) if stored_threads else profile.effective_threads()
    return RunSettings(runtime=rt.name, threads=n_threads, options=merged,
                       remote=profile if profile.ssh else None)


def _stored_threads(model: Model, text: str) -> int:
    """``edgeopt.threads`` from a model file's metadata: a data file, so checked like a flag."""
    try:
        n = int(text)
    except ValueError:
        raise BadInput(f"{model.source}: metadata edgeopt.threads is {text[:20]!r}, not a thread count") from None
    return max(1, min(n, MAX_THREADS))


def open_session(model: Model, settings: RunSettings) -> Session:
    """A session on this host (a remote device's runs go through bench.compare and evaluate.predict)."""
    return runtime_for(model, settings.runtime).load(model, threads=settings.threads,
                                                     options=dict(settings.options))
