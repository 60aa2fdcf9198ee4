"""Transform configs: frozen dataclasses that validate, serialize to JSON and come back.

A recipe found by ``optimize`` is a list of configs; saving it as JSON and replaying it must
give the same model, so configs round-trip through ``{"type", "version", "fields"}`` and only
classes registered here can be rebuilt (no arbitrary code from a JSON file).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable
from typing import Any, TypeVar

from edgeopt.errors import ConfigError

_REGISTRY: dict[str, type] = {}
T = TypeVar("T")

# Modules that define configs; imported on demand when a serialized recipe names a config
# that is not registered yet (importing edgeopt must stay light).
TRANSFORM_MODULES = (
    "edgeopt.transforms.quantize", "edgeopt.transforms.export",
    "edgeopt.transforms.nncf_quantize", "edgeopt.transforms.prune", "edgeopt.transforms.distill",
    "edgeopt.transforms.tflite", "edgeopt.transforms.transformer",
    "edgeopt.transforms.smooth_quant", "edgeopt.transforms.executorch", "edgeopt.transforms.qat",
)


def _ensure_registered(name: str) -> None:
    import importlib

    for module in TRANSFORM_MODULES:
        if name in _REGISTRY:
            return
        try:
            importlib.import_module(module)
        except ImportError:
            continue


def register_config(cls: type[T]) -> type[T]:
    """Class decorator: allow ``cls`` (a frozen dataclass) in serialized recipes."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls.__name__} must be a dataclass")
    params = getattr(cls, "__dataclass_params__", None)
    if params is None or not params.frozen:
        raise TypeError(f"{cls.__name__} must be frozen")
    _REGISTRY[cls.__name__] = cls
    return cls


def config_to_dict(config: Any) -> dict[str, Any]:
    """``{"type": ClassName, "version": 1, "fields": {...}}`` for a registered config."""
    name = type(config).__name__
    if name not in _REGISTRY:
        raise ConfigError(f"{name} is not a registered transform config")
    fields = {}
    for f in dataclasses.fields(config):
        if not f.metadata.get("serialize", True):
            continue
        value = getattr(config, f.name)
        if _is_train_settings(value):  # stored flat, as earlier versions wrote them (see TrainSettings)
            fields.update(dataclasses.asdict(value))
            continue
        fields[f.name] = list(value) if isinstance(value, tuple) else value
    return {"type": name, "version": getattr(config, "VERSION", 1), "fields": fields}


def config_from_dict(payload: dict[str, Any]) -> Any:
    """Rebuild a config from :func:`config_to_dict` output; ConfigError for unknown types or fields."""
    if not isinstance(payload, dict) or "type" not in payload:
        raise ConfigError("a transform config must be an object with 'type' and 'fields'")
    name = payload["type"]
    if name not in _REGISTRY:
        _ensure_registered(str(name))
    cls = _REGISTRY.get(name)
    if cls is None:
        raise ConfigError(f"unknown transform config {name!r}; known: {', '.join(sorted(_REGISTRY))}")
    fields = dict(payload.get("fields", {}))
    known = {f.name: f for f in dataclasses.fields(cls)}
    if "train" in known:
        fields = _nest_train(fields)
    unknown = sorted(set(fields) - set(known))
    if unknown:
        raise ConfigError(f"{name}: unknown field(s) {unknown}")
    for key, value in fields.items():
        if _non_finite(value):
            raise ConfigError(f"{name}: field {key!r} must be finite, got {value!r}")
    hints = typing.get_type_hints(cls)
    for key, value in list(fields.items()):
        if isinstance(value, list) and _is_tuple_type(hints.get(key)):
            fields[key] = tuple(value)
    try:
        return cls(**fields)
    except TypeError as exc:
        raise ConfigError(f"{name}: {exc}") from exc


def _is_train_settings(value: Any) -> bool:
    return type(value).__name__ == "TrainSettings" and dataclasses.is_dataclass(value)


def _nest_train(fields: dict[str, Any]) -> dict[str, Any]:
    """Flat training fields (``epochs``, ``lr`` ...: how recipes store them, then and now) gathered into
    the config's ``train`` settings; a nested ``train`` object is accepted too."""
    from edgeopt.training import TRAIN_FIELDS

    nested = fields.pop("train", None)
    if nested is not None and not isinstance(nested, dict):
        raise ConfigError(f"'train' must be an object of training settings, got {nested!r}")
    train = dict(nested or {})
    for key in TRAIN_FIELDS:
        if key in fields:
            train[key] = fields.pop(key)
    unknown = sorted(set(train) - set(TRAIN_FIELDS))
    if unknown:
        raise ConfigError(f"unknown training setting(s) {unknown}; known: {', '.join(TRAIN_FIELDS)}")
    if train:
        fields["train"] = train
    return fields


def _non_finite(value: Any) -> bool:
    """NaN or infinity anywhere in a field (JSON recipes may carry them: Python's json reads NaN)."""
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return any(_non_finite(v) for v in value)
    if isinstance(value, dict):
        return any(_non_finite(v) for v in value.values())
    return False


def _is_tuple_type(hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin is tuple:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_is_tuple_type(arg) for arg in typing.get_args(hint))
    return False


def registered_configs() -> dict[str, type]:
    return dict(_REGISTRY)


# -- applying configs ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TransformContext:
    """What a transform may need besides the model and its config; none of it is serialized.

    ``calibration`` is for post-training quantization, ``train`` for fine-tuning or distillation,
    ``validation`` for early stopping; the search guarantees none of them overlaps the data
    candidates are judged on. ``teacher`` is the original model for distillation-aided steps.
    """

    calibration: Any = None
    train: Any = None
    validation: Any = None
    teacher: Any = None
    device: Any = None
    seed: int = 0
    progress: bool = True


_APPLIERS: dict[type, Callable[[Any, Any, TransformContext], Any]] = {}


def register_transform(config_cls: type) -> Callable[[Callable[[Any, Any, TransformContext], Any]],
                                                     Callable[[Any, Any, TransformContext], Any]]:
    """Decorator: ``fn(model, config, ctx) -> Model`` applies configs of ``config_cls`` in recipes."""

    def decorate(fn: Callable[[Any, Any, TransformContext], Any]) -> Callable[[Any, Any, TransformContext], Any]:
        _APPLIERS[config_cls] = fn
        return fn

    return decorate


def apply_config(model: Any, config: Any, ctx: TransformContext | None = None) -> Any:
    """Apply one registered config to ``model`` (used by recipes and ``edgeopt apply``)."""
    fn = _APPLIERS.get(type(config))
    if fn is None:
        raise ConfigError(f"no transform is registered for {type(config).__name__}")
    return fn(model, config, ctx or TransformContext())
