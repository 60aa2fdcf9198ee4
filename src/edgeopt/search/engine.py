"""Build candidates from recipes, measure them all with the one harness, and choose.

Measurement rules the choice relies on: every candidate is timed interleaved with the
baseline in one process (ratios, not absolute times, decide), and judged on held-out data
that no transform saw. A candidate that is not clearly faster (or smaller, for the size
objective) than the original is never chosen, and neither is one that is slower.
"""

from __future__ import annotations

import time
import traceback
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgeopt.data import Dataset
from edgeopt.devices import DeviceProfile
from edgeopt.errors import EdgeoptError
from edgeopt.measure.bench import BenchResult, BenchSettings, compare, speedup_interval
from edgeopt.measure.evaluate import EvalResult, accuracy_of, figures_of, predict
from edgeopt.measure.judge import Fidelity, fidelity_of, output_kind, token_mask
from edgeopt.model import Model
from edgeopt.runtimes.sessions import resolve_settings
from edgeopt.search.budget import Budget, check_objective
from edgeopt.search.recipe import Recipe, apply_recipe
from edgeopt.transforms.config import TransformContext

# A candidate must beat the original by this fraction to count as faster/smaller; timings
# within it are noise on a shared machine. Candidates within TIE of the best are treated as
# equally fast, and the tie is broken by accuracy, then size, so noise cannot flip the choice.
MIN_GAIN = 0.03
TIE = 0.05
SIZE_TIE = 0.01
# Among candidates tied on the objective, the judged metric and size, those whose cosine loss (1 - mean
# cosine to the original) is within this fraction of the smallest are equally faithful; the faster of
# them wins. A saturated judge (every variant keeps every neighbour) must not hand the choice to timing
# noise when one variant's outputs are measurably closer to the original.
FAITHFUL_TIE = 0.1


@dataclass
class Candidate:
    recipe: Recipe
    model: Model | None
    error: str | None = None
    build_seconds: float = 0.0


@dataclass
class CandidateResult:
    """One measured candidate (or the baseline); ``to_dict`` is what reports show."""

    name: str
    recipe: dict[str, Any]
    size_bytes: int = 0
    latency_ms: dict[str, float] = field(default_factory=dict)
    speedup: float | None = None
    speedup_interval: list[float] | None = None  # 90% interval from paired interleaved rounds
    size_ratio: float | None = None
    model_memory_mb: float | None = None
    peak_rss_mb: float | None = None
    runtime: str | None = None
    threads: int | None = None
    accuracy: float | None = None
    agreement: float | None = None
    cosine: float | None = None
    cosine_p5: float | None = None  # 5th percentile over samples of the per-sample cosine
    confident_agreement: float | None = None  # where the original's top-1 is clear (class scores)
    kl: float | None = None  # mean KL(original || candidate) of the class probabilities
    nn_agreement: float | None = None  # nearest-neighbour agreement of pooled embeddings
    nn_tie_agreement: float | None = None  # the same, a neighbour the original rates as a near-tie counting as kept
    nn_expected_agreement: float | None = None  # plain NN agreement as expected (measure/judge.py), steadier than counted
    nn_expected_margin: float | None = None  # its 90 % half-width over the judged samples
    embedding_cosine: float | None = None  # mean cosine of pooled embeddings
    drop: float | None = None
    drop_interval: list[float] | None = None  # 90% interval of the drop from the judged samples' noise
    judged: int | None = None  # samples the budget metric counted (confident ones for agreement)
    meets_budget: bool = False
    pareto: bool = False
    status: str = "rejected"
    reason: str = ""
    build_seconds: float = 0.0
    key: str = ""
    model: Model | None = field(default=None, repr=False)
    # every figure of the judging (top-5, minimum cosine, confident counts ...: measure/evaluate.py
    # figures_of); kept out of to_dict, reports that show them take them from here
    figures: EvalResult | None = field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        return self.status != "failed"

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("model", "figures")}

    @classmethod
    def from_dict(cls, payload: dict[str, Any]) -> CandidateResult:
        known = set(cls.__dataclass_fields__) - {"model", "figures"}
        return cls(**{k: v for k, v in payload.items() if k in known})


