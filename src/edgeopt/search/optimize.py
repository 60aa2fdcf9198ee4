"""optimize: search recipes under an accuracy budget, measure every candidate, choose, report.

The flow: split the data once (a tuning part for calibration/fine-tuning, a held-out part
for judging, never overlapping); turn the original into an ONNX baseline; build and evaluate
each recipe's candidate (cached, so a killed run resumes); time all candidates interleaved
with the baseline; keep the Pareto front; choose by the objective within the budget; write
OUTDIR/model.onnx and the reports.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeopt.data import Dataset, load_data
from edgeopt.devices import DeviceProfile, get_device
from edgeopt.errors import BadInput, BudgetNotMet, DataError
from edgeopt.fileio import check_writable_dir
from edgeopt.measure.bench import BenchSettings
from edgeopt.model import Model, load_model
from edgeopt.search.budget import Budget, check_objective, judge_note
from edgeopt.search.cache import CandidateCache, candidate_key, data_fingerprint
from edgeopt.search.engine import (
    Candidate,
    CandidateResult,
    baseline_result,
    build_one,
    choose,
    has_text_mask,
    pareto_front,
    result_for,
    time_candidates,
)
from edgeopt.search.recipe import Recipe
from edgeopt.search.space import target_recipes
from edgeopt.transforms.config import TransformContext

EXECUTORS = ("local", "ray")
# optimize --target: the format every candidate ends in, and the file OUTDIR/model.<suffix>
TARGET_SUFFIX = {"onnx": ".onnx", "executorch": ".pte", "tflite": ".tflite"}


@dataclass
class OptimizeResult:
    """What optimize found: the chosen candidate (None if none met the budget), all results, paths."""

    chosen: CandidateResult | None
    baseline: CandidateResult
    results: list[CandidateResult]
    out_dir: Path
    budget: Budget
    objective: str
    device: DeviceProfile
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    reused: int = 0
    sensitivity: list[dict[str, Any]] | None = None
    measured_on: dict[str, Any] = field(default_factory=dict)  # where latency and accuracy were measured
    target: str = "onnx"

    @property
    def model_path(self) -> Path:
        """Where the chosen model is written: OUTDIR/model.onnx (or .pte / .tflite for another --target)."""
        return self.out_dir / f"model{TARGET_SUFFIX[self.target]}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "chosen": self.chosen.name if self.chosen else None,
            "chosen_recipe": self.chosen.recipe if self.chosen else None,
            "model": str(self.model_path) if self.chosen else None,
            "target": self.target,
            "budget": {"metric": self.budget.metric, "max_drop": self.budget.max_drop,
                       "min_cosine": self.budget.floor},
            "objective": self.objective,
            "device": self.device.to_dict(),
            "baseline": self.baseline.to_dict(),
            "candidates": [r.to_dict() for r in self.results],
            "pareto": [r.name for r in [self.baseline, *self.results] if r.pareto],
            "notes": self.notes,
            "seconds": round(self.seconds, 1),
            "reused_candidates": self.reused,
            "sensitivity": self.sensitivity,
            "measured_on": self.measured_on,
        }


@dataclass
class _Split:
    tune: Dataset
    evaluation: Dataset
    train: Dataset | None
    validation: Dataset | None


def split_data(data: Dataset, *, eval_fraction: float, seed: int) -> _Split:
    """Held-out evaluation part; the rest tunes (calibration, and train/validation for fine-tuning)."""
    if len(data) < 20:
        raise DataError(f"{data.source} has {len(data)} samples; optimize needs at least 20 "
                        "(half calibrate or fine-tune, half judge)")
    evaluation, tune = data.split(eval_fraction, seed=seed)
    train, validation = fine_tuning_split(tune, seed=seed + 1)
    return _Split(tune=tune, evaluation=evaluation, train=train, validation=validation)


def fine_tuning_split(data: Dataset, *, seed: int) -> tuple[Dataset | None, Dataset | None]:
    """``(train, validation)``: 85 % / 15 %, disjoint and stratified; ``(None, None)`` under 20 samples.

    Recipes that fine-tune (pruning, distillation) train on the first part and stop early on the second.
    """
    if len(data) < 20:
        return None, None
    validation, train = data.split(0.15, seed=seed)
    return train, validation


def _onnx_baseline(model: Model, split: _Split) -> Model:
    if model.format == "onnx":
        return model
    if model.format != "torch":
        raise BadInput(f"optimize takes an ONNX or PyTorch model, not {model.format}")
    from edgeopt.transforms.export import OnnxExport, to_onnx

    exported, _ = to_onnx(model, OnnxExport(), data=split.tune)
    return exported


def _baseline(model: Model, split: _Split, target: str) -> Model:
    """What candidates must beat: the original in the target's own format and runtime (FP32)."""
    if target == "onnx":
        return _onnx_baseline(model, split)
    if model.format not in ("onnx", "torch"):
        raise BadInput(f"optimize takes an ONNX or PyTorch model, not {model.format}")
    if target == "executorch":
        from edgeopt.transforms.executorch import ExecutorchExport, to_executorch

        return to_executorch(model, ExecutorchExport(), data=split.tune)[0]
    from edgeopt.transforms.tflite import TfliteExport, to_tflite

    return to_tflite(model, TfliteExport(), data=split.tune)[0]


