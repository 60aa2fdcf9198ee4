"""Datasets: arrays keyed by model input name, optional integer labels, and safe splits.

Data arrives already preprocessed to the model's input (``.npz``), or is preprocessed here from
an image folder or a built-in set. ``split`` gives disjoint parts so that calibration or
fine-tuning data never leaks into the data a result is judged on.
"""

from __future__ import annotations

import math
import os
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from edgeopt.deps import require
from edgeopt.errors import DataError
from edgeopt.model import MAX_SAMPLE_VALUES

if TYPE_CHECKING:
    from edgeopt.model import Model, TensorSpec

SINGLE_INPUT_KEY = "x"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@dataclass(frozen=True)
class Dataset:
    """Input arrays (N, ...) keyed by input name (``x`` for a single input) and optional labels (N,)."""

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None
    source: str

    def __post_init__(self) -> None:
        if not self.inputs:
            raise DataError(f"{self.source}: no input arrays")
        sizes = {k: len(v) for k, v in self.inputs.items()}
        if self.labels is not None:
            sizes["y"] = len(self.labels)
        if len(set(sizes.values())) != 1:
            raise DataError(f"{self.source}: arrays have different numbers of samples {sizes}")

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values())))

    @property
    def has_labels(self) -> bool:
        return self.labels is not None

    def inputs_digest(self) -> str:
        """A fingerprint of the input arrays: transforms that measure statistics on calibration data
        (SmoothQuant's factors, weight rounding's ``H``) key their caches on it."""
        import hashlib

        h = hashlib.sha256()
        for name in sorted(self.inputs):
            array = np.ascontiguousarray(self.inputs[name])
            h.update(f"{name}{array.dtype}{array.shape}".encode())
            h.update(array.tobytes())
        return h.hexdigest()

    def take(self, index: Sequence[int] | np.ndarray | slice) -> Dataset:
        """The samples at ``index`` (a subset keeps the source name, with the count)."""
        inputs = {k: v[index] for k, v in self.inputs.items()}
        labels = self.labels[index] if self.labels is not None else None
        n = len(next(iter(inputs.values())))
        return Dataset(inputs, labels, source=f"{self.source}[{n}]")

    def split(self, fraction: float, *, seed: int = 0) -> tuple[Dataset, Dataset]:
        """Split into two disjoint parts, the first with ``fraction`` of the samples.

        Stratified by label when labels exist, so both parts see every class.

        Example:
            >>> calib, held_out = data.split(0.3, seed=0)  # doctest: +SKIP
        """
        if not 0.0 < fraction < 1.0:
            raise DataError(f"split fraction must be in (0, 1), got {fraction}")
        n = len(self)
        if n < 2:
            raise DataError(f"{self.source} has {n} sample(s); need at least 2 to split")
        rng = np.random.default_rng(seed)
        if self.labels is not None:
            first: list[int] = []
            for cls in np.unique(self.labels):
                members = np.flatnonzero(self.labels == cls)
                rng.shuffle(members)
                k = int(round(len(members) * fraction))
                first.extend(members[:k].tolist())
            first_idx = np.array(sorted(first), dtype=np.int64)
        else:
            perm = rng.permutation(n)
            first_idx = np.sort(perm[: int(round(n * fraction))])
        mask = np.zeros(n, dtype=bool)
        mask[first_idx] = True
        if mask.all() or not mask.any():
            cut = max(1, min(n - 1, int(round(n * fraction))))
            mask[:] = False
            mask[rng.permutation(n)[:cut]] = True
        return self.take(np.flatnonzero(mask)), self.take(np.flatnonzero(~mask))

    def batches(self, batch_size: int) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray | None]]:
        """Yield (inputs, labels) in order, the last batch possibly smaller."""
        if batch_size < 1:
            raise DataError(f"batch size must be >= 1, got {batch_size}")
        for start in range(0, len(self), batch_size):
            end = start + batch_size
            labels = self.labels[start:end] if self.labels is not None else None
            yield {k: v[start:end] for k, v in self.inputs.items()}, labels

    def feeds_for(self, model: Model) -> Dataset:
        """This data keyed by the model's input names and cast to its dtypes; DataError if it can't fit."""
        specs = model.inputs
        if not specs:
            return self
        if len(specs) == 1 and len(self.inputs) == 1:
            # One array for a one-input model whatever its key: converters rename inputs (LiteRT calls a
            # PyTorch model's `input` `serving_default_args_0`), and the shape check below still applies.
            arrays = {specs[0].name: next(iter(self.inputs.values()))}
        else:
            missing = [s.name for s in specs if s.name not in self.inputs]
            if missing:
                raise DataError(
                    f"{self.source} has arrays {sorted(self.inputs)} but the model needs inputs "
                    f"{[s.name for s in specs]}; key the .npz arrays by input name (missing {missing})")
            arrays = {s.name: self.inputs[s.name] for s in specs}
        fitted = {s.name: _fit_array(arrays[s.name], s, self.source) for s in specs}
        return Dataset(fitted, self.labels, self.source)


