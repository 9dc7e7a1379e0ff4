"""Reference images for the image metrics, and their Inception features cached in a safe file.

A reference is an image folder (PNG/JPEG/BMP/WebP, searched recursively, sorted by relative path), an
``.npz`` holding one uint8 image array ([N, H, W, 3] or [N, 3, H, W]), or a reference file written by
:func:`reference_features` (``.safetensors``: the features of every requested layer, so FID, KID and
precision/recall all come from it; torch-fidelity's own cache stores pickles and only FID statistics).

The cache is keyed by a fingerprint of the source (every file's relative path, size and mtime; for an npz
its size and mtime), the Inception weights' SHA-256, the layers and the number of images: a changed
reference or extractor is recomputed, never silently reused. Files are written to a temporary name and
renamed, so an interrupted run leaves no half-written reference behind.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Callable, Optional, Sequence

import numpy as np
import torch

__all__ = ["IMAGE_EXTENSIONS", "ReferenceImages", "open_reference", "reference_features", "load_reference_file",
           "default_reference_cache"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
FORMAT_VERSION = 1


class ReferenceImages:
    """Random access to the uint8 [H, W, 3] images of a folder or an npz (resolution checked on read)."""

    def __init__(self, path: str, limit: Optional[int] = None):
        self.path = path
        if os.path.isdir(path):
            files = []
            for root, _, names in os.walk(path):
                files += [os.path.join(root, f) for f in names if f.lower().endswith(IMAGE_EXTENSIONS)]
            self.files = sorted(files, key=lambda f: os.path.relpath(f, path))
            if not self.files:
                raise ValueError(f"reference {path}: no images ({', '.join(IMAGE_EXTENSIONS)}) in the folder")
            self.array = None
            fingerprint = [(os.path.relpath(f, path), os.path.getsize(f), os.stat(f).st_mtime_ns) for f in self.files]
        elif path.endswith(".npz") and os.path.isfile(path):
            with np.load(path, allow_pickle=False) as z:
                keys = list(z.keys())
                key = "images" if "images" in keys else ("arr_0" if "arr_0" in keys else keys[0] if len(keys) == 1
                                                       else None)
                if key is None:
                    raise ValueError(f"reference {path}: expected one array or an 'images' array, found {keys}")
                arr = z[key]
            if arr.dtype != np.uint8 or arr.ndim != 4 or 3 not in (arr.shape[1], arr.shape[-1]):
                raise ValueError(f"reference {path}['{key}']: expected uint8 images [N, H, W, 3] or [N, 3, H, W], "
                                 f"got {arr.dtype} {arr.shape}")
            self.array = arr if arr.shape[-1] == 3 else arr.transpose(0, 2, 3, 1)
            self.files = None
            st = os.stat(path)
            fingerprint = [(os.path.basename(path), key, st.st_size, st.st_mtime_ns)]
        elif not os.path.exists(path):
            raise FileNotFoundError(f"reference not found: {path!r} (expected an image folder, an .npz of uint8 "
                                    f"images or a .safetensors reference file written by launch/evaluate.py)")
        else:
            raise ValueError(f"reference {path}: expected an image folder, an .npz or a .safetensors reference file")
        total = len(self.files) if self.files is not None else len(self.array)
        self.count = total if limit is None else min(limit, total)
        self.fingerprint = hashlib.sha256(json.dumps([FORMAT_VERSION, self.count, fingerprint]).encode()).hexdigest()
        self.resolution = self._read(0).shape[:2]

    def __len__(self) -> int:
        return self.count

    def _read(self, i: int) -> np.ndarray:
        if self.array is not None:
            return self.array[i]
        from PIL import Image

        with Image.open(self.files[i]) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)

    def batch(self, start: int, stop: int) -> np.ndarray:
        imgs = [self._read(i) for i in range(start, stop)]
        for i, im in zip(range(start, stop), imgs):
            if im.shape[:2] != self.resolution:
                where = self.files[i] if self.files is not None else f"{self.path}[{i}]"
                raise ValueError(f"reference {where}: image is {im.shape[1]}x{im.shape[0]}, the reference's first "
                                 f"image is {self.resolution[1]}x{self.resolution[0]}; all must share one resolution")
        return np.stack(imgs)


def open_reference(path: str, limit: Optional[int] = None) -> ReferenceImages:
    return ReferenceImages(path, limit)


def default_reference_cache(fingerprint: str, weights_sha: str, layers: Sequence[str]) -> str:
    from ..data.synthetic import default_cache_root

    key = hashlib.sha256(json.dumps([fingerprint, weights_sha, sorted(layers)]).encode()).hexdigest()[:20]
    return os.path.join(default_cache_root(), "eval", f"reference-{key}.safetensors")


def load_reference_file(path: str, *, weights_sha: Optional[str] = None, layers: Sequence[str] = (),
                        resolution: Optional[tuple[int, int]] = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Features and metadata of a reference file; checks that it was made with the same Inception weights,
    holds ``layers`` and (when given) matches the generated images' ``resolution`` (H, W)."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise FileNotFoundError(f"reference file not found: {path}")
    with safe_open(path, framework="pt") as f:
        meta = dict(f.metadata() or {})
        feats = {k: f.get_tensor(k) for k in f.keys()}
    if meta.get("format") != "lct_fast-reference":
        raise ValueError(f"{path}: not a reference file written by launch/evaluate.py (metadata {sorted(meta)})")
    if weights_sha and meta.get("weights_sha256") != weights_sha:
        raise ValueError(f"{path}: features were computed with other Inception weights (sha256 "
                         f"{meta.get('weights_sha256', '?')[:12]}…, these are {weights_sha[:12]}…); recompute it "
                         f"from the images")
    missing = [k for k in layers if k not in feats]
    if missing:
        raise ValueError(f"{path}: holds layers {sorted(feats)}, the requested metrics need {missing}")
    if resolution is not None:
        have = tuple(int(v) for v in meta.get("resolution", "0x0").split("x"))
        if have != tuple(resolution):
            raise ValueError(f"{path}: reference images are {have[1]}x{have[0]}, the generated images are "
                             f"{resolution[1]}x{resolution[0]}; FID across resolutions is not comparable")
    return feats, meta


def reference_features(ref: str, extract: Callable[[np.ndarray], dict[str, torch.Tensor]], *, weights_sha: str,
                       layers: Sequence[str], resolution: Optional[tuple[int, int]] = None,
                       limit: Optional[int] = None, cache: Optional[str] = None, batch_size: int = 64,
                       shard: tuple[int, int] = (0, 1),
                       gather: Optional[Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]] = None,
                       log: Callable[[str], None] = lambda s: None,
                       progress_s: float = 0.0) -> tuple[dict[str, torch.Tensor], dict]:
    """Reference features {layer: [N, d]} and metadata: read from ``ref`` if it is a reference file, else from
    the cache (``cache`` or :func:`default_reference_cache`) when its fingerprint matches, else computed with
    ``extract`` (uint8 [B, H, W, 3] -> features) and written to the cache.

    Distributed: ``shard = (rank, world)`` splits the images into contiguous blocks, ``gather`` joins the
    blocks in rank order on every rank; only rank 0 writes the file. ``progress_s``: a progress line of this
    rank's block every this many seconds (0: none)."""
    if ref.endswith(".safetensors"):
        return load_reference_file(ref, weights_sha=weights_sha, layers=layers, resolution=resolution)
    images = open_reference(ref, limit)
    if resolution is not None and tuple(images.resolution) != tuple(resolution):
        raise ValueError(f"reference {ref}: images are {images.resolution[1]}x{images.resolution[0]}, the generated "
                         f"images are {resolution[1]}x{resolution[0]}; FID across resolutions is not comparable")
    path = cache or default_reference_cache(images.fingerprint, weights_sha, layers)
    if os.path.isfile(path):
        try:
            feats, meta = load_reference_file(path, weights_sha=weights_sha, layers=layers)
            if meta.get("fingerprint") == images.fingerprint:
                log(f"reference features: cached {path}")
                return feats, meta
            log(f"reference features: {path} is stale (the reference changed), recomputing")
        except ValueError as e:
            log(f"reference features: {path} not reusable ({e}), recomputing")
    rank, world = shard
    lo, hi = len(images) * rank // world, len(images) * (rank + 1) // world
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in layers}
    from ..progress import Progress

    with Progress(hi - lo, "reference Inception features", who="lct_fast.evaluate", unit="images",
                  interval_s=progress_s) as bar:
        for s in range(lo, hi, batch_size):
            out = extract(images.batch(s, min(s + batch_size, hi)))
            for k in layers:
                parts[k].append(out[k])
            bar.update(min(s + batch_size, hi) - s)
    feats = {k: torch.cat(v) if v else torch.empty(0) for k, v in parts.items()}
    if gather is not None:
        feats = gather(feats)
    meta = {"format": "lct_fast-reference", "version": str(FORMAT_VERSION), "source": os.path.abspath(ref),
            "fingerprint": images.fingerprint, "weights_sha256": weights_sha, "count": str(len(images)),
            "resolution": f"{images.resolution[0]}x{images.resolution[1]}", "layers": ",".join(layers)}
    if rank == 0:
        from safetensors.torch import save_file

        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        save_file({k: v.contiguous() for k, v in feats.items()}, tmp, metadata=meta)
        os.replace(tmp, path)
        log(f"reference features: wrote {path} ({len(images)} images)")
    return feats, meta
