#!/usr/bin/env python
"""The README's main job (``launch/train.py --config configs/tiny.json``) over training seeds and settings: its
in-training latent figure (marginal W1 of 2000 standardised samples, EMA 0.99) at every evaluation, beside the
per-class Gaussian fit (the fair bar on this class-conditional data), the single Gaussian and a second real set.

    python benchmarks/bench_main_job.py --seeds 0 1 2 --variant default= --variant c_sum=method.ict.c_norm=sum

Each (variant, seed) is one run directory ``<runs>/<variant>_s<seed>``; one that already holds a ``summary.json``
is read, not re-trained. Writes ``benchmarks/results/main_job-<machine>-<date>.md`` + ``.csv``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks.harness import write_results  # noqa: E402


def run(run_dir: str, overrides: list[str], seed: int) -> list[dict]:
    """Train (unless done) and return the run's evaluation rows."""
    if not os.path.exists(os.path.join(run_dir, "summary.json")):
        cmd = [sys.executable, os.path.join(ROOT, "launch", "train.py"), "--config", "configs/tiny.json",
               "--out", run_dir, "--set", f"train.seed={seed}"]
        for o in overrides:
            cmd += ["--set", o]
        subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL,
                       env=dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")))
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, filter(str.strip, f)) if "eval/1step/mw1" in r]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--variant", action="append", default=None, metavar="NAME=KEY=VALUE[,KEY=VALUE]",
                    help="a named set of config overrides (repeatable; 'default=' is the preset as it is)")
    ap.add_argument("--runs", default=os.path.join(ROOT, "runs", "main_job"))
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    args = ap.parse_args(argv)
    variants = {}
    for v in args.variant or ["default="]:
        name, _, sets = v.partition("=")
        variants[name] = [s for s in sets.split(",") if s]
    rows, summary = [], []
    for name, overrides in variants.items():
        finals = {1: [], 2: []}
        for seed in args.seeds:
            evals = run(os.path.join(args.runs, f"{name}_s{seed}"), overrides, seed)
            for r in evals:
                row = {"variant": name, "seed": seed, "samples": r["samples"]}
                for k in (1, 2):
                    row[f"mw1_{k}step"] = round(r[f"eval/{k}step/mw1"], 4)
                for base in ("gaussian_class", "gaussian", "real"):
                    row[base] = round(r[f"eval/1step/{base}_mw1"], 4)
                rows.append(row)
            for k in (1, 2):
                finals[k].append(evals[-1][f"eval/{k}step/mw1"])
        bar = rows[-1]["gaussian_class"]
        spread = [f"{np.mean(v):.4f} ± {np.std(v, ddof=1) if len(v) > 1 else 0.0:.4f}" for v in finals.values()]
        beat = sum(v < bar for v in finals[1])
        summary.append(f"| {name} | {' '.join(overrides) or '(preset)'} | {spread[0]} | {spread[1]} | "
                       f"{beat}/{len(finals[1])} | {bar:.4f} |")
        print(summary[-1], flush=True)
    notes = ("Command: `python benchmarks/bench_main_job.py " + " ".join(sys.argv[1:]) + "`.\n\n"
             "The main job's own evaluation (ema_0.99, 2000 samples; marginal W1 of standardised latents, lower is "
             "better) at the end of each run (160k samples), mean ± std over training seeds; `beats` counts the "
             "seeds whose 1-step figure is below the per-class Gaussian fit (the fair bar: the model is told the "
             "class). The reference sets are drawn from the embedded data set itself (no held-out split there).\n\n"
             "| variant | overrides | 1 step | 2 steps | beats per-class fit (1 step) | per-class Gaussian |\n"
             "|---|---|---|---|---|---|\n" + "\n".join(summary) + "\n\nEvery evaluation of every run:")
    print(write_results("main_job", rows, notes=notes, results_dir=args.out)[1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
