"""Encode an image folder / ``.npz`` of images with a local VAE (or pass ``.npy`` latents
through) into latent shards + stats.json.

Examples::

    python launch/encode.py --src data/celebahq256 --out latents/celebahq --vae /models/sd-vae-ft-ema \
        --resolution 256 --mode mean --batch-size 64
    python launch/encode.py --src images.npz --out latents/x --vae /models/vae --labels labels
    python launch/encode.py --src latents.npy --labels labels.npy --out latents/y --vae-scale 0.18215
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Optional, Sequence

from lct_fast.cli import UserError, one_line_errors
from lct_fast.data.encode import encode_dataset


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", required=True, help="image folder, .npz of uint8 images, or .npy of latents [N,C,H,W]")
    p.add_argument("--out", required=True, help="output dataset folder")
    p.add_argument("--vae", default=None, help="local diffusers AutoencoderKL folder (needed for images)")
    p.add_argument("--mode", choices=("mean", "sample"), default="mean", help="posterior mean or a seeded sample")
    p.add_argument("--vae-scale", type=float, default=None, help="latent scale (default: the VAE's scaling_factor)")
    p.add_argument("--resolution", type=int, default=None, help="center-crop + resize images to this size")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--class-dirs", action="store_true", help="immediate subfolders of --src are classes")
    p.add_argument("--npz-key", default=None, help="images array in the .npz (default images/x/arr_0)")
    p.add_argument("--labels", default=None, help=".npz: labels array name; .npy: a .npy file of int labels")
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--dtype", choices=("float16", "float32"), default="float16", help="storage dtype")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--vae-dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    p.add_argument("--seed", type=int, default=0, help="seeds the write order and posterior samples")
    p.add_argument("--no-shuffle", action="store_true", help="write in source order")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--progress-s", type=float, default=30.0, help="outside a terminal, a progress line every this "
                   "many seconds (0: none; on a terminal a progress bar)")
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def check_args(a: argparse.Namespace) -> None:
    """Everything that can be checked before any work, named by its flag."""
    import glob
    import os

    if not os.path.exists(a.src):
        raise UserError(f"--src {a.src}: not found (an image folder, an .npz of uint8 images or an .npy of latents)")
    for flag, v in (("--batch-size", a.batch_size), ("--samples-per-shard", a.samples_per_shard),
                    ("--resolution", a.resolution if a.resolution is not None else 1)):
        if v < 1:
            raise UserError(f"{flag} {v}: expected an integer >= 1")
    images = os.path.isdir(a.src) or a.src.endswith(".npz")
    if not images and not a.src.endswith(".npy"):
        raise UserError(f"--src {a.src}: expected an image folder, an .npz of uint8 images or an .npy of latents")
    if images and not a.vae:
        raise UserError(f"--vae: encoding images ({a.src}) needs a local diffusers AutoencoderKL folder: pass --vae PATH "
                        "(an .npy of latents needs none)")
    if a.vae and not os.path.isdir(a.vae):
        raise UserError(f"--vae {a.vae}: not a folder (a local diffusers AutoencoderKL: config.json + weights)")
    if not a.overwrite and (glob.glob(os.path.join(a.out, "shard-*.tar")) or os.path.exists(os.path.join(a.out,
                                                                                                        "stats.json"))):
        raise UserError(f"--out {a.out}: already holds a dataset; pass --overwrite to replace it")


@one_line_errors("lct-encode")
def main(argv: Optional[Sequence[str]] = None) -> int:
    a = parse_args(argv)
    check_args(a)
    t0 = time.time()
    stats = encode_dataset(
        a.src, a.out, vae_path=a.vae, mode=a.mode, vae_scale=a.vae_scale, resolution=a.resolution,
        batch_size=a.batch_size, class_dirs=a.class_dirs, npz_key=a.npz_key, labels=a.labels,
        samples_per_shard=a.samples_per_shard, dtype=a.dtype, device=a.device, vae_dtype=a.vae_dtype,
        seed=a.seed, shuffle=not a.no_shuffle, overwrite=a.overwrite, progress=a.progress_s,
    )
    dt = time.time() - t0
    print(
        f"wrote {stats.count} latents {list(stats.shape)} {stats.dtype} in {len(stats.shards)} shards to {a.out} "
        f"({stats.count / max(dt, 1e-9):.1f} samples/s); num_classes={stats.num_classes}; "
        f"channel mean={[round(float(v), 4) for v in stats.mean]} std={[round(float(v), 4) for v in stats.std]}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
