"""Load a ``torch.export`` archive (``.pt2``) without running code from it.

``torch.export.load`` is not safe on a file from someone else: it unpickles (with
``weights_only=False``) the archive's sample inputs, any weight or constant stored as a pickle and
any custom object; it evaluates the archive's symbolic-shape strings with ``sympy.sympify`` (an
``eval``); it ``exec``s the archive's ``guards_code`` when the module is built; and a graph node may
name any callable reachable from ``torch`` (``torch.os.system``), which runs when the model runs.

This module reads the archive itself and refuses, before torch deserializes anything, every part
that could run code: pickled payloads, custom objects, compiled (AOTInductor) code, legacy
layouts, guard code that is not shape arithmetic (and the module is built without exec'ing guard
code at all), operators outside the ATen/prims/higher-order namespaces, symbolic expressions that
are not plain arithmetic on shape symbols, and control characters in any string. Tensor payloads are raw bytes; the pickled sample inputs are never read (the input specs
come from the graph itself). A genuine archive written by ``torch.export.save`` loads.
``trust_pickle=True`` hands the file to ``torch.export.load`` unchanged.
"""

from __future__ import annotations

import ast
import json
import math
import operator
import os
import re
import zipfile
from pathlib import Path
from typing import Any

from edgeopt.deps import require
from edgeopt.errors import ModelError, first_line

# Operator namespaces whose ops are tensor kernels compiled into torch (no user code behind them).
OP_NAMESPACES = frozenset({"aten", "prims", "higher_order", "quantized_decomposed"})
_OP = re.compile(r"torch\.ops\.([a-z_][a-z0-9_]*)\.([A-Za-z_][A-Za-z0-9_]*)(?:\.([A-Za-z_][A-Za-z0-9_]*))?")
_SYM_OP = re.compile(r"(_operator|math|torch)\.([a-z][a-z0-9_]*)")
# What a symbolic shape expression (sympy's srepr, e.g. "Add(Symbol('s77', positive=True,
# integer=True), Integer(1))") may hold: shape symbols, sympy constructors and assumptions.
_SYMBOL = re.compile(r"[a-z]+[0-9]+")
_QUOTED_SYMBOL = re.compile(r"'[a-z]+[0-9]+'|\"[a-z]+[0-9]+\"")
_EXPR_CHARS = re.compile(r"[A-Za-z0-9_+\-*/%(),. <>=!&|~^]*")
_EXPR_NAMES = frozenset({
    "Symbol", "Integer", "Rational", "Float", "Add", "Mul", "Pow", "Mod", "Max", "Min", "Abs",
    "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "StrictLessThan", "StrictGreaterThan", "LessThan", "GreaterThan",
    "Equality", "Unequality", "And", "Or", "Not", "Piecewise", "ExprCondPair", "floor", "ceiling", "sqrt",
    "FloorDiv", "ModularIndexing", "Where", "PythonMod", "CleanDiv", "CeilToInt", "FloorToInt", "CeilDiv",
    "LShift", "RShift", "IsNonOverlappingAndDenseIndicator", "TruncToFloat", "TruncToInt", "RoundToInt",
    "RoundDecimal", "ToFloat", "FloatPow", "PowByNatural", "IntTrueDiv", "FloatTrueDiv", "Identity",
    "OpaqueUnaryFn_sqrt", "BitwiseFn_bitwise_and", "BitwiseFn_bitwise_or", "BitwiseFn_bitwise_xor",
    "True", "False", "true", "false", "oo", "zoo", "nan", "int_oo", "Infinity", "NegativeInfinity",
    "IntInfinity", "NegativeIntInfinity", "One", "Zero", "NegativeOne", "Half",
    "positive", "negative", "nonnegative", "nonpositive", "integer", "real", "finite", "zero", "nonzero",
    "commutative", "precision",
})
# Metadata torch keeps for debugging; dropped rather than carried into generated code.
_DROPPED_METADATA = ("stack_trace", "custom")


def _refuse(path: Path, what: str) -> ModelError:
    return ModelError(f"{path.name} {what}; loading it would run code from the file. Re-export it with "
                      "torch.export.save from plain tensors, or pass --trust-pickle if you trust the file")


def load_exported_program(path: str | os.PathLike[str], *, trust_pickle: bool = False) -> Any:
    """Read ``path`` as a torch.export ExportedProgram.

    Args:
        path: a ``.pt2`` file written by ``torch.export.save``.
        trust_pickle: hand the file to ``torch.export.load`` (which unpickles and runs code in it).

    Raises:
        ModelError: the file is not a torch.export archive, or holds something that could run code
            (the message names ``--trust-pickle``).
    """
    torch = require("torch", extra="torch")
    p = Path(path)
    _check_zip(p)
    if trust_pickle:
        try:
            return torch.export.load(str(p))
        except Exception as exc:
            raise ModelError(f"{p} is not a valid torch.export archive: {type(exc).__name__}: "
                             f"{first_line(exc)}") from exc
    try:
        parts = _read_archive(p)
    except ModelError:
        raise
    except Exception as exc:
        raise ModelError(f"{p} is not a valid torch.export archive: {type(exc).__name__}: {first_line(exc)}") from exc
    try:
        return _deserialize(p, parts)
    except ModelError:
        raise
    except Exception as exc:
        raise ModelError(f"{p} is not a valid torch.export archive ({type(exc).__name__}: {first_line(exc)}); "
                         "re-export it with torch.export.save") from exc


