"""Real photographs that ship inside a registry package, cut into small RGB patches (no download).

scikit-image bundles eight colour photographs in ``skimage/data``: astronaut, chelsea (a cat), coffee,
hubble_deep_field, ihc (immunohistochemistry), motorcycle_left, retina and rocket. (``motorcycle_right`` is
the other view of a stereo pair and nearly duplicates ``motorcycle_left``; it is left out.) Each photograph is
one class, so a class-conditional model has to produce patches that a classifier attributes to the right
photograph.

Train, validation and test patches come from **spatially disjoint regions**: every photograph (downscaled so
its longer side is at most ``max_side`` pixels) is tiled into ``block`` x ``block`` cells, seeded fractions of
the cells of each photograph are held out for test and for validation, and every patch is a random crop lying
entirely inside one cell. No validation or test pixel is ever seen in training, and both still cover every
photograph. Every choice (hyperparameters, EMA, sampler settings) is made on validation; test scores the final
table once. The test cells are those of the first, two-way split (the same permutation prefix): the committed
feature network, trained on that split's training cells (today's training and validation cells), never saw
them.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np

__all__ = ["PHOTOS", "SPLITS", "PatchSpec", "load_photo", "photo_cells", "make_patches", "ensure_patches",
           "cached_npz"]

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
    val_fraction: float = 0.15
    """Fraction of each photograph's cells held out for the validation split (0: no validation split)."""
    train_per_class: int = 4096
    """Training patches per photograph."""
    test_per_class: int = 1024
    """Test patches per photograph."""
    val_per_class: int = 1024
    """Validation patches per photograph."""
    seed: int = 0
    """Seed of the cell split and the crops."""
    photos: tuple = PHOTOS
    """The photographs, in class-id order (one class each; a single photograph is an unconditional set)."""

    def key(self) -> str:
        fields = asdict(self)
        if tuple(fields["photos"]) == PHOTOS:
            del fields["photos"]  # the eight-photo set adds nothing to the key
        blob = json.dumps(fields, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]

    def ensure(self, cache_dir: str) -> str:
        """The set's npz under ``cache_dir``, built on first use (:func:`ensure_patches`)."""
        return ensure_patches(self, cache_dir)

    def class_name(self, c: int) -> str:
        """Class ``c``: the photograph's name."""
        return self.photos[c].split(".")[0]


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


def photo_cells(shape: tuple[int, int], spec: PatchSpec, rng: np.random.Generator) -> dict[str, list]:
    """{"train", "val", "test"}: lists of (top, left) cell corners of a photograph of ``shape`` (H, W)."""
    h, w = shape
    cells = [(i * spec.block, j * spec.block) for i in range(h // spec.block) for j in range(w // spec.block)]
    n_val_min = 1 if spec.val_fraction > 0 else 0
    if len(cells) < 2 + n_val_min:
        raise ValueError(f"photograph of {h}x{w} has fewer than {2 + n_val_min} cells of {spec.block} px")
    n_test = min(len(cells) - 1 - n_val_min, max(1, int(round(spec.test_fraction * len(cells)))))
    n_val = 0 if not n_val_min else min(len(cells) - 1 - n_test, max(1, int(round(spec.val_fraction * len(cells)))))
    order = rng.permutation(len(cells))
    pick = lambda ks: sorted(cells[k] for k in ks)  # noqa: E731
    return {"test": pick(order[:n_test]), "val": pick(order[n_test:n_test + n_val]),
            "train": pick(order[n_test + n_val:])}


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


SPLITS = ("train", "val", "test")


def make_patches(spec: PatchSpec = PatchSpec()) -> dict[str, np.ndarray]:
    """Build the patch set: ``<split>_images`` uint8 [N, P, P, 3], ``<split>_labels`` and ``<split>_corners``
    (int64 [N, 2]: each crop's top-left pixel in its downscaled photo) for split in train / val / test (val only
    when ``val_fraction`` > 0). Each split's crops come from a generator of its own, so one split's size never
    moves another's crops."""
    if not 0 < spec.test_fraction < 1 or not 0 <= spec.val_fraction < 1 or spec.test_fraction + spec.val_fraction >= 1:
        raise ValueError(f"test_fraction ({spec.test_fraction}) and val_fraction ({spec.val_fraction}) must lie in "
                         "[0, 1) and leave cells for training")
    if spec.patch > spec.block:
        raise ValueError(f"patch ({spec.patch}) must fit in a cell (block={spec.block})")
    splits = [s for s in SPLITS if s != "val" or spec.val_fraction > 0]
    per = {"train": spec.train_per_class, "val": spec.val_per_class, "test": spec.test_per_class}
    parts: dict[str, list] = {f"{split}_{what}": [] for split in splits for what in ("images", "labels", "corners")}
    for cls, name in enumerate(spec.photos):
        seed_id = PHOTOS.index(name) if name in PHOTOS else 100 + cls  # a photo keeps its cells in any subset
        img = load_photo(name, spec.max_side)
        cells = photo_cells(img.shape[:2], spec, np.random.default_rng([spec.seed, seed_id]))
        for split in splits:
            rng = np.random.default_rng([spec.seed, seed_id, 1 + SPLITS.index(split)])
            images, corners = _crops(img, cells[split], per[split], spec.patch, spec.block, rng)
            parts[f"{split}_images"].append(images)
            parts[f"{split}_corners"].append(corners)
            parts[f"{split}_labels"].append(np.full(per[split], cls, dtype=np.int64))
    out = {k: np.concatenate(v) for k, v in parts.items()}
    for split in splits:  # class-interleaved order, seeded
        perm = np.random.default_rng([spec.seed, 99, SPLITS.index(split)]).permutation(len(out[f"{split}_labels"]))
        for what in ("images", "labels", "corners"):
            out[f"{split}_{what}"] = out[f"{split}_{what}"][perm]
    return out


def cached_npz(name: str, build, root: Optional[str] = None) -> str:
    """Path of ``<root>/<name>.npz`` (default root: the quality cache), written atomically from ``build()``'s
    dict of arrays on first use."""
    from lct_fast.data.synthetic import default_cache_root

    root = root or os.path.join(default_cache_root(), "quality")
    os.makedirs(root, exist_ok=True)
    path = os.path.join(root, f"{name}.npz")
    if not os.path.exists(path):
        tmp = f"{path}.tmp{os.getpid()}.npz"
        np.savez(tmp, **build())
        os.replace(tmp, path)
    return path


def ensure_patches(spec: PatchSpec = PatchSpec(), root: Optional[str] = None) -> str:
    """Path of the cached ``patches-<key>.npz`` (built on first use; written atomically)."""
    return cached_npz(f"patches-{spec.key()}", lambda: make_patches(spec), root)
