"""Write optimize's report.json, report.md and a self-contained report.html (inline SVG plots, inline CSS)."""

from __future__ import annotations

import html
from typing import TYPE_CHECKING, Any

from edgeopt.fileio import atomic_path, write_json
from edgeopt.report import plots

if TYPE_CHECKING:
    from edgeopt.search.optimize import OptimizeResult


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def _size(n: int | None) -> str:
    if not n:
        return "-"
    return f"{n / 1024:.1f} KB" if n < 1024 * 1024 else f"{n / 1024 / 1024:.2f} MB"


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _drop(r: dict[str, Any]) -> str:
    return "-" if r.get("drop") is None else f"{100 * r['drop']:.2f}"


def _cos(r: dict[str, Any]) -> str:
    return "-" if r.get("cosine") is None else f"{r['cosine']:.4f}"


def _nn(r: dict[str, Any]) -> str:
    """Counted, and as expected (measure/judge.py: the count is a lottery over near-ties)."""
    if r.get("nn_expected_agreement") is None:
        return _pct(r.get("nn_agreement"))
    return f"{_pct(r.get('nn_agreement'))} (expected {_pct(r.get('nn_expected_agreement'))})"


def _metric_value(r: dict[str, Any], metric: str) -> float | None:
    """The figure the budget judged, for the headline."""
    if metric == "cosine":
        return r.get("cosine")
    if metric == "neighbours":
        return r.get("nn_tie_agreement") if r.get("nn_tie_agreement") is not None else r.get("nn_agreement")
    if metric == "agreement":
        return r.get("confident_agreement") if r.get("confident_agreement") is not None else r.get("agreement")
    return r.get("accuracy") if r.get("accuracy") is not None else r.get("agreement")


def _ms(r: dict[str, Any]) -> str:
    return f"{r['latency_ms']['p50']:.3f}" if r.get("latency_ms") else "-"


def headline(payload: dict[str, Any]) -> str:
    """One sentence a person reads first."""
    base = payload["baseline"]
    budget = payload["budget"]
    chosen = next((c for c in payload["candidates"] if c["status"] == "chosen"), None)
    if chosen is None:
        return (f"No candidate met the budget ({budget['metric']} drop <= {100 * budget['max_drop']:.2f} pt, "
                f"{payload['objective']} better than the original); the original stays the best choice.")
    metric = _metric_value(chosen, budget["metric"])
    base_metric = _metric_value(base, budget["metric"])
    return (f"Chosen: {chosen['name']} - {_x(chosen.get('speedup'))} faster and {_x(chosen.get('size_ratio'))} "
            f"smaller than the original ({_ms(chosen)} ms vs {_ms(base)} ms p50, {_size(chosen['size_bytes'])} vs "
            f"{_size(base['size_bytes'])}), {budget['metric']} {_pct(metric)} vs {_pct(base_metric)} "
            f"(drop {100 * (chosen.get('drop') or 0):.2f} pt, budget {100 * budget['max_drop']:.2f} pt), "
            f"mean cosine to the original {_cos(chosen)}.")


def _threads(dev: dict[str, Any]) -> str:
    return str(dev["effective_threads"] or "all the device's")


def measured_on_text(where: dict[str, Any] | None) -> str:
    """``Measured on pi (pi@10.0.0.7:22): Cortex-A72, 4 usable core(s), onnxruntime 1.20.1``."""
    if not where:
        return "Measured on this machine"
    via = f" ({where['ssh']}, over SSH)" if where.get("ssh") else " (this machine)"
    return (f"Measured on {where.get('device')}{via}: {where.get('cpu')}, {where.get('usable_cores')} usable "
            f"core(s), {where.get('runtime')} {where.get('runtime_version') or '?'}")


def _rows(payload: dict[str, Any]) -> list[dict[str, Any]]:
    return [payload["baseline"], *payload["candidates"]]


