#!/usr/bin/env python
"""Sample latents (and optionally a decoded PNG grid) from a trained lct_fast model.

Usage::

    python launch/sample.py --checkpoint run/model.safetensors --steps 2 --n 64 --seed 0 --out samples/ \
        [--config run/config.json] [--set method.ict.sigma_mid=0.9] [--vae path/to/sd-vae] [--stats data/]

``--checkpoint`` is a safetensors file of model weights (the preconditioned model's state dict, or the bare
backbone's). The resolved config is read from ``--config`` or, if omitted, from ``<checkpoint>.json`` or
``config.json`` beside the checkpoint. Writes ``<out>/latents.npy`` (float32 [n, C, H, W], normalized space),
``<out>/labels.npy`` for class-conditional models and, with ``--vae``, ``<out>/grid.png`` decoded with the
dataset statistics (``--stats``, default: ``stats.json`` of ``data.path`` in the config).
"""
from lct_fast.cli.sample import *  # noqa: F401,F403  (this file is the command line of lct_fast.cli.sample)
from lct_fast.cli.sample import console, main  # noqa: F401

if __name__ == "__main__":
    console()
