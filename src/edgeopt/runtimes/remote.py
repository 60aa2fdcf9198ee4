"""A remote device over SSH: the system's OpenSSH client runs measure/harness.py on the device.

Why the system ``ssh``: it already does keys, agents, ``~/.ssh/config``, jump hosts and
known_hosts the way the user set them up, and edgeopt never sees or stores a password
(``BatchMode=yes``: a device that wants a password is refused, not prompted for). Host keys are
checked as OpenSSH does; a profile may name its own known_hosts file, or opt in to trust on
first use (``StrictHostKeyChecking=accept-new``).

One measurement is at most three SSH commands: ``probe`` (device facts, which files it already
has), a one-time copy of the runner (harness.py, named by its sha256), and ``run``, whose stdin
is a tar of the job and only the models/inputs the device lacks. The runner checks every file's
sha256 before renaming it into place, so a run killed mid-way leaves nothing that a later run
could trust by mistake; the next run sweeps the dead run's upload folder and copies again only
what never arrived.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import shlex
import shutil
import subprocess
import tarfile
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgeopt.devices import DeviceProfile, parse_ssh
from edgeopt.errors import DeviceError
from edgeopt.measure import harness

if TYPE_CHECKING:
    from edgeopt.measure.bench import BenchSettings
    from edgeopt.model import Model
    from edgeopt.runtimes.sessions import RunSettings

CONNECT_TIMEOUT_S = 10
_UNREACHABLE = ("connection refused", "timed out", "no route to host", "could not resolve", "network is unreachable",
                "connection closed", "connection reset", "name or service not known")
_INSTALL_RUNNER = """import hashlib, os, sys
data = sys.stdin.buffer.read()
if hashlib.sha256(data).hexdigest() != sys.argv[1]:
    sys.exit("the runner arrived damaged; run again")
os.makedirs("tmp", exist_ok=True)
tmp = os.path.join("tmp", "%d-runner.part" % os.getpid())
with open(tmp, "wb") as fh:
    fh.write(data)
os.replace(tmp, sys.argv[2])
"""


def runner_source() -> bytes:
    """The bytes copied to the device: measure/harness.py itself (one harness, host and device)."""
    return Path(harness.__file__).read_bytes()


def _remote_path(path: str) -> str:
    """Quote a device path for its shell, keeping a leading ``~/`` meaning the user's home."""
    if path == "~":
        return '"$HOME"'
    if path.startswith("~/"):
        return '"$HOME"/' + shlex.quote(path[2:])
    return shlex.quote(path)


