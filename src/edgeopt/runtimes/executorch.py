"""ExecuTorch on the CPU: ``.pte`` programs through ``executorch.runtime`` (XNNPACK delegate + portable kernels).

Why a session does more than call ``execute``: a ``.pte`` is exported for fixed input shapes (batch 1
by edgeopt), while bench, eval and serve pass batches. A feed whose batch differs from the program's
runs one sample at a time and the outputs are concatenated, as the LiteRT session does for graphs
fixed to batch 1.

Threads: ExecuTorch's thread pool is process-wide, and XNNPACK binds a loaded method to the pool that
existed when it was loaded; resizing the pool afterwards leaves those methods pointing at a freed pool
(a segfault some runs later, found by timing: resizing before every run crashed within seconds). So the
pool is sized once, before a method loads, and a second thread count in the same process, while a
program loaded at the first is alive, is refused with a clear error.
"""

from __future__ import annotations

import contextlib
import gc
import os
import sys
import threading
import weakref
from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from edgeopt.deps import available, require
from edgeopt.errors import BadInput, DataError, ModelError, UnsupportedOperation, first_line

if TYPE_CHECKING:
    from edgeopt.model import Model

# ExecuTorch ScalarType codes -> numpy dtype names (the ones a model's inputs and outputs use).
SCALAR_TYPES = {0: "uint8", 1: "int8", 2: "int16", 3: "int32", 4: "int64", 5: "float16", 6: "float32",
                7: "float64", 11: "bool", 15: "bfloat16"}
_POOL_LOCK = threading.Lock()
_POOL: dict[str, int] = {}  # "threads": the size edgeopt gave the process-wide pool
_LIVE: weakref.WeakSet[Any] = weakref.WeakSet()  # sessions whose methods are bound to that pool


def _portable_lib() -> Any:
    return require("executorch.extension.pybindings.portable_lib", extra="executorch")


@contextlib.contextmanager
def native_stderr_quiet() -> Iterator[None]:
    """ExecuTorch's C++ side logs cpuinfo probes and thread-pool resets to fd 2; keep them off the CLI.

    Only around loading and pool resizing, never around a run, so real errors still reach stderr.
    """
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # pytest capture or an embedded interpreter
        yield
        return
    sys.stderr.flush()
    saved = os.dup(fd)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
        yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)
        os.close(devnull)


def pool_threads(threads: int | None) -> int:
    """Size the process-wide pool for a method about to load (None: keep it); the size it has.

    Raises:
        BadInput: another thread count is asked for while programs loaded at the current one are alive.
    """
    lib = _portable_lib()
    current = _POOL.get("threads") or int(lib._threadpool_get_thread_count())
    if threads is None or threads == current:
        _POOL["threads"] = current
        return current
    if len(_LIVE):
        gc.collect()  # sessions only held by reference cycles
    if len(_LIVE):
        raise BadInput(f"ExecuTorch's thread pool is process-wide and {len(_LIVE)} loaded program(s) use "
                       f"{current} thread(s); load every .pte in one process with the same --threads "
                       f"(asked for {threads})")
    with native_stderr_quiet():
        lib._unsafe_reset_threadpool(threads)
    _POOL["threads"] = threads
    return threads


def program_summary(payload: bytes) -> dict[str, Any]:
    """What a ``.pte`` executes: delegate calls by backend, portable kernel calls by op name.

    Read from the program itself, so ``bench`` and ``serve`` can say what ran on XNNPACK and what
    fell back to portable kernels for any ``.pte``, not only ones edgeopt exported.
    """
    require("executorch", extra="executorch")
    from executorch.exir._serialize._program import deserialize_pte_binary

    try:
        plan = deserialize_pte_binary(payload).program.execution_plan[0]
    except Exception as exc:
        raise ModelError(f"cannot read the ExecuTorch program: {first_line(exc)}") from exc
    kernels: Counter[str] = Counter()
    backends: Counter[str] = Counter()
    for chain in plan.chains:
        for instr in chain.instructions:
            kind = type(instr.instr_args).__name__
            if kind == "KernelCall":
                op = plan.operators[instr.instr_args.op_index]
                kernels[f"{op.name.replace('::', '.')}.{op.overload}" if op.overload else op.name] += 1
            elif kind == "DelegateCall":
                backends[plan.delegates[instr.instr_args.delegate_index].id] += 1
    return {"delegate_calls": dict(backends), "portable_kernel_calls": dict(kernels)}


def load_program(payload: bytes, source: str) -> Any:
    """An ``executorch.runtime`` Program for the bytes of a ``.pte``; ModelError when they are not one."""
    et_runtime = require("executorch.runtime", extra="executorch")
    try:
        with native_stderr_quiet():
            program = et_runtime.Runtime.get().load_program(payload)
    except Exception as exc:  # the pybinding raises RuntimeError / ValueError variants
        raise ModelError(f"{source} is not a valid ExecuTorch program: {first_line(exc)}; re-export it") from exc
    if "forward" not in program.method_names:
        raise ModelError(f"{source} has no 'forward' method (it has {sorted(program.method_names)})")
    return program


