"""NVIDIA DALI reader of latent shards (``data.reader=dali``): ``fn.readers.webdataset`` + ``fn.decoders.numpy``.

The same shards, statistics and normalisation as the WebDataset reader (:mod:`lct_fast.data.reader`), the
same loader contract (:class:`lct_fast.data.loader.LatentSource`):

* **Validation first.** DALI stops the pipeline on a truncated tar or an unreadable member, so every shard
  is checked before DALI sees it (:func:`validate_shard`: the tar reads to its end, every ``.npy`` header
  has the dataset's shape and a storable dtype, every sample has its ``.cls`` when the dataset is labelled).
  A shard that fails is left out and counted (``errors``: one shard error, its samples as skipped), whatever
  DALI itself would report. DALI reads whole shards, so one bad sample costs its shard.
* **Sharding.** Rank ``r`` of ``W`` reads DALI's shard ``r`` of ``W`` (a contiguous range of the samples of
  the valid shards, ``shard_id``/``num_shards``); ``num_workers`` is the pipeline's CPU thread count.
* **Shuffling** with DALI's reader buffer (``initial_fill = data.shuffle_buffer``; 0 or 1 reads in order),
  seeded from (seed, rank, epoch) like the WebDataset reader's streams. The stream is infinite: at each epoch
  end DALI's reader moves on (to the next shard of the split, ``stick_to_shard=False``), continuing the same
  seeded sequence. Every rank validates the shard list itself: ranks must see the same files.
* **Exact resume by replay.** A DALI reader cannot seek, so a stream built with ``start_sample = k`` runs the
  same seeded pipeline and discards its first ``k / batch_size`` batches: it then yields exactly what an
  uninterrupted stream yields after ``k`` samples (``tests/test_data_dali.py``), at the cost of reading the
  skipped samples again (about ``k / (latents/s)`` seconds at resume).
* **Device.** ``dali_device="gpu"`` (``data.dali_device``) with a CUDA ``device``: DALI's GPU pipeline (decoded
  on the CPU, moved by DALI), the batch handed to torch on that GPU; by default the CPU pipeline, whose batches
  the trainer moves. Normalisation runs in torch on the batch's device (the
  reader's :class:`~lct_fast.data.reader.LatentNormalizer`). The GPU pipeline is untested here: the DALI
  wheel (~199 MB) is more than a device session can carry; the CPU pipeline is what CI runs.
"""
from __future__ import annotations

import os
import tarfile
from typing import Any, Iterator, Optional, Tuple

import numpy as np
import torch

from .reader import DataErrors, LatentNormalizer, list_shards
from .stats import load_stats
from ..seeding import derive_seed

__all__ = ["DaliLoader", "dali_available", "validate_shard"]

_DTYPES = ("<f2", "<f4", "|f2", "|f4", "float16", "float32")


def dali_available() -> Tuple[bool, str]:
    """(True, "") when ``nvidia.dali`` imports, else (False, why)."""
    try:
        import nvidia.dali  # noqa: F401
    except Exception as e:  # noqa: BLE001 -- any import failure means "not usable here"
        return False, f"nvidia-dali is not importable ({type(e).__name__}: {e}); pip install nvidia-dali-cuda130"
    return True, ""


