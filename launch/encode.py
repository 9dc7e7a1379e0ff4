#!/usr/bin/env python
"""Encode an image folder / ``.npz`` of images with a local VAE (or pass ``.npy`` latents

The command line lives in :mod:`lct_fast.cli.encode` (its docstring has the usage), also as
``python -m lct_fast.cli.encode`` and the console script ``lct-encode``; this file keeps
``python launch/encode.py``."""
import sys

from lct_fast.cli.encode import *  # noqa: F401,F403  (this file is the command line of lct_fast.cli.encode)
from lct_fast.cli.encode import main  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
