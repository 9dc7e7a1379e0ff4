"""Latent dataset layer: shard writer, statistics, webdataset reader, synthetic default data.

Public API::

    ShardWriter(out_dir, *, samples_per_shard, vae, vae_scale, dtype, num_classes, overwrite)
    load_stats(path) -> Stats            RunningStats(shape)
    LatentLoader(path, *, batch_size, rank, world_size, seed, sigma_data, normalize,
                 shuffle_buffer, num_workers, resample, start_sample, ...)   make_loader(path, **kw)
    LatentNormalizer(stats, mode, sigma_data)   DataErrors
    ensure_synthetic(cfg=None, root=None, **overrides) -> path
    resolve_dataset(data_cfg, root=None) -> path      loader_from_config(data_cfg, *, batch_size, ...)
"""

from .config_glue import loader_from_config, resolve_dataset
from .reader import DataErrors, LatentLoader, LatentNormalizer, derive_seed, list_shards, make_loader
from .stats import STATS_FILE, RunningStats, Stats, StatsError, load_stats, write_stats
from .synthetic import SyntheticSpec, default_cache_root, ensure_synthetic, generate, write_synthetic
from .writer import SHARD_PATTERN, ShardWriter, npy_bytes

__all__ = [
    "DataErrors",
    "LatentLoader",
    "LatentNormalizer",
    "RunningStats",
    "SHARD_PATTERN",
    "STATS_FILE",
    "ShardWriter",
    "Stats",
    "StatsError",
    "SyntheticSpec",
    "default_cache_root",
    "derive_seed",
    "ensure_synthetic",
    "generate",
    "list_shards",
    "load_stats",
    "loader_from_config",
    "make_loader",
    "npy_bytes",
    "resolve_dataset",
    "write_stats",
    "write_synthetic",
]
