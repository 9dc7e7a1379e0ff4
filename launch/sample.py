#!/usr/bin/env python
"""Sample latents (and optionally a decoded PNG grid) from a trained lct_fast model.

The command line lives in :mod:`lct_fast.cli.sample` (its docstring has the usage), also as
``python -m lct_fast.cli.sample`` and the console script ``lct-sample``; this file keeps
``python launch/sample.py``."""
import sys

try:
    from lct_fast.cli import from_checkout
except ModuleNotFoundError as e:  # not installed (or an older copy is): say how instead of a traceback
    sys.exit(f"launch/sample.py: {e}: install this checkout's lct_fast with `pip install -e .`")
from_checkout(__file__)
from lct_fast.cli.sample import *  # noqa: E402,F401,F403  (this file is the command line of lct_fast.cli.sample)
from lct_fast.cli.sample import main  # noqa: E402,F401

if __name__ == "__main__":
    sys.exit(main())
