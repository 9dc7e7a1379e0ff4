"""Embedded default dataset: synthetic latents that mimic SD-VAE latent statistics.

Used when no dataset path is configured, so the project trains out of the box without a
download. Each sample of class ``k`` (channel ``c``) is

    raw = offset_c + scale_c · ( P_k,c + s·Q_k,c + 0.45·smooth + 0.2·white )   then impulses

* ``P_k,c``, ``Q_k,c``: smooth low-frequency spatial patterns (sums of a few 2-D cosines)
  fixed per class and channel; ``s = ±1`` picks one of two mixture components per class,
  so each class is a two-component mixture and the body is multi-modal rather than
  Gaussian. This is what a small generator can learn: class means and modes are far
  apart relative to the per-sample variation.
* ``smooth``: a per-sample low-frequency random field; ``white``: small i.i.d. noise.
* Impulsive outliers (paper §4.1, Fig. 1, "salt-and-pepper"): a sparse set of elements
  (``outlier_rate``, default 0.2 %) is *replaced* by spikes of 5–9.5 body standard
  deviations, more often negative than positive, so that after per-channel
  standardisation the data reaches roughly −9 … +7 while the quartiles stay in the body.

Note on SPEC §1's "quartiles near ±1.4 after standardisation": for data standardised to
unit variance the quartiles cannot exceed ±√2 (Chebyshev: P(|x| ≥ q) ≥ 1/2 ⇒ q² ≤ 2), and
a heavy-tailed distribution sits well inside that; the paper's Fig. 1 plots latents in
their own units. The synthetic data therefore reproduces the *shape* — a broad,
multi-modal body (standardised quartiles ≈ ±0.67) plus rare spikes out to ≈ −9 / +7
(excess kurtosis ≈ 3.4) — not that literal number.

``ensure_synthetic`` writes the dataset once into a cache folder named by a hash of the
parameters and reuses it afterwards; it writes into a temporary folder and renames it, so
concurrent ranks or an interrupted run never see a half-written dataset.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from typing import Any, Optional

import numpy as np

from ..config import SyntheticConfig
from .stats import STATS_FILE
from .writer import ShardWriter

#: Bump when the generator changes so cached datasets are regenerated.
GENERATOR_VERSION = 1


#: The one description of the dataset: the config's dataclass (``data.synthetic``), so the two cannot drift.
SyntheticSpec = SyntheticConfig


def spec_key(spec: SyntheticSpec) -> str:
    """Cache key of a dataset: a hash of the generator version and every field of ``spec``."""
    payload = json.dumps({"v": GENERATOR_VERSION, **dataclasses.asdict(spec)}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def as_spec(cfg: Any = None, **overrides: Any) -> SyntheticSpec:
    """Build a :class:`SyntheticSpec` from a config object, a dict and/or keyword overrides.

    Only fields of ``SyntheticSpec`` are read; others on the config object are ignored.
    """
    names = [f.name for f in dataclasses.fields(SyntheticSpec)]
    values: dict[str, Any] = {}
    if isinstance(cfg, dict):
        values.update({k: v for k, v in cfg.items() if k in names})
    elif cfg is not None:
        values.update({k: getattr(cfg, k) for k in names if hasattr(cfg, k)})
    unknown = set(overrides) - set(names)
    if unknown:
        raise TypeError(f"unknown synthetic dataset parameter(s) {sorted(unknown)}; known: {names}")
    values.update(overrides)
    return SyntheticSpec(**values)  # validated by the dataclass (ConfigError, a ValueError)


def _smooth_patterns(rng: np.random.Generator, count: int, res: int, terms: int = 4) -> np.ndarray:
    """``count`` smooth fields ``[res, res]`` (sums of low-frequency cosines), unit RMS."""
    u = (np.arange(res) + 0.5) / res
    uu, vv = np.meshgrid(u, u, indexing="ij")
    fx = rng.integers(0, 3, size=(count, terms))
    fy = rng.integers(0, 3, size=(count, terms))
    phase = rng.uniform(0, 2 * np.pi, size=(count, terms))
    amp = rng.normal(size=(count, terms))
    arg = 2 * np.pi * (fx[..., None, None] * uu + fy[..., None, None] * vv) + phase[..., None, None]
    fields = (amp[..., None, None] * np.cos(arg)).sum(axis=1)
    rms = np.sqrt((fields**2).mean(axis=(1, 2), keepdims=True)) + 1e-8
    return fields / rms


def generate(spec: SyntheticSpec) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Return ``(latents [N, C, R, R] float64, labels [N] int64 or None)``; deterministic in ``spec``."""
    rng = np.random.default_rng([spec.seed, GENERATOR_VERSION])
    n, c, r = spec.num_samples, spec.channels, spec.resolution
    k = max(1, spec.num_classes)
    centre = 1.0 * _smooth_patterns(rng, k * c, r).reshape(k, c, r, r)
    mode = 1.2 * _smooth_patterns(rng, k * c, r).reshape(k, c, r, r)
    offset = rng.uniform(-0.8, 0.8, size=(c, 1, 1))  # channel means differ, like SD-VAE's
    scale = rng.uniform(0.6, 1.6, size=(c, 1, 1))

    labels = rng.integers(0, k, size=n)
    sign = rng.choice([-1.0, 1.0], size=(n, 1, 1, 1))
    smooth = _smooth_patterns(rng, n * c, r, terms=3).reshape(n, c, r, r)
    body = centre[labels] + sign * mode[labels] + 0.45 * smooth + 0.2 * rng.normal(size=(n, c, r, r))

    # Impulsive outliers: replace a sparse set of elements by large spikes (in body stds),
    # skewed negative (paper Fig. 1: outliers span about -9 ... 7).
    body_std = body.std(axis=(0, 2, 3), keepdims=True)
    body_mean = body.mean(axis=(0, 2, 3), keepdims=True)
    hit = rng.random(size=body.shape) < spec.outlier_rate
    negative = rng.random(size=body.shape) < 0.55
    magnitude = np.where(negative, -rng.uniform(5.0, 9.5, size=body.shape), rng.uniform(5.0, 7.5, size=body.shape))
    body = np.where(hit, body_mean + magnitude * body_std, body)

    latents = offset + scale * body
    return latents, (labels.astype(np.int64) if spec.num_classes > 0 else None)


