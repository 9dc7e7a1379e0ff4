#!/usr/bin/env python
"""Evaluate an exported model: FID, KID, Inception Score and precision/recall (torch-fidelity), or latent metrics.

The command line lives in :mod:`lct_fast.cli.evaluate` (its docstring has the usage), also as
``python -m lct_fast.cli.evaluate`` and the console script ``lct-evaluate``; this file keeps
``python launch/evaluate.py``."""
import sys

try:
    from lct_fast.cli import from_checkout
except ModuleNotFoundError as e:  # not installed (or an older copy is): say how instead of a traceback
    sys.exit(f"launch/evaluate.py: {e}: install this checkout's lct_fast with `pip install -e .`")
from_checkout(__file__)
from lct_fast.cli.evaluate import *  # noqa: E402,F401,F403  (this file is the command line of lct_fast.cli.evaluate)
from lct_fast.cli.evaluate import main  # noqa: E402,F401

if __name__ == "__main__":
    sys.exit(main())
