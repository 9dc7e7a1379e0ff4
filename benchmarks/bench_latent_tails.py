"""Do our autoencoders' latents have the impulsive outliers of the iLCT paper's Fig. 1?

The paper's premise (Dao et al. 2025, §4.1, Fig. 1): standardised SD-VAE latents have quartiles near -1.4 / 1.4
and outliers from -9 to 7, "like salt-and-pepper noise". The committed tiny VAE gives that on one photograph only
(the star field); pooled over the eight photographs its latents are light-tailed. This benchmark measures the
tail statistics of the latents of all photographs' training patches through

* the committed VAE (``benchmarks/assets/tiny_vae``), and
* autoencoders trained here, within a wall-clock budget, in the directions that could produce such outliers:
  more latent channels (SD3 / FLUX use 16), a larger latent map with the SD VAE's mid-block attention (SD's
  256 px images give 32x32 latents, our 32 px patches 8x8: a GroupNorm over a larger map is what a single
  spiking latent can dominate), and longer training,

and writes them beside the paper's Fig. 1 figures. A variant's statistics are of its training latents,
standardised per channel (``lct_fast.quality.metrics.tail_stats``), and its reconstruction PSNR on the test patches
says whether it is still an autoencoder worth using.

    python benchmarks/bench_latent_tails.py [--variants committed c16 c4_p64_attn] [--minutes 60] [--quick]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks.harness import RESULTS_DIR, write_results  # noqa: E402
from benchmarks.quality_assets import VAE_DIR, VAE_KW, encode_means, recon_psnr, train_vae  # noqa: E402
from lct_fast.quality.metrics import tail_stats  # noqa: E402
from benchmarks.patches import PatchSpec, ensure_patches  # noqa: E402

FIG1 = {"variant": "SD-VAE, CelebA-HQ 256 (paper Fig. 1)", "channels": 4, "latent": "32x32", "q1": -1.4, "q3": 1.4,
        "min": -9.0, "max": 7.0}
"""The paper's figures for standardised SD-VAE latents (§4.1: quartiles "around -1.4 and 1.4", outliers "from -9
to 7"); it gives no kurtosis and no fraction."""


@dataclass
class Variant:
    """An autoencoder to measure: the committed one (``vae_kw`` None) or one trained here."""

    about: str
    vae_kw: Optional[dict] = None
    patch: int = 32
    """Patch side (pixels): the latent map is patch / 4 on a side."""
    share: float = 1.0
    """Its share of the training budget (--minutes), relative to the other trained variants."""


VARIANTS = {
    "committed": Variant("the committed tiny VAE (4 channels, 8x8, 1500 steps)"),
    "c16": Variant("16 latent channels, 8x8", {**VAE_KW, "latent_channels": 16}),
    "c4_p64_attn": Variant("4 channels, 64 px patches -> 16x16 latents, mid-block attention (as SD's VAE)",
                           {**VAE_KW, "mid_block_add_attention": True, "sample_size": 64}, patch=64, share=2.0),
}


def patch_set(patch: int, quick: bool) -> dict[str, np.ndarray]:
    """All eight photographs' patches (the benchmark's cells: 64 px for 32 px patches, 128 px for 64 px)."""
    spec = PatchSpec() if patch == 32 else PatchSpec(patch=patch, block=2 * patch, train_per_class=2048,
                                                     val_per_class=256, test_per_class=256)
    with np.load(ensure_patches(spec), allow_pickle=False) as d:
        data = {k: d[k] for k in d.files if k.endswith("_images")}
    if quick:
        data = {k: v[:256] for k, v in data.items()}
    return data


def summary(name: str, v: Variant, z: np.ndarray, psnr: float, steps: Optional[int], seconds: float) -> dict:
    """One row: the channels' tail statistics (quartiles and extremes over all channels, the worst channel's
    kurtosis and fraction beyond 4 std), pooled over the photographs."""
    rows = tail_stats(z)
    diffs = tail_stats(z[:, :, 1:] - z[:, :, :-1])
    return {"variant": name, "about": v.about, "channels": z.shape[1], "latent": f"{z.shape[2]}x{z.shape[3]}",
            "steps": steps if steps is not None else "", "train_s": round(seconds) if steps is not None else "",
            "test_psnr_db": round(psnr, 2),
            "q1": round(float(np.median([r["q1"] for r in rows])), 2),
            "q3": round(float(np.median([r["q3"] for r in rows])), 2),
            "min": round(min(r["min"] for r in rows), 1), "max": round(max(r["max"] for r in rows), 1),
            "kurtosis_max": round(max(r["excess_kurtosis"] for r in rows), 2),
            "kurtosis_median": round(float(np.median([r["excess_kurtosis"] for r in rows])), 2),
            "beyond_4std_pct": round(100 * float(np.mean([r["frac_beyond_4std"] for r in rows])), 3),
            "diff_kurtosis_max": round(max(r["excess_kurtosis"] for r in diffs), 2),
            "diff_beyond_4std_pct": round(100 * float(np.mean([r["frac_beyond_4std"] for r in diffs])), 3)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--minutes", type=float, default=60.0, help="training budget shared by the trained variants")
    ap.add_argument("--quick", action="store_true", help="smoke run: 256 patches, a few steps")
    ap.add_argument("--out", default=RESULTS_DIR)
    ap.add_argument("--name", default="latent_tails")
    ap.add_argument("--save", default=None, help="folder to save the trained variants in (save_pretrained)")
    args = ap.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    trained = [n for n in args.variants if VARIANTS[n].vae_kw is not None]
    shares = sum(VARIANTS[n].share for n in trained) or 1.0
    table = []
    for name in args.variants:
        v = VARIANTS[name]
        data = patch_set(v.patch, args.quick)
        t0, steps = time.perf_counter(), None
        if v.vae_kw is None:
            from diffusers import AutoencoderKL

            if not os.path.isdir(VAE_DIR):
                raise SystemExit(f"{VAE_DIR}: the committed VAE is missing (benchmarks/quality_assets.py)")
            vae = AutoencoderKL.from_pretrained(VAE_DIR, local_files_only=True).eval()
        else:
            budget = args.minutes * 60 * v.share / shares
            print(f"{name}: {budget / 60:.1f} min of training", flush=True)
            # a wall-clock box (not a step count estimated up front, which a busy machine would shrink)
            vae = (train_vae(data["train_images"], 10, vae_kw=v.vae_kw) if args.quick else
                   train_vae(data["train_images"], 10 ** 9, vae_kw=v.vae_kw, seconds=budget)).float().eval()
            steps = vae.trained_steps
            if args.save:
                vae.save_pretrained(os.path.join(args.save, name), safe_serialization=True)
        seconds = time.perf_counter() - t0
        z = encode_means(vae, data["train_images"]).numpy()
        row = summary(name, v, z, recon_psnr(vae, data["test_images"]), steps, seconds)
        print(row, flush=True)
        table.append(row)
    table.append({k: FIG1.get(k, "") for k in table[0]})
    notes = ("Tail statistics of standardised latents (per channel: quartiles are the median over channels, "
             "min / max the extremes over channels, kurtosis the worst channel; 'diff' = vertical neighbour "
             "differences, what a temporal difference between nearby latents sees), over all eight photographs' "
             "training patches, beside the iLCT paper's Fig. 1. A Gaussian has excess kurtosis 0 and 0.006 % "
             "beyond 4 std.\n\nCommand: `" + " ".join(["python", "benchmarks/bench_latent_tails.py", *sys.argv[1:]])
             + "`")
    paths = write_results(args.name, table, notes=notes, results_dir=args.out)
    print("\n".join(paths))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
