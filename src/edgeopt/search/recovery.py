"""INT8 recovery for ``quantize --mode auto`` when plain INT8 misses the budget: measured steps, in order.

1. **calibration**: percentile ranges, entropy and a smaller sample count, each built and
   judged; the best ranges go on. Only on graphs of at most ``HISTOGRAM_MAX_LAYERS`` weight
   layers: ONNX Runtime's histogram calibrators are Python loops, minutes on a 65-layer CNN,
   which alone would break auto's 5-minute bound (the step says so in the report).
2. **repairs**: empirical bias correction (each layer's own INT8 mean shift given back through its
   bias, transforms/bias_correction.py); kept only when the judge says it helped. Same size
   limit (it re-quantizes); NNCF's INT8 already carries NNCF's fast bias correction.
3. **mixed precision by measured cost and gain**: the one-pass per-layer error
   (transforms/layer_error.py) ranks every weight layer; ONNX Runtime's profiler says how much
   time each layer's INT8 kernel saves over FP32 (measure/layer_times.py). Layers are reverted to
   float in order of error per millisecond saved, 1, 2, 4, ... then bisected, so the fewest layers
   that meet the budget stay float and those that keep INT8's speed stay INT8. For static (QDQ)
   INT8 each try is a graph edit of the INT8 model already built (transforms/float_layers.py:
   milliseconds, no re-calibration), done from the best ONNX Runtime INT8 variant and from NNCF's
   OpenVINO INT8 variant when there is one (OpenVINO's INT8 is the faster on x86, leaving more
   room for float layers); NNCF's INT8 is first rebuilt with histogram (MSE) activation ranges and
   its weights re-rounded against each layer's input statistics (transforms/weight_rounding.py),
   or, when the judge does not find that closer, only re-rounded; kept when the judge says closer. Float means FP32: ONNX Runtime's CPU provider has no faster BF16
   convolution, and in OpenVINO BF16 float layers cap the gain (measured), so reverted OpenVINO
   models carry the f32 hint.
4. **NNCF accuracy control** (``nncf.quantize_with_accuracy_control``), when OpenVINO is among
   the runtimes and step 3 found nothing within the budget: NNCF's own search for the quantizers
   to drop, judged by the same metric (it re-quantizes: a minute or more on a real CNN).
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

# ONNX Runtime's percentile/entropy calibrators build a histogram per tensor in Python; beyond this
# many weight layers they (and the re-quantizing bias correction) are left out (measured: 4 min for
# EfficientNet-Lite1's 65 layers on a loaded 2-core machine).
HISTOGRAM_MAX_LAYERS = 32
# Mixed precision keeps at most this share of the weight layers float.
MAX_FLOAT_SHARE = 0.5

Run = Callable[[list[Recipe]], list[CandidateResult]]
Judge = Callable[[Recipe, Model, float], CandidateResult]


def quality_key(r: CandidateResult) -> tuple[int, float, float]:
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
            baseline_metric: float, run_torch: Run | None = None, qat_epochs: int = 0,
            openvino_start: CandidateResult | None = None, device: Any = None) -> list[CandidateResult]:
    """Run the recovery steps from ``start`` (the best plain ONNX Runtime static INT8 variant, built
    with ``start_config``). ``run_torch`` builds recipes from the PyTorch original with labelled
    training data (None: no QAT step); ``qat_epochs`` 0 leaves QAT out. ``openvino_start``: NNCF's
    OpenVINO INT8 variant, a second start for mixed precision.

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

    def judge(recipe: Recipe, model: Model, seconds: float) -> CandidateResult:
        from edgeopt.search.engine import result_for

        return result_for(Candidate(recipe, model, build_seconds=seconds), key=recipe.key(), eval_data=evaluation,
                          budget=budget, baseline_outputs=baseline_outputs, baseline_metric=baseline_metric,
                          device=device, threads=threads)

    base_cfg = start_config
    layers = weight_nodes(prepared(original))
    keep: list[CandidateResult] = []
    best = start
    steps.append(step_row("0 plain", start, config=base_cfg.label))
    if openvino_start is not None:
        steps.append(step_row("0 plain", openvino_start, config="NNCF INT8 (OpenVINO)"))
        if openvino_start.meets_budget:
            return keep
    small = len(layers) <= HISTOGRAM_MAX_LAYERS
    skipped = (f"skipped: {len(layers)} weight layers; ONNX Runtime's histogram calibrators and re-quantizing "
               f"cost minutes beyond {HISTOGRAM_MAX_LAYERS}")

    # 1. calibration method and sample count
    if small:
        tries: list[Recipe] = [_recipe("percentile", replace(base_cfg, calibration="percentile",
                                                                 samples=min(base_cfg.samples, 32))),
                               _recipe("entropy", replace(base_cfg, calibration="entropy",
                                                          samples=min(base_cfg.samples, 64)))]
        if base_cfg.samples > 32 and len(calibration) > 32:
            tries.append(_recipe("minmax-32-samples", replace(base_cfg, samples=32)))
        for r in run_cfg(tries):
            steps.append(step_row("1 calibration", r, config=_cfg(r).label if r.model else None,
                                  samples=_cfg(r).samples if r.model else None))
            if r.model is not None and quality_key(r) < quality_key(best):
                best = r
        if best is not start:
            keep.append(best)
    else:
        steps.append({"step": "1 calibration", "variant": None, "status": skipped})
        notes.append(f"recovery 1 calibration {skipped}")

    # 2. data-free repairs: bias correction
    if best.meets_budget:
        return keep
    if small:
        corrected = run_cfg([_recipe("bias-corrected", replace(_cfg(best), bias_correction=True))])[0]
        steps.append(step_row("2 bias correction", corrected))
        if corrected.model is not None and quality_key(corrected) < quality_key(best):
            best = corrected
            keep.append(best)
        if best.meets_budget:
            return keep
    else:
        steps.append({"step": "2 bias correction", "variant": None,
                      "status": skipped + " (NNCF's INT8 carries NNCF's fast bias correction)"})

    # 3. mixed precision by measured cost and gain, from ONNX Runtime's INT8 and from NNCF's
    mixed = mixed_precision(original, calibration, evaluation, best, _cfg(best), run=run, threads=threads,
                            steps=steps, notes=notes, judge=judge, openvino_start=openvino_start)
    keep += mixed

    # 4. NNCF accuracy control, when mixed precision found nothing within the budget
    if "openvino" in runtimes:
        if any(r.meets_budget for r in mixed):
            steps.append({"step": "4 NNCF accuracy control", "variant": None,
                          "status": "skipped: mixed precision met the budget (NNCF re-quantizes: a minute or more)"})
        else:
            keep.append(_nncf_accuracy_control(original, calibration, evaluation, budget,
                                               baseline_outputs=baseline_outputs, baseline_metric=baseline_metric,
                                               steps=steps))

    # 5. QAT from the best all-INT8 settings, for PyTorch models with labels
    if run_torch is not None and qat_epochs > 0:
        keep += qat_step(_cfg(best), run_torch=run_torch, epochs=qat_epochs, steps=steps)
    return keep


