"""What every command shares: the error boundary, consoles, --json output, common options."""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from typer._click.globals import get_current_context

from edgeopt.cli import options as opt
from edgeopt.cli.tables import FittingConsole
from edgeopt.errors import BadInput, EdgeoptError
from edgeopt.progress import err_console as err_console

F = TypeVar("F", bound=Callable[..., Any])

# Tables fit the terminal (cli/tables.py); piped output gets 160 columns unless COLUMNS says otherwise.
console = FittingConsole(width=None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 160)


def user_errors(func: F) -> F:
    """Turn an EdgeoptError into one line on stderr and its exit code, never a traceback.

    With ``--json -`` the command's stdout is the JSON document alone: everything else it prints
    (tables, notes, progress, third-party chatter) goes to stderr (see ``json_stdout``).
    """

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            _reject_non_finite(kwargs)
            _check_threads_here(kwargs)
            if kwargs.get("json_out") is not None:
                check_json_target(kwargs["json_out"])
            check_command_outputs(func.__name__, kwargs)
            with json_stdout(kwargs.get("json_out") == "-"), terminate_as_exit():
                return func(*args, **kwargs)
        except EdgeoptError as exc:
            err_console.print(f"[bold red]error:[/] {exc}", markup=True, highlight=False)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            err_console.print("interrupted")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def _check_threads_here(kwargs: dict[str, Any]) -> None:
    """--threads beyond this host's cap is allowed only for a remote --device (it may have more cores)."""
    from edgeopt.devices import MAX_THREADS, get_device
    from edgeopt.runtimes.sessions import check_threads

    threads = kwargs.get("threads")
    if not isinstance(threads, int) or threads <= MAX_THREADS:
        return
    names = [d for d in str(kwargs.get("device") or "").split(",") if d]  # optimize takes several
    check_threads(threads, remote=bool(names) and all(get_device(name).ssh for name in names))


