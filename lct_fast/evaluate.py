"""Sample-quality evaluation of a model: generation split over ranks, then image or latent metrics.

Two evaluators share one driver (:func:`evaluate_model`):

* :class:`ImageEvaluator` — decode with the run's VAE, Inception-v3 features, torch-fidelity's FID / KID /
  IS / precision-recall against reference features that are computed once and cached
  (:mod:`lct_fast.quality.inception`, :mod:`lct_fast.quality.reference`).
* :class:`LatentEvaluator` — for runs without a VAE: marginal W1, sliced Wasserstein and tail statistics on
  standardised latents, beside a second real set and a Gaussian fit (:mod:`lct_fast.quality.latent`).

Distributed: rank r generates samples ⌊n·r/W⌋ … ⌊n·(r+1)/W⌋−1 of the one n-sample draw (sample i's noise and
label depend only on (seed, i), :func:`lct_fast.sample.generate`), decodes them and extracts their
features; the rows are gathered in rank order, so every figure equals a one-process run with the same seed
up to floating-point differences of batched convolutions. Used by ``launch/evaluate.py`` and by the
trainer's in-training evaluation; knows nothing of DeepSpeed.
"""
from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

__all__ = ["EvalSpec", "LatentEvaluator", "ImageEvaluator", "evaluate_model", "gather_rows", "shard_range",
           "git_revision", "format_table", "vae_downsampling"]


@dataclass
class EvalSpec:
    """What to generate: n samples per step count, seeded, in batches; optional CFG."""

    n: int = 2000
    steps: Sequence[int] = (1, 2)
    seed: int = 0
    batch_size: int = 64
    cfg_scale: Optional[float] = None
    """Classifier-free guidance scale (None: the config's, see :func:`lct_fast.sample.generate`)."""
    guidance: Optional[float] = None
    """Guidance scale asked of a guidance-conditioned sCD student (None: method.scd.guidance)."""
    grid: int = 64
    """Samples shown in each step count's grid PNG (rank 0's first ones = the first of the draw)."""


def shard_range(n: int, rank: int, world: int) -> tuple[int, int]:
    """This rank's contiguous block [lo, hi) of n samples."""
    return n * rank // world, n * (rank + 1) // world


def _dist_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's rows [n_r, ...] in rank order (on every rank); identity without a group."""
    rank, world = _dist_world()
    if world == 1:
        return t
    dist = torch.distributed
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    count = torch.tensor([len(t)], device=dev)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    counts = [int(c) for c in counts]
    pad = torch.zeros((max(counts), *t.shape[1:]), dtype=t.dtype, device=dev)
    pad[:len(t)] = t.to(dev)
    parts = [torch.empty_like(pad) for _ in range(world)]
    dist.all_gather(parts, pad)
    return torch.cat([p[:c] for p, c in zip(parts, counts)]).to(t.device)


def git_revision() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        rev = out.stdout.strip()
        if out.returncode == 0 and rev:
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def vae_downsampling(vae) -> int:
    """Pixels per latent element of a diffusers AutoencoderKL (8 for SD's VAE)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


# ------------------------------------------------------------------------------------------- latent
class LatentEvaluator:
    """Latent-space metrics against a dataset's real latents (standardised per channel by its stats)."""

    mode = "latent"
    headline = "mw1"

    def __init__(self, data_path: str, *, n: int, normalize: str = "channel", seed: int = 0, stats: Any = None):
        from .data.reader import LatentNormalizer, read_all_latents
        from .data.stats import load_stats
        from .quality.latent import LatentReference

        self.stats = stats if stats is not None else load_stats(data_path)
        # Only the two disjoint sets the metrics use, a seeded draw validated as the training reader validates
        # (so memory does not grow with the data set, and a bad sample is skipped and counted, not fatal).
        lat, labels, errors = read_all_latents(data_path, subset=2 * n, seed=seed, stats=self.stats)
        # sigma_data = 1: unit variance per channel, the space every latent figure is quoted in.
        self.normalizer = LatentNormalizer(self.stats, normalize, sigma_data=1.0)
        x = self.normalizer.normalize(torch.as_tensor(lat)).numpy()
        self.reference = LatentReference(x, n, seed=seed, labels=labels if self.stats.num_classes else None,
                                         drawn=True)
        self.info = {"mode": "latent", "data": os.path.abspath(data_path), "count": int(self.stats.count),
                     "n": n, "normalize": normalize, "data_errors": errors.summary()}
        self.n = n

    def prepare(self, x0: torch.Tensor, sigma_data: float) -> torch.Tensor:
        """Generated x0 (σ_d-normalised) -> rows to gather: the standardised latents themselves."""
        return (x0.float() / sigma_data).reshape(len(x0), -1)

    def score(self, rows: torch.Tensor, shape: Sequence[int], seed: int = 0) -> dict[str, float]:
        from .quality.latent import latent_metrics

        return latent_metrics(rows.reshape(len(rows), *shape).numpy(), self.reference, seed=seed)

    def grid(self, x0: torch.Tensor, stem: str) -> list[str]:
        from .sample import save_latent_grid

        save_latent_grid(x0, stem)
        return [stem + ".png"]


