#!/usr/bin/env python
"""Sample latents (and optionally a decoded PNG grid) from a trained lct_fast model.

The command line lives in :mod:`lct_fast.cli.sample` (its docstring has the usage), also as
``python -m lct_fast.cli.sample`` and the console script ``lct-sample``; this file keeps
``python launch/sample.py``."""
import sys

from lct_fast.cli.sample import *  # noqa: F401,F403  (this file is the command line of lct_fast.cli.sample)
from lct_fast.cli.sample import main  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