def method_io(program: Any) -> tuple[list[tuple[tuple[int, ...], str]], list[tuple[tuple[int, ...], str]]]:
    """(shape, dtype) of every tensor input and output of ``forward``."""
    meta = program.metadata("forward")
    inputs = [meta.input_tensor_meta(i) for i in range(meta.num_inputs())]
    outputs = [meta.output_tensor_meta(i) for i in range(meta.num_outputs())]
    return ([(tuple(int(s) for s in t.sizes()), SCALAR_TYPES.get(int(t.dtype()), f"et:{t.dtype()}"))
             for t in inputs],
            [(tuple(int(s) for s in t.sizes()), SCALAR_TYPES.get(int(t.dtype()), f"et:{t.dtype()}"))
             for t in outputs])


class ExecutorchSession:
    """One loaded ``forward`` method; numpy in and out, batches split to the exported batch size.

    ``run`` holds a lock: a Method owns its planned memory and is not thread-safe.
    """

    def __init__(self, method: Any, program: Any, source: str, input_names: list[str],
                 output_names: list[str], threads: int) -> None:
        self._torch = require("torch", extra="torch")
        self._method = method
        self._program = program  # the method reads the program's memory: keep it alive as long as the method
        self._source = source
        self._threads = threads
        self.input_names = input_names
        self.output_names = output_names
        in_specs, _ = method_io(program)
        self._shapes = [shape for shape, _ in in_specs]
        self._dtypes = [dtype for _, dtype in in_specs]
        self._lock = threading.Lock()
        self.details: dict[str, Any] = {}

    def _execute(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        torch = self._torch
        tensors = [torch.from_numpy(np.ascontiguousarray(a, dtype=d)) for a, d in
                   zip(arrays, self._dtypes, strict=True)]
        try:
            out = self._method.execute(tensors)
        except Exception as exc:
            raise ModelError(f"ExecuTorch failed to run {self._source}: {first_line(exc)}") from exc
        return [o.numpy().copy() if hasattr(o, "numpy") else np.asarray(o) for o in out]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        try:
            arrays = [np.asarray(feeds[name]) for name in self.input_names]
        except KeyError as exc:
            raise DataError(f"missing input {exc.args[0]!r}; the model takes {self.input_names}") from exc
        for array, shape, name in zip(arrays, self._shapes, self.input_names, strict=True):
            if tuple(array.shape[1:]) != shape[1:]:
                raise DataError(f"input {name} has shape {tuple(array.shape)}; {self._source} was exported "
                                f"for {shape} (batch may differ)")
        with self._lock:
            if all(a.shape[0] == s[0] for a, s in zip(arrays, self._shapes, strict=True)):
                return self._execute(arrays)
            step = self._shapes[0][0]
            n = len(arrays[0])
            if n % step:
                raise DataError(f"{self._source} was exported for batch {step}; got a batch of {n}")
            rows = [self._execute([a[i:i + step] for a in arrays]) for i in range(0, n, step)]
        return [np.concatenate(parts) for parts in zip(*rows, strict=True)]


class ExecutorchRuntime:
    """ExecuTorch CPU runtime for ``.pte`` programs (XNNPACK-delegated parts run in XNNPACK).

    Takes no options; ``threads`` sizes ExecuTorch's process-wide thread pool before the program loads
    (None keeps the pool as it is); every program alive in one process shares that size.

    Example:
        >>> session = ExecutorchRuntime().load(load_model("m.pte"), threads=1)  # doctest: +SKIP
        >>> session.run({session.input_names[0]: x})[0].shape  # doctest: +SKIP
    """

    name = "executorch"
    formats = ("executorch",)

    def available(self) -> bool:
        return available("executorch")

    def load(self, model: Model, *, threads: int | None = None,
             options: dict[str, Any] | None = None) -> ExecutorchSession:
        if options:
            raise BadInput(f"the executorch runtime takes no options, got {sorted(options)}")
        if threads is not None and threads < 1:
            raise BadInput(f"threads must be >= 1, got {threads}")
        if model.format != "executorch":
            raise ModelError(f"ExecuTorch runs .pte programs; {model.source} is {model.format}")
        program = load_program(model.serialized(), model.source)
        with _POOL_LOCK:
            n_threads = pool_threads(threads)
            try:
                with native_stderr_quiet():
                    method = program.load_method("forward")
            except Exception as exc:
                text = first_line(exc)
                if "operator" in text.lower() or "kernel" in text.lower() or "backend" in text.lower():
                    raise UnsupportedOperation(f"ExecuTorch cannot load {model.source}: {text}") from exc
                raise ModelError(f"ExecuTorch cannot load {model.source}: {text}") from exc
            names = [t.name for t in model.inputs] or ["input"]
            outputs = [t.name for t in model.outputs] or ["output"]
            session = ExecutorchSession(method, program, model.source, names, outputs, n_threads)
            _LIVE.add(session)
        session.details = program_summary(model.serialized()) | {"threads": n_threads}
        return session