# -------------------------------------------------------------------------------------------- image
@dataclass
class ImageEvaluator:
    """Decode with a local VAE, Inception features, torch-fidelity metrics against cached reference features.

    Everything that can fail is checked in the constructor, before any sample is generated: the VAE folder,
    the dataset statistics, the Inception weights, the reference (and its resolution against the decoded
    one), and n against the FID layer's dimension."""

    vae_path: str
    stats: object
    inception_weights: str
    ref: str
    latent_resolution: int
    n: int
    metrics: Sequence[str] = ("fid", "kid", "isc", "prc")
    feature_layer: str = "2048"
    normalize: str = "channel"
    ref_cache: Optional[str] = None
    n_ref: Optional[int] = None
    device: str | torch.device = "cpu"
    decode_batch: int = 16
    feature_batch: int = 64
    kid_subset_size: int = 1000
    allow_nonstandard_weights: bool = False
    log: Callable[[str], None] = field(default=lambda s: None)
    progress_s: float = 0.0
    """A progress line of the reference features and of decoding + features every this many seconds (0: none)."""
    mode: str = "image"
    headline: str = "fid"

    def __post_init__(self):
        from .data.reader import LatentNormalizer
        from .data.stats import load_stats
        from .quality.inception import (check_fid_sample_count, check_standard_weights, file_sha256, load_inception,
                                        required_layers)
        from .quality.reference import reference_features
        from .sample import _load_vae

        self.metrics = list(self.metrics)
        self.layers = required_layers(self.metrics, self.feature_layer)
        if "fid" in self.metrics:
            check_fid_sample_count(self.n, self.feature_layer, "--n (generated samples)")
        self.stats = load_stats(self.stats) if isinstance(self.stats, str) else self.stats
        self.vae = _load_vae(self.vae_path, self.device)
        f = vae_downsampling(self.vae)
        self.resolution = (self.latent_resolution * f, self.latent_resolution * f)
        self.net = load_inception(self.inception_weights, self.layers, self.device)
        self.weights_sha = file_sha256(self.inception_weights)
        self.standard_weights = check_standard_weights(self.inception_weights, self.weights_sha,
                                                       self.allow_nonstandard_weights)
        # sigma_data is applied by prepare(); this normaliser only maps standardised x0 back to VAE space.
        self.normalizer = LatentNormalizer(self.stats, self.normalize, sigma_data=1.0)
        rank, world = _dist_world()
        t0 = time.perf_counter()
        self.ref_feats, self.ref_meta = reference_features(
            self.ref, self._extract, weights_sha=self.weights_sha, layers=self.layers, resolution=self.resolution,
            limit=self.n_ref, cache=self.ref_cache, batch_size=self.feature_batch, shard=(rank, world),
            gather=lambda fs: {k: gather_rows(v) for k, v in fs.items()}, log=self.log,
            progress_s=self.progress_s if rank == 0 else 0.0)
        self.reference_s = time.perf_counter() - t0
        if "fid" in self.metrics:
            check_fid_sample_count(len(self.ref_feats[self.feature_layer]), self.feature_layer, f"reference {self.ref}")
        self.info = {"mode": "image", "reference": self.ref_meta, "vae": os.path.abspath(self.vae_path),
                     "inception_weights": os.path.abspath(self.inception_weights),
                     "inception_sha256": self.weights_sha, "inception_standard": self.standard_weights,
                     "feature_layer": self.feature_layer,
                     "resolution": list(self.resolution), "metrics": self.metrics}
        self._last_images: Optional[np.ndarray] = None

    def _extract(self, images: np.ndarray) -> dict[str, torch.Tensor]:
        from .quality.inception import inception_features

        return inception_features(self.net, images, batch_size=self.feature_batch)

    def decode(self, x0: torch.Tensor, sigma_data: float) -> np.ndarray:
        from .sample import decode_latents

        vae_scale = float(getattr(self.stats, "vae_scale", None) or 1.0)
        vae_shift = float(getattr(self.stats, "vae_shift", None) or 0.0)
        lat = self.normalizer.denormalize(x0.float() / sigma_data)
        return decode_latents(lat, self.vae, vae_scale=vae_scale, vae_shift=vae_shift, batch_size=self.decode_batch)

    def prepare(self, x0: torch.Tensor, sigma_data: float, chunk: int = 256, keep: int = 64) -> torch.Tensor:
        """Generated x0 -> decoded images -> one row of concatenated features per sample, ``chunk`` samples
        at a time (a rank's share of 50k decoded images would not fit in memory at once); the first ``keep``
        images are kept for the grid."""
        from .progress import Progress

        rows, self._last_images = [], None
        with Progress(len(x0), "decoding + Inception features", who="lct_fast.evaluate", unit="images",
                      interval_s=self.progress_s, enabled=_dist_world()[0] == 0) as bar:
            for s in range(0, len(x0), chunk):
                images = self.decode(x0[s:s + chunk], sigma_data)
                if self._last_images is None:
                    self._last_images = images[:keep]
                feats = self._extract(images)
                rows.append(torch.cat([feats[k] for k in self.layers], dim=1))
                bar.update(len(images))
        d = sum(self.ref_feats[k].shape[1] for k in self.layers)
        return torch.cat(rows) if rows else torch.empty(0, d)

    def score(self, rows: torch.Tensor, shape: Sequence[int], seed: int = 0) -> dict[str, float]:
        from .quality.inception import image_metrics

        gen, s = {}, 0
        for k in self.layers:
            d = self.ref_feats[k].shape[1]
            gen[k] = rows[:, s:s + d]
            s += d
        return image_metrics(gen, self.ref_feats, self.metrics, feature_layer=self.feature_layer,
                             kid_subset_size=self.kid_subset_size)

    def grid(self, x0: torch.Tensor, stem: str) -> list[str]:
        from .sample import make_grid, save_png

        images = self._last_images[:len(x0)] if self._last_images is not None else None
        if images is None:
            return []
        save_png(stem + ".png", make_grid(images))
        return [stem + ".png"]


