"""A plain PyTorch factory (``forward(self, x)``, no declared inputs) runs on data keyed ``x``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

FACTORY = '''
import torch.nn as nn

class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))
'''


@pytest.fixture
def plain_factory(tmp_path: Path) -> tuple[str, Path, Path]:
    torch = pytest.importorskip("torch")
    (tmp_path / "digit_model.py").write_text(FACTORY)
    import importlib.util

    spec = importlib.util.spec_from_file_location("digit_model_under_test", tmp_path / "digit_model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    torch.manual_seed(0)
    net = mod.CNN().eval()
    torch.save(net.state_dict(), tmp_path / "digit.pth")
    x = np.random.default_rng(0).random((12, 1, 8, 8), dtype=np.float32)
    with torch.no_grad():
        labels = net(torch.from_numpy(x)).argmax(1).numpy()
    np.savez(tmp_path / "test.npz", x=x, y=labels)
    return f"{tmp_path / 'digit_model.py'}:CNN", tmp_path / "digit.pth", tmp_path / "test.npz"


def test_eval_of_a_plain_factory_through_the_cli(cli, plain_factory) -> None:
    spec, weights, data = plain_factory
    result = cli("eval", spec, "--weights", str(weights), "--data", str(data), "--json", "-")
    assert result.exit_code == 0, result.output
    assert '"accuracy": 1.0' in result.stdout  # labels are the model's own predictions


def test_data_that_does_not_match_forward_is_one_line(plain_factory) -> None:
    from edgeopt.errors import BadInput
    from edgeopt.model import load_model
    from edgeopt.runtimes.torch_eager import TorchEager

    spec, weights, _ = plain_factory
    session = TorchEager().load(load_model(spec, weights=str(weights)))
    assert session.input_names == ["x"]
    x = np.zeros((1, 1, 8, 8), np.float32)
    assert session.run({"anything": x})[0].shape == (1, 10)  # one array, one parameter: by position
    with pytest.raises(BadInput, match=r"forward takes \['x'\]"):
        session.run({"a": x, "b": x})