def qat_step(cfg: StaticInt8, *, run_torch: Run, epochs: int, steps: list[dict[str, Any]]) -> list[CandidateResult]:
    """Step 5: QAT with the FP32 model as teacher, trained once and quantized with ``cfg`` (the PTQ
    settings it starts from) and, when ``cfg`` differs, with U8S8 QDQ of the same weight scales too:
    the start is the most accurate broken variant, which may be a slow one (S8S8 symmetric is 1.6x
    slower than U8S8 on x86), and the timing decides between them."""
    from edgeopt.training import TrainSettings
    from edgeopt.transforms.export import OnnxExport
    from edgeopt.transforms.qat import QatConfig

    qat = QatConfig(train=TrainSettings(epochs=epochs), per_channel=cfg.per_channel)
    base = f"int8-qat-{epochs}ep-{'perchannel' if cfg.per_channel else 'pertensor'}"
    u8s8 = replace(cfg, format="qdq", activation_type="u8", weight_type="s8", symmetric_activations=False)
    configs = [(base, u8s8)]
    if cfg != u8s8:
        configs.append((f"{base}-{cfg.format}-{cfg.activation_type}{cfg.weight_type}"
                        + ("-symmetric" if cfg.symmetric_activations else ""), cfg))
    recipes = [Recipe(name, (qat, OnnxExport(), c), needs=("torch", "train", "calibration")) for name, c in configs]
    results = run_torch(recipes)
    for r, (_, c) in zip(results, configs, strict=True):
        steps.append(step_row("5 QAT", r, config=c.label, epochs=epochs,
                              build_seconds=round(r.build_seconds, 1) if r.build_seconds else None))
    return [r for r in results if r.model is not None]


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


