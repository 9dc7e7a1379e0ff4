"""Latent dataset layer: shard writer, statistics, webdataset reader, synthetic default data.

Public API::

    ShardWriter(out_dir, *, samples_per_shard, vae, vae_scale, dtype, num_classes, overwrite)
    load_stats(path) -> Stats            RunningStats(shape)
    build_loader(data_cfg, *, batch_size, rank, world_size, seed, sigma_data, start_sample, ...) -> LatentSource
    LatentSource (the reader protocol)   READERS / register_reader(name, factory)
    LatentLoader(path, *, batch_size, rank, world_size, seed, ...)  (data.reader=webdataset)
    DaliLoader (lct_fast.data.dali_reader, data.reader=dali; needs nvidia-dali)
    LatentNormalizer(stats, mode, sigma_data)   DataErrors
    ensure_synthetic(cfg=None, root=None, **overrides) -> path      resolve_dataset(data_cfg, root=None) -> path
"""

from .loader import READERS, LatentSource, build_loader, register_reader, resolve_dataset
from .reader import DataErrors, LatentLoader, LatentNormalizer, derive_seed, list_shards
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
    "build_loader",
    "LatentSource",
    "READERS",
    "register_reader",
    "npy_bytes",
    "resolve_dataset",
    "write_stats",
    "write_synthetic",
]
