#!/usr/bin/env python
"""Export consolidated EMA weights of a checkpoint to safetensors (for sampling and evaluation).

The command line lives in :mod:`lct_fast.cli.export` (its docstring has the usage), also as
``python -m lct_fast.cli.export`` and the console script ``lct-export``; this file keeps
``python launch/export.py``."""
import sys

try:
    from lct_fast.cli import from_checkout
except ModuleNotFoundError as e:  # not installed (or an older copy is): say how instead of a traceback
    sys.exit(f"launch/export.py: {e}: install this checkout's lct_fast with `pip install -e .`")
from_checkout(__file__)
from lct_fast.cli.export import *  # noqa: E402,F401,F403  (this file is the command line of lct_fast.cli.export)
from lct_fast.cli.export import main  # noqa: E402,F401

if __name__ == "__main__":
    sys.exit(main())