def input_specs(program: Any) -> list[Any]:
    """The program's tensor inputs as TensorSpecs: a static dimension is an int, a dynamic one a name.

    A program exported with batch 1 keeps batch 1 here, so evaluation feeds it one sample at a time.
    """
    from edgeopt.model import TensorSpec

    user_inputs = set(program.graph_signature.user_inputs)
    specs = []
    for node in program.graph.nodes:
        if node.op != "placeholder" or node.name not in user_inputs:
            continue
        val = node.meta.get("val")
        if val is None or not hasattr(val, "shape"):
            continue
        dims = tuple(int(d) if isinstance(d, int) else ("batch" if i == 0 else str(d))
                     for i, d in enumerate(val.shape))
        specs.append(TensorSpec(node.name, dims, str(val.dtype).removeprefix("torch.")))
    return specs


def program_module(program: Any) -> Any:
    """The program as a plain nn.Module: ``train()``/``eval()`` work (torch's versions raise).

    Built without the generated guard function (``check_guards=False``: no archive text is
    exec'd); torch's forward pre-hook still checks input ranks and dimension ranges.
    """
    module = program.module(check_guards=False)
    for name in ("train", "eval"):
        module.__dict__.pop(name, None)
    return module


# -- the archive, checked part by part ------------------------------------------------------------
def _check_zip(path: Path) -> None:
    if not zipfile.is_zipfile(path):
        raise ModelError(f"{path} is not a torch.export archive (not a zip file); re-export it with "
                         "torch.export.save")
    with zipfile.ZipFile(path) as archive:
        declared = sum(info.file_size for info in archive.infolist())
    limit = _memory_bytes()
    if limit and declared > limit:
        raise ModelError(f"{path} declares {declared / 2**30:.1f} GB of content, more than this machine's "
                         f"{limit / 2**30:.1f} GB of memory")


def _memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _read_archive(path: Path) -> dict[str, Any]:
    from torch.export.pt2_archive import _package as pkg
    from torch.export.pt2_archive import constants as c

    reader = pkg.PT2ArchiveReader(str(path))
    names = set(reader.get_file_names())
    if c.ARCHIVE_VERSION_PATH not in names or reader.read_string(c.ARCHIVE_VERSION_PATH) != c.ARCHIVE_VERSION_VALUE:
        raise _refuse(path, "is an older or unknown torch.export archive layout (pickled)")
    model_file = c.MODELS_FILENAME_FORMAT.format("model")
    if model_file not in names:
        raise ModelError(f"{path} holds no exported program named 'model'; re-export it with torch.export.save")
    for name in names:
        if name.startswith((c.AOTINDUCTOR_DIR, c.EXECUTORCH_DIR, c.MTIA_DIR)):
            raise _refuse(path, f"holds compiled code ({name})")
    for legacy in (f"{c.WEIGHTS_DIR}model.pt", f"{c.CONSTANTS_DIR}model.pt"):
        if legacy in names:
            raise _refuse(path, f"stores {legacy} as a pickle")
    weights = pkg._load_payload_config(reader, c.WEIGHTS_CONFIG_FILENAME_FORMAT.format("model"))
    for fqn, meta in weights.config.items():
        if meta.use_pickle or meta.tensor_meta is None:
            raise _refuse(path, f"stores weight {fqn!r} as a pickle")
    constants_file = c.CONSTANTS_CONFIG_FILENAME_FORMAT.format("model")
    if constants_file in names:
        consts = pkg._load_payload_config(reader, constants_file)
        for fqn, meta in consts.config.items():
            if not meta.path_name.startswith(c.TENSOR_CONSTANT_FILENAME_PREFIX):
                raise _refuse(path, f"stores constant {fqn!r} as a custom object")
            if meta.use_pickle or meta.tensor_meta is None:
                raise _refuse(path, f"stores constant {fqn!r} as a pickle")
    program = json.loads(reader.read_bytes(model_file).decode("utf-8"))
    if not isinstance(program, dict):
        raise ModelError(f"{path}: {model_file} is not an exported program")
    guards = program.get("guards_code") or []
    if not isinstance(guards, list) or not all(isinstance(g, str) for g in guards):
        raise ModelError(f"{path}: guards_code is not a list of strings; re-export it with torch.export.save")
    for guard in guards:
        _check_guard(path, guard)
    _check_tree(path, program)
    return {"reader": reader, "program": program, "has_constants": constants_file in names}


