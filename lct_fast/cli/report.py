"""Draw a run's report.png: training curves, evaluation figures, samples beside real data.

    python launch/report.py --run runs/tiny                   # writes runs/tiny/report.png
    python launch/report.py --run runs/xxl --out xxl-report.png
    python launch/report.py --run runs/celebahq --vae /models/sd-vae-ft-ema   # decoded samples

launch/train.py writes the same report at the end of every run.
"""
from __future__ import annotations

import argparse
import sys

from lct_fast.cli import one_line_errors


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="run directory (holds metrics.jsonl)")
    p.add_argument("--out", default=None, help="output PNG (default <run>/report.png)")
    p.add_argument("--vae", default=None,
                   help="local diffusers AutoencoderKL folder to decode the sample panel with (default: the VAE "
                        "the data set's stats.json names, when that folder exists here)")
    return p


@one_line_errors("lct-report")
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from lct_fast.report import write_report

    print(write_report(args.run, args.out, vae=args.vae))
    return 0


if __name__ == "__main__":
    sys.exit(main())
