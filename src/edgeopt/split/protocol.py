"""The stage-to-stage wire format: length-prefixed frames of raw numpy tensors, no pickle.

A frame is ``b"EOPT"``, a 4-byte big-endian header length, a UTF-8 JSON header, then the raw
bytes of each tensor (C order) back to back::

    {"kind": "data", "seq": 7, "tensors": [{"name": "x", "dtype": "float32", "shape": [1, 64]}]}

``kind`` is ``data``, ``end`` (no more items: pass it on and exit) or ``error`` (a stage failed:
``message`` says why; pass it on). The receiver checks every header against an allowlist of
dtypes and a size limit before reading, so a bad frame is an error message, never a crash or
an arbitrary object.
"""

from __future__ import annotations

import json
import socket
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

MAGIC = b"EOPT"
MAX_HEADER = 1 << 20
MAX_TENSOR_BYTES = 1 << 31
DTYPES = ("float32", "float16", "float64", "int8", "uint8", "int16", "int32", "int64", "bool")


class ProtocolError(Exception):
    """A frame that breaks the format, or a peer that went away mid-frame."""


@dataclass
class Frame:
    kind: str
    seq: int = -1
    tensors: dict[str, np.ndarray] = field(default_factory=dict)
    message: str = ""

    @property
    def payload_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


def encode(frame: Frame) -> list[bytes | memoryview]:
    """The frame as buffers for ``socket.sendmsg``/``sendall`` (tensor bytes are not copied)."""
    arrays = {name: np.ascontiguousarray(t) for name, t in frame.tensors.items()}
    header: dict[str, Any] = {"kind": frame.kind, "seq": frame.seq, "message": frame.message,
                              "tensors": [{"name": n, "dtype": str(a.dtype), "shape": list(a.shape)}
                                          for n, a in arrays.items()]}
    head = json.dumps(header).encode()
    return [MAGIC + struct.pack(">I", len(head)) + head, *(memoryview(a).cast("B") for a in arrays.values())]


def send(sock: socket.socket, frame: Frame) -> int:
    """Send one frame; returns the bytes written."""
    total = 0
    for part in encode(frame):
        sock.sendall(part)
        total += len(part)
    return total


def _read_exact(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise ProtocolError("connection closed" + (" mid-frame" if got else ""))
        got += k
    return buf


def recv(sock: socket.socket) -> Frame:
    """Read one frame, validating the header before reading any tensor bytes.

    Raises:
        ProtocolError: wrong magic, oversized or malformed header, disallowed dtype, bad shape,
            or the peer closed the connection.
    """
    start = _read_exact(sock, 8)
    if bytes(start[:4]) != MAGIC:
        raise ProtocolError(f"bad frame magic {bytes(start[:4])!r}: the peer does not speak the edgeopt stage protocol")
    (size,) = struct.unpack(">I", start[4:])
    if size > MAX_HEADER:
        raise ProtocolError(f"frame header of {size} bytes exceeds {MAX_HEADER}")
    try:
        header = json.loads(bytes(_read_exact(sock, size)))
        kind = str(header["kind"])
        specs = header.get("tensors", [])
        seq = int(header.get("seq", -1))
    except (ValueError, KeyError, TypeError) as exc:
        raise ProtocolError(f"malformed frame header ({exc})") from exc
    if kind not in ("data", "end", "error"):
        raise ProtocolError(f"unknown frame kind {kind!r}")
    tensors: dict[str, np.ndarray] = {}
    for spec in specs:
        name, dtype, shape = _check_spec(spec)
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        data = _read_exact(sock, nbytes)
        tensors[name] = np.frombuffer(data, dtype=dtype).reshape(shape)
    return Frame(kind=kind, seq=seq, tensors=tensors, message=str(header.get("message", "")))


def _check_spec(spec: Any) -> tuple[str, str, tuple[int, ...]]:
    if not isinstance(spec, dict):
        raise ProtocolError("tensor spec must be an object")
    name, dtype, shape = spec.get("name"), spec.get("dtype"), spec.get("shape")
    if not isinstance(name, str) or not name:
        raise ProtocolError("tensor spec without a name")
    if dtype not in DTYPES:
        raise ProtocolError(f"tensor {name!r} has dtype {dtype!r}; allowed: {', '.join(DTYPES)}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        raise ProtocolError(f"tensor {name!r} has a bad shape {shape!r}")
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    if nbytes > MAX_TENSOR_BYTES:
        raise ProtocolError(f"tensor {name!r} of {nbytes} bytes exceeds the {MAX_TENSOR_BYTES}-byte limit")
    return name, dtype, tuple(shape)
