"""Pruning: exact sparsity, channel removal with the head kept, fine-tuning, recipes, CLI and errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torch_pruning")

from edgeopt.data import Dataset, save_npz  # noqa: E402
from edgeopt.errors import ConfigError, ModelError  # noqa: E402
from edgeopt.model import load_model  # noqa: E402
from edgeopt.training import TrainSettings  # noqa: E402
from edgeopt.transforms.config import TransformContext, config_from_dict, config_to_dict  # noqa: E402
from edgeopt.transforms.prune import StructuredPrune, UnstructuredPrune, prune_module  # noqa: E402

TINY = '''
import torch
from torch import nn

INPUT_SHAPE = (1, 1, 16, 16)


class Tiny(nn.Module):
    def __init__(self, width=8):
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.conv3 = nn.Conv2d(2 * width, 4 * width, 3, stride=2, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = torch.relu(self.conv3(x))
        return self.fc(self.pool(x).flatten(1))


def build():
    torch.manual_seed(0)
    return Tiny()


def wide():
    return Tiny(width=12)


def broken():
    raise RuntimeError("needs a GPU")
'''


@pytest.fixture(scope="module")
def tiny_factory(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, Path]:
    """(spec, matching weights, weights of a wider net) of a 3-conv CNN on 1x16x16 inputs."""
    root = tmp_path_factory.mktemp("prune_tiny")
    (root / "tiny.py").write_text(TINY)
    spec = f"{root / 'tiny.py'}:build"
    model = load_model(spec)
    torch.save(model.module.state_dict(), root / "tiny.pt")
    torch.save(load_model(f"{root / 'tiny.py'}:wide").module.state_dict(), root / "wide.pt")
    return spec, root / "tiny.pt", root / "wide.pt"


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Dataset, Path]:
    """200 labelled samples whose class is the brightest of 10 horizontal bands (learnable)."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 10, 200)
    x = rng.normal(0, 0.3, (200, 1, 16, 16)).astype(np.float32)
    for i, label in enumerate(y):
        x[i, 0, label + 3, :] += 2.0
    data = Dataset({"x": x}, y.astype(np.int64), source="tiny")
    path = tmp_path_factory.mktemp("prune_data") / "tiny.npz"
    save_npz(path, data)
    return data, path


def _module(spec: str):
    return load_model(spec).module


def _example():
    return torch.zeros(1, 1, 16, 16)


# -- configs ------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5])
def test_sparsity_outside_unit_interval_is_a_config_error(bad: float) -> None:
    with pytest.raises(ConfigError, match=r"sparsity must be in \[0, 1\)"):
        UnstructuredPrune(sparsity=bad)
    with pytest.raises(ConfigError, match=r"ratio must be in \[0, 1\)"):
        StructuredPrune(ratio=bad)


def test_config_validation_and_round_trip() -> None:
    with pytest.raises(ConfigError, match="importance must be l1, l2 or taylor"):
        StructuredPrune(importance="random")
    with pytest.raises(ConfigError, match="scope must be"):
        UnstructuredPrune(scope="model")
    with pytest.raises(ConfigError, match="iterative steps must be >= 1"):
        StructuredPrune(iterative_steps=0)
    cfg = StructuredPrune(ratio=0.3, skip=("conv1",), importance="l2", train=TrainSettings(epochs=2))
    again = config_from_dict(json.loads(json.dumps(config_to_dict(cfg))))
    assert again == cfg and again.skip == ("conv1",)


def test_a_recipe_written_by_an_earlier_version_loads_the_same_config() -> None:
    """Recipes stored the training fields flat beside the technique's own; they still do, and old files load."""
    old = {"type": "StructuredPrune", "version": 1,
           "fields": {"ratio": 0.3, "target_macs": None, "target_latency_ms": None, "importance": "l2",
                      "skip": ["conv1"], "keep_head": True, "iterative_steps": 2, "round_to": None, "epochs": 2,
                      "lr": 0.005, "distill": True, "batch_size": 32, "seed": 7}}
    cfg = config_from_dict(json.loads(json.dumps(old)))
    assert cfg == StructuredPrune(ratio=0.3, importance="l2", skip=("conv1",), iterative_steps=2,
                                  train=TrainSettings(epochs=2, lr=0.005, batch_size=32, seed=7))
    assert cfg.train.weight_decay == 0.0 and cfg.train.patience is None  # fields the old file lacks: defaults
    written = config_to_dict(cfg)["fields"]
    assert "train" not in written and {k: written[k] for k in old["fields"]} == old["fields"]  # flat, as before
    assert config_from_dict({"type": "UnstructuredPrune", "fields": {"sparsity": 0.5, "epochs": 1}}) == \
        UnstructuredPrune(sparsity=0.5, train=TrainSettings(epochs=1))
    with pytest.raises(ConfigError, match="--lr must be > 0"):
        config_from_dict({"type": "UnstructuredPrune", "fields": {"lr": 0}})
    with pytest.raises(ConfigError, match="unknown field"):
        config_from_dict({"type": "UnstructuredPrune", "fields": {"epochz": 1}})


