"""Sample-quality metrics that can tell a Gaussian fit from the data, and the baselines they are read against.

* :func:`sliced_wasserstein` — POT's sliced Wasserstein distance between two point clouds (e.g. flattened
  decoded pixels): it compares whole 1-D marginals along random directions, tails included.
* :func:`knn_precision_recall` — improved precision and recall (Kynkäänniemi et al. 2019): a sample is
  "covered" when it lies within the k-th-nearest-neighbour radius of some sample of the other set.
* :func:`frechet_distance`, :func:`kernel_distance` — FD and the unbiased KID (cubic polynomial kernel), to be
  used in a *nonlinear* feature space only (:mod:`lct_fast.quality.features`); on the latents, or any linear
  map of them, a full-covariance Gaussian fit matches mean and covariance and wins by construction.
* :class:`GaussianFit` — the mean + full-covariance Gaussian of training latents (optionally one per class):
  the bar a generative model has to beat.
* :func:`tail_stats` — per-channel quartiles, extremes and kurtosis (the latent CT paper's Fig. 1).

Everything takes numpy arrays and returns plain floats, deterministic for a seed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

__all__ = ["sliced_wasserstein", "knn_radii", "knn_precision_recall", "frechet_distance", "kernel_distance",
           "GaussianFit", "tail_stats", "class_accuracy", "mean_std"]


def _as2d(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim < 2 or len(x) < 2:
        raise ValueError(f"{name}: expected at least 2 samples [N, ...], got shape {x.shape}")
    return x.reshape(len(x), -1)


def sliced_wasserstein(x: np.ndarray, y: np.ndarray, *, n_projections: int = 512, seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance between samples x [N, ...] and y [M, ...] (POT)."""
    import ot

    x, y = _as2d(x, "x"), _as2d(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"sliced_wasserstein: dimension mismatch {x.shape[1]} vs {y.shape[1]}")
    return float(ot.sliced_wasserstein_distance(x, y, n_projections=n_projections, seed=seed))


def _pairwise_min_radius_cover(a: torch.Tensor, b: torch.Tensor, radii_b: torch.Tensor, chunk: int = 1024
                               ) -> torch.Tensor:
    """For each row of a: is it within radii_b[j] of some row j of b? -> bool [len(a)]."""
    out = []
    for s in range(0, len(a), chunk):
        d = torch.cdist(a[s:s + chunk], b)
        out.append((d <= radii_b[None]).any(dim=1))
    return torch.cat(out)


def knn_radii(x: np.ndarray | torch.Tensor, k: int, chunk: int = 1024) -> torch.Tensor:
    """Distance from each sample to its k-th nearest neighbour within the same set (itself excluded)."""
    x = torch.as_tensor(x, dtype=torch.float64)
    if len(x) <= k:
        raise ValueError(f"knn_radii: need more than k={k} samples, got {len(x)}")
    out = []
    for s in range(0, len(x), chunk):
        d = torch.cdist(x[s:s + chunk], x)
        out.append(d.kthvalue(k + 1, dim=1).values)  # the 1st smallest is the point itself (0)
    return torch.cat(out)


def knn_precision_recall(real: np.ndarray, fake: np.ndarray, *, k: int = 3) -> tuple[float, float]:
    """Improved precision (fraction of fake samples inside the real manifold) and recall (fraction of real
    samples inside the fake manifold), manifolds = unions of k-NN balls (Kynkäänniemi et al. 2019, k = 3)."""
    r = torch.as_tensor(_as2d(real, "real"))
    f = torch.as_tensor(_as2d(fake, "fake"))
    precision = _pairwise_min_radius_cover(f, r, knn_radii(r, k)).double().mean().item()
    recall = _pairwise_min_radius_cover(r, f, knn_radii(f, k)).double().mean().item()
    return precision, recall


