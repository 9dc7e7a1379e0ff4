"""Encode images (folder or ``.npz``) with a local VAE, or pass pre-encoded ``.npy`` latents
through, into latent shards + ``stats.json`` (SPEC §1). CLI: ``launch/encode.py``.

Latents are stored in the VAE's scaled space: ``latent = (z − shift) · vae_scale`` with
``z`` the posterior mean (``mode="mean"``) or a posterior sample drawn from a seeded
generator (``mode="sample"``); ``shift`` is the VAE config's ``shift_factor`` when it has
one, else 0. Images are center-cropped to a square, resized to ``resolution`` and mapped
from [0, 255] to [−1, 1] as diffusers' VAEs expect.
"""

from __future__ import annotations

import os
import random
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np
import torch

from .stats import Stats
from .writer import ShardWriter

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


def list_images(folder: str, *, class_dirs: bool = False) -> tuple[list[tuple[str, Optional[int]]], list[str]]:
    """Image files under ``folder`` (sorted) with class ids.

    With ``class_dirs`` every immediate subfolder is a class (ids in sorted name order, as
    torchvision's ImageFolder); otherwise all images found recursively, without classes.
    Returns ``(items, class_names)``.
    """
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"image folder not found: {folder}")

    def scan(root: str) -> list[str]:
        found = []
        for dirpath, _, files in os.walk(root):
            found.extend(os.path.join(dirpath, f) for f in files if f.lower().endswith(IMAGE_EXTS))
        return sorted(found)

    if class_dirs:
        names = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
        items = [(p, i) for i, n in enumerate(names) for p in scan(os.path.join(folder, n))]
    else:
        names, items = [], [(p, None) for p in scan(folder)]
    if not items:
        raise FileNotFoundError(f"{folder}: no images ({', '.join(IMAGE_EXTS)}) found")
    return items, names


