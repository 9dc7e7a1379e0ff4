#!/usr/bin/env python
"""Train a latent consistency model.

    python launch/train.py --config configs/tiny.json                 # one process
    torchrun --nproc_per_node 8 launch/train.py --config configs/b.json
    deepspeed launch/train.py --config configs/xxl.json --set optim.lr=2e-4
    deepspeed --hostfile launch/hostfile launch/train.py --config configs/xxl.json --resume auto

``--set KEY=VALUE`` overrides any config key (dotted, repeatable); ``--dry-run`` prints the resolved
config and the parameter count (model built on the meta device) and exits.
"""
from lct_fast.cli.train import *  # noqa: F401,F403  (this file is the command line of lct_fast.cli.train)
from lct_fast.cli.train import console, main  # noqa: F401

if __name__ == "__main__":
    console()
