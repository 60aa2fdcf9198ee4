"""Remote devices over SSH, against a real OpenSSH server on 127.0.0.1.

The fixture starts Debian's ``sshd`` in the foreground with its own config (a fresh host key,
key-only login for the user running the tests, this file's own authorized_keys); "the device"
is this interpreter (numpy + onnxruntime) reached through it. Only loopback addresses are used.
The tests skip, saying why, only when sshd or ssh-keygen is absent (.ci/run installs
openssh-server where it can).
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import make_onnx_cnn

SSHD = shutil.which("sshd") or next((p for p in ("/usr/sbin/sshd", "/usr/local/sbin/sshd") if os.path.exists(p)), None)
KEYGEN = shutil.which("ssh-keygen")
pytestmark = pytest.mark.skipif(SSHD is None or KEYGEN is None or shutil.which("ssh") is None,
                                reason="OpenSSH server/client not installed (apt-get install openssh-server); "
                                       ".ci/run installs it when it can")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _keygen(path: Path) -> Path:
    subprocess.run([KEYGEN, "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return path


class Sshd:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.user = getpass.getuser()
        self.host_key = _keygen(root / "host_key")
        self.user_key = _keygen(root / "user_key")
        (root / "authorized_keys").write_text((root / "user_key.pub").read_text())
        self.proc: subprocess.Popen | None = None
        self.port = 0

    def start(self) -> None:
        if os.geteuid() == 0:
            os.makedirs("/run/sshd", exist_ok=True)  # privilege separation directory
        for _ in range(5):
            self.port = _free_port()
            config = self.root / "sshd_config"
            config.write_text("\n".join([
                f"Port {self.port}", "ListenAddress 127.0.0.1", f"HostKey {self.host_key}",
                f"AuthorizedKeysFile {self.root / 'authorized_keys'}", "StrictModes no", "UsePAM no",
                "PasswordAuthentication no", "KbdInteractiveAuthentication no", "PubkeyAuthentication yes",
                "PermitRootLogin prohibit-password", "PidFile none", "LogLevel ERROR", f"AllowUsers {self.user}",
                "MaxStartups 50", ""]))
            self.proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stdout=subprocess.DEVNULL,
                                         stderr=open(self.root / "sshd.log", "ab"))
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                    break
                except OSError:
                    time.sleep(0.05)
            if self.proc.poll() is None:
                pub = (self.root / "host_key.pub").read_text().split()
                self.known_hosts = self.root / "known_hosts"
                self.known_hosts.write_text(f"[127.0.0.1]:{self.port} {pub[0]} {pub[1]}\n")
                return
        raise RuntimeError(f"sshd did not start: {(self.root / 'sshd.log').read_text()[-500:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=10)


@pytest.fixture(scope="session")
def sshd(tmp_path_factory):
    server = Sshd(tmp_path_factory.mktemp("sshd"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def devices_dir(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "devices"
    monkeypatch.setenv("EDGEOPT_DEVICES_DIR", str(folder))
    return folder


def add(sshd: Sshd, name: str, workdir: Path, *, port: int | None = None, key: Path | None = None,
        python: str | None = None, known_hosts: Path | None = None) -> str:
    from edgeopt.devices import add_device

    add_device(name, ssh=f"{sshd.user}@127.0.0.1:{port or sshd.port}", ssh_key=str(key or sshd.user_key),
               python=python or sys.executable, workdir=str(workdir),
               known_hosts=str(known_hosts or sshd.known_hosts))
    return name


@pytest.fixture
def board(sshd, devices_dir, tmp_path) -> str:
    """A device profile for this interpreter over SSH, with its own workdir."""
    return add(sshd, "board", tmp_path / "device-work")


FAST = dict(warmup=3, min_runs=30, min_seconds=0.4, max_seconds=5.0)


# ----------------------------------------------------------------------------- profiles (no ssh needed)

def test_parse_ssh_reads_user_host_port() -> None:
    from edgeopt.devices import parse_ssh
    from edgeopt.errors import DeviceError

    assert parse_ssh("pi@10.0.0.7") == ("pi", "10.0.0.7", 22)
    assert parse_ssh("pi@127.0.0.1:2222") == ("pi", "127.0.0.1", 2222)
    assert parse_ssh("[::1]:2200") == (None, "::1", 2200)
    for bad in ("pi@host:0", "pi@host:99999", "pi@", "@host", "pi@-oProxyCommand=x", "pi@ho st", "a;b@host"):
        with pytest.raises(DeviceError):
            parse_ssh(bad)


def test_devices_add_writes_a_profile_without_secrets(cli, devices_dir, tmp_path) -> None:
    key = _keygen(tmp_path / "k")
    result = cli("devices", "add", "pi", "--ssh", "pi@127.0.0.1:2222", "--key", str(key), "--python",
                 "/home/pi/venv/bin/python", "--threads", "4")
    assert result.exit_code == 0, result.output
    import yaml

    saved = yaml.safe_load((devices_dir / "pi.yaml").read_text())
    assert saved["ssh"] == "pi@127.0.0.1:2222" and saved["ssh_key"] == str(key.resolve())
    assert saved["python"] == "/home/pi/venv/bin/python" and saved["threads"] == 4
    assert "BEGIN OPENSSH PRIVATE KEY" not in (devices_dir / "pi.yaml").read_text()
    listed = json.loads(cli("devices", "--json", "-").stdout)
    assert [p["ssh"] for p in listed if p["name"] == "pi"] == ["pi@127.0.0.1:2222"]
    again = cli("devices", "add", "pi", "--ssh", "pi@127.0.0.1")
    assert again.exit_code == 2 and "already exists" in again.stderr and "--replace" in again.stderr
    for args, words in [(["bad", "--ssh", "pi@host:70000"], "port"), (["rpi4", "--ssh", "pi@host"], "bundled"),
                        (["k2", "--ssh", "pi@host", "--key", str(tmp_path / "nokey")], "no such file")]:
        bad = cli("devices", "add", *args)
        assert bad.exit_code == 2 and words in bad.stderr, bad.output
        assert len(bad.stderr.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- against the real sshd

def test_devices_check_reports_the_device(cli, board) -> None:
    result = cli("devices", "check", board, "--json", "-")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    info = report["info"]
    assert report["ready"] is True and report["missing"] == []
    assert info["python_executable"] == sys.executable or Path(info["python_executable"]).resolve() == \
        Path(sys.executable).resolve()
    import onnxruntime

    assert info["runtimes"]["onnxruntime"]["version"] == onnxruntime.__version__
    assert info["usable_cores"] == len(os.sched_getaffinity(0)) and info["memory_mb"] > 0
    assert "ready: edgeopt bench MODEL --device board" in result.output


def test_eval_on_the_device_equals_a_local_run(cli, board, tmp_path) -> None:
    from edgeopt.data import load_data
    from edgeopt.measure.evaluate import evaluate
    from edgeopt.model import load_model

    model = load_model(make_onnx_cnn(tmp_path / "m.onnx", size=8))
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.standard_normal((70, 1, 8, 8)).astype(np.float32),
             y=rng.integers(0, 10, 70))
    data = load_data(tmp_path / "d.npz")
    remote = evaluate(model, data, device=board, threads=1, keep_outputs=True)
    local = evaluate(model, data, threads=1, keep_outputs=True)
    np.testing.assert_allclose(remote.outputs, local.outputs, rtol=1e-6, atol=1e-6)
    assert remote.accuracy == local.accuracy
    assert remote.measured_on["device"] == board and remote.measured_on["remote"] is True
    # the CLI: same figures, and it says where they were measured
    result = cli("eval", str(tmp_path / "m.onnx"), "--data", str(tmp_path / "d.npz"), "--device", board,
                 "--threads", "1", "--json", "-")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["accuracy"] == pytest.approx(local.accuracy)
    assert payload["measured_on"]["device"] == board
    assert payload["measured_on"]["ssh"].startswith(getpass.getuser() + "@127.0.0.1:")
    assert "measured on board" in result.output


def test_bench_on_the_device_matches_local_ratios_and_copies_once(board, tmp_path) -> None:
    from edgeopt.measure.bench import BenchSettings, compare, speedup_interval
    from edgeopt.model import load_model
    from edgeopt.runtimes.remote import remote_device

    small = load_model(make_onnx_cnn(tmp_path / "small.onnx", channels=4, size=16))
    big = load_model(make_onnx_cnn(tmp_path / "big.onnx", channels=64, size=64))
    cfg = BenchSettings(**FAST)
    remote = compare([small, big], settings=cfg, device=board, threads=1)
    local = compare([small, big], settings=cfg, threads=1)
    r_remote = remote[1].latency_ms["p50"] / remote[0].latency_ms["p50"]
    r_local = local[1].latency_ms["p50"] / local[0].latency_ms["p50"]
    assert r_remote > 2 and r_local > 2, (r_remote, r_local)  # the big model is clearly slower on both
    assert 0.6 < r_remote / r_local < 1.6, (r_remote, r_local)  # same machine: within noise
    assert speedup_interval(remote[0], remote[1]) is not None and remote[0].runs >= 30
    assert remote[0].measured_on["device"] == board and remote[0].peak_rss_mb > 0
    # content-addressed: the models are on the device under their sha256, a re-run sends nothing new
    device = remote_device(__import__("edgeopt").get_device(board))
    workdir = tmp_path / "device-work"
    stored = sorted(p.name for p in (workdir / "models").iterdir())
    assert stored == sorted(hashlib.sha256(m.serialized()).hexdigest() + ".onnx" for m in (small, big))
    mtimes = {p: p.stat().st_mtime_ns for p in (workdir / "models").iterdir()}
    device.present.clear()  # forget what this process knows: the device's own files must suffice
    compare([small, big], settings=BenchSettings(warmup=1, min_runs=5, min_seconds=0.05), device=board, threads=1)
    assert {p: p.stat().st_mtime_ns for p in (workdir / "models").iterdir()} == mtimes
    assert not any((workdir / "tmp").iterdir())


@pytest.mark.slow
def test_optimize_per_device_end_to_end(cli, board, tmp_path) -> None:
    """optimize --device board,host: each device times and judges the candidates itself and chooses by
    its own figures (OUT/board/, OUT/host/); the device's accuracy equals the host's (same outputs)."""
    model = make_onnx_cnn(tmp_path / "m.onnx", channels=16, size=16)
    from edgeopt.model import load_model
    from edgeopt.runtimes import get_runtime

    x = np.random.default_rng(1).standard_normal((60, 1, 16, 16)).astype(np.float32)
    session = get_runtime("onnxruntime").load(load_model(model), threads=1)
    np.savez(tmp_path / "d.npz", x=x, y=np.argmax(session.run({"input": x})[0], axis=1))
    recipes = tmp_path / "recipes.json"
    recipes.write_text(json.dumps([
        {"name": "int8-qdq", "steps": [{"type": "StaticInt8", "fields": {"format": "qdq"}}], "needs": ["calibration"]},
        {"name": "fp16", "steps": [{"type": "Fp16", "fields": {}}]}]))
    out = tmp_path / "opt"
    result = cli("optimize", str(model), "--data", str(tmp_path / "d.npz"), "-o", str(out), "--device",
                 f"{board},host", "--recipes", str(recipes), "--seconds", "0.3", "--json", "-")
    assert result.exit_code in (0, 3), result.output
    payload = json.loads(result.stdout)["devices"]
    assert set(payload) == {board, "host"}
    remote, local = (json.loads((out / name / "report.json").read_text()) for name in (board, "host"))
    assert remote["measured_on"]["device"] == board and remote["measured_on"]["remote"] is True
    assert local["measured_on"]["device"] == "host" and local["measured_on"]["remote"] is False
    assert any("measured on the device board" in n for n in remote["notes"])
    assert "Measured on board" in (out / board / "report.md").read_text()
    for name in ("original", "int8-qdq", "fp16"):  # same outputs on the device: same accuracy and agreement
        r = next(c for c in [remote["baseline"], *remote["candidates"]] if c["name"] == name)
        h = next(c for c in [local["baseline"], *local["candidates"]] if c["name"] == name)
        assert r["accuracy"] == pytest.approx(h["accuracy"]) and r["agreement"] == pytest.approx(h["agreement"])
        assert r["latency_ms"]["p50"] > 0
    if result.exit_code == 0:
        assert remote["chosen"] and (out / board / "model.onnx").exists()


# ----------------------------------------------------------------------------- bad targets: one line, exit 2

def _one_line_exit_2(result, *words: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output
    for word in words:
        assert word in lines[0], lines[0]


def test_wrong_port_wrong_key_unknown_host_key(cli, sshd, devices_dir, tmp_path) -> None:
    model = str(make_onnx_cnn(tmp_path / "m.onnx"))
    out = tmp_path / "out.json"
    add(sshd, "closed", tmp_path / "w1", port=_free_port())
    _one_line_exit_2(cli("bench", model, "--device", "closed", "--json", str(out)), "cannot reach", "closed")
    add(sshd, "stranger", tmp_path / "w2", key=_keygen(tmp_path / "other_key"))
    _one_line_exit_2(cli("bench", model, "--device", "stranger", "--json", str(out)), "refused the key",
                     "ssh-copy-id")
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    add(sshd, "unknown", tmp_path / "w3", known_hosts=empty)
    _one_line_exit_2(cli("devices", "check", "unknown"), "host key", "ssh-keyscan")
    assert not out.exists()
    assert not (tmp_path / "w1").exists() and not (tmp_path / "w2").exists() and not (tmp_path / "w3").exists()


def test_python_without_onnxruntime_names_the_pip_command(cli, sshd, devices_dir, tmp_path) -> None:
    bare = shutil.which("python3", path="/usr/bin:/bin") or "/usr/bin/python3"
    probe = subprocess.run([bare, "-c", "import onnxruntime"], capture_output=True)
    if probe.returncode == 0:
        pytest.skip(f"{bare} has onnxruntime: no bare Python to stand for the device")
    add(sshd, "bare", tmp_path / "w", python=bare)
    model = str(make_onnx_cnn(tmp_path / "m.onnx"))
    _one_line_exit_2(cli("bench", model, "--device", "bare"), "onnxruntime", f"{bare} -m pip install",
                     "onnxruntime==")
    _one_line_exit_2(cli("devices", "check", "bare"), "missing", "pip install")
    _one_line_exit_2(cli("bench", model, "--device", "nosuch"), "unknown device profile")
    add(sshd, "nopython", tmp_path / "w2", python=str(tmp_path / "no" / "python3"))
    _one_line_exit_2(cli("bench", model, "--device", "nopython"), "was not found")


@pytest.mark.slow
def test_a_device_that_dies_mid_run_leaves_nothing_half_done(cli, sshd, devices_dir, tmp_path) -> None:
    """The runner is SIGKILLed while it times (as the OOM killer would): one line, exit 2, no local
    JSON, and the next run on a healthy Python sweeps the dead run's upload folder and succeeds."""
    dying = tmp_path / "dying-python"
    dying.write_text(f"""#!/bin/sh
if [ "$2" = run ]; then
  exec 3<&0  # a background job's stdin would be /dev/null: hand it the upload explicitly
  {sys.executable} "$@" <&3 & child=$!
  sleep 2; kill -9 $child; wait $child; exit $?
fi
exec {sys.executable} "$@"
""")
    dying.chmod(0o755)
    work = tmp_path / "w"
    add(sshd, "dies", work, python=str(dying))
    model = make_onnx_cnn(tmp_path / "m.onnx", channels=32, size=32)
    out = tmp_path / "bench.json"
    result = cli("bench", str(model), "--device", "dies", "--seconds", "30", "--json", str(out))
    _one_line_exit_2(result, "killed on the device", "run again")
    assert not out.exists()
    for kind in ("models", "data"):  # whatever arrived is whole: each file's content is its name
        for f in (work / kind).iterdir() if (work / kind).exists() else []:
            assert hashlib.sha256(f.read_bytes()).hexdigest() == f.name.split(".")[0]
    # a stale upload folder of a dead run, as a kill during the copy leaves it
    stale = work / "tmp" / "999999-dead"
    stale.mkdir(parents=True, exist_ok=True)
    (stale / ("0" * 64 + ".onnx")).write_bytes(b"half a model")
    from edgeopt.devices import add_device

    add_device("dies", ssh=f"{sshd.user}@127.0.0.1:{sshd.port}", ssh_key=str(sshd.user_key), python=sys.executable,
               workdir=str(work), known_hosts=str(sshd.known_hosts), replace=True)
    again = cli("bench", str(model), "--device", "dies", "--seconds", "0.3", "--runs", "10", "--json", str(out))
    assert again.exit_code == 0, again.output
    assert json.loads(out.read_text())["measured_on"]["device"] == "dies"
    assert not any((work / "tmp").iterdir())


