"""Adaptation checkpoints: written atomically, so a power cut never leaves a corrupt one.

A checkpoint is a plain dict of tensors and strings saved with ``torch.save`` to a temporary
file beside the target and renamed over it (``fileio.atomic_path``); a reader sees either the
previous checkpoint or the new one, never half of one. It loads with ``weights_only=True``.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from edgeopt.deps import require
from edgeopt.errors import ModelError
from edgeopt.fileio import atomic_path

FORMAT = "edgeopt.adapt.checkpoint/1"
F = TypeVar("F", bound=Callable[..., Any])


def checkpoint_path(out: str | os.PathLike[str]) -> Path:
    """Where the checkpoint of output ``out`` lives: ``OUT.ckpt.pt`` beside it."""
    p = Path(out)
    return p.with_name(p.name + ".ckpt.pt")


def save_checkpoint(path: str | os.PathLike[str], *, state_dict: dict[str, Any], info: dict[str, Any]) -> None:
    """Write ``state_dict`` plus JSON-able ``info`` (strategy, epochs, samples seen) atomically."""
    torch = require("torch", extra="torch")
    payload = {"format": FORMAT, "info": json.dumps(info, default=str),
               "state_dict": {k: v.detach().clone() for k, v in state_dict.items()}}
    with atomic_path(path) as tmp:
        torch.save(payload, str(tmp))


def restore_on_failure(func: F) -> F:
    """Decorate ``adapt``: if it fails, its ``out`` checkpoint is put back as it was before the run.

    Epoch checkpoints let a killed run resume; a run that fails with an error must not leave one
    behind for ``--resume`` to trust. The previous checkpoint (or its absence) is restored.
    """

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        out = kwargs.get("out")
        ckpt = checkpoint_path(out) if out is not None else None
        prior = ckpt.read_bytes() if ckpt is not None and ckpt.is_file() else None
        try:
            return func(*args, **kwargs)
        except Exception:
            if ckpt is not None:
                if prior is None:
                    ckpt.unlink(missing_ok=True)
                else:
                    with atomic_path(ckpt) as tmp:
                        tmp.write_bytes(prior)
            raise

    return wrapper  # type: ignore[return-value]


def load_checkpoint(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read a checkpoint; return ``(state_dict, info)``.

    Raises:
        ModelError: missing, unreadable, or not an edgeopt adapt checkpoint.
    """
    torch = require("torch", extra="torch")
    p = Path(path)
    if not p.exists():
        raise ModelError(f"no checkpoint to resume from at {p}; run adapt without --resume first")
    try:
        payload = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelError(f"cannot read checkpoint {p}: {type(exc).__name__}") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ModelError(f"{p} is not an edgeopt adapt checkpoint")
    return payload["state_dict"], json.loads(payload["info"])
