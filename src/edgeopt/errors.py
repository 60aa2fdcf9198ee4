"""Every error a user can cause or fix, as one tree under EdgeoptError.

The CLI prints ``str(error)`` as one line on stderr and exits with ``error.exit_code``;
anything that is not an EdgeoptError is a bug (exit 1, one line naming the exception and where it
was raised; EDGEOPT_DEBUG=1 shows the traceback).

EdgeoptError                    exit 2 unless noted
 +-- BadInput                   a flag, value or combination that cannot work
 |    +-- ModelError            a model file that is missing, corrupt, or unsupported
 |    +-- DataError             a data file that is missing, corrupt, or does not fit the model
 |    +-- DeviceError           an unknown or malformed device profile
 |    +-- ConfigError           a transform config with invalid fields
 +-- MissingDependency          an optional extra is not installed (names the pip command)
 +-- UnsupportedOperation       the model uses something a converter or runtime cannot handle
 +-- BudgetNotMet               exit 3: no candidate met the accuracy or speed budget
 +-- PipelineError              a split stage failed (could not load, bad tensor, died) or stopped answering
"""

from __future__ import annotations


class EdgeoptError(Exception):
    """Base of all errors a user can act on; its message is one line."""

    exit_code: int = 2

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


class BadInput(EdgeoptError):
    """A flag, value or combination of them that cannot work."""


class ModelError(BadInput):
    """A model file that is missing, corrupt, or in a form edgeopt cannot load."""


class DataError(BadInput):
    """A data file that is missing, corrupt, or does not fit the model."""


class DeviceError(BadInput):
    """An unknown or malformed device profile."""


class ConfigError(BadInput):
    """A transform config whose fields are invalid."""


class MissingDependency(EdgeoptError):
    """An optional dependency is not installed; the message names the extra to install."""

    def __init__(self, module: str, extra: str) -> None:
        super().__init__(
            f"this needs the Python package '{module}', which is not installed: "
            f"run pip install 'edgeopt[{extra}]'"
        )
        self.module = module
        self.extra = extra


class UnsupportedOperation(EdgeoptError):
    """The model uses an operator or feature that a converter or runtime cannot handle."""


class BudgetNotMet(EdgeoptError):
    """No candidate met the budget; the message names the closest one."""

    exit_code = 3


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when empty), for one-line errors."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class PipelineError(EdgeoptError):
    """A stage failed (could not load, got a bad tensor, died) or stopped answering."""
