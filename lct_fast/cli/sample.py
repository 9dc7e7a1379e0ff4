"""Sample latents (and optionally decoded images) from a trained lct_fast model.

Examples (one line each)::

    python launch/sample.py --checkpoint runs/tiny/export/ema_0.99.safetensors --steps 2 --n 64 --out samples/
    python launch/sample.py --checkpoint runs/b/export/ema_0.999.safetensors --n 50000 --vae path/to/sd-vae --images --out fid/
    python launch/sample.py --checkpoint runs/b/export/ema_0.999.safetensors --set method.ict.sigma_mid=0.9 --label 3 --out c3/

``--checkpoint`` is a safetensors file of model weights (the preconditioned model's state dict, or the bare
backbone's). The resolved config is read from ``--config`` or, if omitted, from ``<checkpoint>.json`` or
``config.json`` beside the checkpoint. Writes ``<out>/latents.npy`` (float32 [n, C, H, W], normalized space),
``<out>/labels.npy`` for class-conditional models and, with ``--vae``, ``<out>/grid.png`` decoded with the
dataset statistics (``--stats``, default: ``stats.json`` of ``data.path`` in the config); ``--images`` also writes
every decoded image as ``<out>/images/<index>.png`` and all of them as ``<out>/images.npz`` (uint8 [n, H, W, 3],
array ``arr_0``: what FID tools such as torch-fidelity or ADM's evaluator read).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

import numpy as np
import torch

from lct_fast.cli import UserError, one_line_errors
from lct_fast.weights import find_config, load_model


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="safetensors file of model weights")
    p.add_argument("--config", default=None, help="resolved config JSON (default: beside the checkpoint)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. method.ict.sigma_mid=0.9 (repeatable)")
    p.add_argument("--steps", type=int, default=1, help="sampling steps: 1, 2 (sigma_mid / t_mid) or more")
    p.add_argument("--n", type=int, default=64, help="number of samples")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (noise and labels)")
    p.add_argument("--batch-size", type=int, default=64, help="samples per forward pass")
    p.add_argument("--label", type=int, default=None, help="generate this class only (default: uniform labels)")
    p.add_argument("--cfg-scale", type=float, default=None, help="classifier-free guidance scale (default: "
                   "method.trigflow.guidance for a diffusion model, else 1 = off)")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale asked of a guidance-conditioned "
                   "sCD student (default: method.scd.guidance)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--vae", default=None, help="local diffusers AutoencoderKL folder: also write grid.png")
    p.add_argument("--stats", default=None, help="dataset folder or stats.json (default: data.path of the config)")
    p.add_argument("--images", action="store_true", help="with --vae: also every image as a PNG and images.npz")
    p.add_argument("--nrow", type=int, default=None, help="images per grid row (default: ceil(sqrt(n)))")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where the model (and the VAE) run: cuda, cuda:1, cpu (default: cuda if available)")
    return p


@one_line_errors("lct-sample")
def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from lct_fast.config import load_config
    from lct_fast.sample import decode_images, generate, make_grid, save_latents, save_png

    for flag, v in (("--n", args.n), ("--steps", args.steps), ("--batch-size", args.batch_size)):
        if v < 1:
            raise UserError(f"{flag} {v}: expected an integer >= 1")
    if args.images and not args.vae:
        raise UserError("--images writes decoded images: pass --vae PATH (a local diffusers AutoencoderKL folder)")

    cfg = load_config(find_config(args.checkpoint, args.config), args.overrides)
    net = load_model(args.checkpoint, cfg, args.device)
    m = cfg.model
    try:
        res = generate(net, cfg.method, n=args.n, shape=(m.in_channels, m.resolution, m.resolution),
                       num_classes=m.num_classes, steps=args.steps, seed=args.seed, batch_size=args.batch_size,
                       labels=args.label, cfg_scale=args.cfg_scale, guidance=args.guidance)
    except ValueError as e:  # a sampler setting this model cannot take (a guidance it was not trained for, ...)
        raise UserError(f"{args.checkpoint}: {e}") from None
    os.makedirs(args.out, exist_ok=True)
    written = [save_latents(os.path.join(args.out, "latents.npy"), res.latents)]
    if res.labels is not None:
        path = os.path.join(args.out, "labels.npy")
        np.save(path, res.labels.numpy().astype(np.int64), allow_pickle=False)
        written.append(path)
    if args.vae:
        stats = args.stats or cfg.data.path
        if not stats:
            raise UserError("--vae needs dataset statistics: pass --stats (the config's data.path is empty)")
        images = decode_images(res.latents, args.vae, stats, sigma_data=cfg.method.sigma_data,
                               normalize=cfg.data.normalize, device=args.device)
        png = os.path.join(args.out, "grid.png")
        save_png(png, make_grid(images, nrow=args.nrow))
        written.append(png)
        if args.images:
            folder = os.path.join(args.out, "images")
            os.makedirs(folder, exist_ok=True)
            for i, img in enumerate(images):
                save_png(os.path.join(folder, f"{i:06d}.png"), img)
            npz = os.path.join(args.out, "images.npz")
            np.savez(npz, arr_0=images.astype(np.uint8))
            written += [folder + os.sep, npz]
    for w in written:
        print(w)
    return 0


if __name__ == "__main__":
    sys.exit(main())