def load_image(path: str, resolution: Optional[int]) -> np.ndarray:
    """RGB uint8 ``[H, W, 3]``, center-cropped to a square and resized (Lanczos) if asked."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        if resolution is not None:
            w, h = im.size
            s = min(w, h)
            left, top = (w - s) // 2, (h - s) // 2
            im = im.crop((left, top, left + s, top + s))
            if s != resolution:
                im = im.resize((resolution, resolution), Image.LANCZOS)
        return np.asarray(im, dtype=np.uint8)


def load_npz_images(path: str, key: Optional[str] = None, labels_key: Optional[str] = None) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Images ``[N, H, W, 3]`` uint8 (``[N, 3, H, W]`` accepted) and optional labels from an ``.npz``."""
    with np.load(path, allow_pickle=False) as data:
        keys = list(data.keys())
        if key is None:
            key = next((k for k in ("images", "x", "arr_0") if k in keys), keys[0] if keys else None)
        if key not in keys:
            raise KeyError(f"{path}: no array '{key}' (arrays: {keys})")
        images = data[key]
        labels = None
        if labels_key is None:
            labels_key = next((k for k in ("labels", "y") if k in keys), None)
        elif labels_key not in keys:
            raise KeyError(f"{path}: no labels array '{labels_key}' (arrays: {keys})")
        if labels_key is not None:
            labels = np.asarray(data[labels_key]).astype(np.int64).reshape(-1)
    if images.ndim != 4 or 3 not in (images.shape[1], images.shape[3]):
        raise ValueError(f"{path}: '{key}' must be [N, H, W, 3] or [N, 3, H, W], got {list(images.shape)}")
    if images.shape[-1] != 3:
        images = images.transpose(0, 2, 3, 1)
    if images.dtype != np.uint8:
        raise ValueError(f"{path}: '{key}' must be uint8 images, got {images.dtype}")
    if labels is not None and len(labels) != len(images):
        raise ValueError(f"{path}: {len(labels)} labels for {len(images)} images")
    return images, labels


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 ``[B, H, W, 3]`` -> float32 ``[B, 3, H, W]`` in [−1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


@torch.no_grad()
def encode_batch(
    vae: Any,
    images: np.ndarray,
    *,
    mode: str = "mean",
    scale: float = 0.18215,
    shift: float = 0.0,
    generator: Optional[torch.Generator] = None,
) -> np.ndarray:
    """Encode uint8 images with ``vae``; returns float32 latents ``(z − shift)·scale``."""
    param = next(vae.parameters())
    x = images_to_tensor(images).to(device=param.device, dtype=param.dtype)
    dist = vae.encode(x).latent_dist
    if mode == "mean":
        z = dist.mean
    elif mode == "sample":
        z = dist.sample(generator=generator)
    else:
        raise ValueError(f"mode must be 'mean' or 'sample', got {mode!r}")
    return ((z.float() - shift) * scale).cpu().numpy()


def _batches(n: int, size: int) -> Iterator[range]:
    for start in range(0, n, size):
        yield range(start, min(n, start + size))


def encode_dataset(
    source: str,
    out_dir: str,
    *,
    vae_path: Optional[str] = None,
    mode: str = "mean",
    vae_scale: Optional[float] = None,
    resolution: Optional[int] = None,
    batch_size: int = 32,
    class_dirs: bool = False,
    npz_key: Optional[str] = None,
    labels: Optional[str] = None,
    samples_per_shard: int = 1000,
    dtype: str = "float16",
    device: Optional[str] = None,
    vae_dtype: str = "float32",
    seed: int = 0,
    shuffle: bool = True,
    overwrite: bool = False,
    progress: Union[bool, float] = False,
) -> Stats:
    """Encode ``source`` (image folder, ``.npz`` of images or ``.npy`` latents) into ``out_dir``.

    ``labels``: for ``.npz`` the labels array name (default ``labels``/``y`` if present);
    for ``.npy`` an optional ``.npy`` file of integer labels. ``shuffle`` writes the samples
    in a seeded random order so shards are not sorted by class (each sample's ``json``
    records its source). For ``.npy`` latents ``vae_scale`` is only recorded (the latents
    are stored as given). ``progress``: seconds between progress lines (True: 30; a bar on a
    terminal; False / 0: none).
    """
    if not os.path.exists(source):
        raise FileNotFoundError(f"encode source not found: {source}")
    order_rng = random.Random(seed)

    if source.endswith(".npy"):
        latents = np.load(source, mmap_mode="r", allow_pickle=False)
        if latents.ndim != 4:
            raise ValueError(f"{source}: latents must be [N, C, H, W], got {list(latents.shape)}")
        lab = None
        if labels is not None:
            lab = np.load(labels, allow_pickle=False).astype(np.int64).reshape(-1)
            if len(lab) != len(latents):
                raise ValueError(f"{labels}: {len(lab)} labels for {len(latents)} latents")
        order = list(range(len(latents)))
        if shuffle:
            order_rng.shuffle(order)
        with ShardWriter(out_dir, samples_per_shard=samples_per_shard, vae=vae_path, vae_scale=vae_scale,
                         dtype=dtype, overwrite=overwrite) as writer:
            for i in order:
                writer.write(np.asarray(latents[i]), None if lab is None else int(lab[i]), {"source": source, "index": i})
        return _close_stats(writer)

    if vae_path is None:
        raise ValueError("encoding images needs vae_path (a local diffusers AutoencoderKL folder)")
    from diffusers import AutoencoderKL

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[vae_dtype]
    vae = AutoencoderKL.from_pretrained(vae_path, torch_dtype=torch_dtype, local_files_only=True,
                                        low_cpu_mem_usage=False).to(device).eval()  # no accelerate warning
    scale = float(vae_scale if vae_scale is not None else (getattr(vae.config, "scaling_factor", None) or 0.18215))
    shift_cfg = getattr(vae.config, "shift_factor", None)
    shift = float(shift_cfg) if shift_cfg is not None else 0.0
    generator = torch.Generator(device=device).manual_seed(seed)
    names = None  # class folder names (label id order) with --class-dirs

    if os.path.isdir(source):
        items, class_names = list_images(source, class_dirs=class_dirs)
        names = list(class_names) if class_dirs and class_names else None
        sources: Sequence[Any] = [p for p, _ in items]
        item_labels = [c for _, c in items]
        if resolution is None:
            resolution = int(vae.config.sample_size) if isinstance(vae.config.sample_size, int) else None
        get = lambda idx: np.stack([load_image(sources[i], resolution) for i in idx])  # noqa: E731
    elif source.endswith(".npz"):
        images, lab = load_npz_images(source, npz_key, labels)
        sources = [f"{source}[{i}]" for i in range(len(images))]
        item_labels = [None] * len(images) if lab is None else [int(v) for v in lab]
        get = lambda idx: images[list(idx)]  # noqa: E731
    else:
        raise ValueError(f"{source}: expected an image folder, an .npz of images or an .npy of latents")

    order = list(range(len(sources)))
    if shuffle:
        order_rng.shuffle(order)
    with ShardWriter(out_dir, samples_per_shard=samples_per_shard, vae=vae_path, vae_scale=scale,
                     vae_shift=shift if shift_cfg is not None else None, dtype=dtype, overwrite=overwrite,
                     class_names=names, num_classes=len(names) if names else None) as writer:
        from ..progress import Progress

        with Progress(len(order), "encoding", who="lct_fast.encode", unit="images",
                      interval_s=30.0 if progress is True else float(progress or 0)) as bar:
            for rng_ in _batches(len(order), batch_size):
                idx = [order[j] for j in rng_]
                lat = encode_batch(vae, get(idx), mode=mode, scale=scale, shift=shift, generator=generator)
                for k, i in enumerate(idx):
                    writer.write(lat[k], item_labels[i], {"source": str(sources[i])})
                bar.update(len(idx))
    return _close_stats(writer)


def _close_stats(writer: ShardWriter) -> Stats:
    from .stats import load_stats

    return load_stats(writer.out_dir)