def _check_tree(path: Path, node: Any, key: str = "") -> None:
    """Walk the program's JSON: operators, symbolic expressions and strings must be harmless."""
    if isinstance(node, dict):
        for drop in _DROPPED_METADATA:
            if drop in node and key == "metadata":
                del node[drop]
        for k, v in node.items():
            if k in ("target", "as_operator") and isinstance(v, str):
                _check_operator(path, v)
            elif k == "expr_str" and isinstance(v, str):
                _check_expr(path, v)
            _check_tree(path, v, k)
    elif isinstance(node, list):
        for v in node:
            _check_tree(path, v, key)
    elif isinstance(node, str):
        if any(ord(ch) < 32 or ord(ch) == 127 for ch in node):
            raise _refuse(path, f"has a control character in {key or 'a string'} ({node[:40]!r})")


def _check_operator(path: Path, target: str) -> None:
    import torch
    from torch._export.serde.serialize import _SYM_OPS

    op = _OP.fullmatch(target)
    if op is not None and op.group(1) in OP_NAMESPACES:
        resolved: Any = torch.ops
        for part in op.groups()[:3]:
            if part is None:
                break
            resolved = getattr(resolved, part, None)
            if resolved is None:
                break
        if isinstance(resolved, (torch._ops.OpOverload, torch._ops.HigherOrderOperator)):
            return
    sym = _SYM_OP.fullmatch(target)
    if sym is not None:
        module = {"_operator": operator, "math": math, "torch": torch}[sym.group(1)]
        resolved = getattr(module, sym.group(2), None)
        if resolved is not None and (resolved in _SYM_OPS or resolved is operator.getitem):
            return
    raise _refuse(path, f"calls {target[:80]!r}, which is not a tensor operator")


# Guard code is Python that torch execs; only shape arithmetic on the inputs may pass.
_GUARD_NODES = (ast.Expression, ast.BoolOp, ast.BinOp, ast.UnaryOp, ast.Compare, ast.Constant, ast.Name,
                ast.Subscript, ast.Attribute, ast.Call, ast.Load, ast.And, ast.Or, ast.Not, ast.USub, ast.UAdd,
                ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow, ast.Eq, ast.NotEq, ast.Lt,
                ast.LtE, ast.Gt, ast.GtE, ast.Slice)
_GUARD_METHODS = frozenset({"size", "stride", "storage_offset", "dim", "numel"})
_GUARD_FUNCTIONS = frozenset({"Max", "Min", "FloorDiv", "Mod", "PythonMod", "CleanDiv", "CeilDiv", "floor",
                              "ceiling", "sqrt", "abs", "min", "max", "int", "float"})
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _check_guard(path: Path, code: str) -> None:
    """Accept ``L['x'].size()[0] > 3``-style shape checks; refuse anything else torch would exec."""
    def bad(why: str) -> ModelError:
        return _refuse(path, f"carries guard code that is not a shape check ({why}: {code[:60]!r})")

    if len(code) > 10_000 or any(ord(ch) < 32 for ch in code):
        raise bad("length or control characters")
    try:
        tree = ast.parse(code, mode="eval")
    except (SyntaxError, ValueError, RecursionError):
        raise bad("not an expression") from None
    for node in ast.walk(tree):
        if not isinstance(node, _GUARD_NODES):
            raise bad(type(node).__name__)
        if isinstance(node, ast.Name) and node.id not in ("L", "math") and node.id not in _GUARD_FUNCTIONS:
            raise bad(f"name {node.id}")
        if isinstance(node, ast.Attribute) and (node.attr.startswith("_") or not (
                node.attr in _GUARD_METHODS or (isinstance(node.value, ast.Name) and node.value.id == "math"))):
            raise bad(f"attribute {node.attr}")
        if isinstance(node, ast.Constant) and not (
                isinstance(node.value, (int, float, bool)) or (isinstance(node.value, str) and _IDENT.fullmatch(node.value))):
            raise bad("constant")
        if isinstance(node, ast.Call) and (node.keywords or not isinstance(node.func, (ast.Attribute, ast.Name))):
            raise bad("call")


def _check_expr(path: Path, expr: str) -> None:
    bare = _QUOTED_SYMBOL.sub("S", expr)
    names = re.findall(r"[A-Za-z_][A-Za-z0-9_]*", bare)
    stray_dot = re.search(r"(?<![0-9])\.|\.(?![0-9])", bare)
    if (len(expr) > 10_000 or not _EXPR_CHARS.fullmatch(bare) or "__" in bare or stray_dot
            or any(n not in _EXPR_NAMES and n != "S" and not _SYMBOL.fullmatch(n) for n in names)):
        raise _refuse(path, f"has a symbolic shape expression that is not arithmetic ({expr[:60]!r})")


def _deserialize(path: Path, parts: dict[str, Any]) -> Any:
    from torch._export.serde import schema
    from torch._export.serde.serialize import ExportedProgramDeserializer, _dict_to_dataclass
    from torch.export.pt2_archive import _package as pkg

    reader = parts["reader"]
    serialized = _dict_to_dataclass(schema.ExportedProgram, parts["program"])
    state_dict = pkg._load_state_dict(reader, "model")
    constants = pkg._load_constants(reader, "model") if parts["has_constants"] else {}
    program = ExportedProgramDeserializer(None).deserialize(serialized, state_dict, constants, None)
    return program