def _huge_buffer_model(path: Path, floats: int) -> Path:
    """A tiny file whose run needs ``floats`` float32s at once (ConstantOfShape, then a sum)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Mul", ["s", "n"], ["big_shape"]),
             helper.make_node("ConstantOfShape", ["big_shape"], ["big"],
                              value=numpy_helper.from_array(np.ones(1, np.float32))),
             helper.make_node("ReduceSum", ["big"], ["y"], keepdims=0)]
    graph = helper.make_graph(nodes, "huge", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])],
                              initializer=[numpy_helper.from_array(np.array([floats], np.int64), "n")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


@pytest.mark.slow
def test_a_device_out_of_memory_is_one_line(cli, sshd, devices_dir, tmp_path) -> None:
    """The device's Python may use 700 MB of address space; the model needs 1.2 GB at run time."""
    small = tmp_path / "small-python"
    small.write_text(f"#!/bin/sh\nulimit -v 700000\nexec {sys.executable} \"$@\"\n")
    small.chmod(0o755)
    add(sshd, "tiny", tmp_path / "w", python=str(small))
    model = _huge_buffer_model(tmp_path / "huge.onnx", 300_000_000)
    out = tmp_path / "bench.json"
    _one_line_exit_2(cli("bench", str(model), "--device", "tiny", "--runs", "1", "--seconds", "0", "--json", str(out)),
                     "tiny ran out of memory")
    assert not out.exists() and not any((tmp_path / "w" / "tmp").iterdir())


@pytest.mark.slow
def test_split_measures_a_remote_device_speed(cli, board, tmp_path) -> None:
    """split plans with the device's measured speed (whole model timed there), not the profile's guess."""
    model = make_onnx_cnn(tmp_path / "m.onnx", channels=16, size=32)
    out = tmp_path / "parts"
    result = cli("split", str(model), "--devices", f"{board},host", "--link-mbps", "1000", "-o", str(out))
    assert result.exit_code == 0, result.output
    plan = json.loads((out / "plan.json").read_text())
    speed = plan["measured_speeds"][board]
    assert speed["measured_on"]["device"] == board and speed["device_whole_model_ms"] > 0
    assert speed["relative_speed"] == pytest.approx(speed["host_whole_model_ms"] / speed["device_whole_model_ms"])
    assert 0.2 < speed["relative_speed"] < 5  # the same machine behind the ssh
    assert plan["stages"][0]["device"] == board
    assert plan["stages"][0]["relative_speed"] == pytest.approx(speed["relative_speed"])
