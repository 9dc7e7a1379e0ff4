"""Glue between ``config.DataConfig`` and the loader: an empty path means the embedded
synthetic dataset (written once into the cache, see :mod:`lct_fast.data.synthetic`)."""

from __future__ import annotations

from typing import Any, Optional

from .reader import LatentLoader
from .synthetic import ensure_synthetic


def resolve_dataset(data_cfg: Any, root: Optional[str] = None) -> str:
    """Dataset folder for a ``DataConfig``-like object: ``path``, or the synthetic default."""
    path = getattr(data_cfg, "path", "") or ""
    if path:
        return path
    return ensure_synthetic(getattr(data_cfg, "synthetic", None), root)


def loader_from_config(
    data_cfg: Any,
    *,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    sigma_data: float = 0.5,
    start_sample: int = 0,
    cache_root: Optional[str] = None,
) -> LatentLoader:
    """Build the training loader from a ``DataConfig`` (fields: path, normalize,
    shuffle_buffer, num_workers, resample, synthetic); missing fields take defaults."""
    return LatentLoader(
        resolve_dataset(data_cfg, cache_root),
        batch_size=batch_size,
        rank=rank,
        world_size=world_size,
        seed=seed,
        sigma_data=sigma_data,
        normalize=getattr(data_cfg, "normalize", "channel"),
        shuffle_buffer=getattr(data_cfg, "shuffle_buffer", 1000),
        num_workers=getattr(data_cfg, "num_workers", 0),
        resample=getattr(data_cfg, "resample", True),
        start_sample=start_sample,
    )
