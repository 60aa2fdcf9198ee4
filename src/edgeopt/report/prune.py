"""The ``prune`` command's result: the technique (transforms/prune.py), its ONNX export, the shared
before/after measurement (measure/outcome.py) and the files it writes (.onnx, .pt, .pt2).

The technique returns a model and its facts (per-layer sparsity or shapes, steps, fine-tune
history); this module adds what a user checks it by: MACs and parameters, sizes (gzip too:
unstructured zeros shrink only when compressed), accuracy before/after on data that tuned nothing,
and batch-1 latency timed interleaved with the original, the way optimize measures its candidates.
"""

from __future__ import annotations

import gzip
import io
from dataclasses import dataclass, field
from typing import Any

from edgeopt.data import Dataset
from edgeopt.deps import require
from edgeopt.errors import ModelError, first_line
from edgeopt.model import Model
from edgeopt.transforms.prune import PruneConfig, UnstructuredPrune, example_input, pruned_model, torch_module


@dataclass
class PruneResult:
    """The pruned PyTorch model, its verified ONNX export, and the report (as written to JSON)."""

    model: Model
    onnx: Model
    report: dict[str, Any] = field(default_factory=dict)


def _state_dict_bytes(module: Any) -> bytes:
    torch = require("torch", extra="torch")
    buf = io.BytesIO()
    torch.save(module.state_dict(), buf)
    return buf.getvalue()


def _sizes(onnx_model: Model, module: Any) -> dict[str, int]:
    onnx_bytes = onnx_model.serialized()
    state = _state_dict_bytes(module)
    return {"onnx_bytes": len(onnx_bytes), "onnx_gzip_bytes": len(gzip.compress(onnx_bytes, 6)),
            "state_dict_bytes": len(state), "state_dict_gzip_bytes": len(gzip.compress(state, 6))}


