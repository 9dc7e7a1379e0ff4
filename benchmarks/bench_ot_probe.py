#!/usr/bin/env python
"""Does minibatch OT leak the class into the noise? A linear probe on the paired noise, with and without labels.

For each data set, batches of ``--batch`` latents (σ_d-normalised as the trainer sees them) are coupled with
standard-normal noise by exact OT (POT), once across the whole batch (the unconditional paper's coupling) and
once within each class (``lct_fast.ot.couple(labels=...)``). A nearest-class-mean classifier (linear) is fitted
on the paired noise of half the batches and scored on the other half: chance is 1 / classes when the noise carries
no class. Beside it, the transport cost ratio each coupling achieves (< 1: shorter paths than random pairing).

    python benchmarks/bench_ot_probe.py                       # embedded data + the quality benchmark's patches
    python benchmarks/bench_ot_probe.py --batches 400 --batch 32

Writes ``benchmarks/results/ot_probe-<machine>-<date>.md`` + ``.csv``.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks.harness import write_results  # noqa: E402
from lct_fast import ot as O  # noqa: E402


def probe(x: np.ndarray, y: np.ndarray, *, batch: int, batches: int, per_class: bool, seed: int) -> dict:
    """Pair noise with ``batches`` random batches of (x, y) and probe the class from the paired noise."""
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    classes = int(y.max()) + 1
    zs, ys, ratios = [], [], []
    for _ in range(batches):
        idx = rng.choice(len(x), batch, replace=False)
        xb, yb = torch.as_tensor(x[idx]).flatten(1).double(), torch.as_tensor(y[idx])
        z = torch.randn(xb.shape, generator=gen, dtype=torch.float64)
        res = O.couple(xb, z, "exact", labels=yb if per_class else None, return_cost=True)
        zs.append(z[res.perm])
        ys.append(yb)
        ratios.append(float(res.ratio))
    z, lab = torch.cat(zs), torch.cat(ys)
    half = len(lab) // 2
    mu = torch.stack([z[:half][lab[:half] == c].mean(0) for c in range(classes)])
    pred = (z[half:] @ mu.T - 0.5 * (mu * mu).sum(1)).argmax(1)
    acc = float((pred == lab[half:]).double().mean())
    n_test = len(lab) - half
    return {"probe_acc": round(acc, 4), "chance": round(1.0 / classes, 4),
            "probe_acc_se": round(float(np.sqrt(acc * (1 - acc) / n_test)), 4),
            "cost_ratio": round(float(np.mean(ratios)), 4), "classes": classes, "pairs_scored": n_test}


def datasets() -> dict:
    """{name: (latents normalised like the trainer's x0, labels)} for the data sets present on this machine."""
    from lct_fast.config import load_config
    from lct_fast.data.reader import LatentNormalizer, read_all_latents
    from lct_fast.data.stats import load_stats
    from lct_fast.data.synthetic import default_cache_root, ensure_synthetic

    out = {}
    cfg = load_config("tiny")
    paths = {"embedded (tiny preset)": ensure_synthetic(cfg.data.synthetic)}
    qroot = os.path.join(default_cache_root(), "quality")
    if os.path.isdir(qroot):
        shards = sorted(d for d in os.listdir(qroot) if d.startswith("shards-") and not ".tmp" in d)
        for d in shards:
            paths[f"photo patches ({d})"] = os.path.join(qroot, d)
    for name, path in paths.items():
        stats = load_stats(path)
        if not stats.num_classes:
            continue
        lat, labels, _ = read_all_latents(path)
        x = LatentNormalizer(stats, "channel", sigma_data=0.5).normalize(torch.as_tensor(lat)).numpy()
        out[name] = (x, labels)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--batches", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    args = ap.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    rows = []
    for name, (x, y) in datasets().items():
        for per_class in (False, True):
            r = probe(x, y, batch=args.batch, batches=args.batches, per_class=per_class, seed=args.seed)
            rows.append({"data": name, "coupling": "within class" if per_class else "across classes", **r})
            print(rows[-1], flush=True)
    notes = (f"Command: `python benchmarks/bench_ot_probe.py {' '.join(sys.argv[1:])}`.\n\n"
             f"Exact OT (POT) on batches of {args.batch} σ_d-normalised latents and standard-normal noise, "
             f"{args.batches} batches per row; a nearest-class-mean (linear) probe fitted on the paired noise of "
             "half of the pairs, accuracy on the other half (`probe_acc_se`: its binomial standard error). "
             "`cost_ratio`: mean transport cost of the coupling / of the random pairing.")
    md = write_results("ot_probe", rows, notes=notes, results_dir=args.out)[1]
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
