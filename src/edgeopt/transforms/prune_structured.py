"""Structured (channel) pruning over torch-pruning: a smaller dense model, really faster.

torch-pruning keeps analysis (DependencyGraph), scoring (GroupMagnitude/GroupTaylor importance)
and surgery (pruning functions) apart; this module only chooses its settings: which layers are
left alone (the classifier head and user-named layers), how many channels go, and when to stop
for a MAC target. Everything here mutates the module it is given; callers pass a copy.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from edgeopt.data import Dataset
from edgeopt.deps import require
from edgeopt.errors import ConfigError, UnsupportedOperation, first_line
from edgeopt.training import check_label_range


def head_layer(module: Any, example: Any) -> str | None:
    """Name of the last Conv/Linear layer run in a forward pass: the classifier head."""
    torch = require("torch", extra="torch")
    order: list[str] = []
    hooks = []
    for name, sub in module.named_modules():
        if isinstance(sub, torch.nn.Conv1d | torch.nn.Conv2d | torch.nn.Conv3d | torch.nn.Linear):
            hooks.append(sub.register_forward_hook(lambda _m, _i, _o, n=name: order.append(n)))
    try:
        with torch.no_grad():
            module.eval()(example)
    finally:
        for h in hooks:
            h.remove()
    return order[-1] if order else None


def resolve_layers(module: Any, names: tuple[str, ...], *, what: str) -> list[Any]:
    """The submodules named in ``names``; ConfigError naming the known ones when one is missing."""
    modules = dict(module.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        known = [n for n, m in module.named_modules() if n and hasattr(m, "weight")]
        raise ConfigError(f"{what}: no layer named {missing[0]!r}; layers with weights: "
                          f"{', '.join(known[:12])}{' ...' if len(known) > 12 else ''}")
    return [modules[n] for n in names]


def _importance(tp: Any, kind: str) -> Any:
    if kind == "l1":
        return tp.importance.GroupMagnitudeImportance(p=1)
    if kind == "l2":
        return tp.importance.GroupMagnitudeImportance(p=2)
    if kind == "taylor":
        return tp.importance.GroupTaylorImportance()
    raise ConfigError(f"importance must be l1, l2 or taylor, got {kind!r}")


def _taylor_gradients(torch: Any, module: Any, data: Dataset, *, batches: int = 4, batch_size: int = 64) -> None:
    """Accumulate loss gradients on a few labelled batches: GroupTaylorImportance reads them."""
    module.zero_grad()
    module.train()
    for i, (feeds, labels) in enumerate(data.batches(batch_size)):
        if i >= batches:
            break
        out = module(*[torch.from_numpy(np.ascontiguousarray(v)) for v in feeds.values()])
        out = out[0] if isinstance(out, list | tuple) else out
        check_label_range(labels, int(out.shape[-1]), data.source)
        loss = torch.nn.functional.cross_entropy(out, torch.from_numpy(labels).long())
        loss.backward()
    module.eval()


def prune_channels(module: Any, example: Any, *, ratio: float, importance: str = "l1",
                   ignored: list[Any], steps: int = 1, round_to: int | None = None,
                   target_macs: float | None = None, count: Callable[[Any], int],
                   data: Dataset | None = None,
                   after_step: Callable[[int], None] | None = None) -> list[dict[str, Any]]:
    """Remove channels from ``module`` in place; return one record per step (ratio, MACs).

    With ``target_macs`` the pruner takes small steps (at most ``ratio`` overall) until the
    MAC count is at or below the target; otherwise it takes ``steps`` equal steps to ``ratio``.
    ``after_step(i)`` runs after each step (the prune-and-tune schedule fine-tunes there).

    Raises:
        ConfigError: Taylor importance without labelled data.
        UnsupportedOperation: torch-pruning cannot trace the model.
    """
    torch = require("torch", extra="torch")
    tp = require("torch_pruning", extra="torch")
    if importance == "taylor" and (data is None or data.labels is None):
        raise ConfigError("taylor importance needs labelled data (--data with y) to compute gradients")
    n_steps = 40 if target_macs is not None else steps
    try:
        pruner = tp.pruner.MetaPruner(module, example, importance=_importance(tp, importance),
                                      pruning_ratio=ratio, iterative_steps=n_steps,
                                      ignored_layers=ignored, round_to=round_to)
    except Exception as exc:
        raise UnsupportedOperation(f"torch-pruning cannot analyse this model: {type(exc).__name__}: "
                                   f"{first_line(exc)}") from exc
    history = []
    for i in range(n_steps):
        if importance == "taylor" and data is not None:
            _taylor_gradients(torch, module, data)
        pruner.step()
        module.zero_grad(set_to_none=True)
        macs = count(module)
        history.append({"step": i + 1, "ratio": round(ratio * (i + 1) / n_steps, 6), "macs": macs})
        if after_step is not None:
            after_step(i)
        if target_macs is not None and macs <= target_macs:
            break
    return history
