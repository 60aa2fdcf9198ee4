"""Parameter and MAC counts of a PyTorch module, via torch-pruning's counter (the field's tool)."""

from __future__ import annotations

from typing import Any

import numpy as np

from edgeopt.deps import require


def count_macs_params(module: Any, example: np.ndarray | dict[str, np.ndarray] | Any) -> tuple[int, int]:
    """(multiply-accumulates, parameters) for one forward pass of ``example`` (batch 1 recommended).

    Example:
        >>> macs, params = count_macs_params(net, np.zeros((1, 3, 224, 224), np.float32))  # doctest: +SKIP
    """
    torch = require("torch", extra="torch")
    tp = require("torch_pruning", extra="torch")
    if isinstance(example, np.ndarray):
        example = torch.from_numpy(example)
    elif isinstance(example, dict):
        example = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in example.items()}
    was_training = module.training
    module.eval()
    with torch.no_grad():
        macs, params = tp.utils.count_ops_and_params(module, example)
    module.train(was_training)
    return int(macs), int(params)
