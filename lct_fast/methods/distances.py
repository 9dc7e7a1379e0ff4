"""Per-sample robust distances of the latent CT paper (eqs. 6–8) as functions of (m, c).

m is the per-sample reduced squared difference (:func:`reduce_squared`): the mean (authors' code,
default) or the sum (‖x − y‖², the papers' notation) of (x − y)² over the D latent dims.
"""
from __future__ import annotations

from typing import Callable, Dict

import torch

__all__ = ["reduce_squared", "l2", "pseudo_huber", "cauchy", "geman_mcclure", "DISTANCES", "robust_distance"]


def reduce_squared(diff: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Per-sample mean or sum of diff² over all non-batch dims -> [B]."""
    sq = diff.flatten(1).square()
    if reduction == "mean":
        return sq.mean(dim=1)
    if reduction == "sum":
        return sq.sum(dim=1)
    raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")


def l2(m: torch.Tensor, c: float = 0.0) -> torch.Tensor:
    """Squared L2: d = m (c unused)."""
    return m


def pseudo_huber(m: torch.Tensor, c: float) -> torch.Tensor:
    """Pseudo-Huber (eq. 7): √(m + c²) − c, written as m / (√(m + c²) + c) to avoid cancellation for m ≪ c²."""
    return m / (torch.sqrt(m + c * c) + c)


def cauchy(m: torch.Tensor, c: float) -> torch.Tensor:
    """Cauchy (eq. 6): ln(1 + m / (2c²)); grows only logarithmically for outliers."""
    return torch.log1p(m / (2.0 * c * c))


def geman_mcclure(m: torch.Tensor, c: float) -> torch.Tensor:
    """Geman–McClure (eq. 8): 2m / (m + 4c²); saturates at 2 (gradient → 0 for outliers)."""
    return 2.0 * m / (m + 4.0 * c * c)


DISTANCES: Dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {
    "l2": l2,
    "pseudo_huber": pseudo_huber,
    "cauchy": cauchy,
    "geman_mcclure": geman_mcclure,
}


def robust_distance(name: str, m: torch.Tensor, c: float) -> torch.Tensor:
    """Apply the named distance to per-sample m with scale c (c > 0 except for ``l2``)."""
    try:
        fn = DISTANCES[name]
    except KeyError:
        raise ValueError(f"distance must be one of {sorted(DISTANCES)}, got {name!r}") from None
    if name != "l2" and not c > 0:
        raise ValueError(f"distance {name!r} needs a scale c > 0, got {c}")
    return fn(m, c)
