#!/usr/bin/env python
"""Encode an image folder / ``.npz`` of images with a local VAE (or pass ``.npy`` latents

The command line lives in :mod:`lct_fast.cli.encode` (its docstring has the usage), also as
``python -m lct_fast.cli.encode`` and the console script ``lct-encode``; this file keeps
``python launch/encode.py``."""
import sys

try:
    from lct_fast.cli import from_checkout
except ModuleNotFoundError as e:  # not installed (or an older copy is): say how instead of a traceback
    sys.exit(f"launch/encode.py: {e}: install this checkout's lct_fast with `pip install -e .`")
from_checkout(__file__)
from lct_fast.cli.encode import *  # noqa: E402,F401,F403  (this file is the command line of lct_fast.cli.encode)
from lct_fast.cli.encode import main  # noqa: E402,F401

if __name__ == "__main__":
    sys.exit(main())