class RemoteDevice:
    """One remote device profile: runs probe/bench/predict jobs on it and maps failures to one line."""

    def __init__(self, profile: DeviceProfile) -> None:
        if not profile.ssh:
            raise DeviceError(f"device {profile.name} is not a remote (ssh) device")
        self.profile = profile
        self.user, self.host, self.port = parse_ssh(profile.ssh, source=f"device {profile.name}")
        source = runner_source()
        self.runner_name = f"runner-{hashlib.sha256(source).hexdigest()[:16]}.py"
        self._runner_sha = hashlib.sha256(source).hexdigest()
        self.present: set[str] = set()
        self.info: dict[str, Any] | None = None

    # -- ssh --------------------------------------------------------------------------------
    @property
    def where(self) -> str:
        who = f"{self.user}@" if self.user else ""
        return f"{who}{self.host}:{self.port}"

    def ssh_argv(self, command: str) -> list[str]:
        ssh = shutil.which("ssh")
        if ssh is None:
            raise DeviceError("the OpenSSH client (ssh) is not installed here: install openssh-client")
        argv = [ssh, "-p", str(self.port), "-o", "BatchMode=yes", "-o", f"ConnectTimeout={CONNECT_TIMEOUT_S}",
                "-o", "ServerAliveInterval=10", "-o", "ServerAliveCountMax=3", "-o", "LogLevel=ERROR"]
        if self.profile.ssh_key:
            key = Path(self.profile.ssh_key).expanduser()
            if not key.is_file():
                raise DeviceError(f"device {self.profile.name}: key file {key} does not exist "
                                  f"(edit {self.profile.name}.yaml or run edgeopt devices add again)")
            argv += ["-i", str(key), "-o", "IdentitiesOnly=yes"]
        if self.profile.known_hosts:
            argv += ["-o", f"UserKnownHostsFile={Path(self.profile.known_hosts).expanduser()}"]
        if self.profile.accept_new_host_key:
            argv += ["-o", "StrictHostKeyChecking=accept-new"]
        destination = f"{self.user}@{self.host}" if self.user else self.host
        return [*argv, "--", destination, command]

    def _ssh(self, command: str, stdin: bytes = b"", *, timeout: float | None = None) -> subprocess.CompletedProcess:
        try:
            done = subprocess.run(self.ssh_argv(command), input=stdin, capture_output=True, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise DeviceError(f"device {self.profile.name} ({self.where}) did not answer within {timeout:.0f} s; "
                              "nothing was kept: run again") from exc
        if done.returncode == 255:
            raise self._ssh_error(done.stderr.decode(errors="replace"))
        return done

    def _ssh_error(self, stderr: str) -> DeviceError:
        name, lines = self.profile.name, [ln.strip() for ln in stderr.splitlines() if ln.strip()]
        text = " ".join(lines).lower()
        last = lines[-1] if lines else "no message"
        if "host key verification failed" in text or "remote host identification has changed" in text:
            kh = self.profile.known_hosts or "~/.ssh/known_hosts"
            return DeviceError(f"device {name}: the host key of {self.where} is not the one in {kh} (or not there yet): "
                               f"check it and add it (ssh-keyscan -p {self.port} {self.host} >> {kh}), "
                               "or re-add the device with --accept-new-host-key")
        if "permission denied" in text or "too many authentication failures" in text:
            key = self.profile.ssh_key or "the keys ssh offers by default"
            return DeviceError(f"device {name}: {self.where} refused the key ({key}): "
                               f"authorize it on the device (ssh-copy-id -p {self.port} {self.where.rsplit(':', 1)[0]})")
        if any(marker in text for marker in _UNREACHABLE):
            return DeviceError(f"device {name}: cannot reach {self.where}: {last}")
        return DeviceError(f"device {name}: ssh to {self.where} failed: {last}")

    # -- runner -------------------------------------------------------------------------------
    def _in_workdir(self, tail: str) -> str:
        """A device shell command: make and enter the workdir, check the runner, run ``tail``."""
        w = _remote_path(self.profile.workdir)
        no_runner = shlex.quote(json.dumps({"ok": False, "kind": "no_runner"}))
        return (f"mkdir -p {w} && cd {w} && {{ test -f {self.runner_name} || {{ echo {no_runner}; exit 0; }}; }}"
                f" && {tail}; rc=$?; exit $rc")

    def _python(self) -> str:
        return _remote_path(self.profile.python)

    def _install_runner(self) -> None:
        w = _remote_path(self.profile.workdir)
        command = (f"mkdir -p {w} && cd {w} && {self._python()} -c {shlex.quote(_INSTALL_RUNNER)} "
                   f"{self._runner_sha} {self.runner_name}; rc=$?; exit $rc")
        done = self._ssh(command, runner_source(), timeout=120)
        if done.returncode != 0:
            raise self._exit_error(done)

    def _exit_error(self, done: subprocess.CompletedProcess) -> DeviceError:
        name, rc = self.profile.name, done.returncode
        err = [ln for ln in done.stderr.decode(errors="replace").splitlines() if ln.strip()]
        if rc == 127:
            return DeviceError(f"device {name}: Python {self.profile.python!r} was not found on {self.where}: "
                               "install python3 there or pass --python to edgeopt devices add")
        if rc in (137, -9) or rc > 128:
            hint = ": out of memory?" if rc in (137, -9) else ""
            return DeviceError(f"device {name}: the run was killed on the device (exit {rc}{hint}); nothing was "
                               "kept: run again (files that arrived complete are reused)")
        return DeviceError(f"device {name}: the runner failed (exit {rc}): {err[-1] if err else 'no message'}")

    def _call(self, args: str, stdin: bytes = b"", *, timeout: float | None = None) -> dict[str, Any]:
        """Run the runner with ``args``; its JSON reply (installing the runner once if absent)."""
        for attempt in range(2):
            done = self._ssh(self._in_workdir(f"{self._python()} {self.runner_name} {args}"), stdin, timeout=timeout)
            reply = _last_json(done.stdout)
            if reply is None:
                raise self._exit_error(done)
            if reply.get("kind") == "no_runner" and attempt == 0:
                self._install_runner()
                continue
            if reply.get("info"):
                self.info = reply["info"]
            return reply
        raise DeviceError(f"device {self.profile.name}: the runner could not be installed in {self.profile.workdir}")

    def _fail(self, reply: dict[str, Any]) -> DeviceError:
        name, kind, error = self.profile.name, reply.get("kind"), reply.get("error", "")
        if kind == "missing_module":
            package = reply.get("package", "onnxruntime")
            return DeviceError(f"device {name}: {package} is not installed for {self.profile.python} on {self.where}: "
                               f"run there: {self.pip_command([package])}")
        if kind == "oom":
            return DeviceError(f"device {name} ran out of memory: {error}")
        if kind == "no_runner":
            return DeviceError(f"device {name}: the runner could not be installed in {self.profile.workdir} "
                               f"on {self.where} (is the folder writable?)")
        return DeviceError(f"device {name}: {error}")

    def pip_command(self, packages: list[str]) -> str:
        """The pip command that installs ``packages`` on the device, pinned to this host's versions."""
        pinned = []
        for p in packages:
            version = harness.package_version(p)
            pinned.append(f"{p}=={version}" if version else p)
        return f"{self.profile.python} -m pip install {' '.join(pinned)}"

    # -- jobs -------------------------------------------------------------------------------
    def probe(self, names: list[str] | None = None) -> dict[str, Any]:
        """Device facts (harness.device_info) and which of ``names`` ("models/<sha>") it already holds."""
        reply = self._call("probe " + " ".join(names or []), timeout=60)
        if not reply.get("ok"):
            raise self._fail(reply)
        self.present.update(reply.get("present", []))
        return reply

    def _ensure_ready(self, files: dict[str, bytes]) -> None:
        unknown = [n for n in files if n not in self.present]
        if self.info is None or unknown:
            self.probe(unknown)
        info = self.info or {}
        missing = [p for p, ok in (("numpy", info.get("numpy")),
                                   ("onnxruntime", (info.get("runtimes") or {}).get("onnxruntime"))) if not ok]
        if missing:
            raise DeviceError(f"device {self.profile.name}: {' and '.join(missing)} not installed for "
                              f"{self.profile.python} on {self.where}: run there: {self.pip_command(missing)}")

    def run(self, job: dict[str, Any], files: dict[str, bytes], *, timeout: float | None) -> dict[str, Any]:
        """Send ``job`` and the ``files`` the device lacks; its reply (the device re-asked once for
        files that vanished since the probe)."""
        self._ensure_ready(files)
        send = {n: b for n, b in files.items() if n not in self.present}
        for attempt in range(2):
            reply = self._call("run", _tar(job, send), timeout=timeout)
            if reply.get("ok"):
                self.present.update(files)
                return reply
            if reply.get("kind") == "missing_files" and attempt == 0:
                wanted = set(reply.get("missing", []))
                self.present.difference_update(wanted)
                send = {n: b for n, b in files.items() if n in wanted}
                continue
            raise self._fail(reply)
        raise DeviceError(f"device {self.profile.name}: files kept disappearing from {self.profile.workdir}")

    def measured_on(self, runtime: str) -> dict[str, Any]:
        from edgeopt.measure.bench import where_from_info

        where = where_from_info(self.profile.name, self.info or {}, runtime, remote=True)
        where["ssh"] = self.where
        return where

    def bench(self, models: list[Model], feeds: list[dict[str, np.ndarray]], settings: list[RunSettings],
              cfg: BenchSettings) -> dict[str, Any]:
        """Time ``models`` interleaved on the device (harness.interleaved there); raw per-model results."""
        files: dict[str, bytes] = {}
        specs = []
        for model, rs in zip(models, settings, strict=True):
            name, payload = _model_file(model, self.profile.name)
            files[name] = payload
            specs.append({"sha": name.split("/", 1)[1], "threads": rs.threads or None, "options": rs.options,
                          "runtime": rs.runtime})
        for rs in settings:
            if rs.runtime != "onnxruntime":
                raise DeviceError(f"device {self.profile.name}: the device runner runs onnxruntime, not {rs.runtime}")
        arrays = {f"{i}/{k}": v for i, f in enumerate(feeds) for k, v in f.items()}
        data_name, data_bytes = _npz_file(arrays)
        files[data_name] = data_bytes
        job = {"kind": "bench", "models": specs, "data": [data_name.split("/", 1)[1]],
               "settings": asdict(cfg)}
        budget = cfg.max_seconds * len(models) * 2 + 30 * len(models) + 300
        reply = self.run(job, files, timeout=budget)
        return {"results": reply["results"], "measured_on": self.measured_on(settings[0].runtime)}

    def predict(self, model: Model, inputs: dict[str, np.ndarray], *, step: int, fixed: bool,
                settings: RunSettings) -> np.ndarray:
        """The model's first output for every sample, computed on the device."""
        if settings.runtime != "onnxruntime":
            raise DeviceError(f"device {self.profile.name}: the device runner runs onnxruntime, not {settings.runtime}")
        name, payload = _model_file(model, self.profile.name)
        data_name, data_bytes = _npz_file(inputs)
        job = {"kind": "predict", "models": [{"sha": name.split("/", 1)[1], "threads": settings.threads or None,
                                              "options": settings.options}],
               "data": [data_name.split("/", 1)[1]], "step": step, "fixed": fixed}
        reply = self.run(job, {name: payload, data_name: data_bytes}, timeout=None)
        raw = base64.b64decode(reply["outputs"])
        return np.load(io.BytesIO(raw), allow_pickle=False)


def _last_json(stdout: bytes) -> dict[str, Any] | None:
    for line in reversed(stdout.decode(errors="replace").splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except ValueError:
                return None
            return value if isinstance(value, dict) else None
    return None


def _model_file(model: Model, device: str) -> tuple[str, bytes]:
    if model.format != "onnx":
        raise DeviceError(f"device {device}: the device runner takes ONNX models; {model.source} is {model.format}")
    from edgeopt.model import _has_external_data

    if _has_external_data(model.onnx):
        raise DeviceError(f"device {device}: {model.source} keeps its weights in external files; "
                          "save it as one .onnx file to measure it on a device")
    payload = model.serialized()
    return f"models/{hashlib.sha256(payload).hexdigest()}", payload


def _npz_file(arrays: dict[str, np.ndarray]) -> tuple[str, bytes]:
    buf = io.BytesIO()
    np.savez(buf, **{k: np.ascontiguousarray(v) for k, v in arrays.items()})
    payload = buf.getvalue()
    return f"data/{hashlib.sha256(payload).hexdigest()}", payload


def _tar(job: dict[str, Any], files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, payload in [("job.json", json.dumps(job).encode()),
                              *((n + (".onnx" if n.startswith("models/") else ".npz"), b) for n, b in files.items())]:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


_DEVICES: dict[tuple[Any, ...], RemoteDevice] = {}


def remote_device(profile: DeviceProfile) -> RemoteDevice:
    """The process-wide RemoteDevice for ``profile`` (it remembers which files the device holds)."""
    key = (profile.name, profile.ssh, profile.ssh_key, profile.python, profile.workdir)
    if key not in _DEVICES:
        _DEVICES[key] = RemoteDevice(profile)
    return _DEVICES[key]


def check_device(profile: DeviceProfile) -> dict[str, Any]:
    """What ``edgeopt devices check`` reports: the device's facts, what is missing and the fix."""
    device = RemoteDevice(profile)
    info = device.probe()["info"]
    host_info = harness.device_info()
    runtimes = info.get("runtimes") or {}
    missing = [p for p, ok in (("numpy", info.get("numpy")), ("onnxruntime", runtimes.get("onnxruntime"))) if not ok]
    notes = []
    host_ort = (host_info.get("runtimes") or {}).get("onnxruntime") or {}
    dev_ort = runtimes.get("onnxruntime") or {}
    if dev_ort and host_ort and dev_ort.get("version") != host_ort.get("version"):
        notes.append(f"onnxruntime {dev_ort.get('version')} on the device, {host_ort.get('version')} here: "
                     "outputs may differ slightly from a host run")
    if profile.memory_mb and info.get("memory_mb") and info["memory_mb"] < profile.memory_mb:
        notes.append(f"the profile says {profile.memory_mb} MB but the device has {info['memory_mb']} MB")
    return {"device": profile.name, "ssh": device.where, "python": profile.python, "workdir": profile.workdir,
            "runner": device.runner_name, "info": info, "missing": missing,
            "fix": device.pip_command(missing) if missing else None, "ready": not missing, "notes": notes}
