"""The optimize report: content from a payload, and its plots rendered by a real browser."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from edgeopt.report.writer import headline, render_html, render_markdown


def payload() -> dict:
    def cand(name, status, p50, size, acc, drop, pareto=False):
        return {"name": name, "status": status, "runtime": "onnxruntime", "latency_ms": {"p50": p50, "p99": p50 * 1.2},
                "speedup": 1.0 / p50, "size_bytes": size, "size_ratio": 1000 / size, "accuracy": acc,
                "agreement": acc, "drop": drop, "pareto": pareto, "reason": f"{status} because"}

    return {"baseline": cand("original", "baseline", 1.0, 1000, 0.99, 0.0, True),
            "candidates": [cand("int8", "chosen", 0.4, 260, 0.985, 0.005, True),
                           cand("dyn", "rejected", 9.0, 255, 0.99, 0.0),
                           {"name": "broken", "status": "failed", "reason": "failed: unsupported op Foo",
                            "size_bytes": 0, "latency_ms": {}, "accuracy": None, "agreement": None, "drop": None}],
            "budget": {"metric": "accuracy", "max_drop": 0.01}, "objective": "latency",
            "device": {"name": "host", "runtime": "onnxruntime", "effective_threads": 2},
            "pareto": ["original", "int8"], "notes": ["a note"], "seconds": 12.0,
            "chosen_recipe": {"name": "int8", "steps": []}}


def test_headline_states_speed_size_and_accuracy() -> None:
    text = headline(payload())
    assert text.startswith("Chosen: int8 - 2.50x faster and 3.85x smaller")
    assert "accuracy 98.50% vs 99.00% (drop 0.50 pt, budget 1.00 pt)" in text


def test_markdown_lists_every_candidate_with_its_reason() -> None:
    md = render_markdown(payload())
    for name in ("original", "int8", "dyn", "broken"):
        assert f"| {name} |" in md
    assert "failed: unsupported op Foo" in md


def test_html_is_self_contained_with_three_plots() -> None:
    pytest.importorskip("matplotlib")
    page = render_html(payload())
    assert page.count("<svg") == 3
    for external in ('src="http', 'href="http', "url(http", "<link", "<script"):
        assert external not in page


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on this machine (apt-get install chromium)")
def test_headless_chromium_renders_the_plots(tmp_path: Path) -> None:
    image = pytest.importorskip("PIL.Image")
    pytest.importorskip("matplotlib")
    page = tmp_path / "report.html"
    page.write_text(render_html(payload()))
    shot = tmp_path / "shot.png"
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,2000",
                    f"--screenshot={shot}", page.as_uri()], capture_output=True, timeout=90, check=True)
    pixels = np.asarray(image.open(shot).convert("RGB")).astype(int)
    # the plots are the only place the 'rejected' orange (#f59e0b) and the Pareto blue (#2563eb) appear
    orange = np.all(np.abs(pixels - [245, 158, 11]) < 40, axis=-1).sum()
    blue = np.all(np.abs(pixels - [37, 99, 235]) < 40, axis=-1).sum()
    assert orange > 300 and blue > 30, (orange, blue)


def test_scatter_numbers_do_not_overlap_when_candidates_coincide() -> None:
    """INT8 variants often sit on one spot; their labels must still be readable."""
    pytest.importorskip("matplotlib")
    from edgeopt.report import plots

    plt = plots._plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    fig.canvas.draw()
    plots._place_numbers(fig, ax, [(0.5, 0.5, str(i)) for i in range(1, 7)])
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in ax.texts]
    plt.close(fig)
    assert len(boxes) == 6
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
