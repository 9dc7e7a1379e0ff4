#!/usr/bin/env python
"""Draw a run's report.png: training curves, evaluation figures, samples beside real data.

    python launch/report.py --run runs/tiny                   # writes runs/tiny/report.png
    python launch/report.py --run runs/xxl --out xxl-report.png

launch/train.py writes the same report at the end of every run.
"""
from lct_fast.cli.report import *  # noqa: F401,F403  (this file is the command line of lct_fast.cli.report)
from lct_fast.cli.report import console, main  # noqa: F401

if __name__ == "__main__":
    console()
