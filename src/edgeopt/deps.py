"""Lazy access to optional dependencies, so `import edgeopt` stays light."""

from __future__ import annotations

import importlib
from types import ModuleType

from edgeopt.errors import MissingDependency


def require(module: str, *, extra: str) -> ModuleType:
    """Import ``module`` or raise MissingDependency naming ``pip install 'edgeopt[extra]'``.

    Example:
        >>> np = require("numpy", extra="core")
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependency(module.split(".")[0], extra) from exc


def available(module: str) -> bool:
    """True when ``module`` can be imported (without importing it twice)."""
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True
