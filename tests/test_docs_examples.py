"""Every Python block in README.md and docs/*.md runs as written, on the bundled example.

A block is run in a fresh interpreter whose working directory holds a link to ``examples/``, so
relative paths in the docs work and whatever a block writes (``out/``) lands in tmp_path.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def python_blocks() -> list[tuple[str, str]]:
    blocks = []
    for doc in DOCS:
        for i, match in enumerate(BLOCK.finditer(doc.read_text())):
            blocks.append((f"{doc.relative_to(ROOT)}#{i + 1}", match.group(1)))
    return blocks


def test_the_docs_have_python_examples() -> None:
    names = [name for name, _ in python_blocks()]
    assert "README.md#1" in names
    assert any(name.startswith("docs/api.md") for name in names)


@pytest.mark.slow
@pytest.mark.parametrize(("name", "code"), python_blocks(), ids=[n for n, _ in python_blocks()])
def test_python_block_runs(name: str, code: str, tmp_path: Path) -> None:
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stderr[-3000:]}"
    assert proc.stdout.strip(), f"{name} printed nothing; a docs example shows its result"
