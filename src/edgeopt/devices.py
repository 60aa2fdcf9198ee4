"""Device profiles: what a target device runs and how fast it is relative to this host.

A profile without ``ssh`` is measured on this host, with the profile's runtime and thread
count, so candidates compare fairly; ``relative_speed`` scales host timings for planning
(``split``) where the real device is not at hand. A profile with ``ssh`` names a real device:
bench, eval, quantize --mode auto and optimize run the same harness there over SSH
(runtimes/remote.py). Profiles are YAML files: the bundled ones in ``edgeopt/device_profiles/``,
the user's (``edgeopt devices add``, in :func:`user_profile_dir`), or a path the user gives.
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
# A remote device may have more cores than this host: --threads is checked against this bound when
# parsed and against the host's MAX_THREADS only for runs here (runtimes/sessions.resolve_settings).
MAX_DEVICE_THREADS = 1024


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
    # A remote device: "user@host[:port]"; key file, Python and working folder on the device.
    ssh: str | None = None
    ssh_key: str | None = None
    python: str = "python3"
    workdir: str = ".cache/edgeopt"
    known_hosts: str | None = None  # a known_hosts file other than OpenSSH's default
    accept_new_host_key: bool = False  # trust on first use (StrictHostKeyChecking=accept-new)

    def effective_threads(self) -> int:
        """Threads to use: the profile's, capped by this host's cores; on a remote device the
        profile's, or 0 for "every core the device lets the runner use" (decided there)."""
        if self.ssh:
            return self.threads or 0
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
    if values.get("ssh") is not None:
        parse_ssh(str(values["ssh"]), source=source)
        if values.get("runtime", "onnxruntime") != "onnxruntime":
            raise DeviceError(f"device profile {source}: a remote (ssh) device runs onnxruntime; "
                              f"runtime {values['runtime']!r} is not supported there yet")
    for key in ("ssh", "ssh_key", "python", "workdir", "known_hosts"):
        if key in values and values[key] is not None and not isinstance(values[key], str):
            raise DeviceError(f"device profile {source}: {key} must be a string, got {values[key]!r}")
    return DeviceProfile(**values)


def parse_ssh(spec: str, *, source: str = "--ssh") -> tuple[str | None, str, int]:
    """``user@host[:port]`` -> (user or None, host, port); IPv6 as ``user@[::1]:2222``."""
    user, sep, rest = spec.rpartition("@")
    user_part = user if sep else None
    host, port = rest, 22
    if rest.startswith("["):
        host, _, tail = rest[1:].partition("]")
        if tail:
            if not tail.startswith(":"):
                raise DeviceError(f"{source}: cannot read {spec!r}; expected user@host[:port]")
            port = _port(tail[1:], spec, source)
    elif rest.count(":") == 1:
        host, _, port_text = rest.partition(":")
        port = _port(port_text, spec, source)
    if not host or host.startswith("-") or (user_part or "").startswith("-") or any(c in host for c in " /\\'\"$`;") or (user_part is not None and not user_part) \
            or (user_part and any(c in user_part for c in " /\\'\"$`;:@")):
        raise DeviceError(f"{source}: cannot read {spec!r}; expected user@host[:port]")
    return user_part, host, port


def _port(text: str, spec: str, source: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise DeviceError(f"{source}: port in {spec!r} must be 1-65535")
    return int(text)


def user_profile_dir() -> Path:
    """Where ``edgeopt devices add`` writes profiles: $EDGEOPT_DEVICES_DIR, else
    $XDG_CONFIG_HOME/edgeopt/devices (~/.config/edgeopt/devices)."""
    explicit = os.environ.get("EDGEOPT_DEVICES_DIR")
    if explicit:
        return Path(explicit).expanduser()
    config = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config) / "edgeopt" / "devices"


def _user_profiles() -> list[DeviceProfile]:
    folder = user_profile_dir()
    if not folder.is_dir():
        return []
    return [_read_yaml(f, str(f)) for f in sorted(folder.glob("*.yaml"))]


def add_device(name: str, *, ssh: str, ssh_key: str | None = None, python: str | None = None,
               workdir: str | None = None, threads: int | None = None, memory_mb: int | None = None,
               known_hosts: str | None = None, accept_new_host_key: bool = False,
               description: str | None = None, replace: bool = False) -> Path:
    """Write a remote device profile to :func:`user_profile_dir`; its path. No password is ever stored:
    the device authenticates a key (``ssh_key``, or whatever OpenSSH offers: agent, ~/.ssh/config)."""
    import yaml

    from edgeopt.fileio import atomic_path

    if not name or not all(c.isalnum() or c in "-_." for c in name) or name.startswith("."):
        raise DeviceError(f"device name {name!r}: use letters, digits, '-', '_' or '.'")
    builtin = {p.name for p in list_devices(include_user=False)}
    if name in builtin:
        raise DeviceError(f"device name {name!r} is a bundled profile; choose another name")
    parse_ssh(ssh)
    key_path = None
    if ssh_key is not None:
        key = Path(ssh_key).expanduser()
        if not key.is_file():
            raise DeviceError(f"--key {ssh_key}: no such file (give the private key that the device accepts)")
        key_path = str(key.resolve())
    if known_hosts is not None:
        known_hosts = str(Path(known_hosts).expanduser().resolve())
    raw: dict[str, Any] = {
        "name": name, "description": description or f"remote device {ssh} (measured on the device over SSH)",
        "runtime": "onnxruntime", "threads": threads, "memory_mb": memory_mb, "ssh": ssh,
        "ssh_key": key_path, "python": python or "python3", "workdir": workdir or ".cache/edgeopt",
        "known_hosts": known_hosts, "accept_new_host_key": bool(accept_new_host_key),
    }
    _profile_from_mapping(raw, f"--ssh {ssh}")  # the same checks a profile gets when it is read
    folder = user_profile_dir()
    target = folder / f"{name}.yaml"
    if target.exists() and not replace:
        raise DeviceError(f"device {name!r} already exists ({target}); pass --replace to overwrite it")
    text = yaml.safe_dump({k: v for k, v in raw.items() if v is not None}, sort_keys=False)
    with atomic_path(target) as tmp:
        tmp.write_text(text)
    return target


def _read_yaml(path: Path | Any, source: str) -> DeviceProfile:
    import yaml

    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise DeviceError(f"device profile {source} is not valid YAML: {first_line(exc)}") from exc
    return _profile_from_mapping(raw, source)


def list_devices(*, include_user: bool = True) -> list[DeviceProfile]:
    """The bundled profiles, ``host`` first, then the user's (``edgeopt devices add``)."""
    folder = resources.files("edgeopt") / "device_profiles"
    profiles = [_read_yaml(f, f.name) for f in folder.iterdir() if f.name.endswith(".yaml")]
    bundled = sorted(profiles, key=lambda p: (p.name != "host", p.name))
    if not include_user:
        return bundled
    names = {p.name for p in bundled}
    return bundled + [p for p in _user_profiles() if p.name not in names]


def get_device(name: str | os.PathLike[str] | DeviceProfile | None = None) -> DeviceProfile:
    """A bundled or user profile by name, or a profile YAML file by path; ``None`` means ``host``.

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
                          "(or give a profile .yaml file, or add one: edgeopt devices add NAME --ssh user@host)")
    return profiles[key]
