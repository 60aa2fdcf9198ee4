"""Peak training memory, measured from the allocator during real training steps.

Method: run a few real optimizer steps of the shared training loop (``training.fit``) on a
copy of the model under ``torch.profiler`` with ``profile_memory=True``. The profiler records
every CPU tensor allocation and free made by PyTorch's allocator, in order; the running sum of
those events peaks at the largest amount of tensor memory the step ever held at once:
activations kept for backward, temporaries, gradients and optimizer state (Adam's two moments
are created at the first step, which is inside the window), plus what adapt's training run also
does: validation passes at the same batch size and the copy of the best weights that early
stopping keeps. The weights and buffers are
resident before the window starts, so their bytes are added. What is not counted: the Python
interpreter and library code (the same for every strategy, and not training memory) and the
local data set itself (it can stream from storage batch by batch).

This is a measurement, not an estimate from layer shapes: it includes what autograd really
saves (e.g. the input of an in-place ReLU, BatchNorm's saved statistics) and what the kernels
allocate as scratch.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from edgeopt.adapt.strategies import Strategy, count_params, frozen_norm_statistics, mark_trainable
from edgeopt.data import Dataset
from edgeopt.deps import require
from edgeopt.errors import DataError

MB = 1024 * 1024


@dataclass
class MemoryMeasurement:
    """Peak training memory of one strategy (bytes), and what it is made of."""

    strategy: str
    trainable_params: int
    total_params: int
    weights_bytes: int
    peak_step_bytes: int
    batch_size: int
    steps: int

    @property
    def peak_bytes(self) -> int:
        return self.weights_bytes + self.peak_step_bytes

    @property
    def peak_mb(self) -> float:
        return self.peak_bytes / MB

    def to_dict(self) -> dict[str, Any]:
        return {"strategy": self.strategy, "trainable_params": self.trainable_params,
                "total_params": self.total_params, "peak_mb": round(self.peak_mb, 3),
                "weights_mb": round(self.weights_bytes / MB, 3),
                "peak_step_mb": round(self.peak_step_bytes / MB, 3),
                "batch_size": self.batch_size, "steps": self.steps}


def measure_training_memory(module: Any, data: Dataset, strategy: Strategy, *, batch_size: int = 32,
                            steps: int = 3, lr: float = 1e-3) -> MemoryMeasurement:
    """Measure the peak memory of ``steps`` real training steps of ``strategy`` on ``module``.

    The module itself is not changed (a deep copy trains).

    Args:
        module: the torch model.
        data: labelled local data; the first ``steps * batch_size`` samples are used.
        strategy: which parameters train.
        batch_size: the batch size training will use (activations scale with it).
        steps: optimizer steps to observe; the first creates the optimizer state.

    Returns:
        The measurement; ``peak_mb`` is what ``--memory-mb`` is compared with.

    Raises:
        DataError: no labels.

    Example:
        >>> measure_training_memory(net, local, LastLayer()).peak_mb  # doctest: +SKIP
        12.4
    """
    torch = require("torch", extra="torch")
    from edgeopt.training import TrainConfig, TrainSettings, fit

    if data.labels is None:
        raise DataError(f"{data.source} has no labels (y): adapting needs labelled local data")
    trial = copy.deepcopy(module)
    params = mark_trainable(trial, strategy)
    n = min(len(data), steps * batch_size)
    subset = data.take(slice(0, n))
    weights = sum(t.numel() * t.element_size() for t in [*trial.parameters(), *trial.buffers()])
    config = TrainConfig(train=TrainSettings(epochs=1, lr=lr, batch_size=batch_size))
    from edgeopt.progress import native_stderr_silenced

    with native_stderr_silenced(), frozen_norm_statistics(trial), \
            torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fit(trial, subset, config=config, validation=subset, params=params, progress=False)
    peak = _peak_live_bytes(prof)
    return MemoryMeasurement(strategy=strategy.name, trainable_params=count_params(params),
                             total_params=count_params(list(trial.parameters())), weights_bytes=int(weights),
                             peak_step_bytes=int(peak), batch_size=batch_size, steps=(n + batch_size - 1) // batch_size)


def _peak_live_bytes(prof: Any) -> int:
    from torch._C._profiler import _EventType

    events: list[tuple[int, int]] = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation and str(node.extra_fields.device).startswith("cpu"):
            events.append((node.start_time_ns, int(node.extra_fields.alloc_size)))
        stack.extend(node.children)
    events.sort()
    live = peak = 0
    for _, size in events:
        live += size
        peak = max(peak, live)
    return peak
