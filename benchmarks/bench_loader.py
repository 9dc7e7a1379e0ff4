#!/usr/bin/env python
"""Throughput of the latent readers side by side (latents/s): WebDataset at 0..N DataLoader workers, DALI
(CPU pipeline, or the GPU one on a CUDA machine) at 1..N threads, in one run.

Generates its own temporary dataset of C×H×W float16 latents (default 4×32×32, the CelebA-HQ 256 / SD-VAE
setting), then times each reader through ``lct_fast.data.build_loader`` -- the trainer's own path -- in its
training (infinite, shuffled) mode: a warm-up of a few batches, then ``--batches`` timed batches. DALI rows
are left out (with a note) when nvidia-dali is not installed. Results go to benchmarks/results/ as CSV +
Markdown (see harness.py).

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
from lct_fast.config import DataConfig  # noqa: E402
from lct_fast.data import ShardWriter, build_loader  # noqa: E402


def make_dataset(path: str, n: int, shape: tuple[int, int, int], per_shard: int, classes: int) -> float:
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    with ShardWriter(path, samples_per_shard=per_shard, dtype="float16", num_classes=classes) as w:
        for start in range(0, n, 1024):
            block = rng.standard_normal((min(1024, n - start), *shape), dtype=np.float32)
            for i, lat in enumerate(block):
                w.write(lat, (start + i) % classes)
    return n / (time.perf_counter() - t0)


def time_loader(path: str, workers: int, batch_size: int, batches: int, warmup: int, shuffle_buffer: int,
                reader: str = "webdataset", device: str = "cpu") -> float:
    cfg = DataConfig(reader=reader, path=path, num_workers=workers, shuffle_buffer=shuffle_buffer)
    import torch

    loader = build_loader(cfg, batch_size=batch_size, seed=0, device=torch.device(device))
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
        import torch

        from lct_fast.data.dali_reader import dali_available

        dali_ok, why = dali_available()
        dali_device = "cuda" if torch.cuda.is_available() else "cpu"
        settings = [("webdataset", w, "cpu") for w in a.workers]
        if dali_ok:
            settings += [("dali", max(1, w), dali_device) for w in a.workers]  # DALI needs >= 1 thread
        settings = list(dict.fromkeys(settings))
        if not dali_ok:
            print(f"dali rows skipped: {why}")
        for reader, w, dev in settings:
            rate = time_loader(path, w, a.batch_size, a.batches, a.warmup, a.shuffle_buffer, reader, dev)
            mb = rate * int(np.prod(a.shape)) * 2 / 1e6
            unit = "workers" if reader == "webdataset" else "threads"
            print(f"{reader:10s} {unit}={w:2d} ({dev})  {rate:10.0f} latents/s  ({mb:.1f} MB/s of fp16 latents)")
            rows.append({"reader": reader, "device": dev, "workers_or_threads": w, "batch_size": a.batch_size,
                         "shape": "x".join(map(str, a.shape)), "dtype": "float16", "latents_per_s": round(rate, 1),
                         "MB_per_s": round(mb, 2), "timed_batches": a.batches, "shuffle_buffer": a.shuffle_buffer})
    if not a.no_save:
        notes = (f"build_loader (data.reader webdataset: resampled, DataLoader workers; dali: the DALI pipeline, "
                 f"CPU threads; normalize=channel) over {a.samples} generated samples in shards of "
                 f"{a.samples_per_shard}; {a.warmup} warm-up + {a.batches} timed batches per row; "
                 f"ShardWriter write rate {write_rate:.0f} samples/s.")
        csv_path, md_path = write_results("bench_loader", rows, notes=notes)
        print(f"results: {csv_path}\n         {md_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