# -- unstructured -------------------------------------------------------------------------------
def test_layer_scope_prunes_exactly_the_fraction_of_each_layer(tiny_factory) -> None:
    module = _module(tiny_factory[0])
    smallest = module.conv2.weight.detach().abs().flatten().sort().values
    info = prune_module(module, UnstructuredPrune(sparsity=0.4), example=_example())
    rows = {r["layer"]: r for r in info["sparsity"]}
    assert set(rows) == {"conv1", "conv2", "conv3", "fc"}
    for name, row in rows.items():
        weight = dict(module.named_modules())[name].weight
        assert row["parameters"] == weight.numel()
        assert row["zeros"] == int((weight == 0).sum()) == round(0.4 * weight.numel())
        assert abs(row["sparsity_pct"] - 40.0) <= 50.0 / row["parameters"] + 1e-4  # only rounding of counts
    assert rows["fc"]["sparsity_pct"] == 40.0  # 320 weights: 128 zeros exactly
    # L1: what is left in conv2 is the largest 60% of the original magnitudes
    kept = module.conv2.weight.detach().abs()
    assert float(kept[kept > 0].min()) >= float(smallest[round(0.4 * smallest.numel()) - 1])
    assert not hasattr(module.conv2, "weight_orig")  # made permanent


def test_global_scope_hits_the_total_and_skip_is_respected(tiny_factory) -> None:
    module = _module(tiny_factory[0])
    before_fc = module.fc.weight.detach().clone()
    info = prune_module(module, UnstructuredPrune(sparsity=0.5, scope="global", skip=("fc",)), example=_example())
    rows = info["sparsity"]
    assert [r["layer"] for r in rows] == ["conv1", "conv2", "conv3"]
    total = sum(r["parameters"] for r in rows)
    assert sum(r["zeros"] for r in rows) == round(0.5 * total)
    assert len({r["sparsity_pct"] for r in rows}) > 1  # global: layers differ
    assert torch.equal(module.fc.weight, before_fc)


def test_unknown_layer_names_the_known_ones(tiny_factory) -> None:
    with pytest.raises(ConfigError, match="no layer named 'head'.*conv1"):
        prune_module(_module(tiny_factory[0]), UnstructuredPrune(skip=("head",)), example=_example())


@pytest.mark.slow
def test_iterative_fine_tuning_keeps_the_zeros_and_recovers(tiny_factory, tiny_data) -> None:
    from edgeopt.training import accuracy_torch

    data, _ = tiny_data
    train, held = data.split(0.7, seed=0)
    module = _module(tiny_factory[0])
    cfg = UnstructuredPrune(sparsity=0.4, iterative_steps=2, distill=False, train=TrainSettings(epochs=3, lr=5e-3))
    info = prune_module(module, cfg, example=_example(), train=train)
    assert [h["step"] for h in info["fine_tune"]] == [1, 2]
    for row in info["sparsity"]:
        assert row["zeros"] == round(0.4 * row["parameters"])
    assert accuracy_torch(module, held) > 0.3  # learned despite 40% zeros (chance: 0.1)


# -- structured ---------------------------------------------------------------------------------
def test_structured_halves_channels_keeps_head_and_skipped_layers(tiny_factory) -> None:
    from edgeopt.measure.complexity import count_macs_params

    module = _module(tiny_factory[0])
    macs0, _ = count_macs_params(module, _example())
    info = prune_module(module, StructuredPrune(ratio=0.5, skip=("conv1",)), example=_example())
    assert info["kept_whole"] == ["fc", "conv1"]
    assert module.fc.out_features == 10
    assert module.conv1.out_channels == 8
    assert module.conv2.out_channels == 8 and module.conv3.out_channels == 16
    assert module.fc.in_features == 16
    assert info["steps"][-1]["macs"] < 0.5 * macs0
    assert module(torch.zeros(3, 1, 16, 16)).shape == (3, 10)


