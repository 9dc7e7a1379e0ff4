#!/usr/bin/env python
"""Draw a run's report.png: training curves, evaluation figures, samples beside real data.

The command line lives in :mod:`lct_fast.cli.report` (its docstring has the usage), also as
``python -m lct_fast.cli.report`` and the console script ``lct-report``; this file keeps
``python launch/report.py``."""
import sys

try:
    from lct_fast.cli import from_checkout
except ModuleNotFoundError as e:  # not installed (or an older copy is): say how instead of a traceback
    sys.exit(f"launch/report.py: {e}: install this checkout's lct_fast with `pip install -e .`")
from_checkout(__file__)
from lct_fast.cli.report import *  # noqa: E402,F401,F403  (this file is the command line of lct_fast.cli.report)
from lct_fast.cli.report import main  # noqa: E402,F401

if __name__ == "__main__":
    sys.exit(main())