def validate_shard(path: str, shape: Tuple[int, ...], labelled: bool, num_classes: int = 0
                   ) -> Tuple[int, Optional[str]]:
    """(samples, None) when the shard is complete and every sample readable -- a latent.npy of the dataset's
    shape and dtype, and in a labelled set a .cls holding an ASCII integer in [0, num_classes) -- else
    (samples seen, why). Keys with other members but no latent.npy fail too (DALI stops on them)."""
    samples, keys_cls, keys_npy, keys_all = 0, set(), set(), set()
    try:
        with tarfile.open(path, "r:") as tar:
            for m in tar:  # reads every header: a truncated file ends in ReadError/EOFError
                if not m.isfile():
                    continue
                key, _, ext = m.name.partition(".")
                if key.startswith("."):  # DALI skips dot-files
                    continue
                keys_all.add(key)
                if ext == "latent.npy":
                    f = tar.extractfile(m)
                    version = np.lib.format.read_magic(f)
                    read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                            else np.lib.format.read_array_header_2_0)
                    arr_shape, _, dtype = read(f)
                    if tuple(arr_shape) != tuple(shape) or dtype.str not in _DTYPES:
                        return samples, (f"{m.name}: shape {tuple(arr_shape)} dtype {dtype.str}, expected "
                                         f"{tuple(shape)} float16/float32")
                    if f.tell() + int(np.prod(arr_shape)) * dtype.itemsize != m.size:
                        return samples, f"{m.name}: {m.size} bytes do not match its header"
                    keys_npy.add(key)
                    samples += 1
                elif ext == "cls":
                    text = tar.extractfile(m).read(32)
                    try:
                        cls = int(text.decode("ascii").strip())
                    except (UnicodeDecodeError, ValueError):
                        return samples, f"{m.name}: class id {text[:16]!r} is not an ASCII integer"
                    if labelled and not 0 <= cls < max(num_classes, 1):
                        return samples, f"{m.name}: class id {cls} outside [0, {num_classes})"
                    keys_cls.add(key)
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        return samples, f"unreadable tar ({type(e).__name__}: {e})"
    if keys_all - keys_npy:
        return samples, f"{len(keys_all - keys_npy)} sample keys without a latent.npy (e.g. {sorted(keys_all - keys_npy)[0]})"
    if labelled and keys_npy - keys_cls:
        return samples, f"{len(keys_npy - keys_cls)} samples without a class id"
    return samples, None


def _truncated(path: str) -> Optional[str]:
    """A tar whose size is not a whole number of 512-byte blocks, or that lacks its end marker, is cut short."""
    size = os.path.getsize(path)
    if size % 512:
        return f"{size} bytes is not a whole number of tar blocks (truncated)"
    with open(path, "rb") as f:
        f.seek(max(0, size - 1024))
        tail = f.read()
    if len(tail) < 1024 or any(tail):
        return "no end-of-archive marker (truncated)"
    return None


