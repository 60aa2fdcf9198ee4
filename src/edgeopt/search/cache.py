"""Candidate cache under OUTDIR/candidates/: a killed search resumes without redoing finished work.

A candidate is stored as ``<key>/model.onnx`` (``.pte`` / ``.tflite`` for other targets) plus ``<key>/result.json``, each written
atomically and the result last, so a directory with a result.json is always complete.
The key hashes the original model, the recipe, the data and the split, so a changed input
never reuses a stale candidate.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from edgeopt.data import Dataset
from edgeopt.fileio import write_json
from edgeopt.model import Model, load_model
from edgeopt.search.engine import CandidateResult

_SUFFIX = {"onnx": ".onnx", "executorch": ".pte", "tflite": ".tflite"}


def data_fingerprint(*parts: Dataset) -> str:
    h = hashlib.sha256()
    for data in parts:
        for name in sorted(data.inputs):
            arr = np.ascontiguousarray(data.inputs[name])
            h.update(name.encode())
            h.update(str(arr.shape).encode() + str(arr.dtype).encode())
            h.update(arr.tobytes())
        if data.labels is not None:
            h.update(np.ascontiguousarray(data.labels).tobytes())
    return h.hexdigest()


def candidate_key(model_sha: str, recipe_key: str, data_fp: str, settings: dict[str, Any]) -> str:
    body = json.dumps({"model": model_sha, "recipe": recipe_key, "data": data_fp, "settings": settings},
                      sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()[:20]


class CandidateCache:
    def __init__(self, root: Path) -> None:
        self.root = root / "candidates"
        self.root.mkdir(parents=True, exist_ok=True)

    def load(self, key: str) -> CandidateResult | None:
        folder = self.root / key
        result_file = folder / "result.json"
        if not result_file.exists():
            return None
        try:
            payload = json.loads(result_file.read_text())
            result = CandidateResult.from_dict(payload)
            model_files = [folder / f"model{suffix}" for suffix in _SUFFIX.values()]
            model_file = next((f for f in model_files if f.exists()), None)
            if result.status != "failed":
                if model_file is None:
                    return None
                result.model = load_model(model_file)
        except (OSError, ValueError, Exception):  # a damaged entry is rebuilt, never trusted
            return None
        return result

    def store(self, key: str, result: CandidateResult, model: Model | None) -> None:
        folder = self.root / key
        folder.mkdir(parents=True, exist_ok=True)
        if model is not None:
            model.save(folder / f"model{_SUFFIX.get(model.format, '.onnx')}")
        write_json(folder / "result.json", result.to_dict())

    def load_timing(self, name: str) -> dict[str, Any] | None:
        path = self.root / f"timing-{name}.json"
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None

    def store_timing(self, name: str, payload: dict[str, Any]) -> None:
        write_json(self.root / f"timing-{name}.json", payload)
