"""Evaluate an exported model: FID, KID, Inception Score and precision/recall (torch-fidelity), or latent metrics.

    python launch/evaluate.py --checkpoint runs/x/export/ema_0.9999.safetensors --vae /models/sd-vae-ft-ema \\
        --ref /data/celebahq256 --inception-weights /models/weights-inception-2015-12-05-6726825d.pth \\
        --n 50000 --steps 1 2 --out runs/x/eval
    torchrun --nproc_per_node 8 launch/evaluate.py --num-samples 50000 ...   # every rank decodes its share
    python launch/evaluate.py --checkpoint runs/tiny/export/ema_0.99.safetensors --out runs/tiny/eval  # no VAE

With ``--vae``: samples are decoded and scored against ``--ref`` (an image folder, an ``.npz`` of uint8 images,
or a ``.safetensors`` reference file this tool writes the first time: Inception features of every requested
layer, reused while the reference and the weights are unchanged). Inception weights come only from the local
``--inception-weights`` file (torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth``), loaded with
``weights_only=True``; nothing is downloaded. Without ``--vae``: latent metrics (marginal W1, sliced
Wasserstein, tails) against the run's latent dataset (or ``--ref`` shards), beside a second real set and a
Gaussian fit. Writes ``<out>/metrics.json`` and one grid PNG per step count, and prints one table.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Optional, Sequence

from lct_fast.cli import one_line_errors


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="exported safetensors weights (launch/export.py)")
    p.add_argument("--config", default=None, help="resolved config JSON (default: beside the checkpoint)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. method.ict.sigma_mid=0.4 (repeatable)")
    p.add_argument("--vae", default=None, help="local diffusers AutoencoderKL folder (image metrics); omit for "
                                              "latent metrics")
    p.add_argument("--stats", default=None, help="dataset folder or stats.json for decoding (default: data.path)")
    p.add_argument("--ref", default=None, help="image folder, .npz of uint8 images or reference .safetensors "
                                              "(image metrics); latent dataset folder (latent metrics; default "
                                              "the run's data)")
    p.add_argument("--ref-cache", default=None, help="where to write/reuse the reference features (default "
                                                    "~/.cache/lct_fast/eval/reference-<key>.safetensors)")
    p.add_argument("--n-ref", type=int, default=None, help="use only the first N reference images")
    p.add_argument("--inception-weights", default=None, help="local Inception-v3 weights file (image metrics)")
    p.add_argument("--allow-nonstandard-weights", action="store_true", help="accept an Inception file other than the "
                   "standard one (SHA-256 6726825d...); the metrics file then says they are not comparable")
    # --num-samples is the spelling torchrun accepts: its own parser takes a bare --n for one of its options.
    p.add_argument("--n", "--num-samples", dest="n", type=int, default=None,
                   help="samples per step count (default 50000 images, 2000 latents)")
    p.add_argument("--steps", type=int, nargs="+", default=[1, 2], help="step counts to evaluate, e.g. 1 2 4")
    p.add_argument("--metrics", nargs="+", default=["fid", "kid", "isc", "prc"],
                   choices=["fid", "kid", "isc", "prc"], help="image metrics")
    p.add_argument("--feature-layer", default="2048", choices=["64", "192", "768", "2048"],
                   help="Inception layer of FID/KID/PR (2048 = the standard FID)")
    p.add_argument("--kid-subset-size", type=int, default=1000, help="KID subset size (capped at n)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (noise and labels)")
    p.add_argument("--batch-size", type=int, default=64, help="samples per generation / feature batch")
    p.add_argument("--cfg-scale", type=float, default=None, help="classifier-free guidance scale (1 = off; needs a "
                   "class-conditional model with label dropout; default: method.trigflow.guidance for a diffusion "
                   "model, else 1)")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale asked of a guidance-conditioned "
                   "sCD student (default: method.scd.guidance)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--device", default=None, help="default: this rank's GPU, else cpu")
    p.add_argument("--progress-s", type=float, default=30.0, help="outside a terminal, a progress line every this "
                   "many seconds (0: none; on a terminal a progress bar)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def _write_json(path: str, obj: dict) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


@one_line_errors("lct-evaluate")
def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from lct_fast.config import ConfigError, load_config
    from lct_fast.evaluate import EvalSpec, ImageEvaluator, LatentEvaluator, evaluate_model, format_table, git_revision
    from lct_fast.trainer import resolve_data_path
    from lct_fast.weights import find_config, load_model

    t_start = time.perf_counter()
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        from lct_fast.distributed import init_distributed

        env = init_distributed()
        rank, world, device = env.rank, env.world_size, str(env.device)
    else:
        rank, world = 0, 1
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = args.device or device
    say = (lambda s: print(f"lct_fast.evaluate: {s}", file=sys.stderr)) if rank == 0 else (lambda s: None)
    try:
        cfg = load_config(find_config(args.checkpoint, args.config), args.overrides)
        if args.steps and min(args.steps) < 1:
            raise ValueError(f"--steps: every step count must be >= 1, got {args.steps}")
        net = load_model(args.checkpoint, cfg, device)
        m = cfg.model
        if args.vae:
            missing = [k for k, v in (("--ref", args.ref), ("--inception-weights", args.inception_weights)) if not v]
            if missing:
                raise ValueError(f"image metrics (--vae) need {' and '.join(missing)}")
            stats = args.stats or cfg.data.path
            if not stats:
                raise ValueError("--vae needs the dataset statistics for decoding: pass --stats (the config's "
                                 "data.path is empty)")
            n = args.n or 50000
            evaluator = ImageEvaluator(
                vae_path=args.vae, stats=stats, inception_weights=args.inception_weights, ref=args.ref,
                latent_resolution=m.resolution, n=n, metrics=args.metrics, feature_layer=args.feature_layer,
                normalize=cfg.data.normalize, ref_cache=args.ref_cache, n_ref=args.n_ref, device=device,
                feature_batch=args.batch_size, kid_subset_size=args.kid_subset_size, log=say,
                allow_nonstandard_weights=args.allow_nonstandard_weights, progress_s=args.progress_s)
        else:
            n = args.n or 2000
            data = args.ref or resolve_data_path(cfg)
            evaluator = LatentEvaluator(data, n=n, normalize=cfg.data.normalize, seed=args.seed)
        if args.cfg_scale not in (None, 1.0) and (m.num_classes <= 0 or cfg.method.label_dropout <= 0):
            raise ValueError(f"--cfg-scale {args.cfg_scale}: the model is not trained for guidance (num_classes="
                             f"{m.num_classes}, method.label_dropout={cfg.method.label_dropout})")
    except (ConfigError, FileNotFoundError, ValueError, ImportError) as e:
        print(f"lct_fast.evaluate: error: {e}", file=sys.stderr)
        return 2
    spec = EvalSpec(n=n, steps=tuple(args.steps), seed=args.seed, batch_size=args.batch_size,
                    cfg_scale=args.cfg_scale, guidance=args.guidance)
    num_classes = m.num_classes
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
    say(f"{args.checkpoint}: {n} samples x steps {list(args.steps)} on {world} rank(s), {evaluator.mode} metrics")
    out = evaluate_model(net, cfg.method, m, spec, evaluator, num_classes=num_classes, device=device,
                         grid_stem=os.path.join(args.out, "grid") if rank == 0 else None,
                         progress_s=args.progress_s, who="lct_fast.evaluate")
    if rank == 0:
        timings = {**out["timings"], "total_s": time.perf_counter() - t_start}
        if hasattr(evaluator, "reference_s"):
            timings["reference_s"] = evaluator.reference_s
        result = {"checkpoint": os.path.abspath(args.checkpoint), "ema": os.path.splitext(
                      os.path.basename(args.checkpoint))[0], "config_name": cfg.name, "method": cfg.method.name,
                  "mode": evaluator.mode, "headline": evaluator.headline, "n": n, "seed": args.seed,
                  "steps": list(args.steps), "cfg_scale": args.cfg_scale,
                  "guidance": args.guidance, "world_size": world,
                  "metrics": {str(k): v for k, v in out["steps"].items()}, "evaluator": evaluator.info,
                  "git_revision": git_revision(), "torch": torch.__version__, "device": device,
                  "timings": timings, "grids": out["grids"],
                  "overrides": list(args.overrides)}
        _write_json(os.path.join(args.out, "metrics.json"), result)
        keys = (["mw1", "real_mw1", "gaussian_mw1", "swd", "real_swd", "gaussian_swd", "kurtosis", "real_kurtosis"]
                if evaluator.mode == "latent" else None)
        print(format_table(out["steps"], keys))
        print(os.path.join(args.out, "metrics.json"))
    if distributed:
        from lct_fast.distributed import shutdown_distributed

        shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
