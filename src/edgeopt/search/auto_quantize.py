"""``edgeopt quantize --mode auto``: try the quantization variants that matter, measure, choose.

The same INT8 recipe can be 2x faster or several times slower than FP32 depending on format,
signedness, per-channel scales and runtime, so nothing is assumed: every variant is built, judged
on held-out data (never the calibration samples) and timed interleaved with the FP32 original by
the search engine, which never chooses a model that is not faster than the original. Variants
that only matter when accuracy is short (other calibration methods, mixed precision) are added
only when every plain INT8 variant misses the budget.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Any

from edgeopt.data import Dataset, load_data
from edgeopt.devices import DeviceProfile, get_device
from edgeopt.errors import BadInput, DataError
from edgeopt.measure.bench import BenchSettings
from edgeopt.model import Model, load_model
from edgeopt.search.budget import Budget, judge_note
from edgeopt.search.engine import (
    CandidateResult,
    baseline_result,
    build_one,
    choose,
    evaluate_candidate,
    has_text_mask,
    result_for,
    time_candidates,
)
from edgeopt.search.recipe import Recipe
from edgeopt.search.space import (
    SAME_OUTPUTS_AS,
    post_training_recipes,
    transformer_recipes,
    weights_per_tensor,
)
from edgeopt.transforms.config import TransformContext
from edgeopt.transforms.quantize import (
    StaticInt8,
    check_quantizable,
)
from edgeopt.transforms.transformer import is_transformer

RUNTIMES = ("onnxruntime", "openvino")


@dataclass
class AutoQuantizeResult:
    """``model`` is the chosen one (None when nothing is faster within the budget)."""

    model: Model | None
    chosen: CandidateResult | None
    baseline: CandidateResult
    results: list[CandidateResult]
    budget: Budget
    notes: list[str] = field(default_factory=list)
    steps: list[dict[str, Any]] = field(default_factory=list)  # the recovery steps, as measured

    def to_dict(self) -> dict[str, Any]:
        return {
            "chosen": self.chosen.name if self.chosen else None,
            "chosen_recipe": self.chosen.recipe if self.chosen else None,
            "budget": {"metric": self.budget.metric, "max_drop": self.budget.max_drop,
                       "min_cosine": self.budget.floor},
            "baseline": self.baseline.to_dict(),
            "variants": [r.to_dict() for r in self.results],
            "recovery_steps": list(self.steps),
            "notes": list(self.notes),
        }


def plain_recipes(model: Model, *, runtimes: tuple[str, ...], device: DeviceProfile | None = None) -> list[Recipe]:
    """The first round: the same post-training space optimize searches (search/space.py)."""
    return post_training_recipes(model, device or get_device(None), runtimes=runtimes)


def _split(data: Dataset, eval_data: Dataset | None, seed: int) -> tuple[Dataset, Dataset, list[str]]:
    if eval_data is not None:
        return data, eval_data, [f"calibration: {len(data)} samples of {data.source}; judged on "
                                 f"{len(eval_data)} samples of {eval_data.source}"]
    if len(data) < 20:
        raise DataError(f"{data.source} has {len(data)} samples; --mode auto needs at least 20 to hold half out "
                        "for judging, or pass --eval-data")
    evaluation, calibration = data.split(0.5, seed=seed)
    return calibration, evaluation, [f"data split: {len(calibration)} samples calibrate, {len(evaluation)} held "
                                     "out for judging (never used to build a variant)"]


def auto_quantize(model: str | os.PathLike[str] | Model, data: str | os.PathLike[str] | Dataset, *,
                  eval_data: str | os.PathLike[str] | Dataset | None = None, max_drop: float = 0.01,
                  metric: str = "auto", min_cosine: float | None = None,
                  device: str | DeviceProfile | None = None, threads: int | None = None,
                  runtimes: tuple[str, ...] | list[str] | None = None, bench: BenchSettings | None = None,
                  seed: int = 0, mixed: bool = True, per_channel: bool | None = None,
                  qat_epochs: int = 3) -> AutoQuantizeResult:
    """Build the relevant quantization variants, measure them against FP32, return the fastest within budget.

    Args:
        model: an FP32 ONNX model (file or Model), or a PyTorch Model (``file.py:factory`` loaded with
            its weights): exported to ONNX first, and the QAT step can fine-tune it.
        data: calibration data; also the source of the held-out judging half when ``eval_data`` is None.
            With labels and a PyTorch model, the calibration part also trains the QAT step.
        eval_data: separate data to judge accuracy/agreement on.
        max_drop: allowed drop in absolute points of ``metric`` (0.01 = 1 pt).
        metric: ``auto`` follows the output (accuracy/agreement for class scores, cosine for
            embeddings and other outputs), or ``accuracy``, ``agreement``, ``cosine``.
        min_cosine: no variant whose mean cosine to FP32 is below this is chosen, whatever the metric
            (None: 0.99, or 1 - max_drop / 2 when judged by agreement: search/budget.default_floor).
        device: device profile; ``threads`` overrides its thread count (timing and evaluation).
        runtimes: runtimes whose variants are tried (default: onnxruntime, and openvino when installed).
        bench: timing settings for the interleaved comparison.
        mixed: add calibration-method and mixed-precision variants when plain INT8 misses the budget.
        per_channel: False for a target without per-channel INT8 weight scales (only per-tensor
            variants are tried, and QAT trains per tensor); None or True: both.
        qat_epochs: epochs of the QAT step (PyTorch model, labelled data, no all-INT8 variant within
            budget); 0 leaves it out.

    Returns:
        AutoQuantizeResult; ``model`` and ``chosen`` are None when no variant is faster than the
        original within the budget (the CLI then exits 3).

    Raises:
        BadInput, DataError, ModelError: bad model, data or flags (before any work is done).

    Example:
        >>> r = auto_quantize("digits_cnn.onnx", "train.npz", threads=1)  # doctest: +SKIP
        >>> r.chosen.name, r.chosen.speedup
    """
    budget = Budget(metric=metric, max_drop=max_drop, min_cosine=min_cosine)  # type: ignore[arg-type]
    chosen_runtimes = tuple(runtimes) if runtimes else RUNTIMES
    unknown = [r for r in chosen_runtimes if r not in RUNTIMES]
    if unknown:
        raise BadInput(f"--runtime for quantization must be onnxruntime or openvino, got {', '.join(unknown)}")
    if isinstance(qat_epochs, bool) or not isinstance(qat_epochs, int) or qat_epochs < 0:
        raise BadInput(f"--qat-epochs must be an integer >= 0, got {qat_epochs!r}")
    profile = get_device(device)
    original = load_model(model)
    torch_original: Model | None = None
    if original.format == "torch":
        torch_original = original
        original = _exported(original, load_data(data))
    check_quantizable(original)
    dataset = load_data(data).feeds_for(original)
    held = load_data(eval_data).feeds_for(original) if eval_data is not None else None
    calibration, evaluation, notes = _split(dataset, held, seed)
    if torch_original is not None:
        notes.append(f"PyTorch model exported to ONNX ({torch_original.source}); every variant starts from that "
                     "FP32 graph, QAT from the PyTorch weights")
    baseline = original.with_metadata(runtime="onnxruntime")
    ctx = TransformContext(calibration=calibration, device=profile, seed=seed, progress=False)
    base, base_out, base_metric = baseline_result(baseline, evaluation, budget, device=profile, threads=threads)
    asked = budget.metric
    budget = budget.for_outputs(base_out, evaluation.labels, name=original.outputs[0].name if original.outputs else None,
                                masked=has_text_mask(base_out, evaluation))
    notes.append(judge_note(asked, budget, base_out, evaluation.labels is not None))
    base.name = "fp32-onnxruntime"

    def run(recipes: list[Recipe]) -> list[CandidateResult]:
        return [result_for(build_one(baseline, recipe, ctx), key=recipe.key(), eval_data=evaluation, budget=budget,
                           baseline_outputs=base_out, baseline_metric=base_metric, device=profile, threads=threads)
                for recipe in recipes]

    screened_out: list[CandidateResult] = []

    def run_screened(recipes: list[Recipe]) -> list[CandidateResult]:
        """Build all, time briefly, judge only those faster than FP32 (the others cannot be chosen)."""
        built = [build_one(baseline, recipe, ctx) for recipe in recipes]
        pending = [CandidateResult(name=c.recipe.name, recipe=c.recipe.to_dict(),
                                   build_seconds=round(c.build_seconds, 2), key=c.recipe.key(), model=c.model)
                   for c in built if c.model is not None]
        screened = _quick_screen(base, pending, device=profile, threads=threads, data=evaluation, notes=notes)
        screened_out.extend(screened)
        out = []
        for c in built:
            if c.model is None:
                out.append(result_for(c, key=c.recipe.key(), eval_data=evaluation, budget=budget,
                                      baseline_outputs=base_out, baseline_metric=base_metric))
                continue
            r = next(p for p in pending if p.name == c.recipe.name)
            if not any(r is x for x in screened):
                try:
                    evaluate_candidate(r, c.model, eval_data=evaluation, budget=budget, baseline_outputs=base_out,
                                       baseline_metric=base_metric, device=profile, threads=threads)
                except Exception as exc:  # noqa: BLE001 - one bad candidate must not end the search
                    r.status, r.reason, r.model = "failed", f"failed: {exc}", None
            out.append(r)
        return out

    steps: list[dict[str, Any]] = []
    by_name: dict[str, Recipe] = {}
    transformer = is_transformer(original)
    if transformer:
        notes.append("transformer graph (self-attention + LayerNorm): tried the transformer space, which keeps "
                     "Softmax, LayerNorm, GELU and the residual stream in float (dynamic INT8, SmoothQuant, fused "
                     "attention, MatMul-only static INT8, INT8 and INT4 weight-only, NNCF transformer mode, NNCF "
                     "INT8 weight compression, alone and after SmoothQuant folded into the LayerNorms)")
        recipes = transformer_recipes(original, profile, runtimes=chosen_runtimes)
        later = [r for r in recipes if r.name in SAME_OUTPUTS_AS]
        results = run([r for r in recipes if r.name not in SAME_OUTPUTS_AS])
        for recipe in later:  # a float-exact rewrite before the same quantization: it can only pass where that did
            twin = next((r for r in results if r.name == SAME_OUTPUTS_AS[recipe.name]), None)
            if twin is None or twin.meets_budget:
                results += run([recipe])
            else:
                notes.append(f"{recipe.name} not built: its outputs are those of {twin.name} (a float-exact "
                             f"rewrite before the same quantization), which misses the budget")
    else:
        plain = plain_recipes(original, runtimes=chosen_runtimes, device=profile)
        if per_channel is False:
            plain = weights_per_tensor(plain)
            notes.append("--per-tensor: the target has no per-channel INT8 weight scales; only per-tensor weight "
                         "variants were tried (NNCF's per-channel INT8 left out)")
        by_name = {r.name: r for r in plain}
        results = run_screened(plain)
    int8_ok = any(r.meets_budget and r.model is not None and r.name.startswith("int8-") for r in results)
    # a variant with no transformation (OpenVINO running the FP32 model) meets any budget: it must not stop the
    # search for a mixed-precision one (it is chosen only if faster than FP32 on ONNX Runtime, and rarely is)
    quantized_ok = any(r.meets_budget and r.model is not None and r.recipe.get("steps") for r in results)
    if mixed and transformer and not quantized_ok:
        results += _transformer_mixed(original, calibration, evaluation, results, run=run, threads=threads,
                                      steps=steps, notes=notes)
    elif mixed and not int8_ok and not transformer and "onnxruntime" in chosen_runtimes:
        statics = [(r, by_name[r.name].steps[0]) for r in results if r.model is not None and r.name in by_name
                   and by_name[r.name].steps and isinstance(by_name[r.name].steps[0], StaticInt8)
                   and by_name[r.name].steps[0].format == "qdq"]
        if statics:
            from edgeopt.search.recovery import recover

            start, start_cfg = min(statics, key=lambda t: (t[0].drop if t[0].drop is not None else 1.0,
                                                           -(t[0].cosine or 0.0)))
            notes.append(f"no plain INT8 variant met the budget: recovery steps from {start.name} (calibration, "
                         "bias correction, mixed precision by measured cost and gain"
                         + (", NNCF accuracy control" if "openvino" in chosen_runtimes else "") + ")")
            run_torch = None
            if torch_original is not None and calibration.labels is not None and qat_epochs > 0:
                run_torch = _torch_runner(torch_original, replace(ctx, train=calibration), evaluation, budget,
                                          base_out, base_metric, profile, threads)
                notes.append(f"QAT (step 5) trains on the {len(calibration)} labelled calibration samples; the "
                             "held-out samples only judge")
            elif torch_original is not None and qat_epochs > 0:
                notes.append("QAT not tried: --data has no labels")
            elif qat_epochs > 0:
                notes.append("QAT not tried: it fine-tunes PyTorch models (pass file.py:factory with --weights)")
            results += recover(original, calibration, evaluation, budget, start=start, start_config=start_cfg,
                               run=run, runtimes=chosen_runtimes if per_channel is not False else
                               tuple(r for r in chosen_runtimes if r != "openvino"), threads=threads, steps=steps,
                               notes=notes, baseline_outputs=base_out, baseline_metric=base_metric,
                               run_torch=run_torch, qat_epochs=qat_epochs, device=profile,
                               openvino_start=next((r for r in results if r.name == "openvino-nncf-int8"
                                                    and r.model is not None), None))
    bench = bench or BenchSettings(warmup=10, min_runs=100, min_seconds=1.0, max_seconds=20.0)
    # only variants within the budget can be chosen: the others are not timed (their size is still given)
    timed = [r for r in results if r.meets_budget]
    time_candidates(base, timed, bench=bench, device=profile, threads=threads, data=evaluation)
    for r in results:
        if r.model is not None and not r.meets_budget:
            r.size_bytes = r.model.size_bytes
            r.size_ratio = round(base.size_bytes / r.size_bytes, 3) if r.size_bytes else None
    if len(timed) < len([r for r in results if r.model is not None]):
        quick = any(r.latency_ms for r in results if r.model is not None and not r.meets_budget)
        notes.append("variants that miss the budget were judged but not timed interleaved (they cannot be chosen)"
                     + ("; their p50 is from the quick timing before judging" if quick else ""))
    timed_by_name = {r.name: r for r in results if r.latency_ms}
    for s in steps:  # each recovery step's latency beside its fidelity, where it was timed
        r = timed_by_name.get(s.get("variant") or "")
        if r is not None:
            s["p50_ms"], s["speedup"] = r.latency_ms.get("p50"), r.speedup
    chosen = _choose_not_slower_than_fp32_on_its_runtime(
        base, [r for r in results if all(r is not x for x in screened_out)], budget)
    notes += judge_noise_notes(chosen, results, budget)
    model_out = chosen.model if chosen is not None else None
    return AutoQuantizeResult(model_out, chosen, base, results, budget, notes, steps)


def _transformer_mixed(original: Model, calibration: Dataset, evaluation: Dataset, results: list[CandidateResult], *,
                       run: Any, threads: int | None, steps: list[dict[str, Any]], notes: list[str]
                       ) -> list[CandidateResult]:
    """Mixed precision for a transformer when no quantized variant met the budget: the one-pass per-layer
    error of dynamic INT8 (each MatMul's input quantized at run time, alone) ranks the MatMuls, and
    search/recovery.py's step keeps the fewest most harmful ones float (1, 2, 4, ... then bisected), in
    ONNX Runtime's dynamic INT8 and in the closest NNCF INT8 weight compression (OpenVINO), whose
    SmoothQuant and re-rounded weights stay as they were.
    Percentile/entropy calibration are not tried: ONNX Runtime's histogram calibrators fail on
    attention-mask tensors ("Too many bins for data range"), and the loss here comes from
    activation outliers, which per-call ranges and SmoothQuant address."""
    from edgeopt.search.recovery import mixed_precision, quality_key
    from edgeopt.transforms.quantize import DynamicInt8

    start = next((r for r in results if r.name == "int8-dynamic-perchannel" and r.model is not None), None)
    if start is None:
        return []
    compressed = [r for r in results if r.model is not None
                  and any(s.get("type") == "NncfWeightsInt8" for s in r.recipe.get("steps", []))]
    weights_start = min(compressed, key=quality_key) if compressed else None
    also = (f" and from {weights_start.name}, the closest NNCF INT8 weight compression (its ignored scope)"
            if weights_start is not None else "")
    notes.append(f"no quantized variant met the budget: mixed precision from int8-dynamic-perchannel{also} (the "
                 "one-pass per-layer error of dynamic INT8 ranks the MatMuls; the fewest most harmful stay float)")
    return mixed_precision(original, calibration, evaluation, start, DynamicInt8(per_channel=True), run=run,
                           threads=threads, steps=steps, notes=notes, weights_start=weights_start)


def _torch_runner(torch_model: Model, ctx: TransformContext, evaluation: Dataset, budget: Budget, base_out: Any,
                  base_metric: float, profile: DeviceProfile, threads: int | None) -> Any:
    """Build recipes from the PyTorch original (QAT) and judge them like every other variant."""

    def run_torch(recipes: list[Recipe]) -> list[CandidateResult]:
        return [result_for(build_one(torch_model, recipe, ctx), key=recipe.key(), eval_data=evaluation,
                           budget=budget, baseline_outputs=base_out, baseline_metric=base_metric, device=profile,
                           threads=threads) for recipe in recipes]

    return run_torch


def _exported(model: Model, data: Dataset) -> Model:
    """The FP32 ONNX graph of a PyTorch model (the baseline every variant is built from)."""
    from edgeopt.transforms.export import OnnxExport, to_onnx

    return to_onnx(model, OnnxExport(), data=data.take(slice(0, min(len(data), 64))))[0]


# The quick timing before judging: a few runs each, interleaved with FP32. A variant whose p50 is
# not below FP32's cannot be chosen (the engine never picks a model slower than the original), so
# it is not judged: on EfficientNet-Lite1, judging ONNX Runtime's dynamic INT8 (ConvInteger) alone
# took 193 s of a loaded machine, FP16 on the CPU 31 s.
# Only where judging costs (FP32 p50 of at least SCREEN_MIN_MS: sub-millisecond models are judged in
# moments and their quick timings are noise) and only clear losers (below SCREEN_BELOW x FP32 speed).
QUICK = BenchSettings(warmup=2, min_runs=8, min_seconds=0.1, max_seconds=2.0)
SCREEN_MIN_MS = 1.0
SCREEN_BELOW = 0.9


def _quick_screen(base: CandidateResult, pending: list[CandidateResult], *, device: DeviceProfile,
                  threads: int | None, data: Dataset, notes: list[str]) -> list[CandidateResult]:
    """Time ``pending`` briefly beside FP32; mark and return the clearly slower ones (not judged)."""
    if not pending:
        return []
    probe = replace(base)
    time_candidates(probe, pending, bench=QUICK, device=device, threads=threads, data=data)
    if probe.latency_ms.get("p50", 0.0) < SCREEN_MIN_MS:
        for r in pending:  # judged and timed as usual
            r.latency_ms, r.speedup, r.speedup_interval = {}, None, None
        return []
    slow = [r for r in pending if r.speedup is not None and r.speedup < SCREEN_BELOW]
    for r in slow:
        r.status = "rejected"
        r.reason = f"slower than FP32 in a quick timing ({r.speedup:.2f}x, {QUICK.min_runs}+ runs); not judged"
        r.model = None
    if slow:
        notes.append(f"quick timing before judging: {len(slow)} variant(s) slower than FP32, not judged: "
                     + ", ".join(f"{r.name} {r.speedup:.2f}x" for r in slow))
    return slow


def judge_noise_notes(chosen: CandidateResult | None, results: list[CandidateResult], budget: Budget) -> list[str]:
    """How many samples judged and the 90% interval of the drop; a warning when it is wider than the budget."""
    ref = chosen or next((r for r in results if r.judged), None)
    if ref is None or not ref.judged or not ref.drop_interval:
        return []
    low, high = ref.drop_interval
    out = [f"judged on {ref.judged} samples ({budget.metric}); {ref.name}: drop {100 * (ref.drop or 0):.2f} pt, "
           f"90% interval {100 * low:.2f}..{100 * high:.2f} pt"]
    if high - low > budget.max_drop:
        out.append(f"warning: the judge's 90% interval ({100 * (high - low):.2f} pt wide) is wider than the "
                   f"{100 * budget.max_drop:.2f} pt budget: one or two samples decide it; pass --eval-data with more "
                   "held-out samples")
    return out


def _choose_not_slower_than_fp32_on_its_runtime(base: CandidateResult, results: list[CandidateResult],
                                                budget: Budget) -> CandidateResult | None:
    """The engine's choice, re-made while it picks a variant that is slower than FP32 on its own
    runtime (e.g. an OpenVINO INT8 model slower than the FP32 model in OpenVINO)."""
    pool = list(results)
    vetoed: list[tuple[CandidateResult, str]] = []
    while True:
        chosen = choose(base, pool, objective="latency", budget=budget)
        fp32 = [r for r in pool if chosen is not None and chosen.runtime != base.runtime and r is not chosen
                and r.runtime == chosen.runtime and not r.recipe.get("steps") and r.latency_ms]
        if chosen is None or not fp32 or chosen.latency_ms["p50"] < fp32[0].latency_ms["p50"]:
            break
        vetoed.append((chosen, f"slower than the FP32 model on {chosen.runtime} ({fp32[0].name})"))
        pool.remove(chosen)
    for r, reason in vetoed:
        r.status, r.reason = "rejected", reason
    return chosen
