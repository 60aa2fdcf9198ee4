"""Device profiles: what a target device runs and how fast it is relative to this host.

Latency is always measured on this host, with the profile's runtime and thread count, so
candidates compare fairly; ``relative_speed`` scales host timings for planning (``split``)
where the real device is not at hand. Profiles are YAML files: the bundled ones in
``edgeopt/device_profiles/`` or a path the user gives.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from edgeopt.errors import DeviceError, first_line

PRECISIONS = ("fp32", "fp16", "bf16", "int8", "int4")
# More intra-op threads than this only oversubscribes the CPU; far larger counts overflow the
# runtimes' C++ ints or stall for minutes creating threads.
MAX_THREADS = 4 * (os.cpu_count() or 1)


@dataclass(frozen=True)
class DeviceProfile:
    """A target device: runtime, threads, memory budget, precisions it executes, relative speed."""

    name: str
    description: str
    runtime: str = "onnxruntime"
    threads: int | None = None
    memory_mb: int | None = None
    precisions: tuple[str, ...] = PRECISIONS
    relative_speed: float = 1.0
    link_mbps: float | None = None
    runtime_options: dict[str, Any] = field(default_factory=dict)

    def effective_threads(self) -> int:
        """Threads to use on this host: the profile's, capped by the cores this host has."""
        cores = os.cpu_count() or 1
        return max(1, min(self.threads or cores, cores))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["precisions"] = list(self.precisions)
        data["effective_threads"] = self.effective_threads()
        return data


def _profile_from_mapping(raw: Any, source: str) -> DeviceProfile:
    if not isinstance(raw, dict) or "name" not in raw:
        raise DeviceError(f"device profile {source} must be a YAML mapping with at least 'name'")
    known = set(DeviceProfile.__dataclass_fields__)
    unknown = sorted(set(raw) - known)
    if unknown:
        raise DeviceError(f"device profile {source}: unknown field(s) {unknown}; known: {sorted(known)}")
    values = dict(raw)
    values.setdefault("description", "")
    if "precisions" in values:
        precisions = tuple(str(p) for p in values["precisions"])
        bad = [p for p in precisions if p not in PRECISIONS]
        if bad:
            raise DeviceError(f"device profile {source}: unknown precision(s) {bad}; known: {list(PRECISIONS)}")
        values["precisions"] = precisions
    threads = values.get("threads")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise DeviceError(f"device profile {source}: threads must be a positive integer, got {threads!r}")
    speed = values.get("relative_speed", 1.0)
    if not isinstance(speed, int | float) or speed <= 0:
        raise DeviceError(f"device profile {source}: relative_speed must be > 0, got {speed!r}")
    values["relative_speed"] = float(speed)
    values["runtime_options"] = dict(values.get("runtime_options") or {})
    return DeviceProfile(**values)


def _read_yaml(path: Path | Any, source: str) -> DeviceProfile:
    import yaml

    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise DeviceError(f"device profile {source} is not valid YAML: {first_line(exc)}") from exc
    return _profile_from_mapping(raw, source)


def list_devices() -> list[DeviceProfile]:
    """The bundled profiles, ``host`` first."""
    folder = resources.files("edgeopt") / "device_profiles"
    profiles = [_read_yaml(f, f.name) for f in folder.iterdir() if f.name.endswith(".yaml")]
    return sorted(profiles, key=lambda p: (p.name != "host", p.name))


def get_device(name: str | os.PathLike[str] | DeviceProfile | None = None) -> DeviceProfile:
    """A bundled profile by name, or a profile YAML file by path; ``None`` means ``host``.

    Raises:
        DeviceError: unknown name (the message lists the known ones) or a malformed file.
    """
    if isinstance(name, DeviceProfile):
        return name
    key = "host" if name is None else str(name)
    if key.endswith((".yaml", ".yml")):
        path = Path(key)
        if not path.exists():
            raise DeviceError(f"device profile file not found: {path}")
        return _read_yaml(path, str(path))
    profiles = {p.name: p for p in list_devices()}
    if key not in profiles:
        raise DeviceError(f"unknown device profile {key!r}; known: {', '.join(profiles)} "
                          "(or give a profile .yaml file; see edgeopt devices)")
    return profiles[key]