def test_structured_target_macs_stops_at_or_below_target(tiny_factory) -> None:
    from edgeopt.measure.complexity import count_macs_params

    module = _module(tiny_factory[0])
    macs0, _ = count_macs_params(module, _example())
    info = prune_module(module, StructuredPrune(ratio=0.9, target_macs=0.6 * macs0), example=_example())
    final = count_macs_params(module, _example())[0]
    assert final <= 0.6 * macs0
    assert final > 0.2 * macs0  # stopped early, not at the 90% ceiling
    assert len(info["steps"]) < 40


def test_taylor_needs_labels_and_uses_them(tiny_factory, tiny_data) -> None:
    with pytest.raises(ConfigError, match="taylor importance needs labelled data"):
        prune_module(_module(tiny_factory[0]), StructuredPrune(importance="taylor"), example=_example())
    module = _module(tiny_factory[0])
    prune_module(module, StructuredPrune(importance="taylor", ratio=0.25), example=_example(),
                 train=tiny_data[0])
    assert module.conv2.out_channels == 12


def test_onnx_model_is_refused_with_how_to_fix(digits_onnx: Path) -> None:
    from edgeopt.transforms.prune import torch_module

    with pytest.raises(ModelError, match=r"file\.py:factory with --weights.*\.pt2"):
        torch_module(load_model(digits_onnx))


@pytest.mark.slow
def test_recipe_prunes_tunes_then_exports(tiny_factory, tiny_data) -> None:
    from edgeopt.search.recipe import Recipe, apply_recipe
    from edgeopt.transforms.export import OnnxExport

    data = tiny_data[0]
    model = load_model(tiny_factory[0], weights=tiny_factory[1])
    recipe = Recipe("prune+export", steps=(StructuredPrune(ratio=0.5, train=TrainSettings(epochs=1)), OnnxExport()))
    out = apply_recipe(model, recipe, TransformContext(train=data, teacher=model, progress=False))
    assert out.format == "onnx"
    weights = {i.name: i for i in out.onnx.graph.initializer}
    assert any(len(w.dims) == 4 and w.dims[0] == 16 for w in weights.values())  # conv3: 32 -> 16 channels
    assert model.module.conv3.out_channels == 32  # the original is untouched


def _no_measuring(monkeypatch: pytest.MonkeyPatch) -> None:
    """Timing or evaluating anything from here on fails the test: a technique must not measure itself."""
    import importlib

    bench, evaluate = (importlib.import_module(f"edgeopt.measure.{m}") for m in ("bench", "evaluate"))

    def refuse(*_a, **_k):
        raise AssertionError("a technique timed or evaluated a model")

    for module, names in ((bench, ("compare", "benchmark")), (evaluate, ("evaluate", "predict"))):
        for name in names:
            monkeypatch.setattr(module, name, refuse)


def test_the_technique_returns_a_model_and_its_facts_and_measures_nothing(tiny_factory, tiny_data,
                                                                          monkeypatch) -> None:
    from edgeopt.transforms.prune import pruned_model

    model = load_model(tiny_factory[0], weights=tiny_factory[1])
    _no_measuring(monkeypatch)
    pruned, facts = pruned_model(model, UnstructuredPrune(sparsity=0.5, train=TrainSettings(epochs=1)),
                                 train=tiny_data[0])
    assert pruned.format == "torch" and pruned.module is not model.module
    rows = {r["layer"]: r for r in facts["sparsity"]}
    assert set(rows) == {"conv1", "conv2", "conv3", "fc"} and rows["conv3"]["sparsity_pct"] == pytest.approx(50.0)
    assert facts["fine_tune"][0]["epochs_run"] == 1  # the technique's own fact: its training history
    assert "latency" not in facts and "accuracy" not in facts


# -- CLI ----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_cli_unstructured_writes_model_weights_archive_and_report(cli, tiny_factory, tiny_data, tmp_path) -> None:
    spec, weights, _ = tiny_factory
    out = tmp_path / "sparse.onnx"
    result = cli("prune", spec, "--weights", weights, "-o", out, "--sparsity", "0.4", "--eval-data",
                 tiny_data[1], "--seconds", "0.1", "--json", tmp_path / "r.json")
    assert result.exit_code == 0, result.stderr
    assert "sparsity per layer" in result.stdout and "40.00%" in result.stdout  # fc: 128 of 320
    report = json.loads((tmp_path / "sparse.report.json").read_text())
    assert json.loads((tmp_path / "r.json").read_text())["sparsity"] == report["sparsity"]
    assert {r["layer"]: r["sparsity_pct"] for r in report["sparsity"]}["fc"] == 40.0
    assert report["macs"]["before"] == report["macs"]["after"]  # zeros are still multiplied
    sizes = report["sizes"]
    assert sizes["after"]["onnx_bytes"] == pytest.approx(sizes["before"]["onnx_bytes"], rel=0.02)
    assert sizes["after"]["onnx_gzip_bytes"] < 0.9 * sizes["before"]["onnx_gzip_bytes"]
    assert report["latency"]["interleaved"] and report["latency"]["speedup_p50"] > 0
    assert 0 <= report["accuracy"]["after"] <= 1 and report["accuracy"]["samples"] == 200
    onnx_model = load_model(out)
    zeros = [int((np.frombuffer(i.raw_data, np.float32) == 0).sum()) for i in onnx_model.onnx.graph.initializer
             if len(i.dims) == 2]
    assert zeros == [round(0.4 * 320)]  # fc weights, zeros kept through export
    reloaded = load_model(spec, weights=tmp_path / "sparse.pt")  # unstructured: same architecture
    assert int((reloaded.module.conv2.weight == 0).sum()) == round(0.4 * 1152)