def build_candidates(baseline: Model, recipes: list[Recipe], ctx: TransformContext) -> list[Candidate]:
    """Apply every recipe to ``baseline``; a recipe that fails becomes a failed Candidate, not a crash."""
    return [build_one(baseline, r, ctx) for r in recipes]


def build_one(baseline: Model, recipe: Recipe, ctx: TransformContext) -> Candidate:
    start = time.perf_counter()
    try:
        model = apply_recipe(baseline, recipe, ctx)
    except EdgeoptError as exc:
        return Candidate(recipe, None, error=str(exc), build_seconds=time.perf_counter() - start)
    except Exception as exc:  # a transform bug must not lose the rest of the search
        last = traceback.extract_tb(exc.__traceback__)[-1]
        where = f" at {last.filename.rsplit('/', 1)[-1]}:{last.lineno}" if last else ""
        return Candidate(recipe, None, error=f"internal error {type(exc).__name__}: {exc}{where}",
                         build_seconds=time.perf_counter() - start)
    return Candidate(recipe, model, build_seconds=time.perf_counter() - start)


def _judge(budget: Budget, outputs: np.ndarray, data: Dataset, reference: np.ndarray,
           name: str | None) -> tuple[Budget, Fidelity, float]:
    """The budget resolved for the original's output kind, the fidelity of ``outputs``, and the metric value."""
    mask = token_mask(reference, data.inputs)
    budget = budget.for_outputs(reference, data.labels, name=name, masked=has_text_mask(reference, data))
    fid = fidelity_of(outputs, reference, kind=output_kind(reference, name=name), mask=mask)
    if budget.metric == "accuracy" and data.labels is not None:
        return budget, fid, accuracy_of(outputs, data.labels)
    return budget, fid, fid.value(budget.metric)


def has_text_mask(reference: np.ndarray, data: Dataset) -> bool:
    """The data has an attention mask for these outputs: token states of a text encoder, or its
    2-D sentence embeddings (pooled embeddings and their neighbours can be computed)."""
    if token_mask(reference, data.inputs) is not None:
        return True
    from edgeopt.measure.judge import MASK_NAMES

    return reference.ndim == 2 and any(n in data.inputs for n in MASK_NAMES)


def _drop_interval(metric: str, outputs: np.ndarray, reference: np.ndarray, data: Dataset,
                   fid: Fidelity) -> tuple[float, float, int]:
    """The 90% interval of the drop on ``metric`` and how many samples it counted (measure/noise.py)."""
    from edgeopt.measure.judge import CONFIDENT_MARGIN, probabilities
    from edgeopt.measure.noise import drop_interval, wilson

    if metric == "neighbours" and fid.nn_agreement is not None:
        share = fid.nn_tie_agreement if fid.nn_tie_agreement is not None else fid.nn_agreement
        low, high = wilson(round((1.0 - share) * fid.n), fid.n)
        return low, high, fid.n

    a, b = outputs.reshape(len(outputs), -1), reference.reshape(len(reference), -1)
    confident = None
    if metric == "agreement" and fid.confident_agreement is not None:
        top2 = np.sort(probabilities(b), axis=1)[:, -2:]
        confident = (top2[:, 1] - top2[:, 0]) >= CONFIDENT_MARGIN
    cosines = None
    if metric == "cosine":
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        cosines = np.sum(a64 * b64, axis=1) / np.maximum(np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1),
                                                         1e-30)
    return drop_interval(metric, outputs, reference, labels=data.labels, confident=confident, cosines=cosines)


def _output_name(model: Model) -> str | None:
    return model.outputs[0].name if model.outputs else None


