"""The one small interface every runtime implements, so bench/eval/serve/split never special-case one.

A Runtime turns a Model into a Session; a Session runs named numpy inputs to a list of numpy
outputs. That is all the harness needs; runtime specifics live in ``options``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    from edgeopt.model import Model


@runtime_checkable
class Session(Protocol):
    """A loaded model ready to run."""

    input_names: list[str]
    output_names: list[str]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run one batch; ``feeds`` maps every input name to an array."""
        ...


@runtime_checkable
class Runtime(Protocol):
    """Loads models of the formats it supports into Sessions."""

    name: str
    formats: tuple[str, ...]

    def available(self) -> bool:
        """True when the runtime's package is installed."""
        ...

    def load(self, model: Model, *, threads: int | None = None,
             options: dict[str, Any] | None = None) -> Session:
        """A Session for ``model`` with ``threads`` intra-op threads (None: the runtime's default)."""
        ...