def _sqrtm_psd(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """‖μa − μb‖² + tr(Σa + Σb − 2(Σa^½ Σb Σa^½)^½) between the Gaussians fitted to features a and b."""
    a, b = _as2d(a, "a"), _as2d(b, "b")
    mu_a, mu_b = a.mean(0), b.mean(0)
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    sa = _sqrtm_psd(ca)
    cross = np.linalg.eigvalsh(sa @ cb @ sa)
    tr_sqrt = np.sqrt(np.clip(cross, 0, None)).sum()
    return float(np.square(mu_a - mu_b).sum() + np.trace(ca) + np.trace(cb) - 2 * tr_sqrt)


def kernel_distance(a: np.ndarray, b: np.ndarray, *, subsets: int = 20, subset_size: int = 500,
                    seed: int = 0) -> tuple[float, float]:
    """KID: unbiased MMD² with the kernel (xᵀy/d + 1)³, mean and std over random subsets (Bińkowski et al.)."""
    a, b = _as2d(a, "a"), _as2d(b, "b")
    m = min(subset_size, len(a), len(b))
    d = a.shape[1]
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(subsets):
        x = a[rng.choice(len(a), m, replace=False)]
        y = b[rng.choice(len(b), m, replace=False)]
        kxx = (x @ x.T / d + 1) ** 3
        kyy = (y @ y.T / d + 1) ** 3
        kxy = (x @ y.T / d + 1) ** 3
        off = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
        vals.append(off - 2 * kxy.mean())
    return float(np.mean(vals)), float(np.std(vals))


def class_accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of samples whose most probable class (of a classifier) is the requested label."""
    return float((np.asarray(probs).argmax(1) == np.asarray(labels)).mean())


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


@dataclass
class GaussianFit:
    """Mean + full covariance of flattened samples, per class when ``labels`` are given (else one Gaussian)."""

    shape: tuple[int, ...]
    means: np.ndarray            # [K, D]
    chols: np.ndarray            # [K, D, D] Cholesky factors of the covariances
    per_class: bool

    @classmethod
    def fit(cls, x: np.ndarray, labels: Optional[np.ndarray] = None, *, jitter: float = 1e-6) -> "GaussianFit":
        x = np.asarray(x, dtype=np.float64)
        flat = x.reshape(len(x), -1)
        groups = [flat] if labels is None else [flat[labels == c] for c in range(int(labels.max()) + 1)]
        means, chols = [], []
        for g in groups:
            if len(g) < 2:
                raise ValueError(f"GaussianFit: a class has {len(g)} samples, need at least 2")
            cov = np.cov(g, rowvar=False) + jitter * np.eye(flat.shape[1])
            means.append(g.mean(0))
            chols.append(np.linalg.cholesky(cov))
        return cls(tuple(x.shape[1:]), np.stack(means), np.stack(chols), labels is not None)

    def sample(self, n: int, *, labels: Optional[np.ndarray] = None, seed: int = 0) -> np.ndarray:
        """n samples [n, *shape] (float32); class k's Gaussian for ``labels[i] = k`` when fitted per class."""
        if self.per_class and (labels is None or len(labels) != n):
            raise ValueError("GaussianFit.sample: a per-class fit needs one label per sample")
        rng = np.random.default_rng(seed)
        eps = rng.standard_normal((n, self.means.shape[1]))
        k = np.asarray(labels, dtype=np.int64) if self.per_class else np.zeros(n, dtype=np.int64)
        out = np.empty_like(eps)
        for c in np.unique(k):  # per class: never an [n, D, D] gather of the Cholesky factors
            sel = k == c
            out[sel] = self.means[c] + eps[sel] @ self.chols[c].T
        return out.reshape(n, *self.shape).astype(np.float32)


def tail_stats(x: np.ndarray) -> list[dict]:
    """Per channel of x [N, C, ...] after standardising it: quartiles, min/max, excess kurtosis and the
    fraction of values beyond 4 standard deviations (0.006 % for a Gaussian)."""
    x = np.asarray(x, dtype=np.float64)
    rows = []
    for c in range(x.shape[1]):
        v = x[:, c].reshape(-1)
        z = (v - v.mean()) / max(v.std(), 1e-12)
        q1, q2, q3 = np.percentile(z, [25, 50, 75])
        rows.append({"channel": c, "mean": float(v.mean()), "std": float(v.std()), "q1": float(q1),
                     "median": float(q2), "q3": float(q3), "min": float(z.min()), "max": float(z.max()),
                     "excess_kurtosis": float((z ** 4).mean() - 3.0),
                     "frac_beyond_4std": float((np.abs(z) > 4).mean())})
    return rows
