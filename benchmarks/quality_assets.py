"""Train the two small networks the real-data quality benchmark needs, on CPU, and write them as committed
assets (``benchmarks/assets/``):

* ``tiny_vae/`` — a diffusers ``AutoencoderKL`` (f = 4, 4 latent channels: 32x32x3 patches <-> 4x8x8 latents),
  saved with ``save_pretrained`` so encode -> train -> sample -> decode run through exactly the VAE path a user
  runs with ``sd-vae-ft-ema``. Trained like the SD VAEs minus the perceptual and adversarial terms:
  L1 + L2 reconstruction plus a tiny KL weight (1e-6), which leaves the latent scale free and is where SD-VAE
  latents get their heavy tails. ``scaling_factor`` is set to 1 / (std of the training latents).
* ``digit_vae/`` — the same autoencoder trained on the digits' training split (the photographs' VAE loses a
  quarter of the digits' identities in reconstruction: classifier accuracy 0.75 on decoded training latents).
* ``digit_features.safetensors`` — the same network trained to tell the ten digits of the second data set
  (:mod:`benchmarks.digits`) apart, on its training split only, without flips.
* ``patch_features.safetensors`` — the feature network of :mod:`lct_fast.quality.features` (a small CNN
  classifier of which photograph a patch comes from), whose penultimate layer is the nonlinear feature space
  of the benchmark's Fréchet / kernel distances and k-NN precision/recall.

    python benchmarks/quality_assets.py [--vae-steps 1500] [--feature-steps 1500]
                                        [--only vae|features|digit-vae|digit-features]

Both are deterministic for a seed on one machine; the committed files are the reference, so results stay
comparable across machines.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Optional

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from lct_fast.quality.features import train_feature_net, save_feature_net  # noqa: E402
from benchmarks.patches import PatchSpec, ensure_patches  # noqa: E402

ASSETS = os.path.join(ROOT, "benchmarks", "assets")
VAE_DIR = os.path.join(ASSETS, "tiny_vae")
FEATURES = os.path.join(ASSETS, "patch_features.safetensors")
DIGIT_FEATURES = os.path.join(ASSETS, "digit_features.safetensors")
DIGIT_VAE_DIR = os.path.join(ASSETS, "digit_vae")

VAE_KW = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
              up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(32, 64, 128), layers_per_block=1,
              latent_channels=4, norm_num_groups=16, sample_size=32, mid_block_add_attention=False)


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def train_vae(train: np.ndarray, steps: int, batch: int = 64, lr: float = 1e-3, kl_weight: float = 1e-6,
              seed: int = 0, vae_kw: Optional[dict] = None, seconds: Optional[float] = None):
    """An ``AutoencoderKL`` (``VAE_KW`` unless ``vae_kw``) trained with L1 + L2 reconstruction + ``kl_weight`` KL,
    Adam with a cosine decay over ``steps``; with ``seconds``, a wall-clock box instead: the cosine runs over
    the elapsed fraction of it and training stops when it is spent (``steps`` then only caps the count), so
    the box holds whatever else the machine is running. ``vae.trained_steps`` says how many were taken."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(**(vae_kw or VAE_KW))
    opt = torch.optim.Adam(vae.parameters(), lr=lr)
    t0 = time.perf_counter()
    if seconds:
        progress = lambda k: min(1.0, (time.perf_counter() - t0) / seconds)  # noqa: E731
    else:
        progress = lambda k: min(k, steps) / steps  # noqa: E731
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5 * (1 + math.cos(math.pi * progress(k))))
    gen = torch.Generator().manual_seed(seed)
    k = -1
    for k in range(steps):
        if seconds and time.perf_counter() - t0 >= seconds:
            k -= 1
            break
        idx = torch.randint(0, len(train), (batch,), generator=gen).numpy()
        x = _to_tensor(train[idx])
        post = vae.encode(x).latent_dist
        y = vae.decode(post.sample(generator=gen)).sample
        rec = (y - x).abs().mean() + (y - x).square().mean()
        loss = rec + kl_weight * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if k % 100 == 0 or k == steps - 1:
            print(f"vae step {k}/{'~' if seconds else ''}{steps if not seconds else int(seconds)}"
                  f"{'s' if seconds else ''}: rec {rec.item():.4f} kl {post.kl().mean().item():.1f} "
                  f"({time.perf_counter() - t0:.0f}s)", flush=True)
    vae.trained_steps = k + 1
    return vae.eval()


