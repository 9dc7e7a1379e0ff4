#!/usr/bin/env python
"""Encode an image folder / ``.npz`` of images with a local VAE (or pass ``.npy`` latents
through) into latent shards + stats.json.

Examples::

    python launch/encode.py --src data/celebahq256 --out latents/celebahq --vae /models/sd-vae-ft-ema \
        --resolution 256 --mode mean --batch-size 64
    python launch/encode.py --src images.npz --out latents/x --vae /models/vae --labels labels
    python launch/encode.py --src latents.npy --labels labels.npy --out latents/y --vae-scale 0.18215
"""
from lct_fast.cli.encode import *  # noqa: F401,F403  (this file is the command line of lct_fast.cli.encode)
from lct_fast.cli.encode import console, main  # noqa: F401

if __name__ == "__main__":
    console()
