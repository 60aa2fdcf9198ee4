"""INT8 recovery for ``quantize --mode auto`` when plain INT8 misses the budget: measured steps, in order.

1. **calibration**: percentile ranges (and entropy on small graphs: ONNX Runtime's histogram
   calibrators cost minutes on a 65-layer CNN) and a smaller sample count, each built and judged;
   the best ranges go on.
2. **repairs**: empirical bias correction (each layer's own INT8 mean shift given back through its
   bias, transforms/bias_correction.py); kept only when the judge says it helped.
3. **mixed precision by measured cost and gain**: the one-pass per-layer error
   (transforms/layer_error.py) ranks every weight layer; ONNX Runtime's profiler says how much
   time each layer's INT8 kernel saves over FP32 (measure/layer_times.py). Layers are reverted to
   float in order of error per millisecond saved, 1, 2, 4, ... then bisected, so the fewest layers
   that meet the budget stay float and those that keep INT8's speed stay INT8. Float means FP32:
   ONNX Runtime's CPU provider has no faster BF16 convolution.
4. **NNCF accuracy control** (``nncf.quantize_with_accuracy_control``) beside it, when OpenVINO
   is among the runtimes: NNCF's own search for the quantizers to drop, judged by the same metric.
5. **QAT** (transforms/qat.py), for PyTorch models with labelled data: a few epochs through INT8
   fake quantization with the FP32 model as teacher, starting from the best all-INT8 step's
   calibration settings and exported to the same INT8 graph, so it keeps all-INT8 speed where
   mixed precision pays for accuracy with float layers. It trains on the calibration part only.

Each step appends a row to ``steps`` (what was tried, its agreement/accuracy, cosine, drop with
the 90 % interval, float layers); the variants each step keeps go to the interleaved timing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np

from edgeopt.data import Dataset
from edgeopt.model import Model
from edgeopt.search.budget import Budget
from edgeopt.search.engine import Candidate, CandidateResult
from edgeopt.search.recipe import Recipe
from edgeopt.transforms.quantize import DynamicInt8, StaticInt8, prepared, weight_nodes

# ONNX Runtime's entropy calibrator builds a histogram per tensor in Python; beyond this many weight
# layers it is left out (measured: 4 min for EfficientNet-Lite1 on a loaded 2-core machine).
ENTROPY_MAX_LAYERS = 32
# Mixed precision keeps at most this share of the weight layers float.
MAX_FLOAT_SHARE = 0.5

Run = Callable[[list[Recipe]], list[CandidateResult]]


def _quality(r: CandidateResult) -> tuple[int, float, float]:
    """Sort key, best first: meets the budget, then smallest drop, then highest cosine."""
    return (0 if r.meets_budget else 1, r.drop if r.drop is not None else 1.0, -(r.cosine or 0.0))


def step_row(step: str, r: CandidateResult, **extra: Any) -> dict[str, Any]:
    return {"step": step, "variant": r.name, "status": "failed" if r.model is None else
            ("meets budget" if r.meets_budget else "misses budget"),
            "accuracy": r.accuracy, "agreement": r.agreement, "confident_agreement": r.confident_agreement,
            "cosine": r.cosine, "drop": r.drop, "drop_interval": r.drop_interval, "judged": r.judged,
            "reason": r.reason if r.model is None else "", **extra}


def recover(original: Model, calibration: Dataset, evaluation: Dataset, budget: Budget, *, start: CandidateResult,
            start_config: StaticInt8, run: Run, runtimes: tuple[str, ...], threads: int | None,
            steps: list[dict[str, Any]], notes: list[str], baseline_outputs: np.ndarray,
            baseline_metric: float, run_torch: Run | None = None, qat_epochs: int = 0) -> list[CandidateResult]:
    """Run the recovery steps from ``start`` (the best plain ONNX Runtime static INT8 variant, built
    with ``start_config``). ``run_torch`` builds recipes from the PyTorch original with labelled
    training data (None: no QAT step); ``qat_epochs`` 0 leaves QAT out.

    Returns the candidates to time (the best of each step, the mixed-precision result, NNCF's);
    every try is recorded in ``steps``.
    """
    configs: dict[int, StaticInt8] = {id(start): start_config}

    def run_cfg(recipes: list[Recipe]) -> list[CandidateResult]:
        results = run(recipes)
        for recipe, r in zip(recipes, results, strict=True):
            configs[id(r)] = recipe.steps[0]  # type: ignore[assignment]
        return results

    def _cfg(r: CandidateResult) -> StaticInt8:
        return configs[id(r)]

    base_cfg = start_config
    layers = weight_nodes(prepared(original))
    keep: list[CandidateResult] = []
    best = start
    steps.append(step_row("0 plain", start, config=base_cfg.label))

    # 1. calibration method and sample count
    tries: list[Recipe] = [_recipe("percentile", replace(base_cfg, calibration="percentile",
                                                             samples=min(base_cfg.samples, 32)))]
    if len(layers) <= ENTROPY_MAX_LAYERS:
        tries.append(_recipe("entropy", replace(base_cfg, calibration="entropy", samples=min(base_cfg.samples, 64))))
    else:
        notes.append(f"entropy calibration skipped: {len(layers)} weight layers (ONNX Runtime's histogram "
                     f"calibrator is minutes per model beyond {ENTROPY_MAX_LAYERS})")
    if base_cfg.samples > 32 and len(calibration) > 32:
        tries.append(_recipe("minmax-32-samples", replace(base_cfg, samples=32)))
    for r in run_cfg(tries):
        steps.append(step_row("1 calibration", r, config=_cfg(r).label if r.model else None,
                              samples=_cfg(r).samples if r.model else None))
        if r.model is not None and _quality(r) < _quality(best):
            best = r
    if best is not start:
        keep.append(best)

    # 2. data-free repairs: bias correction
    if best.meets_budget:
        return keep
    corrected = run_cfg([_recipe("bias-corrected", replace(_cfg(best), bias_correction=True))])[0]
    steps.append(step_row("2 bias correction", corrected))
    if corrected.model is not None and _quality(corrected) < _quality(best):
        best = corrected
        keep.append(best)
    if best.meets_budget:
        return keep

    # 3. mixed precision by measured cost and gain
    keep += _mixed(original, calibration, evaluation, best, _cfg(best), run=run, threads=threads, steps=steps,
                   notes=notes)

    # 4. NNCF accuracy control beside it
    if "openvino" in runtimes:
        keep.append(_nncf_accuracy_control(original, calibration, evaluation, budget,
                                           baseline_outputs=baseline_outputs, baseline_metric=baseline_metric,
                                           steps=steps))

    # 5. QAT from the best all-INT8 settings, for PyTorch models with labels
    if run_torch is not None and qat_epochs > 0:
        keep += qat_step(_cfg(best), run_torch=run_torch, epochs=qat_epochs, steps=steps)
    return keep


def qat_step(cfg: StaticInt8, *, run_torch: Run, epochs: int, steps: list[dict[str, Any]]) -> list[CandidateResult]:
    """Step 5: QAT with the FP32 model as teacher, quantized with ``cfg`` (the PTQ settings it starts from)."""
    from edgeopt.transforms.export import OnnxExport
    from edgeopt.transforms.qat import QatConfig

    qat = QatConfig(epochs=epochs, per_channel=cfg.per_channel)
    recipe = Recipe(f"int8-qat-{epochs}ep-{'perchannel' if cfg.per_channel else 'pertensor'}",
                    (qat, OnnxExport(), cfg), needs=("torch", "train", "calibration"))
    r = run_torch([recipe])[0]
    steps.append(step_row("5 QAT", r, config=cfg.label, epochs=epochs,
                          build_seconds=round(r.build_seconds, 1) if r.build_seconds else None))
    return [r] if r.model is not None else []


def _recipe(tag: str, cfg: StaticInt8) -> Recipe:
    name = f"int8-qdq-{cfg.activation_type}{cfg.weight_type}-{'perchannel' if cfg.per_channel else 'pertensor'}-{tag}"
    return Recipe(name, (cfg,), needs=("calibration",))


def layer_priority(errors: list[Any], saved_ms: dict[str, float]) -> list[tuple[str, float, float, float]]:
    """(layer, noise, ms INT8 saves, priority), most worth reverting first.

    Priority is the layer's error per share of INT8's time saving it holds, the share floored at
    5 %: a layer whose INT8 kernel saves nothing (or is slower, as a 3-channel stem conv often is)
    is reverted first when it has any error; among layers that save time alike, the noisiest goes.
    """
    total = sum(max(v, 0.0) for v in saved_ms.values()) or 1.0
    rows = []
    for e in errors:
        saved = saved_ms.get(e.node, 0.0)
        share = max(saved, 0.0) / total
        rows.append((e.node, e.noise, saved, e.noise / max(share, 0.05)))
    return sorted(rows, key=lambda t: -t[3])


def mixed_precision(original: Model, calibration: Dataset, evaluation: Dataset, start: CandidateResult,
                    cfg: StaticInt8 | DynamicInt8, *, run: Run, threads: int | None, steps: list[dict[str, Any]],
                    notes: list[str]) -> list[CandidateResult]:
    """Step 3 alone, from ``start`` built with ``cfg`` (static INT8, or dynamic INT8 for transformers,
    whose per-layer error then quantizes each twin's input at run time as dynamic INT8 does)."""
    return _mixed(original, calibration, evaluation, start, cfg, run=run, threads=threads, steps=steps, notes=notes)


def _mixed(original: Model, calibration: Dataset, evaluation: Dataset, best: CandidateResult,
           cfg: StaticInt8 | DynamicInt8, *, run: Run, threads: int | None, steps: list[dict[str, Any]],
           notes: list[str]) -> list[CandidateResult]:
    from edgeopt.measure.layer_times import layer_times, node_times
    from edgeopt.transforms.layer_error import layer_errors

    started = time.perf_counter()
    try:
        judged = evaluation.take(np.arange(min(len(evaluation), 64)))
        errors = layer_errors(original, calibration, judged, config=cfg, threads=threads or 1)
        proto = prepared(original)
        names = [e.node for e in errors]
        fp32_ms = layer_times(node_times(original, evaluation, threads=threads or 1), proto, names)
        int8_ms = layer_times(node_times(best.model, evaluation, threads=threads or 1), proto, names)  # type: ignore[arg-type]
    except Exception as exc:  # noqa: BLE001 - an extra step; the variants so far still stand
        steps.append({"step": "3 mixed precision", "status": "failed", "reason": f"per-layer analysis: {exc}"})
        return []
    saved = {n: fp32_ms[n] - int8_ms[n] for n in names}
    order = layer_priority(errors, saved)
    notes.append(f"one-pass per-layer error: {len(errors)} layers ranked in {time.perf_counter() - started:.0f} s "
                 f"(profiled INT8 saves {sum(max(v, 0) for v in saved.values()):.2f} ms a call over the weight layers)")
    limit = max(1, int(len(order) * MAX_FLOAT_SHARE))
    tried: dict[int, CandidateResult] = {}

    def probe(k: int) -> CandidateResult:
        if k not in tried:
            float_nodes = tuple(n for n, *_ in order[:k])
            kind = "int8-dynamic" if isinstance(cfg, DynamicInt8) else "int8"
            r = run([Recipe(f"{kind}-mixed-{k}-float", (replace(cfg, exclude_nodes=float_nodes),),
                            needs=() if isinstance(cfg, DynamicInt8) else ("calibration",))])[0]
            steps.append(step_row("3 mixed precision", r, float_layers=list(float_nodes),
                                  int8_ms_saved_by_float_layers=round(sum(saved[n] for n in float_nodes), 3)))
            tried[k] = r
        return tried[k]

    k, last_miss = 1, 0
    while k <= limit and not probe(k).meets_budget:
        last_miss, k = k, k * 2
    if k > limit:
        k = limit
        if not probe(k).meets_budget:
            best_try = min(tried.values(), key=_quality)
            return [best_try] if best_try.model is not None else []
    low, high = last_miss, k  # low misses (0 = the start), high meets
    while high - low > 1:
        mid = (low + high) // 2
        if probe(mid).meets_budget:
            high = mid
        else:
            low = mid
    return [probe(high)]


def _nncf_accuracy_control(original: Model, calibration: Dataset, evaluation: Dataset, budget: Budget, *,
                           baseline_outputs: np.ndarray, baseline_metric: float,
                           steps: list[dict[str, Any]]) -> CandidateResult:
    from edgeopt.search.engine import result_for
    from edgeopt.transforms.nncf_quantize import nncf_accuracy_control

    start = time.perf_counter()
    recipe = Recipe("openvino-nncf-accuracy-control", (), runtime="openvino")
    try:
        model = nncf_accuracy_control(original, calibration=calibration, validation=evaluation,
                                      baseline_outputs=baseline_outputs, metric=budget.metric,
                                      max_drop=budget.max_drop)
        cand = Candidate(recipe, model, build_seconds=time.perf_counter() - start)
    except Exception as exc:  # noqa: BLE001 - a candidate beside the others
        cand = Candidate(recipe, None, error=str(exc), build_seconds=time.perf_counter() - start)
    r = result_for(cand, key=recipe.key(), eval_data=evaluation, budget=budget, baseline_outputs=baseline_outputs,
                   baseline_metric=baseline_metric)
    steps.append(step_row("4 NNCF accuracy control", r))
    return r