def prune(model: Model, config: PruneConfig, *, data: Dataset | None = None, eval_data: Dataset | None = None,
          threads: int | None = None, device: Any = None, latency: bool = True, bench_settings: Any = None,
          progress: bool = False) -> PruneResult:
    """Prune a PyTorch model, fine-tune it on ``data``, export it to ONNX and measure the effect.

    Args:
        model: a PyTorch Model (``file.py:factory`` + weights, or ``.pt2``); it is not changed.
        config: :class:`UnstructuredPrune` or :class:`StructuredPrune`.
        data: fine-tuning data (and Taylor gradients). Without ``eval_data``, a labelled ``data``
            used for either is split 80/20 (stratified) so the result is judged on samples it was
            not tuned on; when ``data`` is not used for tuning, it is only judged on.
        eval_data: the data accuracy before/after is judged on (never used for tuning).
        threads: intra-op threads for timing and evaluation; default: ``device``'s, else 1.
        device: a device profile (name, .yaml or DeviceProfile) whose runtime and threads time
            the models; default: ONNX Runtime.
        latency: time the original and pruned ONNX models interleaved (``measure.compare``).
        bench_settings: ``BenchSettings`` for that timing and for ``target_latency_ms``'s.

    Returns:
        PruneResult with the pruned torch Model, its verified ONNX export and the report:
        MACs/params before and after, per-layer sparsity or shapes, sizes and gzip sizes,
        latency before/after and accuracy before/after (when labels exist); for a latency
        target, ``target_latency`` (every timing, the original's and the reached latency) and
        ``target_latency_met``.

    Raises:
        ModelError: the model is not PyTorch.
        ConfigError: invalid layers or settings.

    Example:
        >>> r = prune(load_model("net.py:build", weights="w.pt"), StructuredPrune(ratio=0.5))  # doctest: +SKIP
        >>> r.report["macs"]["reduction_pct"]
    """
    from edgeopt.measure.complexity import count_macs_params
    from edgeopt.measure.outcome import measure_outcome
    from edgeopt.transforms.config import config_to_dict
    from edgeopt.transforms.export import to_onnx
    from edgeopt.transforms.prune_latency import LatencyTiming

    original = torch_module(model)
    runtime = None if device is not None else "onnxruntime"
    threads = threads if threads is not None or device is not None else 1
    tune_data = data
    uses_data = config.train.epochs > 0 or getattr(config, "importance", None) == "taylor"
    if data is not None and eval_data is None and data.labels is not None and uses_data:
        tune_data, eval_data = data.split(0.8, seed=config.train.seed)
    elif data is not None and eval_data is None and data.labels is not None:
        eval_data = data
    example = example_input(model, tune_data or eval_data)
    input_shape = tuple(example.shape)
    macs0, params0 = count_macs_params(original, example)
    check_data = eval_data or tune_data
    base_onnx, _ = to_onnx(Model.from_torch(original, source=model.source, input_shape=input_shape), data=check_data)
    timing = LatencyTiming(original=base_onnx, runtime=runtime, threads=threads, device=device,
                           settings=bench_settings)
    pruned, info = pruned_model(model, config, train=tune_data, example_data=eval_data, progress=progress,
                                timing=timing)
    module = pruned.module
    macs1, params1 = count_macs_params(module, example)
    pruned_onnx, check = to_onnx(pruned, data=check_data)
    report: dict[str, Any] = {
        "model": model.source, **info, "config": config_to_dict(config),
        "macs": {"before": macs0, "after": macs1, "reduction_pct": round(100.0 * (1 - macs1 / macs0), 2)
                 if macs0 else None},
        "params": {"before": params0, "after": params1,
                   "reduction_pct": round(100.0 * (1 - params1 / params0), 2) if params0 else None},
        "sizes": {"before": _sizes(base_onnx, original), "after": _sizes(pruned_onnx, module)},
        "export_check": check.to_dict(),
        "data": {"tuned_on": tune_data.source if tune_data is not None and uses_data else None,
                 "judged_on": eval_data.source if eval_data is not None else None},
    }
    if isinstance(config, UnstructuredPrune):
        report["note"] = ("unstructured zeros are still stored and multiplied by dense runtimes: the model "
                          "shrinks only when compressed (gzip sizes), and latency is as measured, not assumed")
    judged = eval_data if eval_data is not None and eval_data.labels is not None else None
    if judged is not None or latency:
        outcome = measure_outcome(base_onnx, pruned_onnx, data=judged, latency=latency, bench=bench_settings,
                                  device=device, threads=threads, name="pruned")
        if outcome.accuracy_block() is not None:
            report["accuracy"] = outcome.accuracy_block()
        if latency:
            report["latency"] = outcome.latency_block()
    return PruneResult(model=pruned, onnx=pruned_onnx, report=report)


def save_pruned(result: PruneResult, out: Any) -> dict[str, str]:
    """Write OUT (.onnx), OUT.pt (state_dict), OUT.pt2 (torch.export, reloadable architecture).

    A structured-pruned state_dict only fits the pruned architecture, which the .pt2 carries.
    """
    from pathlib import Path

    torch = require("torch", extra="torch")
    from edgeopt.fileio import atomic_path

    target = Path(out)
    module = result.model.module.eval()
    shape = result.model.inputs[0].shape if result.model.inputs else None
    example = torch.zeros((2, *shape[1:])) if shape else None
    paths = {"onnx": str(target), "state_dict": str(target.with_suffix(".pt")), "pt2": str(target.with_suffix(".pt2"))}
    if example is None:
        raise ModelError(f"{result.model.source}: input shape unknown; cannot write the .pt2 archive")
    try:
        program = torch.export.export(module, (example,),
                                      dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=65536)},))
    except Exception as exc:
        from edgeopt.errors import UnsupportedOperation

        raise UnsupportedOperation(f"torch.export of the pruned model failed: {first_line(exc)}") from exc
    with atomic_path(paths["pt2"]) as tmp:
        staged = tmp.with_suffix(".pt2")  # torch.export.save wants the .pt2 suffix
        try:
            torch.export.save(program, str(staged))
            staged.replace(tmp)
        finally:
            staged.unlink(missing_ok=True)
    with atomic_path(paths["state_dict"]) as tmp:
        torch.save(module.state_dict(), str(tmp))
    result.onnx.save(target)
    return paths