# ------------------------------------------------------------------------------------------- driver
def evaluate_model(net: torch.nn.Module, method_cfg, model_cfg, spec: EvalSpec, evaluator, *, num_classes: int,
                   device: str | torch.device = "cpu", grid_stem: Optional[str] = None,
                   keep_rows: bool = False, progress_s: float = 0.0, who: str = "lct_fast") -> dict:
    """Generate ``spec.n`` samples per step count (this rank's share), score them with ``evaluator``.

    Returns {"steps": {k: metrics}, "timings": {...}, "grids": [paths]} on rank 0 and the same timings with
    empty metrics elsewhere. ``grid_stem``: write ``<grid_stem>-<k>step.png`` on rank 0. ``keep_rows``: also
    return the gathered rows (standardised latents or features) per step count under "rows". ``progress_s``:
    a progress line of rank 0's generation every this many seconds (0: none; :mod:`lct_fast.progress`)."""
    from .progress import Progress
    from .sample import generate

    rank, world = _dist_world()
    lo, hi = shard_range(spec.n, rank, world)
    shape = (model_cfg.in_channels, model_cfg.resolution, model_cfg.resolution)
    sigma_data = float(method_cfg.sigma_data)
    results: dict = {}
    timings = {"generate_s": 0.0, "prepare_s": 0.0, "score_s": 0.0}
    grids: list[str] = []
    kept: dict = {}
    for steps in spec.steps:
        t0 = time.perf_counter()
        with Progress(hi - lo, f"generating ({int(steps)} step{'s' if int(steps) > 1 else ''}, rank 0's share)",
                      who=who, interval_s=progress_s, enabled=rank == 0) as bar:
            res = generate(
                net, method_cfg, n=spec.n, shape=shape, num_classes=num_classes, steps=int(steps), seed=spec.seed,
                batch_size=spec.batch_size, device=device, start=lo, count=hi - lo, cfg_scale=spec.cfg_scale,
                guidance=spec.guidance, progress=bar)
        t1 = time.perf_counter()
        rows = gather_rows(evaluator.prepare(res.latents, sigma_data))
        t2 = time.perf_counter()
        if rank == 0:
            results[int(steps)] = evaluator.score(rows, shape, seed=spec.seed)
            if keep_rows:
                kept[int(steps)] = rows
            if grid_stem and spec.grid:
                grids += evaluator.grid(res.latents[:spec.grid], f"{grid_stem}-{int(steps)}step")
        t3 = time.perf_counter()
        timings["generate_s"] += t1 - t0
        timings["prepare_s"] += t2 - t1
        timings["score_s"] += t3 - t2
    return {"steps": results, "timings": timings, "grids": grids, "rows": kept}


def format_table(results: dict[int, dict[str, float]], keys: Optional[Sequence[str]] = None) -> str:
    """A plain-text table: one row per step count, one column per metric."""
    if not results:
        return ""
    keys = list(keys or next(iter(results.values())).keys())
    head = ["steps"] + keys
    rows = [[str(k)] + [f"{v[key]:.5g}" if key in v else "-" for key in keys] for k, v in sorted(results.items())]
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    line = lambda r: "  ".join(c.rjust(w) for c, w in zip(r, widths))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows])