class DaliLoader:
    """Iterable of ``(x0 float32 [B,C,H,W], labels int64 [B])`` from latent shards through a DALI pipeline.

    Arguments as :class:`lct_fast.data.reader.LatentLoader` (``num_workers`` = DALI threads, ``resample`` is
    implied: the stream is infinite), plus ``device`` (CUDA: the GPU pipeline)."""

    def __init__(self, path: str, *, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 sigma_data: float = 0.5, normalize: str = "channel", shuffle_buffer: int = 1000,
                 num_workers: int = 0, resample: bool = True, start_sample: int = 0, epoch: int = 0,
                 device: Optional[torch.device] = None, dali_device: str = "cpu", prefetch: int = 2,
                 stats: Any = None) -> None:
        ok, why = dali_available()
        if not ok:
            raise ImportError(f"data.reader=dali: {why}")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {batch_size}")
        if world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if start_sample < 0 or start_sample % batch_size:
            raise ValueError(f"start_sample must be a multiple of batch_size={batch_size} and >= 0, got {start_sample}")
        if not resample:
            raise ValueError("data.reader=dali streams without end (resample=true); use the webdataset reader "
                             "for one-epoch mode")
        self.path = os.path.abspath(path)
        if not os.path.isdir(self.path):
            raise FileNotFoundError(f"latent dataset folder not found: {self.path}")
        self.stats = stats if stats is not None else load_stats(self.path)  # the caller's, when it has read them
        self.normalizer = LatentNormalizer(self.stats, normalize, sigma_data)
        self.batch_size, self.rank, self.world_size = int(batch_size), int(rank), int(world_size)
        self.seed, self.epoch = int(seed), int(epoch)
        self.shuffle_buffer = int(shuffle_buffer)
        self.threads = max(1, int(num_workers))
        self.start_sample = int(start_sample)
        self.samples_yielded = self.start_sample
        if dali_device not in ("cpu", "gpu"):
            raise ValueError(f"data.dali_device must be cpu | gpu, got {dali_device!r}")
        self.device = torch.device(device) if device is not None and dali_device == "gpu" else torch.device("cpu")
        self.prefetch = int(prefetch)
        self._errors = DataErrors()
        self.shards = []
        labelled = self.stats.num_classes > 0
        present = {os.path.basename(s): s for s in list_shards(self.path)}
        counts = {e["name"]: int(e["count"]) for e in self.stats.shards}
        for entry in self.stats.shards:
            if entry["name"] not in present:
                self._errors.add("shard", "missing_shard", f"{entry['name']} is listed in stats.json but absent")
        for shard in present.values():
            n, why = validate_shard(shard, self.stats.shape, labelled, self.stats.num_classes)
            why = why or _truncated(shard)  # a cut inside the last member's data or the end marker
            if why is None:
                self.shards.append(shard)
                continue
            self._errors.add("shard", "invalid_shard", f"{os.path.basename(shard)}: {why}")
            self._errors.skipped_samples += counts.get(os.path.basename(shard), n)  # the whole shard is lost
        if not self.shards:
            raise ValueError(f"{self.path}: no readable shard for the DALI reader ({self._errors.summary()})")
        self.labelled = labelled

    # -- contract ----------------------------------------------------------------------
    @property
    def errors(self) -> DataErrors:
        return self._errors

    def report(self) -> str:
        return f"{self.path}: {self._errors.summary()}"

    @property
    def num_classes(self) -> int:
        return self.stats.num_classes

    @property
    def shape(self) -> Tuple[int, int, int]:
        return self.stats.shape

    # -- pipeline ----------------------------------------------------------------------
    def _pipeline(self):
        from nvidia.dali import fn, pipeline_def

        gpu = self.device.type == "cuda"
        shuffle = self.shuffle_buffer > 1
        ext = ["latent.npy", "cls"] if self.labelled else ["latent.npy"]
        # DALI seeds are 32-bit; (seed, rank, epoch) as the WebDataset reader derives its streams' seeds
        dali_seed = derive_seed(self.seed, "dali", self.rank, self.epoch) % (2 ** 31)

        @pipeline_def(batch_size=self.batch_size, num_threads=self.threads,
                      device_id=(self.device.index or 0) if gpu else None, seed=dali_seed,
                      prefetch_queue_depth=self.prefetch)
        def pipe():
            outs = fn.readers.webdataset(paths=self.shards, ext=ext, random_shuffle=shuffle,
                                         initial_fill=max(self.shuffle_buffer, 1), shard_id=self.rank,
                                         num_shards=self.world_size, missing_component_behavior="error",
                                         name="latents")
            outs = outs if isinstance(outs, (list, tuple)) else [outs]
            x = fn.decoders.numpy(outs[0])
            if gpu:
                x = x.gpu()
            return (x, outs[1]) if self.labelled else (x,)

        p = pipe()
        p.build()
        return p

    def _to_torch(self, out) -> Tuple[torch.Tensor, torch.Tensor]:
        x = out[0]
        if self.device.type == "cuda":
            from nvidia.dali.plugin.pytorch import feed_ndarray

            t = x.as_tensor()
            from nvidia.dali.plugin.pytorch import to_torch_type

            lat = torch.empty(t.shape(), dtype=to_torch_type[t.dtype], device=self.device)
            feed_ndarray(t, lat, cuda_stream=torch.cuda.current_stream(self.device))
            torch.cuda.current_stream(self.device).synchronize()  # the next run() may reuse DALI's buffer
        else:
            lat = torch.from_numpy(np.ascontiguousarray(x.as_array()))
        if self.labelled:
            labels = torch.tensor([int(bytes(np.asarray(out[1][i])).decode("ascii")) for i in range(len(out[1]))],
                                  dtype=torch.int64)
        else:
            labels = torch.zeros(lat.shape[0], dtype=torch.int64)
        labels = labels.to(lat.device)
        # Finiteness is checked per batch (validation reads headers only): a non-finite latent is dropped and
        # counted, as the WebDataset reader skips it; the batch is then that much smaller.
        ok = torch.isfinite(lat.flatten(1)).all(dim=1)
        if not bool(ok.all()):
            for _ in range(int((~ok).sum())):
                self._errors.add("sample", "non_finite", "a latent with NaN/Inf values (dropped from its batch)")
            lat, labels = lat[ok], labels[ok]
        return self.normalizer.normalize(lat), labels

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        pipe = self._pipeline()
        for _ in range(self.start_sample // self.batch_size):  # replay up to the resume point
            pipe.run()
        self.samples_yielded = self.start_sample
        try:
            while True:
                x0, labels = self._to_torch(pipe.run())
                self.samples_yielded += int(labels.shape[0])
                yield x0, labels
        finally:
            del pipe

    def __repr__(self) -> str:
        return (f"DaliLoader({self.path!r}, {len(self.shards)} shards, batch {self.batch_size}, rank {self.rank}/"
                f"{self.world_size}, {self.device.type})")