def write_synthetic(spec: SyntheticSpec, out_dir: str) -> str:
    """Generate ``spec`` and write it as shards + ``stats.json`` into ``out_dir``."""
    latents, labels = generate(spec)
    with ShardWriter(
        out_dir, samples_per_shard=spec.samples_per_shard, vae=f"synthetic:v{GENERATOR_VERSION}",
        vae_scale=1.0, dtype=spec.dtype, num_classes=spec.num_classes, stats_batch=1024,
    ) as writer:
        for i in range(spec.num_samples):
            writer.write(latents[i], None if labels is None else int(labels[i]))
    return out_dir


def default_cache_root() -> str:
    """``$LCT_FAST_CACHE`` or ``~/.cache/lct_fast``."""
    return os.environ.get("LCT_FAST_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "lct_fast")


def ensure_synthetic(cfg: Any = None, root: Optional[str] = None, **overrides: Any) -> str:
    """Path of the synthetic dataset for ``cfg`` (written on first use, then reused).

    ``cfg`` is a ``SyntheticConfig``-like object, a dict or ``None`` (defaults), updated by
    ``overrides``. The dataset lives in ``<root>/synthetic-<hash of params>``; it is written
    to a temporary sibling folder and renamed into place, so a reader only ever sees a
    complete dataset, and concurrent callers (several ranks) are safe: the first rename
    wins and the others discard their copy.
    """
    spec = as_spec(cfg, **overrides)
    root = os.path.abspath(root or default_cache_root())
    final = os.path.join(root, f"synthetic-{spec_key(spec)}")
    if os.path.exists(os.path.join(final, STATS_FILE)):
        return final
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".tmp-synthetic-{spec_key(spec)}-", dir=root)
    try:
        write_synthetic(spec, tmp)
        with open(os.path.join(tmp, "synthetic.json"), "w") as f:
            json.dump({"generator_version": GENERATOR_VERSION, **dataclasses.asdict(spec)}, f, indent=1)
        try:
            os.rename(tmp, final)
        except OSError:
            # Someone else finished first (rename onto a non-empty folder fails): use theirs.
            if not os.path.exists(os.path.join(final, STATS_FILE)):
                raise
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return final
