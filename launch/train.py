#!/usr/bin/env python
"""Train a latent consistency model.

The command line lives in :mod:`lct_fast.cli.train` (its docstring has the usage), also as
``python -m lct_fast.cli.train`` and the console script ``lct-train``; this file keeps
``python launch/train.py``."""
import sys

from lct_fast.cli.train import *  # noqa: F401,F403  (this file is the command line of lct_fast.cli.train)
from lct_fast.cli.train import main  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
