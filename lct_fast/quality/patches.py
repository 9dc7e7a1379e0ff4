"""Real photographs that ship inside a registry package, cut into small RGB patches (no download).

scikit-image bundles eight colour photographs in ``skimage/data``: astronaut, chelsea (a cat), coffee,
hubble_deep_field, ihc (immunohistochemistry), motorcycle_left, retina and rocket. (``motorcycle_right`` is
the other view of a stereo pair and nearly duplicates ``motorcycle_left``; it is left out.) Each photograph is
one class, so a class-conditional model has to produce patches that a classifier attributes to the right
photograph.

Train and test patches come from **spatially disjoint regions**: every photograph (downscaled so its longer
side is at most ``max_side`` pixels) is tiled into ``block`` x ``block`` cells, a seeded fraction of the cells
of each photograph is held out, and every patch is a random crop lying entirely inside one cell. No test pixel
is ever seen in training, and test patches still cover every photograph.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np

__all__ = ["PHOTOS", "PatchSpec", "load_photo", "photo_cells", "make_patches", "ensure_patches"]

# (class id order) file names inside skimage/data
PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "hubble_deep_field.jpg", "ihc.png",
          "motorcycle_left.png", "retina.jpg", "rocket.jpg")


@dataclass(frozen=True)
class PatchSpec:
    """What defines a patch set (its cache key)."""

    patch: int = 32
    """Patch side in pixels."""
    block: int = 64
    """Side of the cells each photograph is tiled into; each cell is train or test as a whole."""
    max_side: int = 512
    """Photographs are downscaled (Lanczos) so that their longer side is at most this."""
    test_fraction: float = 0.2
    """Fraction of each photograph's cells held out for the test split."""
    train_per_class: int = 4096
    """Training patches per photograph."""
    test_per_class: int = 1024
    """Test patches per photograph."""
    seed: int = 0
    """Seed of the cell split and the crops."""

    def key(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


def _skimage_data_dir() -> str:
    try:
        import skimage
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the real-patch data set needs scikit-image (pip install scikit-image): its "
                          "sample photographs are the data") from e
    return os.path.join(os.path.dirname(skimage.__file__), "data")


def load_photo(name: str, max_side: int = 512) -> np.ndarray:
    """Photograph ``name`` from skimage/data as RGB uint8 [H, W, 3], downscaled to ``max_side`` if larger."""
    from PIL import Image

    path = os.path.join(_skimage_data_dir(), name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: scikit-image sample photograph missing (expected in the wheel)")
    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        s = max_side / max(w, h)
        if s < 1:
            im = im.resize((max(1, round(w * s)), max(1, round(h * s))), Image.LANCZOS)
        return np.asarray(im, dtype=np.uint8)


def photo_cells(shape: tuple[int, int], spec: PatchSpec, rng: np.random.Generator) -> tuple[list, list]:
    """(train cells, test cells) of a photograph of ``shape`` (H, W): lists of (top, left) corners."""
    h, w = shape
    cells = [(i * spec.block, j * spec.block) for i in range(h // spec.block) for j in range(w // spec.block)]
    if len(cells) < 2:
        raise ValueError(f"photograph of {h}x{w} has fewer than 2 cells of {spec.block} px")
    n_test = min(len(cells) - 1, max(1, int(round(spec.test_fraction * len(cells)))))
    order = rng.permutation(len(cells))
    test = sorted(cells[k] for k in order[:n_test])
    train = sorted(cells[k] for k in order[n_test:])
    return train, test


def _crops(img: np.ndarray, cells: list, n: int, patch: int, block: int,
           rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """n random crops inside the given cells and their (top, left) pixel corners."""
    which = rng.integers(0, len(cells), size=n)
    off = rng.integers(0, block - patch + 1, size=(n, 2))
    out = np.empty((n, patch, patch, 3), dtype=np.uint8)
    corners = np.asarray(cells, dtype=np.int64)[which] + off
    for k, (y, x) in enumerate(corners):
        out[k] = img[y:y + patch, x:x + patch]
    return out, corners


def make_patches(spec: PatchSpec = PatchSpec()) -> dict[str, np.ndarray]:
    """Build the patch set: ``train_images``/``test_images`` uint8 [N, P, P, 3], ``train_labels``/``test_labels``
    and ``train_corners``/``test_corners`` (int64 [N, 2]: each crop's top-left pixel in its downscaled photo)."""
    if not 0 < spec.test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {spec.test_fraction}")
    if spec.patch > spec.block:
        raise ValueError(f"patch ({spec.patch}) must fit in a cell (block={spec.block})")
    parts: dict[str, list] = {f"{split}_{what}": [] for split in ("train", "test")
                              for what in ("images", "labels", "corners")}
    for cls, name in enumerate(PHOTOS):
        rng = np.random.default_rng([spec.seed, cls])
        img = load_photo(name, spec.max_side)
        train, test = photo_cells(img.shape[:2], spec, rng)
        for split, cells, n in (("train", train, spec.train_per_class), ("test", test, spec.test_per_class)):
            images, corners = _crops(img, cells, n, spec.patch, spec.block, rng)
            parts[f"{split}_images"].append(images)
            parts[f"{split}_corners"].append(corners)
            parts[f"{split}_labels"].append(np.full(n, cls, dtype=np.int64))
    out = {k: np.concatenate(v) for k, v in parts.items()}
    for split in ("train", "test"):  # class-interleaved order, seeded
        perm = np.random.default_rng([spec.seed, 99, split == "test"]).permutation(len(out[f"{split}_labels"]))
        for what in ("images", "labels", "corners"):
            out[f"{split}_{what}"] = out[f"{split}_{what}"][perm]
    return out


def ensure_patches(spec: PatchSpec = PatchSpec(), root: Optional[str] = None) -> str:
    """Path of the cached ``patches-<key>.npz`` (built on first use; written atomically)."""
    from lct_fast.data.synthetic import default_cache_root

    root = root or os.path.join(default_cache_root(), "quality")
    os.makedirs(root, exist_ok=True)
    path = os.path.join(root, f"patches-{spec.key()}.npz")
    if not os.path.exists(path):
        data = make_patches(spec)
        tmp = f"{path}.tmp{os.getpid()}.npz"
        np.savez(tmp, **data)
        os.replace(tmp, path)
    return path
