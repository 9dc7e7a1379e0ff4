#!/usr/bin/env python
"""Evaluate an exported model: FID, KID, Inception Score and precision/recall (torch-fidelity), or latent metrics.

The command line lives in :mod:`lct_fast.cli.evaluate` (its docstring has the usage), also as
``python -m lct_fast.cli.evaluate`` and the console script ``lct-evaluate``; this file keeps
``python launch/evaluate.py``."""
import sys

from lct_fast.cli.evaluate import *  # noqa: F401,F403  (this file is the command line of lct_fast.cli.evaluate)
from lct_fast.cli.evaluate import main  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