def mixed_precision(original: Model, calibration: Dataset, evaluation: Dataset, best: CandidateResult,
                    cfg: StaticInt8 | DynamicInt8, *, run: Run, threads: int | None, steps: list[dict[str, Any]],
                    notes: list[str], judge: Judge | None = None,
                    openvino_start: CandidateResult | None = None,
                    weights_start: CandidateResult | None = None) -> list[CandidateResult]:
    """Step 3, from ``best`` built with ``cfg`` (static INT8, or dynamic INT8 for transformers, whose
    per-layer error then quantizes each twin's input at run time as dynamic INT8 does). With ``judge``
    and a QDQ ``cfg`` each try is a graph edit of ``best`` (and of ``openvino_start``, NNCF's INT8, when
    given); otherwise each try is re-quantized with ``exclude_nodes``. ``weights_start``: an NNCF INT8
    weight-compression variant (OpenVINO), searched too, its layers ranked by reverting each
    (:func:`_revert_ranking`; the same ranking when that fails), each try rebuilt with the layers in its
    ``ignored_scope`` (its SmoothQuant and weight rounding as they were)."""
    from edgeopt.measure.layer_times import layer_times, node_times
    from edgeopt.transforms.layer_error import layer_errors

    started = time.perf_counter()
    try:
        judged = evaluation.take(np.arange(min(len(evaluation), 64)))
        errors = layer_errors(original, calibration, judged, config=cfg, threads=threads or 1)
        proto = prepared(original)
        names = [e.node for e in errors]
        profiled = evaluation.take(np.arange(min(len(evaluation), 4)))  # node_times runs the first sample
        fp32_ms = layer_times(node_times(original, profiled, threads=threads or 1, runs=10), proto, names)
        int8_ms = layer_times(node_times(best.model, profiled, threads=threads or 1, runs=10), proto, names)  # type: ignore[arg-type]
    except Exception as exc:  # noqa: BLE001 - an extra step; the variants so far still stand
        steps.append({"step": "3 mixed precision", "status": "failed", "reason": f"per-layer analysis: {exc}"})
        return []
    saved = {n: fp32_ms[n] - int8_ms[n] for n in names}
    order = [n for n, *_ in layer_priority(errors, saved)]
    notes.append(f"one-pass per-layer error: {len(errors)} layers ranked in {time.perf_counter() - started:.0f} s "
                 f"(profiled INT8 saves {sum(max(v, 0) for v in saved.values()):.2f} ms a call over the weight layers)")
    if judge is None or not isinstance(cfg, StaticInt8) or cfg.format != "qdq":
        found = [_requantize_search(best, cfg, order, saved, run=run, steps=steps)]
        if weights_start is not None and weights_start.model is not None:
            own = _revert_ranking(weights_start, original, judged, run=run, threads=threads, notes=notes)
            found.append(_ignored_scope_search(weights_start, own or order, saved, run=run, steps=steps))
        return [r for r in found if r is not None]
    out = []
    starts: list[tuple[CandidateResult, StaticInt8 | None, Model]] = [
        (best, cfg, Model.from_onnx(proto, source=original.source))]
    if openvino_start is not None and openvino_start.model is not None:
        ov_start = _rounded_start(openvino_start, original, calibration, judge=judge, steps=steps)
        if ov_start.meets_budget:
            out.append(ov_start)
        else:
            starts.append((ov_start, None, original))
    for start, start_cfg, reference in starts:
        found = _revert_search(start, start_cfg, reference, order, saved, judge=judge, steps=steps)
        if found is not None:
            out.append(found)
    return out


