"""Which parameters on-device training updates: the strategies, from cheapest to most capable.

- ``last-layer``: only the final classifier (weight and bias); the body is a fixed feature
  extractor, so no activation needs keeping for backward beyond the last layer's input.
- ``bias-last``: every bias plus the last layer (TinyTL, Cai et al., NeurIPS 2020): biases need
  no stored activations for their gradient, so memory stays close to inference.
- ``sparse``: the weights of the last ``blocks`` weight layers plus every bias (sparse update
  from "On-Device Training Under 256KB Memory", Lin et al., NeurIPS 2022).
- ``full``: every parameter.

A weight layer is a module whose own ``weight`` parameter has two or more dimensions
(convolutions, linear layers), taken in module registration order, which for the usual
``nn.Sequential``-style models (and onnx2torch graphs) is execution order.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

from edgeopt.deps import require
from edgeopt.errors import ConfigError, ModelError


@dataclass(frozen=True)
class LastLayer:
    """Train only the last weight layer (weight + bias)."""

    name: ClassVar[str] = "last-layer"

    def select(self, module: Any) -> list[tuple[str, Any]]:
        last = _weight_layers(module)[-1][0]
        return [(n, p) for n, p in module.named_parameters() if _owner(n) == last]


@dataclass(frozen=True)
class BiasLast:
    """Train every bias and the last weight layer (TinyTL)."""

    name: ClassVar[str] = "bias-last"

    def select(self, module: Any) -> list[tuple[str, Any]]:
        last = _weight_layers(module)[-1][0]
        return [(n, p) for n, p in module.named_parameters() if _owner(n) == last or n.endswith("bias")]


@dataclass(frozen=True)
class SparseUpdate:
    """Train the weights of the last ``blocks`` weight layers and every bias."""

    name: ClassVar[str] = "sparse"
    blocks: int = 2

    def __post_init__(self) -> None:
        if self.blocks < 1:
            raise ConfigError(f"sparse update needs blocks >= 1, got {self.blocks}")

    def select(self, module: Any) -> list[tuple[str, Any]]:
        layers = {name for name, _ in _weight_layers(module)[-self.blocks:]}
        return [(n, p) for n, p in module.named_parameters() if _owner(n) in layers or n.endswith("bias")]


@dataclass(frozen=True)
class FullFinetune:
    """Train every parameter."""

    name: ClassVar[str] = "full"

    def select(self, module: Any) -> list[tuple[str, Any]]:
        return list(module.named_parameters())


Strategy = LastLayer | BiasLast | SparseUpdate | FullFinetune

# Cheapest first; ``auto`` walks this list from the end and keeps the first that fits.
STRATEGIES: tuple[Strategy, ...] = (LastLayer(), BiasLast(), SparseUpdate(), FullFinetune())
STRATEGY_NAMES: tuple[str, ...] = tuple(s.name for s in STRATEGIES)


def get_strategy(name: str) -> Strategy:
    """The strategy called ``name`` (one of :data:`STRATEGY_NAMES`).

    Raises:
        ConfigError: unknown name.

    Example:
        >>> get_strategy("bias-last").name
        'bias-last'
    """
    for strategy in STRATEGIES:
        if strategy.name == name:
            return strategy
    raise ConfigError(f"unknown strategy {name!r}: choose auto or one of {', '.join(STRATEGY_NAMES)}")


def strategy_dict(strategy: Strategy) -> dict[str, Any]:
    return {"name": strategy.name, **asdict(strategy)}


def mark_trainable(module: Any, strategy: Strategy) -> list[Any]:
    """Freeze every parameter of ``module`` except the strategy's; return the trainable ones.

    Raises:
        ModelError: the module has no weight layer (nothing for the strategy to train).
    """
    chosen = strategy.select(module)
    names = {n for n, _ in chosen}
    for n, p in module.named_parameters():
        p.requires_grad_(n in names)
    return [p for _, p in chosen]


def count_params(params: list[Any]) -> int:
    return int(sum(p.numel() for p in params))


def _owner(param_name: str) -> str:
    return param_name.rpartition(".")[0]


def _weight_layers(module: Any) -> list[tuple[str, Any]]:
    layers = [(name, m) for name, m in module.named_modules()
              if getattr(m, "weight", None) is not None and getattr(m.weight, "ndim", 0) >= 2
              and any(n == "weight" for n, _ in m.named_parameters(recurse=False))]
    if not layers:
        raise ModelError("the model has no weight layer (convolution or linear) to adapt")
    return layers


@contextlib.contextmanager
def frozen_norm_statistics(module: Any) -> Iterator[None]:
    """Keep every BatchNorm layer in eval mode while training (running statistics frozen).

    A few hundred local samples would otherwise overwrite the running mean/variance that the
    whole original training set produced, and the model forgets the original domain even where
    no weight was trained. The affine parameters (BatchNorm's weight and bias) still train when
    the strategy selects them.
    """
    torch = require("torch", extra="torch")
    norms = [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]

    def stay_eval(self: Any, mode: bool = True) -> Any:
        self.training = False
        return self

    for m in norms:
        m.__dict__["train"] = types.MethodType(stay_eval, m)
        m.training = False
    try:
        yield
    finally:
        for m in norms:
            m.__dict__.pop("train", None)