def render_markdown(payload: dict[str, Any]) -> str:
    dev = payload["device"]
    lines = ["# edgeopt optimize report", "", f"**{headline(payload)}**", "",
             f"- Device profile: `{dev['name']}` ({dev['runtime']}, {_threads(dev)} thread(s))",
             f"- {measured_on_text(payload.get('measured_on'))}",
             f"- Objective: {payload['objective']}; budget: {payload['budget']['metric']} drop <= "
             f"{100 * payload['budget']['max_drop']:.2f} pt, mean cosine >= {payload['budget'].get('min_cosine', '-')}",
             f"- Pareto front: {', '.join(payload['pareto'])}", f"- Search time: {payload['seconds']} s", ""]
    lines += [f"- {n}" for n in payload["notes"]]
    lines += ["", "| candidate | status | runtime | p50 ms | speed-up | size | smaller | accuracy | agreement | cosine "
              "| NN agr. | drop pt | why |",
              "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in _rows(payload):
        lines.append(f"| {r['name']} | {r['status']}{' (Pareto)' if r.get('pareto') else ''} | {r.get('runtime') or '-'} | "
                     f"{_ms(r)} | {_x(r.get('speedup'))} | {_size(r.get('size_bytes'))} | {_x(r.get('size_ratio'))} | "
                     f"{_pct(r.get('accuracy'))} | {_pct(r.get('agreement'))} | {_cos(r)} | {_nn(r)} | "
                     f"{_drop(r)} | {r.get('reason', '')} |")
    lines += ["", "Latency: batch 1, every candidate timed interleaved with the original in one process "
              "(ratios are what to trust on a shared machine). Accuracy on held-out data no candidate was built with.", ""]
    if payload.get("chosen_recipe"):
        lines += ["## Chosen recipe", "", "```json", _json(payload["chosen_recipe"]), "```", ""]
    return "\n".join(lines)


def _json(obj: Any) -> str:
    import json

    return json.dumps(obj, indent=2)


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1100px;color:#111827;padding:0 16px}
h1{font-size:22px;margin-bottom:4px} .headline{font-size:17px;background:#ecfdf5;border-left:5px solid #16a34a;padding:12px 14px;margin:14px 0}
.headline.none{background:#fef3c7;border-color:#f59e0b} .meta{color:#4b5563;font-size:13px}
table{border-collapse:collapse;width:100%;font-size:12.5px;margin:12px 0} th,td{border-bottom:1px solid #e5e7eb;padding:5px 7px;text-align:right}
th{background:#f9fafb} td.l,th.l{text-align:left} tr.chosen{background:#dcfce7;font-weight:600} tr.failed{color:#991b1b} tr.baseline{background:#f3f4f6}
.plots{display:grid;grid-template-columns:1fr 1fr;gap:14px} .plot{border:1px solid #e5e7eb;padding:8px;border-radius:6px;overflow:hidden}
.plot svg{width:100%;height:auto} .wide{grid-column:1 / span 2} pre{background:#f9fafb;padding:10px;overflow:auto;font-size:12px}
"""


def render_html(payload: dict[str, Any]) -> str:
    rows = _rows(payload)
    chosen = any(r["status"] == "chosen" for r in payload["candidates"])
    esc = html.escape
    dev = payload["device"]
    parts = ["<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>edgeopt optimize report</title>",
             f"<style>{_CSS}</style></head><body>", "<h1>edgeopt optimize report</h1>",
             f"<div class='headline{'' if chosen else ' none'}'>{esc(headline(payload))}</div>",
             f"<p class='meta'>Device profile <b>{esc(dev['name'])}</b> ({esc(dev['runtime'])}, "
             f"{_threads(dev)} thread(s)) &middot; {esc(measured_on_text(payload.get('measured_on')))} &middot; objective <b>{esc(payload['objective'])}</b> &middot; "
             f"budget: {esc(payload['budget']['metric'])} drop &le; {100 * payload['budget']['max_drop']:.2f} pt &middot; "
             f"search {payload['seconds']} s</p>"]
    if payload["notes"]:
        parts.append("<ul class='meta'>" + "".join(f"<li>{esc(n)}</li>" for n in payload["notes"]) + "</ul>")
    parts.append("<table><tr><th class='l'>candidate</th><th class='l'>status</th><th class='l'>runtime</th><th>p50 ms</th>"
                 "<th>p99 ms</th><th>speed-up</th><th>size</th><th>smaller</th><th>accuracy</th><th>agreement</th>"
                 "<th>cosine</th><th>NN agr.</th><th>drop pt</th><th class='l'>why</th></tr>")
    for r in rows:
        p99 = f"{r['latency_ms']['p99']:.3f}" if r.get("latency_ms") else "-"
        drop = _drop(r)
        parts.append(f"<tr class='{esc(r['status'])}'><td class='l'>{esc(r['name'])}{' &#9733;' if r.get('pareto') else ''}</td>"
                     f"<td class='l'>{esc(r['status'])}</td><td class='l'>{esc(str(r.get('runtime') or '-'))}</td>"
                     f"<td>{_ms(r)}</td><td>{p99}</td><td>{_x(r.get('speedup'))}</td><td>{_size(r.get('size_bytes'))}</td>"
                     f"<td>{_x(r.get('size_ratio'))}</td><td>{_pct(r.get('accuracy'))}</td><td>{_pct(r.get('agreement'))}</td>"
                     f"<td>{_cos(r)}</td><td>{_nn(r)}</td><td>{drop}</td><td class='l'>{esc(r.get('reason', ''))}</td></tr>")
    parts.append("</table><p class='meta'>&#9733; = on the Pareto front (no other candidate is at once more accurate, "
                 "faster and smaller). Latency: batch 1, all candidates timed interleaved with the original in one "
                 "process. Accuracy on held-out data that no candidate was built with.</p>")
    if plots.plots_available():
        base_metric = payload["baseline"].get("accuracy")
        if base_metric is None:
            base_metric = payload["baseline"].get("agreement")
        floor = None if base_metric is None else 100 * (base_metric - payload["budget"]["max_drop"])
        figs = [("wide", plots.pareto_scatter(rows, metric_label=payload["budget"]["metric"], budget_floor=floor)),
                ("", plots.bars(rows, key="latency", label="p50 latency (ms)", title="Latency p50 (batch 1)")),
                ("", plots.bars(rows, key="size", label="size (KB)", title="Model size on disk"))]
        if payload.get("sensitivity"):
            figs.append(("wide", plots.sensitivity_bars(payload["sensitivity"])))
        parts.append("<div class='plots'>" + "".join(f"<div class='plot {cls}'>{svg}</div>" for cls, svg in figs)
                     + "</div>")
    else:
        parts.append("<p class='meta'>Plots need matplotlib: pip install 'edgeopt[report]'.</p>")
    if payload.get("chosen_recipe"):
        parts.append(f"<h2>Chosen recipe</h2><pre>{esc(_json(payload['chosen_recipe']))}</pre>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_optimize_reports(result: OptimizeResult) -> dict[str, str]:
    """report.json, report.md and report.html in the result's out_dir, each written atomically."""
    payload = result.to_dict()
    out = result.out_dir
    write_json(out / "report.json", payload)
    with atomic_path(out / "report.md") as tmp:
        tmp.write_text(render_markdown(payload))
    with atomic_path(out / "report.html") as tmp:
        tmp.write_text(render_html(payload))
    return {k: str(out / f"report.{k}") for k in ("json", "md", "html")}
