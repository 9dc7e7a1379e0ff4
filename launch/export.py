#!/usr/bin/env python
"""Export consolidated EMA weights of a checkpoint to safetensors (for sampling and evaluation).

The command line lives in :mod:`lct_fast.cli.export` (its docstring has the usage), also as
``python -m lct_fast.cli.export`` and the console script ``lct-export``; this file keeps
``python launch/export.py``."""
import sys

from lct_fast.cli.export import *  # noqa: F401,F403  (this file is the command line of lct_fast.cli.export)
from lct_fast.cli.export import main  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
