"""Shard writer for latent datasets (SPEC §1).

Writes WebDataset tar shards ``shard-%06d.tar`` whose samples hold ``latent.npy`` (no
pickles), an optional ``cls`` (ASCII integer) and an optional ``json`` (metadata), and on a
clean close a ``stats.json`` with streaming statistics of exactly the stored values.
Every shard is written under a temporary name and renamed when complete, so a crash never
leaves a half-written ``shard-*.tar``; ``stats.json`` is written last, so a folder without
it is an incomplete dataset and the loader refuses it.
"""

from __future__ import annotations

import glob
import io
import json
import os
import tarfile
import time
from typing import Any, Optional

import numpy as np

from .stats import ALLOWED_DTYPES, STATS_FILE, RunningStats, Stats, write_stats

SHARD_PATTERN = "shard-%06d.tar"
#: Width of the zero-padded sample key (room for 10^10 samples).
KEY_DIGITS = 10


def npy_bytes(array: np.ndarray) -> bytes:
    """Serialise an array as ``.npy`` bytes without pickling."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


class ShardWriter:
    """Write latents into tar shards and accumulate their statistics.

    Use as a context manager::

        with ShardWriter(out_dir, samples_per_shard=1000, vae="path/to/vae", vae_scale=0.18215) as w:
            for latent, cls in items:
                w.write(latent, cls)

    Args:
        out_dir: dataset folder (created if missing).
        samples_per_shard: samples per tar shard.
        vae: name or path of the VAE used to encode (stored in ``stats.json``).
        vae_scale: scale factor applied to the VAE latents (stored in ``stats.json``).
        vae_shift: shift subtracted before scaling (VAEs with a ``shift_factor``), or None.
        dtype: storage dtype, ``"float16"`` or ``"float32"``; ``None`` keeps the input dtype
            (which must then be one of those two). Statistics are computed on the stored,
            already cast values, so normalisation at load time matches the data exactly.
        num_classes: number of classes; ``None`` infers ``max(cls) + 1`` (0 when no sample
            has a class). Either every sample has a class or none does.
        overwrite: remove existing shards/stats in ``out_dir`` first; otherwise a folder that
            already holds a dataset is an error.
        stats_batch: samples buffered between statistic merges (speed only).
    """

    def __init__(
        self,
        out_dir: str,
        *,
        samples_per_shard: int = 1000,
        vae: Optional[str] = None,
        vae_scale: Optional[float] = None,
        vae_shift: Optional[float] = None,
        dtype: Optional[str] = "float16",
        num_classes: Optional[int] = None,
        overwrite: bool = False,
        stats_batch: int = 256,
        class_names: Optional[list] = None,
    ):
        if samples_per_shard <= 0:
            raise ValueError(f"samples_per_shard must be > 0, got {samples_per_shard}")
        if dtype is not None and dtype not in ALLOWED_DTYPES:
            raise ValueError(f"dtype must be one of {ALLOWED_DTYPES} or None, got {dtype!r}")
        if num_classes is not None and num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        self.class_names = None if class_names is None else [str(c) for c in class_names]
        self.out_dir = os.path.abspath(out_dir)
        self.samples_per_shard = int(samples_per_shard)
        self.vae = vae
        self.vae_scale = vae_scale
        self.vae_shift = vae_shift
        self.dtype = dtype
        self.num_classes = num_classes
        self.stats_batch = max(1, int(stats_batch))
        os.makedirs(self.out_dir, exist_ok=True)
        existing = sorted(glob.glob(os.path.join(self.out_dir, "shard-*.tar")))
        stats_path = os.path.join(self.out_dir, STATS_FILE)
        if existing or os.path.exists(stats_path):
            if not overwrite:
                raise FileExistsError(
                    f"{self.out_dir}: already holds a dataset ({len(existing)} shards"
                    f"{', stats.json' if os.path.exists(stats_path) else ''}); pass overwrite=True to replace it"
                )
            for p in existing + ([stats_path] if os.path.exists(stats_path) else []):
                os.remove(p)

        self.count = 0
        self.shard_counts: list[dict[str, Any]] = []
        self._shape: Optional[tuple[int, ...]] = None
        self._stored_dtype: Optional[str] = None
        self._running: Optional[RunningStats] = None
        self._pending: list[np.ndarray] = []
        self._has_cls: Optional[bool] = None
        self._max_cls = -1
        self._tar: Optional[tarfile.TarFile] = None
        self._tar_tmp = ""
        self._tar_final = ""
        self._tar_count = 0
        self._closed = False

    # -- context manager -------------------------------------------------------------
    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    # -- writing ---------------------------------------------------------------------
    def write(self, latent: np.ndarray, cls: Optional[int] = None, meta: Optional[dict] = None) -> str:
        """Append one latent ``[C, H, W]``; returns the sample key."""
        if self._closed:
            raise RuntimeError("ShardWriter: write() after close()")
        arr = np.asarray(latent)
        if arr.ndim != 3:
            raise ValueError(f"latent must have shape [C, H, W], got {list(arr.shape)}")
        if self._shape is None:
            self._shape = tuple(arr.shape)
            self._running = RunningStats(self._shape)
        elif tuple(arr.shape) != self._shape:
            raise ValueError(f"latent shape {list(arr.shape)} differs from the first sample's {list(self._shape)}")
        target = self.dtype or arr.dtype.name
        if target not in ALLOWED_DTYPES:
            raise ValueError(f"latent dtype {arr.dtype} not storable; pass dtype='float16' or 'float32'")
        stored = arr.astype(target, copy=False)
        if self._stored_dtype is None:
            self._stored_dtype = target
        if not np.all(np.isfinite(stored)):
            raise ValueError(f"sample {self.count}: latent contains NaN/Inf (after cast to {target})")
        has_cls = cls is not None
        if self._has_cls is None:
            self._has_cls = has_cls
        elif self._has_cls != has_cls:
            raise ValueError(
                f"sample {self.count}: {'has' if has_cls else 'lacks'} a class id but earlier samples "
                f"{'did not' if has_cls else 'did'}; either every sample has a class or none does"
            )
        if has_cls:
            if isinstance(cls, bool) or int(cls) != cls or int(cls) < 0:
                raise ValueError(f"sample {self.count}: class id must be an integer >= 0, got {cls!r}")
            cls = int(cls)
            if self.num_classes is not None and cls >= self.num_classes:
                raise ValueError(f"sample {self.count}: class id {cls} >= num_classes {self.num_classes}")
            self._max_cls = max(self._max_cls, cls)

        key = f"{self.count:0{KEY_DIGITS}d}"
        files = [("latent.npy", npy_bytes(stored))]
        if has_cls:
            files.append(("cls", str(cls).encode("ascii")))
        if meta is not None:
            files.append(("json", json.dumps(meta, sort_keys=True).encode("utf-8")))
        tar = self._current_tar()
        mtime = time.time()
        for suffix, data in files:
            info = tarfile.TarInfo(f"{key}.{suffix}")
            info.size = len(data)
            info.mtime = mtime
            tar.addfile(info, io.BytesIO(data))
        self._tar_count += 1
        self.count += 1
        self._pending.append(stored)
        if len(self._pending) >= self.stats_batch:
            self._flush_stats()
        if self._tar_count >= self.samples_per_shard:
            self._finish_tar()
        return key

    def _current_tar(self) -> tarfile.TarFile:
        if self._tar is None:
            index = len(self.shard_counts)
            self._tar_final = os.path.join(self.out_dir, SHARD_PATTERN % index)
            self._tar_tmp = self._tar_final + f".tmp-{os.getpid()}"
            self._tar = tarfile.open(self._tar_tmp, "w", format=tarfile.USTAR_FORMAT)
            self._tar_count = 0
        return self._tar

    def _finish_tar(self) -> None:
        assert self._tar is not None
        self._tar.close()
        os.replace(self._tar_tmp, self._tar_final)
        self.shard_counts.append({"name": os.path.basename(self._tar_final), "count": self._tar_count})
        self._tar = None

    def _flush_stats(self) -> None:
        if self._pending:
            assert self._running is not None
            self._running.update(np.stack(self._pending))
            self._pending = []

    # -- closing ---------------------------------------------------------------------
    def close(self) -> Stats:
        """Finish the last shard and write ``stats.json``; returns the statistics."""
        if self._closed:
            raise RuntimeError("ShardWriter: close() called twice")
        if self.count == 0:
            self.abort()
            raise ValueError(f"{self.out_dir}: no samples were written")
        if self._tar is not None:
            self._finish_tar()
        self._flush_stats()
        self._closed = True
        running = self._running
        assert running is not None and self._shape is not None and self._stored_dtype is not None
        if self.num_classes is not None:
            num_classes = self.num_classes
        else:
            num_classes = self._max_cls + 1 if self._has_cls else 0
        stats = Stats(
            count=self.count,
            shape=(self._shape[0], self._shape[1], self._shape[2]),
            dtype=self._stored_dtype,
            mean=running.mean_channel,
            std=running.std_channel,
            mean_element=running.mean_element,
            std_element=running.std_element,
            vae=self.vae,
            vae_scale=self.vae_scale,
            num_classes=num_classes,
            vae_shift=self.vae_shift,
            shards=self.shard_counts,
            class_names=self.class_names if self.class_names and len(self.class_names) == num_classes else None,
        )
        stats.path = write_stats(stats, self.out_dir)
        return stats

    def abort(self) -> None:
        """Drop the shard in progress (completed shards stay; no ``stats.json`` is written)."""
        if self._tar is not None:
            try:
                self._tar.close()
            finally:
                if os.path.exists(self._tar_tmp):
                    os.remove(self._tar_tmp)
                self._tar = None
        self._closed = True