@contextlib.contextmanager
def terminate_as_exit() -> Iterator[None]:
    """SIGTERM ends the command like Ctrl-C would: cleanup code runs, temp files are removed."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _reject_non_finite(kwargs: dict[str, Any]) -> None:
    """The safety net under cli/options.py: no NaN or infinity reaches a command, named or not."""
    import math

    for name, value in kwargs.items():
        for v in value if isinstance(value, (list, tuple)) else (value,):
            if isinstance(v, float) and not math.isfinite(v):
                raise BadInput(f"{_flag(name)} must be a finite number, got {v}")


def _flag(name: str) -> str:
    ctx = get_current_context(silent=True)
    for param in ctx.command.params if ctx is not None else ():
        if param.name == name and param.opts:
            return max(param.opts, key=len)
    return "--" + name.replace("_", "-")


class _JsonSlot:
    """The one JSON document a ``--json -`` command prints, held until its other output is done."""

    active = False
    payloads: list[Any] = []


@contextlib.contextmanager
def json_stdout(active: bool) -> Iterator[None]:
    """While the command runs, send stdout to stderr (Python-level and, for a real terminal or
    pipe, file descriptor 1 too, which covers C libraries and child processes); then write the
    document ``emit_json('-', ...)`` handed over, if any, to the real stdout."""
    if not active:
        yield
        return
    real_stdout = sys.stdout
    saved_fd = None
    with contextlib.suppress(AttributeError, OSError, ValueError):
        if real_stdout.fileno() == 1:
            real_stdout.flush()
            saved_fd = os.dup(1)
            os.dup2(2, 1)
    sys.stdout = sys.stderr
    _JsonSlot.active, _JsonSlot.payloads = True, []
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        sys.stdout = real_stdout
        if saved_fd is not None:
            os.dup2(saved_fd, 1)
            os.close(saved_fd)
        payloads, _JsonSlot.active, _JsonSlot.payloads = _JsonSlot.payloads, False, []
        if payloads:
            from edgeopt.fileio import _json_default

            real_stdout.write(json.dumps(payloads[-1], indent=2, default=_json_default) + "\n")
            real_stdout.flush()


def check_json_target(target: str) -> None:
    """``--json FILE`` goes into an existing folder and is not a folder; checked before any work."""
    if target == "-":
        return
    path = Path(target)
    if path.is_dir():
        raise BadInput(f"--json {target} is a directory; give a file name, or - for stdout")
    if not path.parent.is_dir():
        raise BadInput(f"--json {target}: folder {path.parent} does not exist")


# Parameters that name files a command reads; no output may be one of them.
INPUT_PARAMS = ("model", "models", "data", "eval_data", "test_data", "reference", "weights", "teacher",
                "teacher_weights", "recipe", "recipes", "original_data", "deployed", "outdir")


def output_files(command: str, out: Path, kwargs: dict[str, Any]) -> dict[str, Path]:
    """Every file ``command`` writes for ``-o out``: the output itself and the side files beside it."""
    from edgeopt.fileio import report_path

    if command == "optimize":
        suffix = {"executorch": ".pte", "tflite": ".tflite"}.get(str(kwargs.get("target")), ".onnx")
        return {"-o": out / f"model{suffix}", "report": out / "report.json", "Markdown report": out / "report.md",
                "HTML report": out / "report.html"}
    if command == "plan":  # split MODEL -o OUTDIR
        files = {"plan": out / "plan.json"}
        if out.is_dir():
            files.update({f"stage {p.name}": p for p in sorted(out.glob("stage_*.onnx"))})
        return files
    files = {"-o": out}
    if command in ("quantize", "prune", "adapt", "distill", "export"):
        files["report"] = report_path(out)
    if command in ("prune", "adapt", "distill"):
        files["state_dict"] = out.with_suffix(".pt")
    if command == "prune":
        files["torch.export archive"] = out.with_suffix(".pt2")
    if command == "adapt":
        files["checkpoint"] = out.with_name(out.name + ".ckpt.pt")
    if command == "distill":
        files["vocabulary"] = out.with_suffix(".vocab.json")
    modes = [m.strip() for m in str(kwargs.get("quantize") or "").split(",") if m.strip()]
    if command == "export" and len(modes) > 1:
        files.update({f"{m} variant": out.with_name(f"{out.stem}_{m}{out.suffix}") for m in modes})
    return files


def _check_side_files_are_ours(out: Path, files: dict[str, Path]) -> None:
    """A side file (``OUT.pt``, ``OUT.pt2``, ``OUT.vocab.json``) may replace only an earlier run's.

    An earlier run lists its side files in ``OUT``'s .report.json; an existing file it does not
    list is the user's (their weights, say) and is never overwritten.
    """
    from edgeopt.fileio import report_path

    side = {what: p for what, p in files.items() if what in ("state_dict", "torch.export archive", "vocabulary")}
    existing = {what: p for what, p in side.items() if p.exists()}
    if not existing:
        return
    listed: set[Path] = set()
    try:
        report = json.loads(report_path(out).read_text())
        outputs = report.get("outputs", {}) if isinstance(report, dict) else {}
        values = list(outputs.values()) if isinstance(outputs, dict) else []
        values.append(report.get("vocab") if isinstance(report, dict) else None)
        listed = {Path(v).resolve() for v in values if isinstance(v, str)}
    except (OSError, ValueError, RecursionError):
        pass
    for what, path in existing.items():
        if path.resolve() not in listed:
            raise BadInput(f"-o {out} would overwrite {path} (its {what}), which no earlier edgeopt run of -o {out} "
                           "wrote; move that file or choose another -o")


def check_command_outputs(command: str, kwargs: dict[str, Any]) -> None:
    """Before any work: no output (``-o``, its side files, ``--json``) is an input, a folder, or unwritable."""
    from edgeopt.fileio import check_outputs, input_paths

    inputs = input_paths(kwargs.get(name) for name in INPUT_PARAMS)
    json_out = kwargs.get("json_out")
    if json_out is not None:
        check_outputs({"--json": json_out}, inputs)
    out = kwargs.get("out")
    if out is not None:
        files = output_files(command, Path(out), kwargs)
        check_outputs({("-o" if what == "-o" else f"-o {out}: its {what}"): path for what, path in files.items()},
                      inputs, missing_parent_ok=True)
        _check_side_files_are_ours(Path(out), files)
        if json_out not in (None, "-") and any(Path(json_out).resolve() == p.resolve() for p in files.values()):
            raise BadInput(f"--json {json_out} is one of the files -o {out} writes; choose another name")


def emit_json(target: str | None, payload: Any) -> None:
    """Write ``payload`` to ``target`` (a path, atomically) or, for ``-``, as stdout's only content."""
    if target is None:
        return
    from edgeopt.fileio import _json_default, write_json

    if target == "-":
        if _JsonSlot.active:
            if _JsonSlot.payloads:
                raise RuntimeError("a command emitted two JSON documents for --json -")
            _JsonSlot.payloads.append(payload)
        else:
            sys.stdout.write(json.dumps(payload, indent=2, default=_json_default) + "\n")
    else:
        write_json(Path(target), payload)


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def fmt_pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def fmt_cos(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


# Options shared by commands (typer reads these Annotated aliases).
JsonOpt = Annotated[str | None, typer.Option("--json", help="Write results as JSON to this file ('-' for stdout).")]
WeightsOpt = Annotated[Path | None, typer.Option("--weights", help="state_dict (.pt/.pth) for a file.py:factory model.")]
TrustPickleOpt = Annotated[bool, typer.Option("--trust-pickle", help="Allow loading pickled modules (runs code from the file).")]
TrustCodeOpt = Annotated[bool, typer.Option("--trust-code", help="Allow a recipe to name Python files (e.g. a distillation student file.py:factory); importing them runs their code.")]
RuntimeOpt = Annotated[str | None, typer.Option("--runtime", help="onnxruntime, openvino, litert or torch; default: the model's stored runtime.")]
ThreadsOpt = Annotated[int | None, typer.Option("--threads", callback=opt.threads, metavar="N",
                                              help="Intra-op threads; default: the --device profile's "
                                                   "(without --device: the host profile, all cores).")]
DeviceOpt = Annotated[str | None, typer.Option("--device", help="Device profile name or .yaml file (see edgeopt devices).")]
InputSizeOpt = Annotated[str | None, typer.Option("--input-size", metavar="CxHxW", help="Image folders: the size images are resized to, e.g. 3x224x224.")]
MeanOpt = Annotated[str | None, typer.Option("--mean", metavar="M,M,M", help="Image folders: per-channel mean, e.g. 0.485,0.456,0.406.")]
StdOpt = Annotated[str | None, typer.Option("--std", metavar="S,S,S", help="Image folders: per-channel std, e.g. 0.229,0.224,0.225.")]
SecondsOpt = Annotated[float, typer.Option("--seconds", callback=opt.seconds, help="Minimum timed seconds per model.")]
SECONDS = 2.0  # every command's --seconds default: DESIGN's "at least 100 runs and 2 s" (BenchSettings)
RunsOpt = Annotated[int, typer.Option("--runs", callback=opt.at_least_one, help="Minimum timed runs per model.")]
MaxDropOpt = Annotated[float, typer.Option("--max-drop", callback=opt.unit_interval_drop, help="Allowed drop in absolute points (0.01 = 1 pt).")]
MetricOpt = Annotated[str, typer.Option("--metric", help="What the budget judges: auto (class scores: accuracy, or "
                                        "agreement where the original is confident; a text encoder, i.e. data "
                                        "with an attention mask: neighbours; other outputs: cosine), accuracy, "
                                        "agreement, cosine or neighbours (nearest-neighbour agreement of the pooled "
                                        "embeddings where the original's neighbour is clear).")]
MinCosineOpt = Annotated[float | None, typer.Option("--min-cosine", callback=opt.cosine, help="Never choose a variant "
                                                    "whose mean cosine to the original is below this, whatever the "
                                                    "metric [default: 0.99; judged by agreement: 1 - max-drop/2, "
                                                    "e.g. 0.995 at 1 pt].", show_default=False)]
QatEpochsOpt = Annotated[int | None, typer.Option("--qat-epochs", callback=opt.qat_epochs, help="PyTorch model with "
                                                  "labelled --data: epochs of the QAT recovery step, run when no "
                                                  "all-INT8 variant meets the budget (default 3; 0: no QAT).")]


def resolve_threads(threads: int | None, device: Any = None) -> int:
    """``--threads`` as every command reads it: the given number, else the --device profile's (host: all cores)."""
    if threads is not None:
        return threads
    from edgeopt.devices import get_device

    return get_device(device).effective_threads()


def check_threads(threads: int | None) -> None:
    """Reject ``--threads`` below 1; None leaves the choice to the command."""
    if threads is not None and threads < 1:
        raise BadInput(f"--threads must be >= 1, got {threads}")


def check_output_dir(out: Path) -> None:
    """Create the folder ``out`` goes into and prove it is writable, before any long work starts."""
    from edgeopt.fileio import check_writable_dir

    check_writable_dir(out.parent)


def check_onnx_output(out: Path) -> None:
    """``-o`` must name an .onnx file, not a folder, in a writable folder."""
    if out.suffix.lower() != ".onnx":
        raise BadInput(f"-o must name an .onnx file, got {out}")
    if out.is_dir():
        raise BadInput(f"-o {out} is a directory; give a file name ending in .onnx")
    check_output_dir(out)


def parse_floats(text: str | None, flag: str) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise BadInput(f"{flag} takes comma-separated numbers, got {text!r}") from None


InputShapeOpt = Annotated[str | None, typer.Option(
    "--input-shape", help="PyTorch models: input shape with batch, e.g. 1x3x224x224 (instead of --data).")]


def parse_input_shape(text: str | None) -> tuple[int, ...] | None:
    """``1x3x224x224`` -> (1, 3, 224, 224); BadInput for anything else."""
    if text is None:
        return None
    parts = text.lower().replace(",", "x").split("x")
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        raise BadInput(f"--input-shape takes dimensions joined by x, e.g. 1x3x224x224, got {text!r}") from None
    if len(dims) < 2 or any(d < 1 for d in dims):
        raise BadInput(f"--input-shape needs a batch and at least one more dimension, all >= 1, got {text!r}")
    return dims


_IMAGE_FLAGS: contextvars.ContextVar[tuple[str | None, str | None, str | None]] = contextvars.ContextVar(
    "image_flags", default=(None, None, None))


def load_data_arg(spec: str, input_size: str | None = None, mean: str | None = None, std: str | None = None) -> Any:
    """Load ``--data``-style input; an image folder uses the command's --input-size/--mean/--std."""
    from edgeopt.data import load_data, parse_size

    given = _IMAGE_FLAGS.get()
    input_size, mean, std = input_size or given[0], mean or given[1], std or given[2]
    return load_data(spec, input_size=parse_size(input_size) if input_size else None,
                     mean=parse_floats(mean, "--mean"), std=parse_floats(std, "--std"))


def image_folder_flags(func: F) -> F:
    """Give a command whose data flags accept image folders --input-size, --mean and --std, declared
    here once; every ``load_data_arg`` inside the command then reads them."""
    signature = inspect.signature(func, eval_str=True)
    extra = [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None, annotation=kind)
             for name, kind in (("input_size", InputSizeOpt), ("mean", MeanOpt), ("std", StdOpt))]
    params = list(signature.parameters.values())
    at = next((i for i, p in enumerate(params) if p.name == "json_out"), len(params))
    params[at:at] = extra

    @functools.wraps(func)
    def wrapper(*args: Any, input_size: str | None = None, mean: str | None = None, std: str | None = None,
                **kwargs: Any) -> Any:
        token = _IMAGE_FLAGS.set((input_size, mean, std))
        try:
            return func(*args, **kwargs)
        finally:
            _IMAGE_FLAGS.reset(token)

    wrapper.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in params}
    return wrapper  # type: ignore[return-value]