@torch.no_grad()
def encode_means(vae, images: np.ndarray, batch: int = 256) -> torch.Tensor:
    """The posterior means of uint8 images [N, H, W, 3], encoded in batches."""
    return torch.cat([vae.encode(_to_tensor(images[s:s + batch])).latent_dist.mean
                      for s in range(0, len(images), batch)])


def latent_std(vae, images: np.ndarray, batch: int = 256) -> float:
    return float(encode_means(vae, images, batch).std())


@torch.no_grad()
def recon_psnr(vae, images: np.ndarray, batch: int = 256) -> float:
    err = []
    for s in range(0, len(images), batch):
        x = _to_tensor(images[s:s + batch])
        y = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
        err.append(((y - x) / 2).square().flatten(1).mean(1))
    mse = torch.cat(err).mean().item()
    return 10 * math.log10(1.0 / mse)


def finalize_vae(vae, data: dict, info: dict, out_dir: str = VAE_DIR) -> dict:
    """Round the weights to fp16 (the committed file is fp16: 5 MB; diffusers loads it as fp32), then set
    ``scaling_factor`` from the rounded network's latents and write the folder + ``training.json``."""
    vae = vae.half().float().eval()
    std = latent_std(vae, data["train_images"][:8192])
    vae.register_to_config(scaling_factor=1.0 / std)
    info = {**info, "latent_std": std, "test_psnr_db": recon_psnr(vae, data["test_images"]),
            "params": sum(p.numel() for p in vae.parameters())}
    vae.half().save_pretrained(out_dir, safe_serialization=True)
    with open(os.path.join(out_dir, "training.json"), "w") as f:
        json.dump(info, f, indent=2)
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vae-steps", type=int, default=1500)
    ap.add_argument("--feature-steps", type=int, default=1500)
    ap.add_argument("--only", choices=["vae", "features", "digit-vae", "digit-features"], default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    with np.load(ensure_patches(PatchSpec()), allow_pickle=False) as d:
        data = {k: d[k] for k in d.files}
    os.makedirs(ASSETS, exist_ok=True)
    if args.only in (None, "vae"):
        vae = train_vae(data["train_images"], args.vae_steps, seed=args.seed)
        info = finalize_vae(vae, data, {"train_steps": args.vae_steps})
        print(f"tiny VAE: {info}")
    if args.only in (None, "features"):
        net, acc = train_feature_net(data["train_images"], data["train_labels"], data["test_images"],
                                     data["test_labels"], steps=args.feature_steps, seed=args.seed)
        save_feature_net(net, FEATURES, meta={"train_steps": str(args.feature_steps), "test_accuracy": f"{acc:.4f}"})
        print(f"feature network: test accuracy {acc:.4f} -> {FEATURES}")
    if args.only in (None, "digit-vae", "digit-features"):
        from benchmarks.digits import DigitSpec, make_digits

        digits = make_digits(DigitSpec())
    if args.only in (None, "digit-vae"):
        vae = train_vae(digits["train_images"], args.vae_steps, seed=args.seed)
        info = finalize_vae(vae, digits, {"train_steps": args.vae_steps, "data": "mnist5k"}, out_dir=DIGIT_VAE_DIR)
        print(f"digit VAE: {info}")
    if args.only in (None, "digit-features"):
        net, acc = train_feature_net(digits["train_images"], digits["train_labels"], digits["test_images"],
                                     digits["test_labels"], steps=args.feature_steps, seed=args.seed, flip=False)
        save_feature_net(net, DIGIT_FEATURES, meta={"train_steps": str(args.feature_steps),
                                                    "test_accuracy": f"{acc:.4f}", "data": "mnist5k"})
        print(f"digit feature network: test accuracy {acc:.4f} -> {DIGIT_FEATURES}")


if __name__ == "__main__":
    main()
