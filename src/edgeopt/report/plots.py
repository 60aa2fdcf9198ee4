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


def pareto_scatter(rows: list[dict[str, Any]], *, metric_label: str, budget_floor: float | None) -> str:
    """Latency vs accuracy; marker area ~ size; the Pareto front joined by a line; the budget floor dashed."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    measured = [r for r in rows if r.get("latency_ms") and _quality(r) is not None]
    biggest = max((r["size_bytes"] for r in measured), default=1) or 1
    for r in measured:
        ax.scatter(r["latency_ms"]["p50"], _quality(r), s=40 + 400 * r["size_bytes"] / biggest,
                   color=COLORS.get(r["status"], "#9ca3af"), alpha=0.75, edgecolors="black", linewidths=0.6,
                   zorder=3)
        if r.get("pareto") or r["status"] in ("baseline", "chosen"):
            ax.annotate(r["name"], (r["latency_ms"]["p50"], _quality(r)), fontsize=7, xytext=(5, 4),
                        textcoords="offset points")
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
    ax.set_xlabel("latency p50 (ms, batch 1) - lower is better")
    ax.set_ylabel(f"{metric_label} (%) - higher is better")
    ax.set_title("Candidates: accuracy vs latency (marker area ~ model size; labels on the Pareto front)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
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
