"""Reading a split directory's ``plan.json``: checked before any stage is loaded or started.

The plan is data written by ``edgeopt split``; a stage path that is not a plain ``.onnx`` name in
the directory (a ``.py`` factory, a path outside it) is refused, so running a split directory
never imports code.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeopt.errors import BadInput, first_line

if TYPE_CHECKING:
    pass


def load_plan(outdir: str | Path) -> dict[str, Any]:
    """Read OUTDIR/plan.json and check every stage file is there.

    Raises:
        BadInput: not a split directory, or a malformed plan.
    """
    from edgeopt.devices import MAX_THREADS
    from edgeopt.fileio import read_json

    folder = Path(outdir)
    path = folder / "plan.json"
    if not path.is_file():
        raise BadInput(f"{folder} has no plan.json: make one with edgeopt split MODEL --devices A,B -o {folder}")
    plan = read_json(path, "split plan")
    try:
        stages = plan["stages"]
        if not isinstance(stages, list) or not stages:
            raise ValueError("no stages")
        for stage in stages:
            _check_stage_path(stage["path"])
            if not (folder / stage["path"]).is_file():
                raise BadInput(f"{folder / stage['path']} is missing; re-run edgeopt split")
        if not math.isfinite(float(plan["link"]["mbps"])):
            raise ValueError("link mbps is not finite")
        threads = plan.get("threads")
        if threads is not None and not (isinstance(threads, int) and 1 <= threads <= MAX_THREADS):
            raise ValueError(f"threads must be an integer in [1, {MAX_THREADS}], got {threads!r}")
        source = (plan.get("model") or {}).get("path")
        if source is not None and not (isinstance(source, str) and source.lower().endswith(".onnx")
                                       and ".py:" not in source):
            raise ValueError(f"model.path must name the .onnx model that was split, got {str(source)[:80]!r}")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise BadInput(f"{path} is not a valid split plan ({first_line(exc)})") from exc
    return plan


def _check_stage_path(name: object) -> None:
    """A stage is an .onnx file inside the split directory, named plainly (no folders, no factory)."""
    if not isinstance(name, str) or Path(name).name != name or name in ("", ".", "..") \
            or not name.lower().endswith(".onnx") or ":" in name:
        raise ValueError(f"stage path {str(name)[:80]!r} must be an .onnx file name inside the split directory")