@pytest.mark.slow
def test_cli_structured_with_fine_tuning_round_trips_through_pt2(cli, tiny_factory, tiny_data, tmp_path) -> None:
    from edgeopt.measure.evaluate import predict

    spec, weights, _ = tiny_factory
    out = tmp_path / "slim.onnx"
    result = cli("prune", spec, "--weights", weights, "-o", out, "--sparsity", "0.5", "--structured",
                 "--importance", "l2", "--data", tiny_data[1], "--epochs", "2", "--distill", "--no-latency")
    assert result.exit_code == 0, result.stderr
    report = json.loads((tmp_path / "slim.report.json").read_text())
    assert report["macs"]["reduction_pct"] >= 45
    assert report["export_check"]["max_abs_diff"] <= 1e-4
    assert 38 <= report["accuracy"]["samples"] <= 42  # ~20% of 200 held out of the tuning data (stratified)
    assert report["data"]["tuned_on"] != report["data"]["judged_on"]
    assert len(report["fine_tune"]) == 1 and "latency" not in report
    archive = load_model(tmp_path / "slim.pt2")
    x = tiny_data[0].take(slice(0, 8))
    with torch.no_grad():
        torch_out = archive.module(torch.from_numpy(x.inputs["x"])).numpy()
    assert np.max(np.abs(predict(load_model(out), x) - torch_out)) <= 1e-4
    mismatch = cli("eval", spec, "--weights", tmp_path / "slim.pt", "--data", tiny_data[1])
    assert mismatch.exit_code == 2 and "shape mismatch" in mismatch.stderr


@pytest.mark.parametrize("sparsity", ["1.0", "-0.2"])
def test_cli_bad_sparsity_exit_2(cli, tiny_factory, tmp_path, sparsity: str) -> None:
    out = tmp_path / "x.onnx"
    result = cli("prune", tiny_factory[0], "-o", out, "--sparsity", sparsity)
    assert result.exit_code == 2
    assert result.stderr.strip().count("\n") == 0 and "sparsity must be in [0, 1)" in result.stderr
    assert "Traceback" not in result.stderr and not out.exists()


def test_cli_onnx_input_explains_how_to_give_pytorch(cli, digits_onnx, tmp_path) -> None:
    result = cli("prune", digits_onnx, "-o", tmp_path / "x.onnx", "--sparsity", "0.4")
    assert result.exit_code == 2
    assert "file.py:factory" in result.stderr and ".pt2" in result.stderr
    assert result.stderr.strip().count("\n") == 0 and not (tmp_path / "x.onnx").exists()


def test_cli_factory_that_raises_exit_2(cli, tiny_factory, tmp_path) -> None:
    spec = tiny_factory[0].replace(":build", ":broken")
    result = cli("prune", spec, "-o", tmp_path / "x.onnx", "--sparsity", "0.4")
    assert result.exit_code == 2
    assert "raised RuntimeError: needs a GPU" in result.stderr and "Traceback" not in result.stderr


def test_cli_weights_that_do_not_match_exit_2(cli, tiny_factory, tmp_path) -> None:
    spec, _, wide = tiny_factory
    result = cli("prune", spec, "--weights", wide, "-o", tmp_path / "x.onnx", "--sparsity", "0.4")
    assert result.exit_code == 2
    assert "do not match the model" in result.stderr and "shape mismatch" in result.stderr
    assert not (tmp_path / "x.onnx").exists()


def test_cli_epochs_without_data_exit_2(cli, tiny_factory, tmp_path) -> None:
    result = cli("prune", tiny_factory[0], "-o", tmp_path / "x.onnx", "--sparsity", "0.4", "--epochs", "2")
    assert result.exit_code == 2 and "--epochs needs fine-tuning data" in result.stderr
