#!/usr/bin/env python
"""Train a latent consistency model.

The command line lives in :mod:`lct_fast.cli.train` (its docstring has the usage), also as
``python -m lct_fast.cli.train`` and the console script ``lct-train``; this file keeps
``python launch/train.py``."""
import sys

try:
    from lct_fast.cli import from_checkout
except ModuleNotFoundError as e:  # not installed (or an older copy is): say how instead of a traceback
    sys.exit(f"launch/train.py: {e}: install this checkout's lct_fast with `pip install -e .`")
from_checkout(__file__)
from lct_fast.cli.train import *  # noqa: E402,F401,F403  (this file is the command line of lct_fast.cli.train)
from lct_fast.cli.train import main  # noqa: E402,F401

if __name__ == "__main__":
    sys.exit(main())