def pre_check(model: Model, target: str, data: Dataset) -> list[str]:
    """``edgeopt check`` for the target before any candidate is built: stop with its message when the
    model cannot be exported there; a note when parts of it would run on a fallback path."""
    from edgeopt.check import TARGET_FOR_FORMAT, check
    from edgeopt.errors import UnsupportedOperation

    if model.format not in ("onnx", "torch"):
        return []
    result = check(model, [TARGET_FOR_FORMAT[target]], data=data.take(slice(0, 2)), convert=False).targets[0]
    if result.exit_code == 2:
        raise UnsupportedOperation(f"optimize stopped before building candidates: {result.message()}")
    return [f"operator check: {result.message()}"]


def optimize(model: str | os.PathLike[str] | Model, data: str | os.PathLike[str] | Dataset, *,
             out_dir: str | os.PathLike[str], max_drop: float = 0.01, metric: str = "auto",
             min_cosine: float | None = None,
             objective: str = "latency", device: str | DeviceProfile | None = None, threads: int | None = None,
             time_budget_min: float | None = None, executor: str = "local", ray_address: str | None = None,
             recipes: list[Recipe] | None = None, eval_fraction: float = 0.5, seed: int = 0,
             bench: BenchSettings | None = None, progress: bool = True, weights: str | None = None,
             trust_pickle: bool = False, write_reports: bool = True, target: str = "onnx",
             per_channel: bool | None = None, qat_epochs: int = 3) -> OptimizeResult:
    """Find the smallest/fastest model within the accuracy budget, measured on the device profile.

    Args:
        model: ONNX file, PyTorch ``file.py:factory`` (with ``weights``) or a Model.
        data: labelled data (``.npz`` etc.); half judges candidates and is never used to build them.
        out_dir: where ``model.onnx``, ``report.{json,md,html}`` and ``candidates/`` go.
        max_drop: the budget in absolute points of ``metric`` (0.01 = 1 point).
        metric: ``auto`` follows the output (accuracy/agreement for class scores, cosine for
            embeddings and other outputs), or ``accuracy``, ``agreement``, ``cosine``.
        min_cosine: no candidate whose mean cosine to the original is below this is chosen (None: 0.99,
            or 1 - max_drop / 2 when judged by agreement: search/budget.default_floor).
        objective: ``latency``, ``size`` or ``memory``.
        time_budget_min: stop building candidates when this many minutes have passed; keep the best so far.
        executor: ``local`` or ``ray`` (candidates built in parallel on a Ray cluster; timing stays local).
        target: the format every candidate ends in: ``onnx`` (default), ``executorch`` (.pte, judged
            against the FP32 .pte) or ``tflite`` (against the FP32 .tflite); ``edgeopt check`` for it runs first.
        per_channel: False for a target without per-channel INT8 weight scales: every INT8 step is per tensor.
        qat_epochs: epochs of the QAT recovery step (PyTorch model, labelled data, no INT8 candidate within
            budget; search/recovery.py); 0 leaves it out.

    Returns:
        OptimizeResult; ``chosen`` is None when no candidate met the budget.

    Raises:
        BudgetNotMet: never (the CLI raises it from a result with no choice); BadInput/DataError for bad input.

    Example:
        >>> r = optimize("examples/digits/digits_cnn.onnx", "examples/digits/test.npz", out_dir="out")  # doctest: +SKIP
        >>> r.chosen.name, r.chosen.speedup
    """
    start = time.perf_counter()
    check_objective(objective)
    if executor not in EXECUTORS:
        raise BadInput(f"--executor must be local or ray, got {executor!r}")
    if time_budget_min is not None and time_budget_min <= 0:
        raise BadInput(f"--time-budget must be > 0 minutes, got {time_budget_min}")
    if not 0.05 <= eval_fraction <= 0.95:
        raise BadInput(f"eval fraction must be in [0.05, 0.95], got {eval_fraction}")
    if target not in TARGET_SUFFIX:
        raise BadInput(f"--target must be one of {', '.join(TARGET_SUFFIX)}, got {target!r}")
    if isinstance(qat_epochs, bool) or not isinstance(qat_epochs, int) or qat_epochs < 0:
        raise BadInput(f"--qat-epochs must be an integer >= 0, got {qat_epochs!r}")
    budget = Budget(metric=metric, max_drop=max_drop, min_cosine=min_cosine)  # type: ignore[arg-type]
    profile = get_device(device)
    out = check_writable_dir(out_dir)
    original = load_model(model, weights=weights, trust_pickle=trust_pickle)
    dataset = load_data(data)
    notes: list[str] = []
    split = split_data(dataset, eval_fraction=eval_fraction, seed=seed)
    notes += pre_check(original, target, split.tune)
    baseline_model = _baseline(original, split, target)
    split = _Split(tune=split.tune.feeds_for(baseline_model), evaluation=split.evaluation.feeds_for(baseline_model),
                   train=split.train, validation=split.validation)
    notes.append(f"data split: {len(split.tune)} samples for calibration/fine-tuning, {len(split.evaluation)} "
                 "held out for judging (never used to build a candidate)")
    bench = bench or BenchSettings(warmup=10, min_runs=100, min_seconds=1.0, max_seconds=20.0)
    plan = recipes if recipes is not None else target_recipes(original, profile, target)
    if per_channel is False:
        from edgeopt.search.space import weights_per_tensor

        plan = weights_per_tensor(plan)
        notes.append("--per-tensor: the target has no per-channel INT8 weight scales; every INT8 step is per tensor")
    if not plan:
        raise BadInput("no recipes apply to this model and device profile")

    cache = CandidateCache(out)
    fp = data_fingerprint(split.tune, split.evaluation)
    settings_key = {"metric": budget.metric, "min_cosine": budget.min_cosine, "eval_fraction": eval_fraction,
                    "seed": seed,
                    "device": profile.name, "threads": threads}
    if profile.ssh:  # the same name may later point at another board: its figures are not this one's
        settings_key["ssh"] = profile.ssh
    if target != "onnx":
        settings_key["target"] = target
    ctx = TransformContext(calibration=split.tune, train=split.train, validation=split.validation,
                           teacher=original if original.format == "torch" else baseline_model,
                           device=profile, seed=seed, progress=False)
    base, base_out, base_metric = baseline_result(baseline_model, split.evaluation, budget, device=profile,
                                                  threads=threads)
    asked = budget.metric
    budget = budget.for_outputs(base_out, split.evaluation.labels,
                                name=baseline_model.outputs[0].name if baseline_model.outputs else None,
                                masked=has_text_mask(base_out, split.evaluation))
    notes.append(judge_note(asked, budget, base_out, split.evaluation.labels is not None))
    deadline = start + time_budget_min * 60 if time_budget_min else None
    reserve = (len(plan) + 1) * bench.min_seconds + 5.0
    results: list[CandidateResult] = []
    reused = 0
    pending: list[tuple[Recipe, str]] = []
    for recipe in plan:
        key = candidate_key(original.sha256, recipe.key(), fp, settings_key)
        cached = cache.load(key)
        if cached is not None:
            cached.name = recipe.name
            results.append(cached)
            reused += 1
        else:
            pending.append((recipe, key))
    if reused:
        notes.append(f"reused {reused} finished candidate(s) from {cache.root}")

    def finish(recipe: Recipe, key: str, cand: Candidate) -> CandidateResult:
        r = result_for(cand, key=key, eval_data=split.evaluation, budget=budget, baseline_outputs=base_out,
                       baseline_metric=base_metric, device=profile, threads=threads)
        cache.store(key, r, r.model)
        return r

    skipped: list[str] = []
    from edgeopt.progress import progress_bar

    with progress_bar(enabled=progress) as bar:
        task = bar.add_task("candidates", total=len(pending))
        if executor == "ray" and pending:
            from edgeopt.search.ray_executor import build_with_ray

            local = [(r, k) for r, k in pending if "torch" in r.needs]
            remote = [(r, k) for r, k in pending if "torch" not in r.needs]
            built = build_with_ray(baseline_model, [r for r, _ in remote], split.tune, address=ray_address,
                                   seed=seed)
            notes.append(f"built {len(remote)} candidate(s) on Ray; latency measured serially on this host")
            for (recipe, key), cand in zip(remote, built, strict=True):
                results.append(finish(recipe, key, cand))
                bar.advance(task)
            pending = local
        for recipe, key in pending:
            if deadline is not None and time.perf_counter() + reserve > deadline:
                skipped.append(recipe.name)
                continue
            bar.update(task, description=f"building {recipe.name}")
            source = original if "torch" in recipe.needs else baseline_model
            results.append(finish(recipe, key, build_one(source, recipe, ctx)))
            bar.advance(task)
    if skipped:
        notes.append(f"time budget reached: skipped {len(skipped)} recipe(s): {', '.join(skipped)}")
    order = {r.name: i for i, r in enumerate(plan)}
    results.sort(key=lambda r: order.get(r.name, len(order)))
    recovery_steps: list[dict[str, Any]] = []
    if target == "onnx" and recipes is None and (deadline is None or time.perf_counter() + reserve < deadline):
        qat = original.format == "torch" and split.train is not None and split.train.labels is not None \
            and qat_epochs > 0
        results += _int8_recovery(baseline_model, split, budget, plan, results, base_out, base_metric,
                                  run=lambda rs: [finish(r, candidate_key(original.sha256, r.key(), fp, settings_key),
                                                         build_one(baseline_model, r, ctx)) for r in rs],
                                  run_torch=(lambda rs: [finish(r, candidate_key(original.sha256, r.key(), fp,
                                                                                 settings_key),
                                                                build_one(original, r, ctx)) for r in rs])
                                  if qat else None, qat_epochs=qat_epochs,
                                  threads=threads, steps=recovery_steps, notes=notes)

    timing_name = candidate_key(original.sha256, ",".join(sorted(r.key for r in results)), fp,
                                {**settings_key, "bench": bench.__dict__})
    timing = cache.load_timing(timing_name)
    if timing is not None and set(timing.get("latency", {})) >= {r.key for r in results if r.model is not None}:
        _apply_timing(base, results, timing)
        notes.append("latency reused from the finished interleaved timing of an earlier run")
    else:
        if progress:
            from edgeopt.progress import note

            note(f"timing {1 + sum(r.model is not None for r in results)} models interleaved...")
        time_candidates(base, results, bench=bench, device=profile, threads=threads, data=split.evaluation)
        cache.store_timing(timing_name, _timing_payload(base, results))
    pareto_front([base, *results])
    chosen = choose(base, results, objective=objective, budget=budget)
    outcome = OptimizeResult(chosen=chosen, baseline=base, results=results, out_dir=out, budget=budget,
                             objective=objective, device=profile, notes=notes, reused=reused,
                             measured_on=measured_on(profile, base.runtime or "onnxruntime"), target=target)
    if profile.ssh:
        notes.append(f"latency and accuracy measured on the device {profile.name} ({profile.ssh}) over SSH; "
                     "candidates built on this host")
    chosen_path = outcome.model_path
    if chosen is not None and chosen.model is not None:
        chosen.model.save(chosen_path)
    elif chosen_path.exists():
        chosen_path.unlink()
    outcome.seconds = time.perf_counter() - start
    if write_reports:
        from edgeopt.report.writer import write_optimize_reports

        write_optimize_reports(outcome)
    return outcome


