#!/usr/bin/env python
"""Draw a run's report.png: training curves, evaluation figures, samples beside real data.

The command line lives in :mod:`lct_fast.cli.report` (its docstring has the usage), also as
``python -m lct_fast.cli.report`` and the console script ``lct-report``; this file keeps
``python launch/report.py``."""
import sys

from lct_fast.cli.report import *  # noqa: F401,F403  (this file is the command line of lct_fast.cli.report)
from lct_fast.cli.report import main  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
