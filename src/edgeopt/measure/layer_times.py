"""Per-node run time inside ONNX Runtime, from its own profiler.

Mixed precision should keep in float the layers whose INT8 buys little time: a depthwise 3x3
conv or a classifier's last Gemm often runs about as fast in FP32, while a 1x1 conv gets most
of INT8's gain. ONNX Runtime's profiler records every kernel call of the *optimized* graph; after
its QDQ fusion an INT8 layer runs as one node (QLinearConv, ...) whose name keeps the original
layer's name as a prefix, so FP32 and INT8 node times can be matched layer by layer. Times are
medians over ``runs`` calls at batch 1 with the given thread count; the profile is only a
ranking aid, the latency a user sees is still measured by measure.bench.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from edgeopt.data import Dataset
from edgeopt.deps import require
from edgeopt.model import Model


def node_times(model: Model, data: Dataset, *, threads: int = 1, runs: int = 20) -> dict[str, float]:
    """Median milliseconds per call of every node ONNX Runtime ran, keyed by node name.

    Args:
        model: an ONNX model (run in ONNX Runtime on CPU, full graph optimization).
        data: inputs; the first sample is run ``runs`` times (after two warm-up calls).
        threads: intra-op threads.

    Example:
        >>> times = node_times(load_model("cnn.onnx"), data, threads=1)  # doctest: +SKIP
        >>> max(times, key=times.get)
    """
    ort = require("onnxruntime", extra="core")
    feeds = next(iter(data.feeds_for(model).batches(1)))[0]
    with tempfile.TemporaryDirectory(prefix="edgeopt-prof-") as tmp:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.enable_profiling = True
        opts.profile_file_prefix = os.path.join(tmp, "prof")
        session = ort.InferenceSession(model.serialized(), opts, providers=["CPUExecutionProvider"])
        for _ in range(2 + runs):
            session.run(None, feeds)
        path = Path(session.end_profiling())
        events = json.loads(path.read_text())
    calls: dict[str, list[float]] = defaultdict(list)
    for e in events:
        if e.get("cat") == "Node" and str(e.get("name", "")).endswith("_kernel_time"):
            calls[e["name"][: -len("_kernel_time")]].append(float(e.get("dur", 0)) / 1000.0)
    # skip the warm-up calls: every node is called once per run
    return {name: float(np.median(ms[2:] if len(ms) > 2 else ms)) for name, ms in calls.items()}


def layer_times(times: dict[str, float], proto: Any, layers: list[str]) -> dict[str, float]:
    """Milliseconds of each layer in ``layers`` (node names of ``proto``, the graph before ORT's
    optimizations), from :func:`node_times` of a model built from it.

    ORT renames what it fuses: an INT8 layer runs as ``<layer>_token_N`` (QDQ fusion), an FP32
    Conv fused with its Clip/Relu/Add as ``<output tensor>_nchwc``. A profiled name is stripped of
    those suffixes and matched to a node name or a tensor name of ``proto``; a match on a weight-free
    node (the activation a Conv was fused into) is walked back through its producers to the layer.
    Nodes that map to no layer (pooling, reshapes) are left out.
    """
    producer = {out: node for node in proto.graph.node for out in node.output}
    by_name = {node.name: node for node in proto.graph.node}
    wanted = set(layers)
    out = dict.fromkeys(layers, 0.0)
    for name, ms in times.items():
        owner = _owner(_strip(name), by_name, producer, wanted)
        if owner is not None:
            out[owner] += ms
    return out


def _strip(name: str) -> str:
    name = re.sub(r"_token_\d+$", "", name)
    for suffix in ("_nchwc", "_quant", "_fused"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return name


def _owner(name: str, by_name: dict[str, Any], producer: dict[str, Any], wanted: set[str]) -> str | None:
    node = by_name.get(name) or producer.get(name)
    for _ in range(4):  # Conv -> Add -> Clip is the longest chain ORT fuses into one kernel
        if node is None:
            return None
        if node.name in wanted:
            return node.name
        node = producer.get(node.input[0]) if node.input else None
    return None
