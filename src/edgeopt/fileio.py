"""Atomic file output: a reader never sees a half-written model or report."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from edgeopt.errors import BadInput


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` only if the block succeeds.

    Example:
        >>> with atomic_path("out.onnx") as tmp:  # doctest: +SKIP
        ...     onnx.save(proto, tmp)
    """
    target = Path(path)
    parent = target.parent if str(target.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        sweep_stale_temps(target)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".tmp", dir=parent)
    except OSError as exc:
        raise BadInput(f"cannot write {target}: {exc.strerror or exc}; choose a writable location") from exc
    os.close(fd)
    tmp = Path(tmp_name)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, OSError) and not isinstance(exc, BadInput):  # a full disk, a vanished folder
            raise BadInput(f"cannot write {target}: {exc.strerror or exc}") from exc
        raise


def read_json(path: str | os.PathLike[str], what: str) -> Any:
    """Parse a JSON file a user gave (a recipe, a plan); any failure is one BadInput line naming ``what``."""
    p = Path(path)
    try:
        return json.loads(p.read_text())
    except FileNotFoundError:
        raise BadInput(f"{what} {p} not found") from None
    except IsADirectoryError:
        raise BadInput(f"{what} {p} is a directory, not a JSON file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInput(f"cannot read {what} {p}: {exc}") from None
    except ValueError as exc:
        raise BadInput(f"{what} {p} is not valid JSON: {exc}") from None
    except RecursionError:
        raise BadInput(f"{what} {p} is nested too deeply to be a {what}") from None


def sweep_stale_temps(target: str | os.PathLike[str]) -> list[Path]:
    """Remove ``.OUT.<pid>.XXXX.tmp`` files beside ``target`` left by a run that no longer exists.

    A killed run (kill -9, power loss) cannot clean up after itself; the next write of the same
    output does. A temp file whose process is still alive (a concurrent run) is left alone.
    """
    target = Path(target)
    parent = target.parent if str(target.parent) else Path(".")
    removed = []
    for tmp in parent.glob(f".{glob_escape(target.name)}.*.tmp"):
        pid_text = tmp.name[len(target.name) + 2:].split(".", 1)[0]
        if not pid_text.isdigit() or _alive(int(pid_text)):
            continue
        with contextlib.suppress(OSError):
            tmp.unlink()
            removed.append(tmp)
    return removed


def glob_escape(name: str) -> str:
    return "".join(f"[{ch}]" if ch in "*?[" else ch for ch in name)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_json(path: str | os.PathLike[str], payload: Any) -> None:
    """Write ``payload`` as indented JSON, atomically."""
    text = json.dumps(payload, indent=2, sort_keys=False, default=_json_default) + "\n"
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def _json_default(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def check_writable_dir(path: str | os.PathLike[str]) -> Path:
    """Create ``path`` if needed and prove it is writable, before any long work starts."""
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=out, prefix=".edgeopt-probe", delete=True)
        probe.close()
    except OSError as exc:
        raise BadInput(f"output directory {out} is not writable ({exc.strerror or exc}); choose another -o") from exc
    return out


def input_paths(specs: Iterable[Any]) -> list[Path]:
    """The files behind command inputs (``m.onnx``, ``f.py:factory``, ``NAME=PATH``), those that exist."""
    found = []
    for spec in specs:
        if spec is None:
            continue
        for item in spec if isinstance(spec, (list, tuple)) else (spec,):
            text = str(item)
            if ".py:" in text:
                text = text.rpartition(":")[0]
            candidates = [text] + ([text.partition("=")[2]] if "=" in text else [])
            found.extend(Path(c) for c in candidates if c and os.path.exists(c))
    return found


def check_outputs(outputs: Mapping[str, str | os.PathLike[str] | None], inputs: Iterable[Path], *,
                  missing_parent_ok: bool = False) -> None:
    """Prove every output file can be written and replaces no input, before any work starts.

    Args:
        outputs: ``{what: path}``, e.g. ``{"-o": "int8.onnx", "report": "int8.report.json"}``;
            None entries are skipped.
        inputs: files the command reads (see :func:`input_paths`); an output that is the same
            file (same path, symlink or hard link) is refused, so a run never destroys its input.
        missing_parent_ok: a folder that does not exist yet is fine (``-o`` creates it; ``--json``
            does not, so there it is an error).

    Raises:
        BadInput: an output that is a folder, the same file as an input, or in a folder that
            does not exist or cannot be written.
    """
    sources = [p for p in inputs if p.exists()]
    for what, given in outputs.items():
        if given is None or str(given) == "-":
            continue
        path = Path(given)
        if path.is_dir():
            raise BadInput(f"{what} {path} is a directory; give a file name")
        for source in sources:
            if path.exists() and (os.path.samefile(path, source) or path.resolve() == source.resolve()):
                raise BadInput(f"{what} {path} is the input file {source}; writing it would destroy the input: "
                               "choose another output name")
        parent = path.parent if str(path.parent) else Path(".")
        if not parent.exists():
            if not missing_parent_ok:
                raise BadInput(f"{what} {path}: folder {parent} does not exist; create it first")
        elif not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
            raise BadInput(f"{what} {path}: {parent} is not writable (not a writable folder)")


def report_path(out: str | os.PathLike[str]) -> Path:
    """Where a command that writes ``out`` puts its report: ``int8.onnx`` -> ``int8.report.json`` beside it."""
    target = Path(out)
    return target.with_name(target.stem + ".report.json")