def _int8_recovery(baseline_model: Model, split: Any, budget: Budget, plan: list[Recipe],
                   results: list[CandidateResult], base_out: Any, base_metric: float, *, run: Any,
                   threads: int | None, steps: list[dict[str, Any]], notes: list[str], run_torch: Any = None,
                   qat_epochs: int = 0) -> list[CandidateResult]:
    """The INT8 recovery steps of ``quantize --mode auto`` (search/recovery.py) when no INT8 candidate
    meets the budget and an ONNX Runtime static INT8 candidate exists to start from (CNNs; transformers
    have their own space)."""
    from edgeopt.transforms.quantize import StaticInt8

    if baseline_model.format != "onnx" or any(r.meets_budget and r.model is not None and "int8" in r.name
                                              for r in results):
        return []
    by_name = {r.name: r for r in plan}
    statics = [(r, by_name[r.name].steps[0]) for r in results if r.model is not None and r.name in by_name
               and by_name[r.name].steps and isinstance(by_name[r.name].steps[0], StaticInt8)
               and by_name[r.name].steps[0].format == "qdq" and not by_name[r.name].steps[0].op_types]
    if not statics:
        return []
    from edgeopt.search.recovery import recover

    start, cfg = min(statics, key=lambda t: (t[0].drop if t[0].drop is not None else 1.0, -(t[0].cosine or 0.0)))
    notes.append(f"no INT8 candidate met the budget: INT8 recovery steps from {start.name} (calibration, bias "
                 "correction, mixed precision by measured cost and gain" + (", QAT" if run_torch else "") + ")")
    out = recover(baseline_model, split.tune, split.evaluation, budget, start=start, start_config=cfg, run=run,
                  runtimes=("onnxruntime",), threads=threads, steps=steps, notes=notes, baseline_outputs=base_out,
                  baseline_metric=base_metric, run_torch=run_torch, qat_epochs=qat_epochs)
    notes.extend(f"recovery {s['step']}: {s.get('variant')} {s.get('status')}, cosine "
                 f"{(s.get('cosine') or 0):.4f}" + (f", float layers {len(s['float_layers'])}"
                                                    if s.get("float_layers") else "") for s in steps)
    return out


