"""Plots as inline SVG strings (no external assets), drawn with matplotlib when it is installed."""

from __future__ import annotations

import io
import re
from typing import Any

from edgeopt.deps import available

COLORS = {"baseline": "#6b7280", "chosen": "#16a34a", "rejected": "#f59e0b", "failed": "#dc2626"}


def plots_available() -> bool:
    return available("matplotlib")


def _svg(fig: Any) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    text = buf.getvalue()
    text = re.sub(r"<metadata>.*?</metadata>", "", text, flags=re.S)
    return text[text.index("<svg"):]


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    matplotlib.rcParams["svg.fonttype"] = "path"
    import matplotlib.pyplot as plt

    return plt


def _quality(row: dict[str, Any]) -> float | None:
    value = row.get("accuracy")
    if value is None:
        value = row.get("agreement")
    return None if value is None else 100.0 * value


# Offsets (points) tried in turn for a point's number until it overlaps no label placed before it.
_LABEL_OFFSETS = [(6, 5), (6, -12), (-13, 5), (-13, -12), (0, 13), (0, -20), (14, 0), (-22, 0), (12, 16),
                  (12, -24), (-24, 16), (-24, -24)]


def _place_numbers(fig: Any, ax: Any, points: list[tuple[float, float, str]]) -> None:
    """Number the labelled points, moving each number until it overlaps no earlier one.

    Names would collide (INT8 variants sit on top of each other); numbers are short, and the key
    under the plot gives each number its name.
    """
    renderer = fig.canvas.get_renderer()
    placed: list[Any] = []
    for x, y, text in points:
        label = None
        for dx, dy in _LABEL_OFFSETS:
            if label is not None:
                label.remove()
            label = ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=8,
                                fontweight="bold", zorder=4)
            box = label.get_window_extent(renderer).expanded(1.15, 1.2)
            if not any(box.overlaps(other) for other in placed):
                break
        placed.append(label.get_window_extent(renderer))


def pareto_scatter(rows: list[dict[str, Any]], *, metric_label: str, budget_floor: float | None) -> str:
    """Latency vs accuracy; marker area ~ size; the Pareto front joined by a line; the budget floor dashed.

    The baseline, the chosen model and the Pareto front are numbered, with a key of names below.
    """
    plt = _plt()
    from matplotlib.ticker import FuncFormatter, LogLocator

    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    measured = [r for r in rows if r.get("latency_ms") and _quality(r) is not None]
    biggest = max((r["size_bytes"] for r in measured), default=1) or 1
    for r in measured:
        ax.scatter(r["latency_ms"]["p50"], _quality(r), s=40 + 400 * r["size_bytes"] / biggest,
                   color=COLORS.get(r["status"], "#9ca3af"), alpha=0.75, edgecolors="black", linewidths=0.6,
                   zorder=3)
    front = sorted((r for r in measured if r.get("pareto")), key=lambda r: r["latency_ms"]["p50"])
    if len(front) > 1:
        ax.plot([r["latency_ms"]["p50"] for r in front], [_quality(r) for r in front], color="#2563eb",
                linewidth=1.2, zorder=2, label="Pareto front")
    if budget_floor is not None:
        ax.axhline(budget_floor, color="#dc2626", linestyle="--", linewidth=1, label="budget floor")
    for status, color in COLORS.items():
        ax.scatter([], [], color=color, label=status)
    latencies = [r["latency_ms"]["p50"] for r in measured]
    if latencies and max(latencies) / max(min(latencies), 1e-9) > 20:
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_minor_locator(LogLocator(base=10, subs="auto"))
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xlabel("latency p50 (ms, batch 1) - lower is better")
    ax.set_ylabel(f"{metric_label} (%) - higher is better")
    ax.set_title("Candidates: accuracy vs latency (marker area ~ model size)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    labelled = [r for r in measured if r.get("pareto") or r["status"] in ("baseline", "chosen")]
    labelled.sort(key=lambda r: (r["status"] != "baseline", r["status"] != "chosen", r["latency_ms"]["p50"]))
    fig.canvas.draw()
    _place_numbers(fig, ax, [(r["latency_ms"]["p50"], _quality(r), str(i)) for i, r in enumerate(labelled, 1)])
    key = [f"{i}  {r['name']} ({r['status']}{', Pareto' if r.get('pareto') else ''})"
           for i, r in enumerate(labelled, 1)]
    if key:
        ax.text(0.0, -0.16, "\n".join(key), transform=ax.transAxes, va="top", ha="left", fontsize=7.5,
                family="monospace")
    return _svg(fig)


def bars(rows: list[dict[str, Any]], *, key: str, label: str, title: str) -> str:
    """Horizontal bars of one figure per candidate (``latency`` p50 or ``size``), coloured by status."""
    plt = _plt()
    measured = [r for r in rows if r.get("latency_ms")]
    values = [r["latency_ms"]["p50"] if key == "latency" else r["size_bytes"] / 1024.0 for r in measured]
    fig, ax = plt.subplots(figsize=(7.5, 0.35 * len(measured) + 1.2))
    ax.barh([r["name"] for r in measured], values, color=[COLORS.get(r["status"], "#9ca3af") for r in measured])
    for i, v in enumerate(values):
        ax.text(v, i, f" {v:.3g}", va="center", fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel(label)
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    return _svg(fig)


def sensitivity_bars(rows: list[dict[str, Any]]) -> str:
    """Per-layer sensitivity: the fidelity lost when only that layer is quantized."""
    plt = _plt()
    top = rows[:20]
    fig, ax = plt.subplots(figsize=(7.5, 0.32 * len(top) + 1.2))
    values = [100.0 * float(r.get("drop") or 0.0) for r in top]
    ax.barh([str(r.get("node")) for r in top], values, color="#7c3aed")
    ax.invert_yaxis()
    ax.set_xlabel("drop when only this layer is INT8 (points)")
    ax.set_title("Per-layer quantization sensitivity (most sensitive first)")
    ax.grid(axis="x", alpha=0.3)
    return _svg(fig)
