"""A recipe: transform configs applied in order, plus the runtime the result is run on.

Recipes are what ``optimize`` searches over and what its report shows; they serialize to JSON
(configs through the allowlist in ``transforms.config``) so a found recipe can be replayed.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from edgeopt.errors import ConfigError
from edgeopt.model import Model
from edgeopt.transforms.config import (
    TransformContext,
    _non_finite,
    apply_config,
    config_from_dict,
    config_to_dict,
)


@dataclass(frozen=True)
class Recipe:
    """``steps`` (frozen config dataclasses) applied in order; the result runs on ``runtime``."""

    name: str
    steps: tuple[Any, ...] = ()
    runtime: str = "onnxruntime"
    runtime_options: dict[str, Any] = field(default_factory=dict)
    needs: tuple[str, ...] = ()  # "calibration", "train": data the steps require

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "steps": [config_to_dict(s) for s in self.steps],
                "runtime": self.runtime, "runtime_options": dict(self.runtime_options),
                "needs": list(self.needs)}

    @classmethod
    def from_dict(cls, payload: dict[str, Any], *, trust_code: bool = False) -> Recipe:
        """Read a serialized recipe.

        A step that names a Python file (a distillation student ``evil.py:build``) would import
        and run it; such a recipe is refused unless ``trust_code`` (``--trust-code``) is given.

        Raises:
            ConfigError: a malformed recipe, or one naming a Python file without ``trust_code``.
        """
        if not isinstance(payload, dict):
            raise ConfigError(f"a recipe must be a JSON object, got {type(payload).__name__}")
        steps = payload.get("steps", [])
        if not isinstance(steps, list):
            raise ConfigError("a recipe's steps must be a list")
        try:
            recipe = cls(name=str(payload["name"]), steps=tuple(config_from_dict(s) for s in steps),
                         runtime=str(payload.get("runtime", "onnxruntime")),
                         runtime_options=dict(payload.get("runtime_options", {})),
                         needs=tuple(payload.get("needs", ())))
        except KeyError as exc:
            raise ConfigError(f"recipe is missing {exc}") from exc
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"recipe {payload.get('name')!r} is malformed: {exc}") from exc
        if _non_finite(recipe.runtime_options):
            raise ConfigError(f"recipe {recipe.name!r}: runtime_options must hold finite numbers")
        if not trust_code:
            for step in recipe.steps:
                for name, value in _code_fields(step):
                    raise ConfigError(f"recipe {recipe.name!r} step {type(step).__name__} names Python code "
                                      f"({name}={value!r}); applying it would run that file. Pass --trust-code "
                                      "if you trust the recipe")
        return recipe

    def key(self) -> str:
        """A stable hash of what the recipe does (not its display name)."""
        body = {k: v for k, v in self.to_dict().items() if k != "name"}
        return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def describe(self) -> str:
        steps = " -> ".join(type(s).__name__ for s in self.steps) or "none"
        opts = f" {self.runtime_options}" if self.runtime_options else ""
        return f"{steps} @ {self.runtime}{opts}"


def _code_fields(config: Any) -> list[tuple[str, str]]:
    """The fields of ``config`` that name a Python file (``file.py`` or ``file.py:factory``)."""
    import dataclasses

    found = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, str) and (".py:" in value or value.rstrip().endswith(".py")):
            found.append((f.name, value))
    return found


def apply_recipe(model: Model, recipe: Recipe, ctx: TransformContext | None = None) -> Model:
    """Apply every step, then record the runtime (and its options) in the model's metadata."""
    out = model
    for step in recipe.steps:
        out = apply_config(out, step, ctx)
    if out.format == "onnx":
        meta = {"runtime": recipe.runtime, "recipe": recipe.describe()}
        if recipe.runtime_options:
            meta["runtime_options"] = json.dumps(recipe.runtime_options, sort_keys=True)
        out = out.with_metadata(**meta)
    return out
