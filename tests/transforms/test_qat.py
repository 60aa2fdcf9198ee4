"""QAT: fine-tune through INT8 fake quantization with the FP32 model as teacher, exported to the
same INT8 ONNX graph as post-training quantization."""

from __future__ import annotations

import numpy as np
import pytest

from edgeopt.data import Dataset
from edgeopt.errors import BadInput, ConfigError
from edgeopt.measure.evaluate import accuracy_of, predict
from edgeopt.model import Model
from edgeopt.transforms.export import OnnxExport, to_onnx
from edgeopt.transforms.qat import QatConfig, qat_finetune, qat_int8
from edgeopt.transforms.quantize import StaticInt8, quantize

torch = pytest.importorskip("torch")
sklearn = pytest.importorskip("sklearn.datasets")


@pytest.fixture(scope="module")
def digits_cnn() -> tuple[object, Dataset, Dataset]:
    """A small CNN trained for a few seconds on scikit-learn's real 8x8 digits (1,200 train, 597 test)."""
    torch.manual_seed(0)
    digits = sklearn.load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]
    y = digits.target.astype(np.int64)
    idx = np.random.default_rng(0).permutation(len(x))
    train, test = Dataset({"input": x[idx[:1200]]}, y[idx[:1200]], "digits-train"), \
        Dataset({"input": x[idx[1200:]]}, y[idx[1200:]], "digits-test")
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv2d(16, 32, 3, padding=1, stride=2), torch.nn.ReLU(),
                              torch.nn.Flatten(), torch.nn.Linear(32 * 16, 10))
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    rng = np.random.default_rng(1)
    for _ in range(8):
        order = rng.permutation(1200)
        for i in range(0, 1200, 64):
            b = order[i:i + 64]
            loss = torch.nn.functional.cross_entropy(net(torch.from_numpy(train.inputs["input"][b])),
                                                     torch.from_numpy(train.labels[b]))
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval(), train, test


def _ops(model: Model) -> list[str]:
    return sorted(n.op_type for n in model.onnx.graph.node)


@pytest.mark.slow
def test_qat_int8_is_the_ptq_graph_and_keeps_accuracy(digits_cnn) -> None:
    net, train, test = digits_cnn
    cal = train.take(np.arange(128))
    wrapped = Model.from_torch(net, source="digits-cnn", input_shape=(1, 1, 8, 8))
    fp32, _ = to_onnx(wrapped, OnnxExport(atol=1e-3), data=cal)
    ptq = quantize(fp32, StaticInt8(), data=cal)
    qat = qat_int8(wrapped, train, cal, config=QatConfig(epochs=2))
    assert _ops(qat) == _ops(ptq)  # same INT8 graph, so the same INT8 speed
    assert qat.size_bytes == pytest.approx(ptq.size_bytes, rel=0.05)
    acc_fp32 = accuracy_of(predict(fp32, test), test.labels)
    acc_qat = accuracy_of(predict(qat, test), test.labels)
    assert acc_fp32 > 0.93
    assert acc_qat >= acc_fp32 - 0.015
    # the teacher is untouched
    assert accuracy_of(predict(fp32, test), test.labels) == acc_fp32


def test_qat_needs_labels_and_layers(digits_cnn) -> None:
    net, train, _ = digits_cnn
    with pytest.raises(BadInput, match="labelled"):
        qat_finetune(net, Dataset(train.inputs, None, "unlabelled"))
    with pytest.raises(BadInput, match="no Conv2d or Linear"):
        qat_finetune(torch.nn.Sequential(torch.nn.Flatten()), train)
    with pytest.raises(ConfigError, match="epochs"):
        QatConfig(epochs=0)
