"""Export consolidated EMA weights of a checkpoint to safetensors (for sampling and evaluation).

    python launch/export.py --run runs/tiny                 # latest complete checkpoint, every EMA
    python launch/export.py --run runs/xxl --tag samples-000409600000 --out exported/

Reads the per-rank client states (the EMA is kept per rank, as ZeRO-3 partitions when stage 3), stitches
them together offline, and writes ``<out>/<ema name>.safetensors`` plus ``<out>/config.json`` (the run's
resolved config) so ``launch/sample.py --checkpoint`` can rebuild the model. No GPU or process group needed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

import torch

from lct_fast import checkpoint as ckpt
from lct_fast.cli import one_line_errors
from lct_fast.ema import consolidate
from lct_fast.run_dir import RunDir


def export(run_dir: str, tag: str | None = None, out: str | None = None) -> list[str]:
    run = RunDir(run_dir)
    ckpt_dir = run.checkpoints
    tag = tag or ckpt.find_resume_tag(ckpt_dir)
    if tag is None or not ckpt.is_complete(ckpt_dir, tag):
        raise FileNotFoundError(f"{ckpt_dir}: no complete checkpoint{' ' + tag if tag else ''} to export")
    states = [torch.load(f, map_location="cpu", weights_only=True)["ema"]
              for f in ckpt.client_state_paths(ckpt_dir, tag)]
    from safetensors.torch import save_file

    out = out or run.export
    os.makedirs(out, exist_ok=True)
    written = []
    for name, tensors in consolidate(states).items():
        path = os.path.join(out, f"{name}.safetensors")
        save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata={"tag": tag, "ema": name})
        written.append(path)
    shutil.copyfile(run.config, os.path.join(out, "config.json"))
    return written


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="run directory (holds config.json and checkpoints/)")
    p.add_argument("--tag", default=None, help="checkpoint tag (default: latest complete)")
    p.add_argument("--out", default=None, help="output folder (default <run>/export)")
    return p


@one_line_errors("lct-export")
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    for path in export(args.run, args.tag, args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
