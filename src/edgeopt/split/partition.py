"""Cut an ONNX model into contiguous sub-models with onnx.utils.Extractor.

Each sub-model takes the tensor crossing the previous cut (or the graph inputs) and returns the
tensor crossing the next cut (or the graph outputs); weights and constants it needs come along.
Every stage written to disk is loaded once in ONNX Runtime, so a broken stage fails at
``edgeopt split`` time, not in the middle of a pipeline run.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from edgeopt.errors import ModelError, first_line
from edgeopt.split.graph import CutPoint, GraphCuts

if TYPE_CHECKING:
    import onnx


def extract(cuts: GraphCuts, start: CutPoint | None, end: CutPoint | None, *, name: str) -> onnx.ModelProto:
    """The sub-model between two cuts (``None`` = the graph's own inputs / outputs).

    Args:
        cuts: the analysed graph.
        start: the cut this part begins after, or None for the model's first node.
        end: the cut this part ends at, or None for the model's last node.
        name: graph name of the sub-model.

    Returns:
        A checked ONNX ModelProto with the parent's opsets and ``edgeopt.*`` metadata.

    Raises:
        ModelError: the extractor cannot build a valid sub-model.

    Example:
        >>> part = extract(cuts, None, cuts.cuts[10], name="stage_0")  # doctest: +SKIP
    """
    import onnx
    import onnx.utils

    inputs = list(start.tensors) if start is not None else list(cuts.input_names)
    outputs = list(end.tensors) if end is not None else list(cuts.output_names)
    try:
        sub = _extractor(cuts).extract_model(inputs, outputs)
        sub.graph.name = name
        onnx.checker.check_model(sub, full_check=False)
    except Exception as exc:  # onnx raises several error types here
        raise ModelError(f"cannot extract the part {inputs} -> {outputs}: {first_line(exc)}") from exc
    del sub.metadata_props[:]
    for prop in cuts.proto.metadata_props:
        if prop.key.startswith("edgeopt."):
            sub.metadata_props.add(key=prop.key, value=prop.value)
    return sub


def _extractor(cuts: GraphCuts) -> onnx.utils.Extractor:
    import onnx.utils

    cached = getattr(cuts, "_extractor", None)
    if cached is None:
        cached = onnx.utils.Extractor(cuts.proto)
        cuts._extractor = cached  # type: ignore[attr-defined]
    return cached


def write_stage(proto: onnx.ModelProto, path: Path) -> None:
    """Write one stage atomically after proving ONNX Runtime loads it."""
    import onnxruntime as ort

    from edgeopt.fileio import write_bytes

    payload = proto.SerializeToString()
    try:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        ort.InferenceSession(payload, sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own exception types
        raise ModelError(f"stage {path.name} does not load in ONNX Runtime: {first_line(exc)}") from exc
    write_bytes(path, payload)