def evaluate_candidate(result: CandidateResult, model: Model, *, eval_data: Dataset, budget: Budget,
                       baseline_outputs: np.ndarray, baseline_metric: float, device: Any = None,
                       threads: int | None = None) -> None:
    """Fill the accuracy/fidelity figures, drop and meets_budget of ``result`` (in place).

    ``meets_budget`` needs both the metric drop within the budget and the mean cosine to the
    original at or above the budget's floor.
    """
    settings = resolve_settings(model, device=device, threads=threads)
    outputs = predict(model, eval_data, settings=settings)
    judged, fid, value = _judge(budget, outputs, eval_data, baseline_outputs, _output_name(model))
    result.agreement, result.cosine, result.cosine_p5 = fid.agreement, fid.cosine, fid.cosine_p5
    result.confident_agreement, result.kl = fid.confident_agreement, fid.kl
    result.nn_agreement, result.embedding_cosine = fid.nn_agreement, fid.embedding_cosine
    result.nn_tie_agreement, result.nn_expected_agreement = fid.nn_tie_agreement, fid.nn_expected_agreement
    result.nn_expected_margin = fid.nn_expected_margin
    result.figures = figures_of(outputs, eval_data, fid=fid, check_labels=False)
    result.accuracy = result.figures.accuracy
    result.drop = judged.drop(baseline_metric, value)
    result.meets_budget = judged.allows(baseline_metric, value, cosine=fid.cosine, nn_expected=fid.nn_expected_agreement,
                                        nn_margin=fid.nn_expected_margin or 0.0)
    low, high, result.judged = _drop_interval(judged.metric, outputs, baseline_outputs, eval_data, fid)
    result.drop_interval = [round(low, 5), round(high, 5)]
    result.runtime, result.threads = settings.runtime, settings.threads


def baseline_result(baseline: Model, eval_data: Dataset, budget: Budget, *, device: Any = None,
                    threads: int | None = None) -> tuple[CandidateResult, np.ndarray, float]:
    """The baseline's result, its outputs on ``eval_data`` and its budget metric.

    ``budget.for_outputs(outputs, eval_data.labels)`` gives the metric actually judged (``auto``
    resolved for the output kind).
    """
    settings = resolve_settings(baseline, device=device, threads=threads)
    outputs = predict(baseline, eval_data, settings=settings)
    _, fid, metric = _judge(budget, outputs, eval_data, outputs, _output_name(baseline))
    figures = figures_of(outputs, eval_data, check_labels=False)
    result = CandidateResult(name="original", recipe=Recipe("original").to_dict(), size_bytes=baseline.size_bytes,
                             accuracy=figures.accuracy, figures=figures,
                             agreement=1.0, cosine=1.0, cosine_p5=1.0, drop=0.0, meets_budget=True, status="baseline",
                             confident_agreement=1.0 if fid.confident_agreement is not None else None,
                             kl=0.0 if fid.kl is not None else None, nn_agreement=fid.nn_agreement,
                             nn_tie_agreement=fid.nn_tie_agreement, nn_expected_agreement=fid.nn_expected_agreement,
                             nn_expected_margin=fid.nn_expected_margin, embedding_cosine=fid.embedding_cosine,
                             reason="the original model", runtime=settings.runtime, threads=settings.threads,
                             model=baseline, size_ratio=1.0, speedup=1.0)
    return result, outputs, metric


def time_candidates(baseline: CandidateResult, results: list[CandidateResult], *, bench: BenchSettings | None,
                    device: str | DeviceProfile | None = None, threads: int | None = None,
                    data: Dataset | None = None) -> list[BenchResult]:
    """Time the baseline and every built candidate interleaved; fill latency, speedup, size and memory.

    Returns the harness's results (baseline first, then the timed candidates in order)."""
    timed = [baseline] + [r for r in results if r.model is not None]
    models = [r.model for r in timed]
    run_settings = [resolve_settings(m, device=device, threads=threads) for m in models]
    bench_results: list[BenchResult] = compare(models, settings=bench, run_settings=run_settings,
                                               data=data)
    base_p50 = bench_results[0].latency_ms["p50"]
    for r, b in zip(timed, bench_results, strict=True):
        r.latency_ms = {k: round(v, 4) for k, v in b.latency_ms.items()}
        r.speedup = round(base_p50 / b.latency_ms["p50"], 3)
        interval = speedup_interval(bench_results[0], b) if r is not baseline else None
        r.speedup_interval = [round(v, 3) for v in interval] if interval is not None else None
        r.size_bytes = b.size_bytes
        r.size_ratio = round(baseline.size_bytes / b.size_bytes, 3) if b.size_bytes else None
        r.model_memory_mb = b.model_memory_mb
        r.peak_rss_mb = b.peak_rss_mb
        r.runtime, r.threads = b.runtime, b.threads
    return bench_results


