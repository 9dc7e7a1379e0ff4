#!/usr/bin/env python
"""Throughput of the webdataset latent reader (latents/s) at several worker counts.

Generates its own temporary dataset of C×H×W float16 latents (default 4×32×32, the
CelebA-HQ 256 / SD-VAE setting), then times ``LatentLoader`` in resampled (training) mode
for each worker count: a warm-up of a few batches, then ``--batches`` timed batches.
Results go to benchmarks/results/ as CSV + Markdown (see harness.py).

    python benchmarks/bench_loader.py --samples 8192 --workers 0 1 2 4 --batch-size 128
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.harness import machine_string, write_results  # noqa: E402
from lct_fast.data import LatentLoader, ShardWriter  # noqa: E402


def make_dataset(path: str, n: int, shape: tuple[int, int, int], per_shard: int, classes: int) -> float:
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    with ShardWriter(path, samples_per_shard=per_shard, dtype="float16", num_classes=classes) as w:
        for start in range(0, n, 1024):
            block = rng.standard_normal((min(1024, n - start), *shape), dtype=np.float32)
            for i, lat in enumerate(block):
                w.write(lat, (start + i) % classes)
    return n / (time.perf_counter() - t0)


def time_loader(path: str, workers: int, batch_size: int, batches: int, warmup: int, shuffle_buffer: int) -> float:
    loader = LatentLoader(path, batch_size=batch_size, num_workers=workers, shuffle_buffer=shuffle_buffer,
                          resample=True, seed=0)
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    t0 = time.perf_counter()
    n = 0
    for _ in range(batches):
        x, _ = next(it)
        n += x.shape[0]
    dt = time.perf_counter() - t0
    del it
    return n / dt


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=8192, help="samples in the generated dataset")
    p.add_argument("--shape", type=int, nargs=3, default=[4, 32, 32])
    p.add_argument("--samples-per-shard", type=int, default=512)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2, 4])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--batches", type=int, default=50, help="timed batches per setting")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--shuffle-buffer", type=int, default=1000)
    p.add_argument("--dir", default=None, help="where to write the temporary shards (default: a temp dir)")
    p.add_argument("--no-save", action="store_true", help="print only, do not write results files")
    a = p.parse_args(argv)

    print(f"machine: {machine_string()}")
    rows = []
    with tempfile.TemporaryDirectory(dir=a.dir) as tmp:
        path = os.path.join(tmp, "latents")
        write_rate = make_dataset(path, a.samples, tuple(a.shape), a.samples_per_shard, 10)
        print(f"wrote {a.samples} latents {a.shape} fp16 at {write_rate:.0f} samples/s")
        for w in a.workers:
            rate = time_loader(path, w, a.batch_size, a.batches, a.warmup, a.shuffle_buffer)
            mb = rate * int(np.prod(a.shape)) * 2 / 1e6
            print(f"workers={w:2d}  {rate:10.0f} latents/s  ({mb:.1f} MB/s of fp16 latents)")
            rows.append({"workers": w, "batch_size": a.batch_size, "shape": "x".join(map(str, a.shape)),
                         "dtype": "float16", "latents_per_s": round(rate, 1), "MB_per_s": round(mb, 2),
                         "timed_batches": a.batches, "shuffle_buffer": a.shuffle_buffer})
    if not a.no_save:
        notes = (f"LatentLoader (resampled, normalize=channel) over {a.samples} generated samples in shards of "
                 f"{a.samples_per_shard}; {a.warmup} warm-up + {a.batches} timed batches per row; "
                 f"ShardWriter write rate {write_rate:.0f} samples/s.")
        csv_path, md_path = write_results("bench_loader", rows, notes=notes)
        print(f"results: {csv_path}\n         {md_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
