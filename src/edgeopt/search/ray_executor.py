"""Build post-training candidates in parallel on a Ray cluster (a local one by default).

Only construction runs remotely; accuracy and latency are measured back on this host, so
candidates never time each other. Workers need edgeopt installed (true for a local cluster;
for a remote ``ray://`` cluster, install edgeopt in its image or runtime_env).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from edgeopt.data import Dataset
from edgeopt.deps import require
from edgeopt.model import Model
from edgeopt.search.engine import Candidate
from edgeopt.search.recipe import Recipe


def _build_remote(model_bytes: bytes, source: str, recipe: dict[str, Any], inputs: dict[str, np.ndarray],
                  labels: np.ndarray | None, seed: int) -> tuple[bytes | None, str | None, float]:
    import onnx

    from edgeopt.data import Dataset
    from edgeopt.model import Model
    from edgeopt.search.engine import build_one
    from edgeopt.search.recipe import Recipe
    from edgeopt.transforms.config import TransformContext

    model = Model.from_onnx(onnx.load_from_string(model_bytes), source=source)
    calibration = Dataset(inputs, labels, source="calibration")
    plan = Recipe.from_dict(recipe, trust_code=True)  # serialized by this run from an already vetted plan
    cand = build_one(model, plan, TransformContext(calibration=calibration, seed=seed, progress=False))
    return (cand.model.serialized() if cand.model is not None else None, cand.error, cand.build_seconds)


def build_with_ray(baseline: Model, recipes: list[Recipe], calibration: Dataset, *, address: str | None = None,
                   seed: int = 0) -> list[Candidate]:
    """One Ray task per recipe; results in the order of ``recipes``."""
    if not recipes:
        return []
    ray = require("ray", extra="ray")
    import onnx

    started = False
    if not ray.is_initialized():
        ray.init(address=address, num_cpus=None if address else (os.cpu_count() or 1), include_dashboard=False,
                 log_to_driver=False, ignore_reinit_error=True, configure_logging=False)
        started = True
    try:
        task = ray.remote(_build_remote)
        model_ref = ray.put(baseline.serialized())
        inputs_ref = ray.put(calibration.inputs)
        refs = [task.remote(model_ref, baseline.source, r.to_dict(), inputs_ref, calibration.labels, seed)
                for r in recipes]
        outputs = ray.get(refs)
    finally:
        if started:
            ray.shutdown()
    candidates = []
    for recipe, (payload, error, seconds) in zip(recipes, outputs, strict=True):
        model = None
        if payload is not None:
            model = Model.from_onnx(onnx.load_from_string(payload), source=f"{baseline.source} [{recipe.name}]")
        candidates.append(Candidate(recipe, model, error=error, build_seconds=seconds))
    return candidates