ROUNDED = "openvino-nncf-int8-rounded"
HISTOGRAM_ROUNDED = "openvino-nncf-int8-histogram-rounded"


def _start_configs() -> dict[str, Any]:
    """The NNCF settings each start of the float-layer search is built with (recorded in its recipes)."""
    from edgeopt.transforms.nncf_quantize import NncfInt8

    return {ROUNDED: NncfInt8(weight_rounding=True),
            HISTOGRAM_ROUNDED: NncfInt8(activation_range="histogram", weight_rounding=True)}


def _rounded_start(start: CandidateResult, original: Model, calibration: Dataset, *, judge: Judge,
                   steps: list[dict[str, Any]]) -> CandidateResult:
    """A better start than NNCF's plain INT8 for the float-layer search, each try judged and kept only
    when the judge finds it closer than ``start``:

    1. NNCF re-run with histogram (MSE) activation ranges, then its weights re-rounded against each
       layer's input statistics (transforms/weight_rounding.py); same kernels and speed.
    2. when 1 is not closer: NNCF's own INT8 with its weights re-rounded (no re-calibration).

    Measured on EfficientNet-Lite1 (300 crops never used to build or judge; README "INT8 for a real
    CNN"): all-INT8 cosine 0.9847 plain, 0.9882 re-rounded, 0.9907 histogram ranges + re-rounded; with
    the same 2/4/8 layers FP32: 0.9935/0.9947/0.9952 re-rounded, 0.9961/0.9976/0.9981 with histogram
    ranges. The diagnosis: after re-rounding, activation quantization was the larger error (INT8 weights
    with float activations 0.9962), and NNCF's default range (the mean of per-sample min/max) is too
    wide for tensors whose values mostly sit far below their extremes."""
    from edgeopt.transforms.nncf_quantize import nncf_quantize
    from edgeopt.transforms.weight_rounding import round_weights

    runtime = start.recipe.get("runtime") or "openvino"
    options = start.recipe.get("runtime_options") or {}
    configs = _start_configs()
    builds = ((HISTOGRAM_ROUNDED, lambda: nncf_quantize(original, configs[HISTOGRAM_ROUNDED], data=calibration),
               "3 activation ranges + weight rounding"),
              (ROUNDED, lambda: round_weights(start.model, original, calibration),  # type: ignore[arg-type]
               "3 weight rounding"))
    for name, build, step in builds:
        began = time.perf_counter()
        recipe = Recipe(name, (configs[name],), runtime=runtime, runtime_options=options, needs=("calibration",))
        try:
            model = build().with_metadata(runtime=runtime)
            r = judge(recipe, model, time.perf_counter() - began)
        except Exception as exc:  # noqa: BLE001 - an extra try; NNCF's own INT8 still stands
            r = CandidateResult(name=recipe.name, recipe=recipe.to_dict(), status="failed", reason=f"failed: {exc}")
        kept = _closer(r, start)
        steps.append(step_row(step, r, start=start.name, build_seconds=round(time.perf_counter() - began, 1),
                              kept="start of the float-layer search" if kept else f"no: {start.name} is as good"))
        if kept:
            return r
    return start


def _closer(r: CandidateResult, start: CandidateResult) -> bool:
    """``r`` is closer to the original than ``start``: it meets the budget where ``start`` does not,
    or its drop is lower by more than the judge can tell apart, or (drops within the judge's noise)
    its mean cosine is higher. On EfficientNet-Lite1 the judge counts ~87 clear samples, one sample
    is 1.1 pt: the rounded INT8 (cosine 0.9872 vs 0.9846) flipped one and lost on the drop alone."""
    from edgeopt.measure.noise import tell_apart

    if r.model is None:
        return False
    if r.meets_budget != start.meets_budget:
        return r.meets_budget
    drop_r, drop_s = r.drop or 0.0, start.drop or 0.0
    noise = tell_apart(1.0 - max(drop_r, drop_s), r.judged) if r.judged else 0.0
    if abs(drop_r - drop_s) > noise + 1e-12:
        return drop_r < drop_s
    return (r.cosine or 0.0) > (start.cosine or 0.0)


