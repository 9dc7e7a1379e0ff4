#!/usr/bin/env python
"""Evaluate an exported model: FID, KID, Inception Score and precision/recall (torch-fidelity), or latent metrics.

    python launch/evaluate.py --checkpoint runs/x/export/ema_0.9999.safetensors --vae /models/sd-vae-ft-ema \\
        --ref /data/celebahq256 --inception-weights /models/weights-inception-2015-12-05-6726825d.pth \\
        --n 50000 --steps 1 2 --out runs/x/eval
    torchrun --nproc_per_node 8 launch/evaluate.py --num-samples 50000 ...   # every rank decodes its share
    python launch/evaluate.py --checkpoint runs/tiny/export/ema_0.99.safetensors --out runs/tiny/eval  # no VAE

With ``--vae``: samples are decoded and scored against ``--ref`` (an image folder, an ``.npz`` of uint8 images,
or a ``.safetensors`` reference file this tool writes the first time: Inception features of every requested
layer, reused while the reference and the weights are unchanged). Inception weights come only from the local
``--inception-weights`` file (torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth``), loaded with
``weights_only=True``; nothing is downloaded. Without ``--vae``: latent metrics (marginal W1, sliced
Wasserstein, tails) against the run's latent dataset (or ``--ref`` shards), beside a second real set and a
Gaussian fit. Writes ``<out>/metrics.json`` and one grid PNG per step count, and prints one table.
"""
from lct_fast.cli.evaluate import *  # noqa: F401,F403  (this file is the command line of lct_fast.cli.evaluate)
from lct_fast.cli.evaluate import console, main  # noqa: F401

if __name__ == "__main__":
    console()