def result_for(cand: Candidate, *, key: str, eval_data: Dataset, budget: Budget, baseline_outputs: np.ndarray,
               baseline_metric: float, device: Any = None, threads: int | None = None) -> CandidateResult:
    """A built candidate judged on ``eval_data`` (not yet timed); a build or evaluation failure is a failed result."""
    r = CandidateResult(name=cand.recipe.name, recipe=cand.recipe.to_dict(), build_seconds=round(cand.build_seconds, 2),
                        key=key, model=cand.model)
    if cand.model is None:
        r.status, r.reason = "failed", f"failed: {cand.error}"
        return r
    try:
        evaluate_candidate(r, cand.model, eval_data=eval_data, budget=budget, baseline_outputs=baseline_outputs,
                           baseline_metric=baseline_metric, device=device, threads=threads)
    except Exception as exc:  # noqa: BLE001 - one bad candidate must not end the search
        r.status, r.reason, r.model = "failed", f"failed: {exc}", None
    return r


def measure_candidates(baseline: Model, candidates: list[Candidate], *, eval_data: Dataset, budget: Budget,
                       bench: BenchSettings | None = None, device: str | DeviceProfile | None = None,
                       threads: int | None = None) -> tuple[CandidateResult, list[CandidateResult]]:
    """Accuracy and fidelity of every candidate on ``eval_data``, then latency interleaved with the baseline."""
    base, base_out, base_metric = baseline_result(baseline, eval_data, budget, device=device, threads=threads)
    results = [result_for(c, key=c.recipe.key(), eval_data=eval_data, budget=budget, baseline_outputs=base_out,
                          baseline_metric=base_metric, device=device, threads=threads) for c in candidates]
    time_candidates(base, results, bench=bench, device=device, threads=threads, data=eval_data)
    return base, results


def _objective_value(r: CandidateResult, objective: str) -> float:
    if objective == "size":
        return float(r.size_bytes)
    if objective == "memory":
        return float(r.model_memory_mb or 0.0)
    return float(r.latency_ms.get("p50", float("inf")))


def _quality_lost(r: CandidateResult) -> float:
    """What ``r`` lost on the judged metric (its drop), else on accuracy or agreement; lower is better."""
    if r.drop is not None:
        return r.drop
    return -(r.accuracy if r.accuracy is not None else r.agreement or 0.0)


def _tell_apart(r: CandidateResult) -> float:
    """The accuracy difference ``r``'s judge cannot tell apart from noise (0 when it was not judged)."""
    from edgeopt.measure.noise import tell_apart

    if not r.judged:
        return 0.0
    quality = next((q for q in (r.accuracy, r.confident_agreement, r.nn_tie_agreement, r.agreement)
                    if q is not None), None)
    if quality is None or r.drop is None:
        return 0.0
    return tell_apart(quality, r.judged)