def _fewest(probe: Callable[[int], CandidateResult], n: int) -> CandidateResult | None:
    """Probe 1, 2, 4, ... float layers, then bisect: the fewest that meet the budget (or the best
    try when none of up to ``MAX_FLOAT_SHARE`` of the ``n`` layers does)."""
    limit = max(1, int(n * MAX_FLOAT_SHARE))
    tried: dict[int, CandidateResult] = {}

    def once(k: int) -> CandidateResult:
        if k not in tried:
            tried[k] = probe(k)
        return tried[k]

    k, last_miss = 1, 0
    while k <= limit and not once(k).meets_budget:
        last_miss, k = k, k * 2
    if k > limit:
        k = limit
        if not once(k).meets_budget:
            best_try = min(tried.values(), key=quality_key)
            return best_try if best_try.model is not None else None
    low, high = last_miss, k  # low misses (0 = the start), high meets
    while high - low > 1:
        mid = (low + high) // 2
        if once(mid).meets_budget:
            high = mid
        else:
            low = mid
    return once(high)


def _requantize_search(best: CandidateResult, cfg: StaticInt8 | DynamicInt8, order: list[str],
                       saved: dict[str, float], *, run: Run, steps: list[dict[str, Any]]) -> CandidateResult | None:
    """Each try re-quantized with ``exclude_nodes`` (dynamic INT8 has no Q/DQ pairs to edit)."""
    kind = "int8-dynamic" if isinstance(cfg, DynamicInt8) else "int8"
    needs = () if isinstance(cfg, DynamicInt8) else ("calibration",)

    def build(float_nodes: tuple[str, ...]) -> CandidateResult:
        return run([Recipe(f"{kind}-mixed-{len(float_nodes)}-float", (replace(cfg, exclude_nodes=float_nodes),),
                           needs=needs)])[0]

    return _float_layer_search(best, order, saved, build, steps=steps)


def _float_layer_search(start: CandidateResult, order: list[str], saved: dict[str, float],
                        build: Callable[[tuple[str, ...]], CandidateResult], *,
                        steps: list[dict[str, Any]]) -> CandidateResult | None:
    """:func:`_fewest` over the first k layers of ``order`` kept float, each try built by ``build`` from
    ``start`` and recorded as a step-3 row."""

    def probe(k: int) -> CandidateResult:
        float_nodes = tuple(order[:k])
        r = build(float_nodes)
        steps.append(step_row("3 mixed precision", r, float_layers=list(float_nodes), start=start.name,
                              int8_ms_saved_by_float_layers=round(sum(saved.get(n, 0.0) for n in float_nodes), 3)))
        return r

    return _fewest(probe, len(order))


def _revert_ranking(start: CandidateResult, original: Model, judged: Dataset, *, run: Run, threads: int | None,
                    notes: list[str]) -> list[str] | None:
    """``start``'s compressed MatMuls, the one whose reverting to float (a graph edit of ``start``'s model)
    brings the outputs closest to the original's first; None when it cannot be measured.

    Dynamic INT8's per-layer error is only a proxy for NNCF's weights with group-wise run-time activation
    quantization: on all-MiniLM-L6-v2 this ranking reaches an expected plain NN agreement of 98.8-98.9 % with
    12 of 36 MatMuls float (benchmarks/transformer_float_layers.py), the proxy needed 18 for 98.8 %.
    Each layer costs one graph edit and one run of ``judged`` (36 layers of MiniLM on 64 sentences: 19 s).
    """
    from edgeopt.measure import evaluate
    from edgeopt.transforms.float_layers import revert_losses
    from edgeopt.transforms.nncf_quantize import NncfWeightsInt8

    began = time.perf_counter()
    try:
        recipe = Recipe.from_dict(start.recipe)
        prefix = recipe.steps[:next(i for i, s in enumerate(recipe.steps) if isinstance(s, NncfWeightsInt8))]
        reference = original  # the float model the compression started from (SmoothQuant's, when there is one)
        if prefix:
            built = run([Recipe(f"{start.name}-float", prefix, needs=recipe.needs)])[0]
            if built.model is None:
                return None
            reference = built.model
        expected = evaluate(original, judged, threads=threads, keep_outputs=True).outputs
        loss = revert_losses(start.model, reference, judged, expected, threads=threads)  # type: ignore[arg-type]
    except Exception as exc:  # noqa: BLE001 - the proxy ranking still stands
        notes.append(f"ranking {start.name}'s layers by reverting each failed ({exc}); dynamic INT8's per-layer "
                     "error ranks them")
        return None
    notes.append(f"{start.name}: its {len(loss)} compressed MatMuls ranked by reverting each to float "
                 f"({time.perf_counter() - began:.0f} s on {len(judged)} samples)")
    return sorted(loss, key=loss.__getitem__)


