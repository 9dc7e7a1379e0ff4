#!/usr/bin/env python
"""Export consolidated EMA weights of a checkpoint to safetensors (for sampling and evaluation).

    python launch/export.py --run runs/tiny                 # latest complete checkpoint, every EMA
    python launch/export.py --run runs/xxl --tag samples-000409600000 --out exported/

Reads the per-rank client states (the EMA is kept per rank, as ZeRO-3 partitions when stage 3), stitches
them together offline, and writes ``<out>/<ema name>.safetensors`` plus ``<out>/config.json`` (the run's
resolved config) so ``launch/sample.py --checkpoint`` can rebuild the model. No GPU or process group needed.
"""
from lct_fast.cli.export import *  # noqa: F401,F403  (this file is the command line of lct_fast.cli.export)
from lct_fast.cli.export import console, main  # noqa: F401

if __name__ == "__main__":
    console()