def measured_on(profile: DeviceProfile, runtime: str) -> dict[str, Any]:
    """Where the figures come from: the remote device's facts, or this host's."""
    if profile.ssh:
        from edgeopt.runtimes.remote import remote_device

        device = remote_device(profile)
        if device.info is None:  # every figure came from the cache: ask the device what it is now
            device.probe()
        return device.measured_on(runtime)
    from edgeopt.measure.bench import measured_here

    return measured_here(runtime, profile)


_TIMED_FIELDS = ("latency_ms", "speedup", "speedup_interval", "size_bytes", "size_ratio", "model_memory_mb",
                 "peak_rss_mb", "runtime", "threads")


def _timing_payload(base: CandidateResult, results: list[CandidateResult]) -> dict[str, Any]:
    return {"baseline": {f: getattr(base, f) for f in _TIMED_FIELDS},
            "latency": {r.key: {f: getattr(r, f) for f in _TIMED_FIELDS} for r in results if r.model is not None}}


def _apply_timing(base: CandidateResult, results: list[CandidateResult], timing: dict[str, Any]) -> None:
    for f, v in timing["baseline"].items():
        setattr(base, f, v)
    for r in results:
        for f, v in timing["latency"].get(r.key, {}).items():
            setattr(r, f, v)


def budget_error(result: OptimizeResult) -> BudgetNotMet:
    """The one-line exit-3 error for a search with no choice, naming the closest candidate."""
    measured = [r for r in result.results if r.status != "failed" and r.latency_ms]
    where = f"reports in {result.out_dir}"
    if not measured:
        return BudgetNotMet(f"no candidate could be built and measured; see {result.out_dir / 'report.md'}")
    faster = [r for r in measured if (r.speedup or 0) > 1.0]
    pool = faster or measured
    closest = min(pool, key=lambda r: (r.drop if r.drop is not None else 1.0))
    return BudgetNotMet(
        f"no candidate met the budget ({result.budget.metric} drop <= {100 * result.budget.max_drop:.2f} pt and "
        f"better {result.objective} than the original); closest: {closest.name} "
        f"(drop {100 * (closest.drop or 0):.2f} pt, {closest.speedup or 0:.2f}x speed, "
        f"{closest.size_ratio or 0:.2f}x smaller); {where}")