def _ignored_scope_search(start: CandidateResult, order: list[str], saved: dict[str, float], *, run: Run,
                          steps: list[dict[str, Any]]) -> CandidateResult | None:
    """Each try is ``start``'s recipe again with the first k layers of ``order`` in the ignored scope of its
    NNCF weight compression: float weights, and no run-time quantization of those layers' inputs."""
    from edgeopt.transforms.nncf_quantize import NncfWeightsInt8

    recipe = Recipe.from_dict(start.recipe)

    def build(float_nodes: tuple[str, ...]) -> CandidateResult:
        steps_k = tuple(replace(s, ignored_scope=float_nodes) if isinstance(s, NncfWeightsInt8) else s
                        for s in recipe.steps)
        return run([Recipe(f"{start.name}-mixed-{len(float_nodes)}-float", steps_k, runtime=recipe.runtime,
                           runtime_options=dict(recipe.runtime_options), needs=recipe.needs)])[0]

    return _float_layer_search(start, order, saved, build, steps=steps)


def _revert_search(start: CandidateResult, cfg: StaticInt8 | None, reference: Model, order: list[str],
                   saved: dict[str, float], *, judge: Judge, steps: list[dict[str, Any]]) -> CandidateResult | None:
    """Each try reverts the first k layers of ``order`` to float in ``start``'s model (a graph edit).
    ``cfg`` None: ``start`` is NNCF's OpenVINO INT8 (recipes record ``NncfInt8.ignored_scope``)."""
    from edgeopt.transforms.float_layers import revert_to_float
    from edgeopt.transforms.nncf_quantize import NncfInt8

    rebuilt = _start_configs()  # the NNCF settings ``start`` was built with, when it is one of the rebuilt starts
    nncf_cfg = rebuilt.get(start.name, NncfInt8())
    prefix = start.name if start.name in rebuilt else "openvino-nncf-int8"

    def build(float_nodes: tuple[str, ...]) -> CandidateResult:
        began = time.perf_counter()
        k = len(float_nodes)
        if cfg is None:
            recipe = Recipe(f"{prefix}-mixed-{k}-float", (replace(nncf_cfg, ignored_scope=float_nodes),),
                            runtime="openvino", runtime_options={"precision": "f32"}, needs=("calibration",))
        elif start.recipe.get("runtime") == "openvino":  # ORT's QDQ model run by OpenVINO
            recipe = Recipe(f"int8-mixed-{k}-float-openvino", (replace(cfg, exclude_nodes=float_nodes),),
                            runtime="openvino", runtime_options={"precision": "f32"}, needs=("calibration",))
        else:
            recipe = Recipe(f"int8-mixed-{k}-float", (replace(cfg, exclude_nodes=float_nodes),),
                            needs=("calibration",))
        try:
            model = revert_to_float(start.model, reference, float_nodes)  # type: ignore[arg-type]
            return judge(recipe, model, time.perf_counter() - began)
        except Exception as exc:  # noqa: BLE001 - one failed try is a failed row, not a crash
            return CandidateResult(name=recipe.name, recipe=recipe.to_dict(), status="failed", reason=f"failed: {exc}")

    return _float_layer_search(start, order, saved, build, steps=steps)


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