def choose(baseline: CandidateResult, results: list[CandidateResult], *, objective: str = "latency",
           budget: Budget | None = None) -> CandidateResult | None:
    """Pick the best candidate for ``objective`` within the budget; set status and reason on every result.

    Rules: failed candidates and those over budget are rejected; a candidate slower than the
    original (by more than MIN_GAIN) is rejected whatever the objective; for latency it must be
    at least MIN_GAIN faster, for size at least MIN_GAIN smaller. Among the rest, those within
    TIE of the best objective value are equivalent; among those, the candidates whose judged
    quality is within the judge's noise of the most accurate (:func:`edgeopt.measure.noise.tell_apart`
    on the samples judged) are equivalent too, and the smallest of them wins; among equal sizes, those
    whose expected plain NN agreement reaches a ``neighbours`` budget's floor outright (not only within
    its interval: :func:`_clear_of_nn_floor`), of those the most faithful (mean cosine to the original,
    losses within FAITHFUL_TIE are equal), then the fastest.
    "Faster" for the latency objective is judged on the lower bound of the speed-up's interval
    from paired interleaved rounds where there is one, so noise on a loaded machine cannot pass
    as a gain.
    """
    check_objective(objective)
    max_drop = budget.max_drop if budget else None
    metric = budget.metric if budget else "accuracy"
    qualified: list[CandidateResult] = []
    for r in results:
        if r.status == "failed" or r.model is None and not r.latency_ms:
            r.status = "failed"
            continue
        speed = r.speedup or 0.0
        smaller = (r.size_ratio or 0.0) >= 1 + MIN_GAIN
        if budget is not None and r.cosine is not None and not budget.cosine_ok(r.cosine):
            r.status, r.reason = "rejected", (f"mean cosine to the original {r.cosine:.4f} is below the floor "
                                              f"{budget.floor:g} (--min-cosine), whatever its {metric}")
        elif budget is not None and r.nn_expected_agreement is not None and \
                not budget.neighbours_ok(r.nn_expected_agreement, r.nn_expected_margin or 0.0):
            r.status, r.reason = "rejected", (f"plain nearest-neighbour agreement, as expected, "
                                              f"{100 * r.nn_expected_agreement:.2f} % (90 % interval up to "
                                              f"{100 * (r.nn_expected_agreement + (r.nn_expected_margin or 0)):.2f} %) "
                                              f"is below {100 * (budget.nn_floor or 0):.2f} % (near-ties may cost at "
                                              "most twice the budget)")
        elif not r.meets_budget:
            r.status = "rejected"
            r.reason = (f"{metric} drop {100 * (r.drop or 0):.2f} pt exceeds the budget"
                        + (f" of {100 * max_drop:.2f} pt" if max_drop is not None else ""))
        elif speed < 1 / (1 + MIN_GAIN):
            r.status, r.reason = "rejected", f"slower than the original ({speed:.2f}x)"
        elif objective == "latency" and speed < 1 + MIN_GAIN:
            r.status, r.reason = "rejected", f"not faster than the original ({speed:.2f}x)"
        elif objective == "latency" and r.speedup_interval and r.speedup_interval[0] < 1 + MIN_GAIN:
            low, high = r.speedup_interval
            r.status, r.reason = "rejected", (f"not reliably faster than the original ({speed:.2f}x, 90% interval "
                                              f"{low:.2f}-{high:.2f}x over the interleaved rounds)")
        elif objective == "size" and not smaller:
            r.status, r.reason = "rejected", f"not smaller than the original ({r.size_ratio or 0:.2f}x)"
        elif objective == "memory" and (r.model_memory_mb or 0) >= (baseline.model_memory_mb or 0) and \
                r.size_bytes >= baseline.size_bytes:
            r.status, r.reason = "rejected", "uses no less memory than the original"
        else:
            qualified.append(r)
    if not qualified:
        return None
    best_value = min(_objective_value(r, objective) for r in qualified)
    tied = [r for r in qualified if _objective_value(r, objective) <= best_value * (1 + TIE) + 1e-12]
    order = {id(r): i for i, r in enumerate(results)}
    # Ties within the judge's noise: among candidates as good on the objective, those whose judged
    # quality is within what the held-out samples can tell apart of the best are equal, and the
    # smaller, then faster, one wins (one sample in 2,000 must not choose a 3x larger model).
    best = min(tied, key=lambda r: (_quality_lost(r), r.size_bytes, order[id(r)]))
    noise = _tell_apart(best)
    within = [r for r in tied if _quality_lost(r) - _quality_lost(best) <= noise + 1e-12]
    # sizes within SIZE_TIE are one size (the same weights with other run-time settings differ by a few
    # metadata bytes): among those the most faithful (mean cosine to the original, within FAITHFUL_TIE)
    # and then the faster wins
    smallest = min(r.size_bytes for r in within)
    sized = [r for r in within if r.size_bytes <= smallest * (1 + SIZE_TIE)]
    floor_met = _clear_of_nn_floor(sized, budget)
    same_size = _most_faithful(floor_met)
    chosen = sorted(same_size, key=lambda r: (_objective_value(r, "latency"), r.size_bytes, order[id(r)]))[0]
    for r in qualified:
        if r is chosen:
            r.status = "chosen"
            interval = (f" (90% interval {r.speedup_interval[0]:.2f}-{r.speedup_interval[1]:.2f}x)"
                        if r.speedup_interval else "")
            r.reason = (f"best {objective} within budget: {r.speedup:.2f}x faster{interval}, "
                        f"{r.size_ratio or 0:.2f}x smaller, drop {100 * (r.drop or 0):.2f} pt")
        else:
            r.status = "rejected"
            if r in within:
                if r.size_bytes > smallest * (1 + SIZE_TIE):
                    worse = "larger than"
                elif r not in floor_met:
                    worse = (f"only within its 90 % interval of the {100 * (budget.nn_floor or 0):g} % floor on "
                             f"plain NN agreement (expected {100 * (r.nn_expected_agreement or 0):.2f} % vs "
                             f"{100 * (chosen.nn_expected_agreement or 0):.2f} %), unlike")
                elif r not in same_size:
                    worse = f"further from the original than (mean cosine {r.cosine:.5f} vs {chosen.cosine:.5f})"
                else:
                    worse = "slower than"
                r.reason = (f"as good on {objective} (within {int(TIE * 100)}%) and on accuracy within the judge's "
                            f"noise ({100 * noise:.2f} pt on {best.judged or '?'} samples) but {worse} the chosen one")
            elif r in tied:
                r.reason = f"as good on {objective} (within {int(TIE * 100)}%) but less accurate than the chosen one"
            else:
                r.reason = f"within budget but worse on {objective} than the chosen one"
    return chosen