def _fit_array(array: np.ndarray, spec: TensorSpec, source: str) -> np.ndarray:
    sample_shape = tuple(array.shape[1:])
    want = spec.shape[1:]
    if len(sample_shape) != len(want) or any(
        isinstance(w, int) and w > 0 and w != got for w, got in zip(want, sample_shape, strict=False)
    ):
        shown = "x".join(str(d) if isinstance(d, int) else "?" for d in want)
        raise DataError(
            f"{source}: samples have shape {'x'.join(map(str, sample_shape)) or 'scalar'} but model input "
            f"'{spec.name}' expects {shown}; preprocess the data to the model's input shape")
    want_dtype = np.dtype(spec.dtype) if not spec.dtype.startswith("onnx:") and spec.dtype != "bfloat16" else None
    if want_dtype is None or array.dtype == want_dtype:
        return array
    if array.dtype.kind == want_dtype.kind or (array.dtype.kind in "iu" and want_dtype.kind in "iu"):
        return array.astype(want_dtype)
    raise DataError(
        f"{source}: data is {array.dtype} but model input '{spec.name}' expects {want_dtype}; "
        f"convert and preprocess the data to {want_dtype} (e.g. scale and normalize images)")


# -- loading ------------------------------------------------------------------------------------
def load_data(spec: str | os.PathLike[str] | Dataset, *, input_size: tuple[int, ...] | None = None,
              mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> Dataset:
    """Load a dataset.

    Args:
        spec: ``data.npz`` (``x`` or one array per input name, optional ``y``), a folder of
            images in class sub-folders, or ``sklearn:digits``.
        input_size: ``(C, H, W)`` for image folders and to resize built-in images.
        mean, std: per-channel normalization applied after scaling pixels to [0, 1].

    Raises:
        DataError: a missing or corrupt file, no ``x``, labels that are not integers.

    Example:
        >>> data = load_data("examples/digits/test.npz")  # doctest: +SKIP
        >>> len(data), data.inputs["x"].shape[1:]
        (540, (1, 32, 32))
    """
    if isinstance(spec, Dataset):
        return spec
    text = str(spec)
    if text.startswith("sklearn:"):
        return _load_sklearn(text.split(":", 1)[1], input_size, mean, std)
    path = Path(text)
    if not path.exists():
        raise DataError(f"data not found: {path}")
    if path.is_dir():
        return _load_image_folder(path, input_size, mean, std)
    if path.suffix.lower() == ".npz":
        return _load_npz(path)
    if path.suffix.lower() == ".jsonl":
        raise DataError(f"{path.name} is text data; text .jsonl is read by the commands that tokenize "
                        "it (distill --student for transformers), not here")
    raise DataError(f"unsupported data file {path.name}: expected .npz, an image folder, or sklearn:digits")


def _load_npz(path: Path) -> Dataset:
    _check_npz_size(path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {k: archive[k] for k in archive.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise DataError(f"{path} is not a readable .npz file ({type(exc).__name__}); save it with numpy.savez") from exc
    except MemoryError:
        raise DataError(f"{path} does not fit in this machine's memory") from None
    labels = arrays.pop("y", None)
    if not arrays:
        raise DataError(f"{path} has no input arrays: save the inputs as 'x' (or one array per input name)")
    if len(arrays) > 1 and SINGLE_INPUT_KEY in arrays:
        pass
    elif len(arrays) == 1 and SINGLE_INPUT_KEY not in arrays:
        only = next(iter(arrays))
        if only.startswith("arr_"):
            raise DataError(f"{path} has an unnamed array {only!r}; save the inputs as x=..., labels as y=...")
    if labels is not None:
        labels = _check_labels(labels, path)
    if any(arr.ndim > 0 and len(arr) == 0 for arr in arrays.values()):
        raise DataError(f"{path} has no samples")
    for key, arr in arrays.items():
        if arr.dtype == object:
            raise DataError(f"{path}: array {key!r} holds Python objects; save numeric arrays")
        if arr.ndim == 0:
            raise DataError(f"{path}: array {key!r} is a scalar; inputs need a leading sample dimension")
        if arr.dtype == np.float64:
            arrays[key] = arr.astype(np.float32)
        check_finite(arrays[key], f"{path}: array {key!r}")
    return Dataset(arrays, labels, source=str(path))


def check_finite(array: np.ndarray, what: str) -> None:
    """Refuse NaN or infinity in input data: it calibrates NaN scales and scores as an accuracy."""
    if array.dtype.kind not in "fc" or array.size == 0:
        return
    bad = ~np.isfinite(array.reshape(len(array), -1) if array.ndim > 1 else array)
    if bad.any():
        rows = np.flatnonzero(bad.any(axis=1) if bad.ndim > 1 else bad)
        raise DataError(f"{what} has {int(bad.sum())} NaN or infinite value(s) (first in sample {int(rows[0])}); "
                        "clean or drop those samples")


def memory_bytes() -> int | None:
    """Physical memory of this machine, or None when the platform does not say."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _check_npz_size(path: Path) -> None:
    """Read each array's header (shape, dtype) and refuse a file that declares more than memory holds."""
    try:
        with zipfile.ZipFile(path) as archive:
            declared = 0
            for info in archive.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                with archive.open(info) as fh:
                    version = np.lib.format.read_magic(fh)
                    header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                              else np.lib.format.read_array_header_2_0)
                    shape, _, dtype = header(fh, max_header_size=10_000)
                declared += int(np.prod(shape, dtype=object)) * dtype.itemsize
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, TypeError) as exc:
        raise DataError(f"{path} is not a readable .npz file ({type(exc).__name__}); save it with numpy.savez") from exc
    limit = memory_bytes()
    if limit is not None and declared > limit // 2:
        raise DataError(f"{path} declares {declared / 2**30:.1f} GB of arrays, more than half this machine's "
                        f"{limit / 2**30:.1f} GB of memory; use a smaller sample")


def _check_labels(labels: np.ndarray, source: object) -> np.ndarray:
    if labels.ndim != 1:
        raise DataError(f"{source}: labels y must be a 1-D array of class indices, got shape {labels.shape}")
    if labels.dtype.kind == "f":
        if not np.all(np.equal(np.mod(labels, 1), 0)):
            raise DataError(f"{source}: labels y must be integer class indices")
        labels = labels.astype(np.int64)
    if labels.dtype.kind not in "iu":
        raise DataError(f"{source}: labels y must be integer class indices, got {labels.dtype}")
    if len(labels) and int(labels.min()) < 0:
        raise DataError(f"{source}: labels y must be class indices >= 0, got {int(labels.min())}")
    return labels.astype(np.int64)


def _normalize(x: np.ndarray, mean: Sequence[float] | None, std: Sequence[float] | None) -> np.ndarray:
    channels = x.shape[1]
    if mean is not None:
        m = np.asarray(mean, dtype=np.float32)
        if m.size not in (1, channels):
            raise DataError(f"--mean has {m.size} values but images have {channels} channel(s)")
        x = x - m.reshape(1, -1, 1, 1)
    if std is not None:
        s = np.asarray(std, dtype=np.float32)
        if s.size not in (1, channels) or np.any(s <= 0):
            raise DataError(f"--std needs {channels} positive value(s), got {list(std)}")
        x = x / s.reshape(1, -1, 1, 1)
    return x.astype(np.float32)


def _load_sklearn(name: str, input_size: tuple[int, ...] | None, mean: Sequence[float] | None,
                  std: Sequence[float] | None) -> Dataset:
    if name != "digits":
        raise DataError(f"unknown built-in data set sklearn:{name}; available: sklearn:digits")
    datasets = require("sklearn.datasets", extra="sklearn")
    bunch = datasets.load_digits()
    x = (bunch.images.astype(np.float32) / 16.0)[:, None, :, :]
    if input_size is not None:
        x = resize_images(x, input_size)
    return Dataset({SINGLE_INPUT_KEY: _normalize(x, mean, std)}, bunch.target.astype(np.int64),
                   source="sklearn:digits")


def resize_images(x: np.ndarray, size: tuple[int, ...]) -> np.ndarray:
    """Resize (N, C, H, W) images to ``size`` = (C, H, W) bilinearly (grey <-> RGB by repetition/mean)."""
    if len(size) != 3:
        raise DataError(f"input size must be CxHxW, got {'x'.join(map(str, size))}")
    c, h, w = size
    n, c0, h0, w0 = x.shape
    if c != c0:
        if c0 == 1:
            x = np.repeat(x, c, axis=1)
        elif c == 1:
            x = x.mean(axis=1, keepdims=True)
        else:
            raise DataError(f"cannot convert {c0}-channel images to {c} channels")
    if (h, w) == (h0, w0):
        return x.astype(np.float32)
    ys = (np.arange(h) + 0.5) * h0 / h - 0.5
    xs = (np.arange(w) + 0.5) * w0 / w - 0.5
    y0 = np.clip(np.floor(ys).astype(int), 0, h0 - 1)
    x0 = np.clip(np.floor(xs).astype(int), 0, w0 - 1)
    y1 = np.clip(y0 + 1, 0, h0 - 1)
    x1 = np.clip(x0 + 1, 0, w0 - 1)
    wy = np.clip(ys - y0, 0, 1)[None, None, :, None]
    wx = np.clip(xs - x0, 0, 1)[None, None, None, :]
    top = x[:, :, y0][:, :, :, x0] * (1 - wx) + x[:, :, y0][:, :, :, x1] * wx
    bottom = x[:, :, y1][:, :, :, x0] * (1 - wx) + x[:, :, y1][:, :, :, x1] * wx
    return (top * (1 - wy) + bottom * wy).astype(np.float32)


def _load_image_folder(root: Path, input_size: tuple[int, ...] | None, mean: Sequence[float] | None,
                       std: Sequence[float] | None) -> Dataset:
    if input_size is None:
        raise DataError(f"{root} is an image folder: pass --input-size CxHxW (and --mean/--std if the model needs them)")
    image_mod = require("PIL.Image", extra="report")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{root} has no class sub-folders; put images in {root}/<class_name>/")
    c, h, w = input_size
    images: list[np.ndarray] = []
    labels: list[int] = []
    for index, name in enumerate(classes):
        for file in sorted((root / name).iterdir()):
            if file.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                with image_mod.open(file) as img:
                    img = img.convert("L" if c == 1 else "RGB").resize((w, h), image_mod.BILINEAR)
                    arr = np.asarray(img, dtype=np.float32) / 255.0
            except OSError as exc:
                raise DataError(f"cannot read image {file}: {exc}") from exc
            images.append(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1))
            labels.append(index)
    if not images:
        raise DataError(f"{root} has class folders but no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    x = _normalize(np.stack(images), mean, std)
    return Dataset({SINGLE_INPUT_KEY: x}, np.array(labels, dtype=np.int64), source=str(root))


def parse_size(text: str) -> tuple[int, ...]:
    """Parse ``3x224x224`` into ``(3, 224, 224)``."""
    try:
        dims = tuple(int(p) for p in text.lower().split("x"))
    except ValueError as exc:
        raise DataError(f"bad size {text!r}: expected numbers joined by x, e.g. 3x224x224") from exc
    if not dims or any(d <= 0 for d in dims):
        raise DataError(f"bad size {text!r}: every dimension must be positive")
    if math.prod(dims) > MAX_SAMPLE_VALUES:
        raise DataError(f"size {text} is {math.prod(dims):,} values per sample; at most {MAX_SAMPLE_VALUES:,} "
                        "(e.g. 3x4096x4096)")
    return dims


def save_npz(path: str | os.PathLike[str], data: Dataset) -> None:
    """Write a dataset as .npz atomically (inputs by name, labels as y)."""
    from edgeopt.fileio import atomic_path

    with atomic_path(path) as tmp:
        arrays = dict(data.inputs)
        if data.labels is not None:
            arrays["y"] = data.labels
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **arrays)  # type: ignore[arg-type]
