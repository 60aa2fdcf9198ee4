"""PyTorch eager execution, so a PyTorch model can be benchmarked before and after export."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from edgeopt.deps import available, require
from edgeopt.errors import BadInput, ModelError

if TYPE_CHECKING:
    from edgeopt.model import Model


class TorchSession:
    def __init__(self, module: Any, input_names: list[str], threads: int | None) -> None:
        self._torch = require("torch", extra="torch")
        self._module = module.eval()
        self._threads = threads
        self.input_names = input_names
        self.output_names = ["output"]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        torch = self._torch
        if self._threads is not None:
            torch.set_num_threads(self._threads)
        args = [torch.from_numpy(np.ascontiguousarray(a)) for a in self._ordered(feeds)]
        with torch.inference_mode():
            out = self._module(*args)
        if isinstance(out, dict):
            out = list(out.values())
        if isinstance(out, list | tuple):
            return [o.detach().numpy() for o in out]
        return [out.detach().numpy()]

    def _ordered(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Feeds in ``forward``'s order: by name when the names match, else by position (data keyed ``x``)."""
        if all(name in feeds for name in self.input_names):
            return [feeds[name] for name in self.input_names]
        if len(feeds) == len(self.input_names):
            return list(feeds.values())
        raise BadInput(f"the model's forward takes {self.input_names}; the data has arrays {sorted(feeds)}")


def forward_inputs(module: Any) -> list[str]:
    """Names of ``forward``'s positional parameters, for a module whose inputs nothing declared."""
    import inspect

    try:
        params = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return ["input"]
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    names = [p.name for p in params if p.kind in kinds and p.default is inspect.Parameter.empty]
    return names or ["input"]


class TorchEager:
    name = "torch"
    formats = ("torch",)

    def available(self) -> bool:
        return available("torch")

    def load(self, model: Model, *, threads: int | None = None,
             options: dict[str, Any] | None = None) -> TorchSession:
        if options:
            raise BadInput(f"the torch runtime takes no options, got {sorted(options)}")
        if model.format != "torch":
            raise ModelError(f"the torch runtime runs PyTorch models; {model.source} is {model.format}")
        names = [t.name for t in model.inputs] or forward_inputs(model.module)
        return TorchSession(model.module, names, threads)
