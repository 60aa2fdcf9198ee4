"""The edge-architecture catalogue: built for any input/classes, counted, timed and cached."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torchvision")

from edgeopt.errors import BadInput  # noqa: E402
from edgeopt.transforms.architectures import build_architecture, list_architectures, zoo  # noqa: E402

REQUIRED = {"mobilenet_v2_0.5", "mobilenet_v2_0.75", "mobilenet_v2_1.0", "mobilenet_v3_small", "mobilenet_v3_large",
            "squeezenet1_1", "efficientnet_b0", "shufflenet_v2_x0_5", "shufflenet_v2_x1_0", "mnasnet0_5",
            "mnasnet1_0"}


def test_catalogue_names_cover_the_edge_families():
    assert REQUIRED <= set(list_architectures())


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_every_network_runs_on_small_one_channel_input(name):
    # MobileNets downsample 32x: at 1x32x32 they must still produce one logit row per sample.
    net = build_architecture(name, input_size=(1, 32, 32), classes=10)
    with torch.no_grad():
        out = net(torch.zeros(2, 1, 32, 32))
    assert tuple(out.shape) == (2, 10)
    first = next(m for m in net.modules() if isinstance(m, torch.nn.Conv2d))
    assert first.in_channels == 1 and first.stride == (1, 1)


def test_non_square_many_channel_input_and_stock_stride_for_large_images():
    net = build_architecture("mobilenet_v3_small", input_size=(5, 48, 64), classes=7)
    with torch.no_grad():
        assert tuple(net(torch.zeros(1, 5, 48, 64)).shape) == (1, 7)
    big = build_architecture("mobilenet_v3_small", input_size=(3, 224, 224), classes=1000)
    assert next(m for m in big.modules() if isinstance(m, torch.nn.Conv2d)).stride == (2, 2)


def test_params_and_macs_match_the_published_figures_at_224():
    # torchvision's documented MobileNetV3-Small: 2,542,856 parameters, 0.06 GFLOPS (MACs).
    (entry,) = zoo(input_size=(3, 224, 224), classes=1000, names=["mobilenet_v3_small"], latency=False,
                   use_cache=False)
    assert entry.params == 2_542_856
    assert 50e6 < entry.macs < 65e6
    assert entry.latency_ms is None


def test_unknown_architecture_lists_the_known_ones():
    with pytest.raises(BadInput, match="unknown architecture 'resnet9000'; known: mobilenet_v2_0.5"):
        build_architecture("resnet9000", input_size=(3, 32, 32), classes=10)
    with pytest.raises(BadInput, match="too small"):
        build_architecture("squeezenet1_1", input_size=(3, 8, 8), classes=10)


@pytest.mark.slow
def test_latency_is_measured_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEOPT_CACHE", str(tmp_path))
    first = zoo(input_size=(1, 32, 32), classes=10, names=["shufflenet_v2_x0_5"], threads=1, bench_seconds=0.2)
    assert all(e.latency_ms["p50"] > 0 and e.onnx_bytes > 4 * e.params * 0.9 for e in first)
    assert not any(e.cached for e in first)
    files = sorted(p.name for p in (tmp_path / "zoo").iterdir())
    assert len(files) == 1 and all(f.endswith(".json") and not f.startswith(".") for f in files)
    again = zoo(input_size=(1, 32, 32), classes=10, names=["shufflenet_v2_x0_5"], threads=1)
    assert all(e.cached for e in again)
    assert [e.latency_ms for e in again] == [e.latency_ms for e in first]
    other = zoo(input_size=(1, 32, 32), classes=11, names=["shufflenet_v2_x0_5"], threads=1, latency=False)
    assert not other[0].cached  # a different class count is a different cache entry


def test_cli_zoo_sorted_json(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEOPT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "zoo.json"
    result = cli("zoo", "--input-size", "1x32x32", "--classes", "10", "--no-latency", "--sort", "macs",
                 "--only", "mobilenet_v3_small,squeezenet1_1,shufflenet_v2_x0_5", "--json", out)
    assert result.exit_code == 0, result.stderr
    rows = json.loads(out.read_text())
    assert [r["name"] for r in rows] == ["shufflenet_v2_x0_5", "mobilenet_v3_small", "squeezenet1_1"]
    assert np.all(np.diff([r["macs"] for r in rows]) > 0)
    assert rows[0]["input_size"] == [1, 32, 32] and rows[0]["classes"] == 10
    assert "shufflenet_v2_x0_5" in result.stdout


@pytest.mark.parametrize("args, message", [
    (["--only", "nope", "--no-latency"], "unknown architecture 'nope'; known:"),
    (["--sort", "speed", "--no-latency"], "--sort must be params, macs, latency or name"),
    (["--input-size", "3x2x", "--no-latency"], "bad size"),
    (["--sort", "latency", "--no-latency"], "--sort latency needs latency"),
])
def test_cli_zoo_bad_input_is_one_line_exit_2(cli, tmp_path, monkeypatch, args, message):
    monkeypatch.setenv("EDGEOPT_CACHE", str(tmp_path))
    result = cli("zoo", *args)
    assert result.exit_code == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_students_batchnorm_settles_in_short_training() -> None:
    torch = pytest.importorskip("torch")
    from edgeopt.transforms.architectures import BN_MOMENTUM, build_architecture

    net = build_architecture("mobilenet_v3_small", input_size=(1, 32, 32), classes=10)
    momenta = {m.momentum for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}
    assert momenta == {BN_MOMENTUM}



def test_zoo_times_each_network_once_interleaved(tmp_path, monkeypatch):
    """zoo is a catalogue listing, not a before/after pair: every uncached network is timed once, all in
    one interleaved harness run (measure.compare), and a cached listing times nothing."""
    import importlib

    bench = importlib.import_module("edgeopt.measure.bench")
    real, calls = bench.compare, []
    monkeypatch.setattr(bench, "compare", lambda models, **kw: calls.append([m.source for m in models])
                        or real(models, **kw))
    monkeypatch.setenv("EDGEOPT_CACHE", str(tmp_path))
    names = ["shufflenet_v2_x0_5", "squeezenet1_1"]
    first = zoo(input_size=(1, 32, 32), classes=10, names=names, threads=1, bench_seconds=0.1)
    assert calls == [names] and all(e.latency_ms["p50"] > 0 for e in first)
    again = zoo(input_size=(1, 32, 32), classes=10, names=names, threads=1, bench_seconds=0.1)
    assert len(calls) == 1 and all(e.cached for e in again)  # from the cache: timed again nowhere
    assert [e.latency_ms for e in again] == [e.latency_ms for e in first]
