"""edgeopt optimize: the accuracy-budgeted search over recipes."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from edgeopt.cli import app
from edgeopt.cli import options as opt
from edgeopt.cli.common import (
    SECONDS,
    JsonOpt,
    MaxDropOpt,
    MetricOpt,
    MinCosineOpt,
    QatEpochsOpt,
    SecondsOpt,
    ThreadsOpt,
    TrustCodeOpt,
    TrustPickleOpt,
    WeightsOpt,
    console,
    emit_json,
    err_console,
    fmt_bytes,
    fmt_cos,
    fmt_pct,
    image_folder_flags,
    load_data_arg,
    user_errors,
)


@app.command()
@user_errors
@image_folder_flags
def optimize(
    model: Annotated[str, typer.Argument(help="ONNX model, or PyTorch file.py:factory with --weights.")],
    data: Annotated[str, typer.Option("--data", help="Labelled data (.npz, image folder, sklearn:digits).")],
    out: Annotated[Path, typer.Option("-o", "--out", help="Output directory.")],
    max_drop: MaxDropOpt = 0.01,
    metric: MetricOpt = "auto",
    min_cosine: MinCosineOpt = None,
    objective: Annotated[str, typer.Option("--objective", help="latency, size or memory.")] = "latency",
    target: Annotated[str, typer.Option("--target", help="Format every candidate ends in: onnx, executorch (.pte) "
                                                         "or tflite; its operator check runs first.")] = "onnx",
    device: Annotated[str | None, typer.Option("--device", help="Device profile, or several comma-separated: each chooses by its own figures (OUT/NAME/).")] = None,
    threads: ThreadsOpt = None,
    time_budget: Annotated[float | None, typer.Option("--time-budget", callback=opt.positive, help="Minutes; stops cleanly, keeps the best so far.")] = None,
    executor: Annotated[str, typer.Option("--executor", help="local, or ray (build candidates on a Ray cluster).")] = "local",
    ray_address: Annotated[str | None, typer.Option("--ray-address", help="ray:// address; default: a local cluster.")] = None,
    recipes: Annotated[Path | None, typer.Option("--recipes", help="JSON list of recipes to try instead of the default space.")] = None,
    eval_fraction: Annotated[float, typer.Option("--eval-fraction", callback=opt.open_fraction, help="Share of --data held out for judging.")] = 0.5,
    per_channel: Annotated[bool | None, typer.Option("--per-channel/--per-tensor", help="--per-tensor: a target without per-channel INT8 weight scales (every INT8 step per tensor, QAT too).")] = None,
    qat_epochs: QatEpochsOpt = None,
    seconds: SecondsOpt = SECONDS,
    weights: WeightsOpt = None,
    trust_pickle: TrustPickleOpt = False,
    trust_code: TrustCodeOpt = False,
    json_out: JsonOpt = None,
) -> None:
    """Search quantization/pruning/runtime recipes within --max-drop; keep the Pareto front; pick the best."""
    from edgeopt.errors import BadInput
    from edgeopt.fileio import read_json
    from edgeopt.measure.bench import BenchSettings
    from edgeopt.search.optimize import budget_error
    from edgeopt.search.optimize import optimize as run_optimize
    from edgeopt.search.recipe import Recipe

    if max_drop < 0:
        raise BadInput(f"--max-drop must be >= 0 (0.01 = 1 point), got {max_drop}")
    plan = None
    if recipes is not None:
        raw = read_json(recipes, "recipes")
        if not isinstance(raw, list):
            raise BadInput(f"{recipes} must hold a JSON list of recipes")
        plan = [Recipe.from_dict(r, trust_code=trust_code) for r in raw]
    from edgeopt.cli.measure import device_list

    targets = device_list(device)
    if len(targets) > 1:
        _fleet(targets, lambda name: run_optimize(
            model, load_data_arg(data), out_dir=out / str(name), max_drop=max_drop, metric=metric,
            min_cosine=min_cosine, objective=objective, device=name, threads=threads, time_budget_min=time_budget,
            executor=executor, ray_address=ray_address, recipes=plan, eval_fraction=eval_fraction,
            bench=BenchSettings(min_seconds=seconds, min_runs=100, max_seconds=max(20.0, seconds)),
            weights=str(weights) if weights else None, trust_pickle=trust_pickle, target=target,
            per_channel=per_channel, qat_epochs=3 if qat_epochs is None else qat_epochs), out, json_out)
        return
    result = run_optimize(model, load_data_arg(data), out_dir=out, max_drop=max_drop, metric=metric, min_cosine=min_cosine,
                          objective=objective,
                          device=device, threads=threads, time_budget_min=time_budget, executor=executor,
                          ray_address=ray_address, recipes=plan, eval_fraction=eval_fraction,
                          bench=BenchSettings(min_seconds=seconds, min_runs=100, max_seconds=max(20.0, seconds)),
                          weights=str(weights) if weights else None, trust_pickle=trust_pickle, target=target,
                          per_channel=per_channel, qat_epochs=3 if qat_epochs is None else qat_epochs)
    payload = result.to_dict()
    table = Table(title=f"edgeopt optimize: {model} on {result.device.name} (objective {objective})")
    for col in ("candidate", "status", "runtime", "p50 ms", "speed-up", "size", "smaller", "accuracy",
                "agreement", "cosine", "drop pt", "why"):
        table.add_column(col, justify="left" if col in ("candidate", "status", "runtime", "why") else "right",
                         overflow="fold")
    styles = {"chosen": "bold green", "failed": "red", "baseline": "dim"}
    for r in [result.baseline, *result.results]:
        table.add_row(r.name + (" *" if r.pareto else ""), r.status, r.runtime or "-",
                      f"{r.latency_ms['p50']:.3f}" if r.latency_ms else "-",
                      f"{r.speedup:.2f}x" if r.speedup else "-", fmt_bytes(r.size_bytes) if r.size_bytes else "-",
                      f"{r.size_ratio:.2f}x" if r.size_ratio else "-", fmt_pct(r.accuracy), fmt_pct(r.agreement),
                      fmt_cos(r.cosine), "-" if r.drop is None else f"{100 * r.drop:.2f}", r.reason, style=styles.get(r.status))
    console.print(table)
    console.print("* Pareto front. Latency: batch 1, interleaved with the original; accuracy on held-out data.")
    from edgeopt.report.writer import headline, measured_on_text

    console.print(measured_on_text(payload["measured_on"]), style="dim")

    console.print(headline(payload), style="bold")
    console.print(f"reports: {out / 'report.html'}, {out / 'report.md'}, {out / 'report.json'}")
    emit_json(json_out, payload)
    if result.chosen is None:
        raise budget_error(result)
    console.print(f"model: {result.model_path}")
    if result.chosen.size_bytes:
        err_console.print(f"size {fmt_bytes(result.baseline.size_bytes)} -> {fmt_bytes(result.chosen.size_bytes)}",
                          style="dim")


def _fleet(targets: list[str | None], run: Any, out: Path, json_out: str | None) -> None:
    """optimize per device (each in OUT/NAME/, each choosing by its own figures); one column per device."""
    from edgeopt.errors import BudgetNotMet
    from edgeopt.report.writer import measured_on_text

    results = {}
    for name in targets:
        err_console.print(f"optimizing for {name}...")
        results[str(name)] = run(name)
    table = Table(title="edgeopt optimize: one column per device (speed-up vs the original there; * chosen)")
    table.add_column("candidate")
    for name in results:
        table.add_column(name, justify="right")
    first = next(iter(results.values()))
    for i, r in enumerate([first.baseline, *first.results]):
        cells = [r.name]
        for res in results.values():
            row = [res.baseline, *res.results][i]
            mark = " *" if row.status == "chosen" else (" (failed)" if row.status == "failed" else "")
            cells.append((f"{row.speedup:.2f}x" if row.speedup else "-") + mark)
        table.add_row(*cells)
    console.print(table)
    for name, res in results.items():
        console.print(f"{name}: chose {res.chosen.name if res.chosen else 'nothing'}; "
                      f"{measured_on_text(res.measured_on)}; reports in {res.out_dir}", style="dim")
    emit_json(json_out, {"devices": {name: res.to_dict() for name, res in results.items()}})
    missing = [name for name, res in results.items() if res.chosen is None]
    if missing:
        raise BudgetNotMet(f"no candidate met the budget on {', '.join(missing)}; reports in "
                           f"{', '.join(str(out / m) for m in missing)}")


@app.command()
@user_errors
@image_folder_flags
def apply(
    model: Annotated[str, typer.Argument(help="The original model (ONNX, or PyTorch file.py:factory).")],
    recipe: Annotated[Path, typer.Argument(help="A recipe JSON: optimize's chosen_recipe, or one of report.json's candidates.")],
    out: Annotated[Path, typer.Option("-o", "--out", help="Output .onnx.")],
    data: Annotated[str | None, typer.Option("--data", help="Calibration / fine-tuning data, when the recipe needs it.")] = None,
    weights: WeightsOpt = None,
    trust_pickle: TrustPickleOpt = False,
    trust_code: TrustCodeOpt = False,
) -> None:
    """Replay a saved recipe on a model (e.g. the one optimize chose), without searching again."""
    from edgeopt.errors import BadInput
    from edgeopt.fileio import read_json
    from edgeopt.model import load_model
    from edgeopt.search.optimize import fine_tuning_split
    from edgeopt.search.recipe import Recipe, apply_recipe
    from edgeopt.transforms.config import TransformContext

    payload = read_json(recipe, "recipe")
    if isinstance(payload, dict) and "chosen_recipe" in payload:
        payload = payload["chosen_recipe"]
    if not isinstance(payload, dict):
        raise BadInput(f"{recipe} does not hold a recipe object (or optimize's report.json)")
    plan = Recipe.from_dict(payload, trust_code=trust_code)
    loaded = load_model(model, weights=weights, trust_pickle=trust_pickle)
    dataset = load_data_arg(data) if data else None
    if plan.needs and dataset is None:
        raise BadInput(f"recipe {plan.name} needs {', '.join(plan.needs)} data: pass --data")
    train, validation = fine_tuning_split(dataset, seed=0) if dataset is not None else (None, None)
    ctx = TransformContext(calibration=dataset, train=train, validation=validation, teacher=loaded)
    with console.status(f"applying {plan.describe()}..."):
        result = apply_recipe(loaded, plan, ctx)
    saved = result.save(out)
    console.print(f"wrote {out} ({fmt_bytes(saved.size_bytes)}) from recipe {plan.name}: {plan.describe()}")