def _clear_of_nn_floor(tied: list[CandidateResult], budget: Budget | None) -> list[CandidateResult]:
    """Of candidates the objective, the judge and size cannot tell apart, those whose expected plain NN
    agreement reaches the budget's floor itself rather than only within its 90 % interval (all of them
    when none does, or when the budget has no such floor).

    The interval lets a variant within the judge's noise of the floor pass, so that a miss of 0.00003 does
    not turn the choice into FP32; but between two variants as fast and as small, the one shown to meet
    the floor is the one to ship (all-MiniLM-L6-v2: SmoothQuant 0.6 and 0.5 with groups of 128 differ by
    under 1 % in p50, 3.37x and 3.35x faster, expected 97.9 % and 98.1 %).
    """
    floor = budget.nn_floor if budget is not None else None
    if floor is None:
        return tied
    clear = [r for r in tied if r.nn_expected_agreement is None or r.nn_expected_agreement >= floor - 1e-12]
    return clear or tied


def _most_faithful(tied: list[CandidateResult]) -> list[CandidateResult]:
    """Of candidates the objective, the judge and size cannot tell apart, those whose cosine loss is within
    FAITHFUL_TIE of the smallest (all of them when some have no cosine)."""
    if any(r.cosine is None for r in tied):
        return tied
    least = min(1.0 - r.cosine for r in tied)
    return [r for r in tied if 1.0 - r.cosine <= least * (1 + FAITHFUL_TIE) + 1e-9]


def pareto_front(results: list[CandidateResult]) -> list[CandidateResult]:
    """Mark and return the candidates no other beats on accuracy/agreement, latency and size at once."""
    pool = [r for r in results if r.status != "failed" and r.latency_ms]

    def score(r: CandidateResult) -> tuple[float, float, float]:
        return (_quality_lost(r), r.latency_ms["p50"], float(r.size_bytes))

    front = []
    for r in pool:
        s = score(r)
        dominated = any(all(a <= b for a, b in zip(score(o), s, strict=True)) and score(o) != s for o in pool
                        if o is not r)
        r.pareto = not dominated
        if r.pareto:
            front.append(r)
    return front
