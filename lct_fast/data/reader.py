"""WebDataset reader for latent shards (SPEC §1).

Pipeline per (rank, worker), built from webdataset pieces::

    shard list (SimpleShardList, seeded order | ResampledShards, seeded draws)
      -> explicit split by rank, then by worker (no torch.distributed state is read)
      -> tarfile_to_samples(handler=count-and-continue)
      -> decode: latent.npy with allow_pickle=False, cls, validation (skip + count bad samples)
      -> seeded shuffle buffer -> skip (resume) -> batched(collate: normalise, to torch)

Modes
-----
* ``resample=True`` (training): an infinite stream. Each worker draws shards *with
  replacement* from its own subset of shards (rank subset, then worker subset; a smaller
  pool is shared when there are fewer shards than ranks × workers) in *rounds* of
  ``round_shards`` shards; each round is shuffled through a seeded buffer. Every seed
  derives from ``(seed, rank, worker, round)``.
* ``resample=False`` (evaluation / one epoch): every shard is read exactly once per epoch,
  split over ranks and workers (shard order permuted with ``(seed, epoch)``, unless
  ``shuffle_buffer <= 1``, which reads shards in name order without shuffling), so the union
  over all ranks and workers holds every intact sample exactly once. The last batch of each
  worker may be partial.

Batches are ``(x0, labels)``: ``x0`` float32 ``[B, C, H, W]`` = (latent − mean)/std·σ_d with
per-channel or per-element statistics from ``stats.json``; ``labels`` int64 ``[B]`` holds the
class ids. For an unconditional dataset (``num_classes == 0``) every label is ``0`` ==
``num_classes``, i.e. the model's null class id (project convention: id ``num_classes`` is
the null class).

Resume
------
``start_sample`` is the number of samples *this rank* already consumed (a multiple of the
batch size). With ``W`` workers, DataLoader delivers batches round-robin (batch ``j`` comes
from worker ``j mod W``), so after ``n = start_sample / B`` batches worker ``w`` has produced
``len(range(w, n, W))`` of them. On resume every worker skips exactly its own share, and
physical worker ``p`` plays the role of logical worker ``(p + n) mod W`` so that the first
batch the new DataLoader delivers is batch ``n`` of the uninterrupted run. In resample mode
whole rounds are skipped without reading them when ``stats.json`` lists per-shard counts
(files written by ``ShardWriter`` do), so resuming late in a long run is cheap. Resume is
exact when the skipped part of the data was intact; a corrupt sample skipped before the
resume point shifts the stream by that many samples. In one-epoch mode resume is supported
with ``num_workers <= 1`` (workers exhaust at different times, which breaks the round-robin
arithmetic).

One-epoch mode across a change of world size (``epoch_history``)
-------------------------------------------------------------------
The epoch's split over ranks is fixed when it starts, so a resume on another number of ranks
re-splits what is left of it, sample by sample. ``epoch_history`` lists the earlier layouts of
the epoch as ``(world_size, samples_per_rank)`` pairs, oldest first: ``N_0`` ranks each took
``s_0`` samples of their streams, then ``N_1`` ranks each took ``s_1`` of theirs, and so on;
the loader's own ``(rank, world_size)`` is the layout after the last pair. The stream of rank
``j`` of layout ``k >= 1`` is::

    rest_k     = stream(0 of N_{k-1})[s_{k-1}:] ++ ... ++ stream(N_{k-1}-1 of N_{k-1})[s_{k-1}:]
    stream(j)  = rest_k[j :: N_k]

and layout 0 is the ordinary one-epoch split. Every sample the old ranks had not consumed goes
to exactly one new rank and none they consumed comes back, because the old streams are
replayed from their seeds (the ledger of consumed keys is implicit in them). The cost is
reading: each new rank replays every old rank's stream of the epoch once at start-up.
Errors met while replaying are counted in this loader's ``errors`` too.

Corrupt data
------------
A truncated or unreadable shard, a sample without ``latent.npy``, a bad or pickled
``.npy``, a wrong dtype/shape, non-finite values or a bad class id are skipped, counted by
reason in ``loader.errors`` and logged (``logging`` logger ``lct_fast.data``, first few per
reason); they never stop the run. A missing folder or ``stats.json`` raises immediately.
"""

from __future__ import annotations

import glob
import io
import itertools
import logging
import os
import random
import tarfile
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch
import webdataset as wds

from ..seeding import derive_seed
from .stats import Stats, StatsError, load_stats

log = logging.getLogger("lct_fast.data")

_LOG_FIRST = 3  # log the first few occurrences of each reason per worker


# --------------------------------------------------------------------------------------
# error accounting
# --------------------------------------------------------------------------------------
@dataclass
class DataErrors:
    """Counts of skipped samples / shard errors, by reason, with a few example messages."""

    skipped_samples: int = 0
    shard_errors: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)
    max_examples: int = 20

    def add(self, kind: str, reason: str, message: str) -> None:
        if kind == "sample":
            self.skipped_samples += 1
        else:
            self.shard_errors += 1
        n = self.reasons.get(reason, 0) + 1
        self.reasons[reason] = n
        if len(self.examples) < self.max_examples:
            self.examples.append(f"{reason}: {message}")
        if n <= _LOG_FIRST:
            log.warning("lct_fast.data: skipped %s (%s): %s", kind, reason, message)

    @property
    def total(self) -> int:
        return self.skipped_samples + self.shard_errors

    def copy(self) -> "DataErrors":
        return DataErrors(self.skipped_samples, self.shard_errors, dict(self.reasons), list(self.examples))

    @classmethod
    def merge(cls, parts: Sequence["DataErrors"]) -> "DataErrors":
        out = cls()
        for p in parts:
            out.skipped_samples += p.skipped_samples
            out.shard_errors += p.shard_errors
            for k, v in p.reasons.items():
                out.reasons[k] = out.reasons.get(k, 0) + v
            out.examples.extend(p.examples[: max(0, out.max_examples - len(out.examples))])
        return out

    def summary(self) -> str:
        if self.total == 0:
            return "no data errors"
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.reasons.items()))
        return f"skipped {self.skipped_samples} samples and {self.shard_errors} shard errors ({reasons})"


class _SampleError(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def _tar_reason(exn: BaseException) -> str:
    if isinstance(exn, FileNotFoundError):
        return "missing_shard"
    if isinstance(exn, (tarfile.TarError, EOFError)):
        return "corrupt_tar"
    return f"tar_{type(exn).__name__}"


def _exn_url(exn: BaseException) -> str:
    urls = [a for a in getattr(exn, "args", ()) if isinstance(a, str) and ".tar" in a]
    return urls[-1] if urls else "?"


# --------------------------------------------------------------------------------------
# normalisation
# --------------------------------------------------------------------------------------
class LatentNormalizer:
    """``x0 = (latent − mean) / std · σ_d`` and its inverse (SPEC §1).

    ``mode``: ``"channel"`` (per-channel stats), ``"element"`` (per-element stats, as in the
    paper's code) or ``"none"`` (identity: raw latents as float32). A zero std (a constant
    channel/element) is treated as 1 so the map stays invertible.
    """

    def __init__(self, stats: Stats, mode: str = "channel", sigma_data: float = 0.5):
        c = stats.shape[0]
        if mode == "channel":
            mean = stats.mean.reshape(c, 1, 1)
            std = stats.std.reshape(c, 1, 1)
        elif mode == "element":
            if stats.mean_element is None or stats.std_element is None:
                raise StatsError(
                    f"{stats.path}: key 'mean_element': normalize='element' needs per-element statistics "
                    f"(mean_element/std_element), which this stats.json lacks"
                )
            mean, std = stats.mean_element, stats.std_element
        elif mode == "none":
            mean = np.zeros((c, 1, 1))
            std = np.full((c, 1, 1), float(sigma_data))
        else:
            raise ValueError(f"normalize must be 'channel', 'element' or 'none', got {mode!r}")
        if not sigma_data > 0:
            raise ValueError(f"sigma_data must be > 0, got {sigma_data}")
        std = np.where(std > 0, std, 1.0)
        self.mode = mode
        self.sigma_data = float(sigma_data)
        self.mean = np.asarray(mean, np.float32)
        self.scale = np.asarray(sigma_data / std, np.float32)  # multiplies (latent - mean)
        self.inv_scale = np.asarray(std / sigma_data, np.float32)
        self._torch: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def normalize_np(self, latent: np.ndarray) -> np.ndarray:
        return ((np.asarray(latent, np.float32) - self.mean) * self.scale).astype(np.float32, copy=False)

    def _params(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        key = (like.device.type, like.device.index)
        if key not in self._torch:
            self._torch[key] = tuple(torch.from_numpy(a).to(like.device) for a in (self.mean, self.scale, self.inv_scale))
        return self._torch[key]

    def normalize(self, latent: torch.Tensor) -> torch.Tensor:
        """Latents ``[..., C, H, W]`` -> x0 (float32)."""
        mean, scale, _ = self._params(latent)
        return (latent.float() - mean) * scale

    def denormalize(self, x0: torch.Tensor) -> torch.Tensor:
        """x0 ``[..., C, H, W]`` -> latents in the VAE's (scaled) space, float32."""
        mean, _, inv_scale = self._params(x0)
        return x0.float() * inv_scale + mean


# --------------------------------------------------------------------------------------
# pipeline stages
# --------------------------------------------------------------------------------------
def _split(index: int, count: int) -> Callable[[Iterator[Any]], Iterator[Any]]:
    """Explicit split_by_node / split_by_worker: keep every ``count``-th item from ``index``."""

    def stage(src: Iterator[Any]) -> Iterator[Any]:
        return itertools.islice(src, index, None, count)

    return stage


_NPY_MAGIC = b"\x93NUMPY"


class NpyDecoder:
    """Decode ``.npy`` bytes without pickles, caching parsed headers.

    All latents of a dataset share one header, and numpy's header parser (``ast``-based)
    costs more than copying a 4×32×32 array, so the header is parsed once with numpy's own
    safe parser and later samples with the same header bytes skip straight to
    ``frombuffer``. Object dtypes are refused (``allow_pickle=False``).
    """

    def __init__(self) -> None:
        self._headers: dict[bytes, tuple[np.dtype, tuple[int, ...], bool, int]] = {}

    def __call__(self, data: bytes) -> np.ndarray:
        if len(data) < 10 or data[:6] != _NPY_MAGIC:
            raise ValueError("not an .npy file (bad magic)")
        major = data[6]
        hlen_size = 2 if major == 1 else 4
        if major not in (1, 2, 3):
            raise ValueError(f"unsupported .npy version {major}")
        hlen = int.from_bytes(data[8 : 8 + hlen_size], "little")
        end = 8 + hlen_size + hlen
        header = data[:end]
        parsed = self._headers.get(header)
        if parsed is None:
            if major == 3:  # utf-8 header: rare, let numpy do the whole thing
                return np.lib.format.read_array(io.BytesIO(data), allow_pickle=False)
            fp = io.BytesIO(header)
            np.lib.format.read_magic(fp)
            read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read_header(fp)  # numpy's safe (literal_eval) header parser
            if dtype.hasobject:
                raise ValueError("object arrays need pickle; refused (allow_pickle=False)")
            parsed = (dtype, tuple(shape), bool(fortran), int(np.prod(shape, dtype=np.int64)))
            if len(self._headers) < 64:
                self._headers[header] = parsed
        dtype, shape, fortran, count = parsed
        if len(data) - end != count * dtype.itemsize:
            raise ValueError(f"array data is {len(data) - end} bytes, expected {count * dtype.itemsize} for {dtype} {list(shape)}")
        arr = np.frombuffer(data, dtype=dtype, count=count, offset=end)
        return arr.reshape(shape[::-1]).transpose() if fortran else arr.reshape(shape)


def _decode_stage(shape: tuple[int, ...], num_classes: int, errors: DataErrors):
    """Decode and validate raw samples into ``(latent ndarray, label int)``."""

    read_npy = NpyDecoder()

    def decode_one(sample: dict[str, Any]) -> tuple[np.ndarray, int]:
        if "latent.npy" not in sample:
            raise _SampleError("missing_latent", f"no latent.npy (files: {sorted(k for k in sample if not k.startswith('__'))})")
        try:
            arr = read_npy(sample["latent.npy"])
        except Exception as exc:  # bad magic, truncated data, object dtype (pickle) ...
            raise _SampleError("bad_npy", f"{type(exc).__name__}: {exc}") from None
        if arr.dtype not in (np.float16, np.float32):
            raise _SampleError("bad_dtype", f"dtype {arr.dtype}, expected float16 or float32")
        if tuple(arr.shape) != shape:
            raise _SampleError("bad_shape", f"shape {list(arr.shape)}, expected {list(shape)}")
        if not np.all(np.isfinite(arr)):
            raise _SampleError("non_finite", "latent contains NaN/Inf")
        if num_classes == 0:
            return arr, 0  # unconditional: label = num_classes = null class id
        if "cls" not in sample:
            raise _SampleError("missing_cls", f"no cls in a dataset with num_classes={num_classes}")
        try:
            label = int(sample["cls"].decode("ascii").strip())
        except (UnicodeDecodeError, ValueError):
            raise _SampleError("bad_cls", f"cls {sample['cls'][:20]!r} is not an ASCII integer") from None
        if not 0 <= label < num_classes:
            raise _SampleError("bad_cls", f"class id {label} outside [0, {num_classes})")
        return arr, label

    def stage(src: Iterator[dict[str, Any]]) -> Iterator[tuple[np.ndarray, int]]:
        for sample in src:
            try:
                yield decode_one(sample)
            except _SampleError as exc:
                errors.add("sample", exc.reason, f"{sample.get('__url__', '?')} key {sample.get('__key__', '?')}: {exc}")

    return stage


def _tar_handler(errors: DataErrors) -> Callable[[BaseException], bool]:
    def handler(exn: BaseException) -> bool:
        first = exn.args[0] if getattr(exn, "args", None) else exn
        errors.add("shard", _tar_reason(exn), f"{_exn_url(exn)}: {type(exn).__name__}: {first}")
        return True  # continue with the next file / shard

    return handler


def _shuffle_stage(bufsize: int, seed: int):
    if bufsize <= 1:
        return None
    return wds.shuffle(bufsize, initial=bufsize, rng=random.Random(seed))


# --------------------------------------------------------------------------------------
# per-worker stream
# --------------------------------------------------------------------------------------
@dataclass
class _Plan:
    shards: list[str]
    counts: dict[str, int]
    shape: tuple[int, int, int]
    num_classes: int
    normalizer: LatentNormalizer
    batch_size: int
    rank: int
    world_size: int
    num_workers: int
    seed: int
    epoch: int
    shuffle_buffer: int
    resample: bool
    round_shards: int
    start_batches: int
    max_empty_rounds: int
    history: tuple[tuple[int, int], ...] = ()


class _ShardStream(torch.utils.data.IterableDataset):
    """The batches of one (rank, logical worker); also used in-process when num_workers=0.

    Yields ``(x0, labels, errors_or_None)``; ``errors`` is a snapshot of this worker's error
    counts whenever they changed, and a final ``(None, None, errors)`` is yielded at the end
    of a finite stream so that errors after the last batch reach the main process.
    """

    def __init__(self, plan: _Plan):
        super().__init__()
        self.plan = plan

    def _worker(self) -> tuple[int, int]:
        info = torch.utils.data.get_worker_info()
        phys, n = (info.id, info.num_workers) if info is not None else (0, 1)
        nw = max(1, self.plan.num_workers)
        if n != nw:
            raise RuntimeError(f"_ShardStream: expected {nw} workers, DataLoader runs {n}")
        # Rotation so that the first batch delivered is batch `start_batches` of the full run.
        return (phys + self.plan.start_batches) % nw, nw

    def _pool(self, logical: int, nw: int) -> list[str]:
        p = self.plan
        per_rank = p.shards[p.rank :: p.world_size] if len(p.shards) >= p.world_size else p.shards
        per_worker = per_rank[logical::nw]
        return per_worker if per_worker else per_rank

    def _resampled(self, logical: int, nw: int, errors: DataErrors, skip: int) -> Iterator[tuple[np.ndarray, int]]:
        p = self.plan
        pool = self._pool(logical, nw)
        k = max(1, p.round_shards)
        empty = 0
        for rnd in itertools.count():
            wseed = derive_seed(p.seed, "shards", p.rank, logical, rnd)
            urls = [d["url"] for d in wds.ResampledShards(pool, nshards=k, worker_seed=lambda: wseed, deterministic=True)]
            if skip > 0 and all(u in p.counts for u in urls):
                n_round = sum(p.counts[u] for u in urls)
                if skip >= n_round:  # skip the whole round without reading it
                    skip -= n_round
                    continue
            round_urls = [dict(url=u) for u in urls]
            src = wds.DataPipeline(
                lambda: iter(round_urls),
                wds.tarfile_to_samples(handler=_tar_handler(errors)),
                _decode_stage(p.shape, p.num_classes, errors),
                _shuffle_stage(p.shuffle_buffer, derive_seed(p.seed, "shuffle", p.rank, logical, rnd)),
            )
            produced = 0
            for item in src:
                produced += 1
                if skip > 0:
                    skip -= 1
                    continue
                yield item
            empty = empty + 1 if produced == 0 else 0
            if empty >= p.max_empty_rounds:
                raise RuntimeError(
                    f"lct_fast.data: rank {p.rank} worker {logical} read {empty} rounds of shards without a "
                    f"single valid sample; the dataset looks unreadable ({errors.summary()})"
                )

    def _epoch_split(self, rank: int, world: int, logical: int, nw: int, errors: DataErrors) -> Iterator[tuple[np.ndarray, int]]:
        """The epoch's ordinary split: rank ``rank`` of ``world``, worker ``logical`` of ``nw``."""
        p = self.plan
        return iter(wds.DataPipeline(
            # shuffle_buffer <= 1 means no shuffling at all: shards in name order (sequential read).
            wds.SimpleShardList(p.shards, seed=derive_seed(p.seed, "epoch", p.epoch) if p.shuffle_buffer > 1 else None),
            _split(rank, world),
            _split(logical, nw),
            wds.tarfile_to_samples(handler=_tar_handler(errors)),
            _decode_stage(p.shape, p.num_classes, errors),
            _shuffle_stage(p.shuffle_buffer, derive_seed(p.seed, "shuffle", rank, logical, p.epoch)),
        ))

    def _layout_stream(self, level: int, rank: int, errors: DataErrors) -> Iterator[tuple[np.ndarray, int]]:
        """Rank ``rank``'s stream in layout ``level`` of the epoch (module docstring: ``epoch_history``)."""
        p = self.plan
        world = p.history[level][0] if level < len(p.history) else p.world_size
        if level == 0:
            return self._epoch_split(rank, world, 0, 1, errors)
        old_world, taken = p.history[level - 1]
        rest = itertools.chain.from_iterable(
            itertools.islice(self._layout_stream(level - 1, r, errors), taken, None) for r in range(old_world))
        return itertools.islice(rest, rank, None, world)

    def _one_epoch(self, logical: int, nw: int, errors: DataErrors, skip: int) -> Iterator[tuple[np.ndarray, int]]:
        p = self.plan
        if p.history:  # num_workers <= 1 here (checked by LatentLoader)
            return itertools.islice(self._layout_stream(len(p.history), p.rank, errors), skip, None)
        return itertools.islice(self._epoch_split(p.rank, p.world_size, logical, nw, errors), skip, None)

    def _collate(self, items: list[tuple[np.ndarray, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        lat = np.stack([it[0] for it in items])
        x0 = torch.from_numpy(self.plan.normalizer.normalize_np(lat))
        labels = torch.tensor([it[1] for it in items], dtype=torch.int64)
        return x0, labels

    def __iter__(self):
        p = self.plan
        logical, nw = self._worker()
        errors = DataErrors()
        skip = len(range(logical, p.start_batches, nw)) * p.batch_size
        if p.resample:
            samples = self._resampled(logical, nw, errors, skip)
        else:
            samples = self._one_epoch(logical, nw, errors, skip)
        sent = 0
        batches = wds.batched(p.batch_size, collation_fn=self._collate, partial=not p.resample)(samples)
        for x0, labels in batches:
            snap = errors.copy() if errors.total != sent else None
            sent = errors.total
            yield x0, labels, (logical, snap)
        yield None, None, (logical, errors.copy())


# --------------------------------------------------------------------------------------
# public loader
# --------------------------------------------------------------------------------------
def list_shards(path: str) -> list[str]:
    """Sorted ``shard-*.tar`` paths of a dataset folder (clear error when there are none)."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"latent dataset folder not found: {path}")
    shards = sorted(glob.glob(os.path.join(path, "shard-*.tar")))
    if not shards:
        raise FileNotFoundError(f"{path}: no shard-*.tar files in the latent dataset folder")
    return shards


class LatentLoader:
    """Iterable of ``(x0 float32 [B,C,H,W], labels int64 [B])`` batches from latent shards.

    See the module docstring for modes, determinism, resume and error handling. Each call
    to ``iter()`` starts again from ``start_sample``; ``samples_yielded`` tracks this rank's
    sample counter (``start_sample`` + samples delivered since), the value to pass as
    ``start_sample`` when resuming. The stream is a function of (dataset, seed, rank,
    world_size, num_workers, batch_size, shuffle_buffer, round_shards, epoch, epoch_history): keep them
    fixed across a resume.
    """

    def __init__(
        self,
        path: str,
        *,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        sigma_data: float = 0.5,
        stats: Optional[Stats] = None,
        normalize: str = "channel",
        shuffle_buffer: int = 1000,
        num_workers: int = 0,
        resample: bool = True,
        start_sample: int = 0,
        epoch: int = 0,
        round_shards: int = 4,
        epoch_history: Sequence[tuple[int, int]] = (),
        pin_memory: bool = False,
        prefetch_factor: int = 4,
        max_empty_rounds: int = 100,
    ):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {batch_size}")
        if world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if start_sample < 0 or start_sample % batch_size:
            raise ValueError(f"start_sample must be a multiple of batch_size={batch_size} and >= 0, got {start_sample}")
        if not resample and num_workers > 1 and start_sample > 0:
            raise ValueError(
                "resume (start_sample > 0) in one-epoch mode (resample=False) needs num_workers <= 1: "
                "workers run out of data at different times, so the delivery order is data dependent"
            )
        history = tuple((int(w), int(n)) for w, n in epoch_history)
        if history and (resample or num_workers > 1):
            raise ValueError(
                f"epoch_history={list(history)}: a re-split epoch needs one-epoch mode (resample=False) and "
                f"num_workers <= 1, got resample={resample}, num_workers={num_workers}")
        if any(w <= 0 or n < 0 for w, n in history):
            raise ValueError(f"epoch_history={list(history)}: expected (world_size > 0, samples_per_rank >= 0) pairs")
        self.path = os.path.abspath(path)
        if not os.path.isdir(self.path):
            raise FileNotFoundError(f"latent dataset folder not found: {self.path}")
        self.stats = stats if stats is not None else load_stats(self.path)  # the caller's, when it has read them
        self.normalizer = LatentNormalizer(self.stats, normalize, sigma_data)
        shards = list_shards(self.path)
        present = {os.path.basename(s) for s in shards}
        self._missing = [s["name"] for s in self.stats.shards if s["name"] not in present]
        counts = {os.path.join(self.path, s["name"]): int(s["count"]) for s in self.stats.shards}
        first_world = history[0][0] if history else world_size  # later layouts split samples, not shards
        if not resample and len(shards) < first_world:
            raise ValueError(
                f"{self.path}: {len(shards)} shards cannot be split over world_size={first_world} ranks in "
                f"one-epoch mode; write smaller shards (samples_per_shard) or use resample=True"
            )
        if len(shards) < world_size * max(1, num_workers):
            log.warning(
                "lct_fast.data: %d shards for %d ranks x %d workers: %s",
                len(shards), world_size, max(1, num_workers),
                "some workers share a pool of shards" if resample else "some workers get no shard",
            )
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.start_sample = int(start_sample)
        self.samples_yielded = self.start_sample
        self.pin_memory = pin_memory
        self.prefetch_factor = prefetch_factor
        self._plan = _Plan(
            shards=shards,
            counts=counts,
            shape=self.stats.shape,
            num_classes=self.stats.num_classes,
            normalizer=self.normalizer,
            batch_size=self.batch_size,
            rank=rank,
            world_size=world_size,
            num_workers=self.num_workers,
            seed=seed,
            epoch=epoch,
            shuffle_buffer=int(shuffle_buffer),
            resample=resample,
            round_shards=round_shards,
            start_batches=self.start_sample // self.batch_size,
            max_empty_rounds=max_empty_rounds,
            history=history,
        )
        self._worker_errors: dict[int, DataErrors] = {}

    # -- properties ------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return self.stats.num_classes

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.stats.shape

    @property
    def errors(self) -> DataErrors:
        """Skipped samples / shard errors over all workers of the current iteration."""
        extra = DataErrors()
        for name in self._missing:
            extra.shard_errors += 1
            extra.reasons["missing_shard"] = extra.reasons.get("missing_shard", 0) + 1
            if len(extra.examples) < extra.max_examples:
                extra.examples.append(f"missing_shard: {name} is listed in stats.json but absent")
        return DataErrors.merge([extra, *self._worker_errors.values()])

    def report(self) -> str:
        """One-line summary of skipped data, e.g. for the training log."""
        return f"{self.path}: {self.errors.summary()}"

    def normalize(self, latent: torch.Tensor) -> torch.Tensor:
        return self.normalizer.normalize(latent)

    def denormalize(self, x0: torch.Tensor) -> torch.Tensor:
        """Inverse of the load-time normalisation: x0 -> latents (VAE-scaled space)."""
        return self.normalizer.denormalize(x0)

    # -- iteration -------------------------------------------------------------------
    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        stream = _ShardStream(self._plan)
        if self.num_workers == 0:
            source: Any = iter(stream)
        else:
            source = iter(
                torch.utils.data.DataLoader(
                    stream,
                    batch_size=None,
                    num_workers=self.num_workers,
                    pin_memory=self.pin_memory,
                    prefetch_factor=self.prefetch_factor,
                    in_order=True,
                )
            )
        self.samples_yielded = self.start_sample
        self._worker_errors = {}
        if self._missing:
            log.warning("lct_fast.data: %d shards listed in stats.json are missing: %s", len(self._missing), self._missing[:5])
        for x0, labels, err in source:
            if err[1] is not None:
                self._worker_errors[err[0]] = err[1]
            if x0 is None:
                continue
            self.samples_yielded += int(labels.shape[0])
            yield x0, labels
        if self.errors.total:
            log.warning("lct_fast.data: %s", self.report())


def read_all_latents(path: str, subset: int | None = None, *, seed: int = 0,
                     stats: Stats | None = None) -> tuple[np.ndarray, np.ndarray, DataErrors]:
    """Latents (as stored, float32 [N, C, H, W]) and class ids of a shard folder for evaluation and statistics
    (not the training stream), each sample validated as the training reader validates it (npy, dtype, shape
    against ``stats.json``, finite values, a class id in range where the data set has classes): an unreadable
    shard or an invalid sample is skipped and counted in the returned :class:`DataErrors`.

    Without ``subset``: every valid sample, in key order. With ``subset = k``: the first k valid samples of a
    permutation of all sample keys seeded by ``seed``, in that order, reading only those members (memory and
    time do not grow with the data set); fewer if the data set has fewer."""
    errors = DataErrors()
    stats = stats if stats is not None else load_stats(path)
    decode = _decode_stage(tuple(stats.shape), int(stats.num_classes), errors)
    # Pass 1, tar headers only: every sample's members.
    members: dict[str, dict[str, tuple[str, tarfile.TarInfo]]] = {}
    for shard in list_shards(path):
        try:
            with tarfile.open(shard) as tf:
                for m in tf.getmembers():
                    key, _, ext = m.name.partition(".")
                    members.setdefault(f"{os.path.basename(shard)}/{key}", {})[ext] = (shard, m)
        except (tarfile.TarError, OSError, EOFError) as e:
            errors.add("shard", "bad_tar", f"{shard}: {e}")
    keys = sorted(k for k, v in members.items() if "latent.npy" in v)
    if subset is not None:
        keys = [keys[i] for i in np.random.default_rng(seed).permutation(len(keys))]
    # Pass 2: the chosen samples, shard by shard, validated; an invalid one is replaced by the next in order.
    lats: dict[str, np.ndarray] = {}
    labels: dict[str, int] = {}
    want = len(keys) if subset is None else min(int(subset), len(keys))
    pos = 0
    while len(lats) < want and pos < len(keys):
        batch = keys[pos:pos + (want - len(lats))]
        pos += len(batch)
        by_shard: dict[str, list[str]] = {}
        for k in batch:
            by_shard.setdefault(members[k]["latent.npy"][0], []).append(k)
        for shard, ks in by_shard.items():
            try:
                with tarfile.open(shard) as tf:
                    for k in ks:
                        sample = {ext: tf.extractfile(m).read() for ext, (_, m) in members[k].items()}
                        sample.update(__key__=k, __url__=shard)
                        for lat, lab in decode(iter([sample])):
                            lats[k], labels[k] = lat, lab
            except (tarfile.TarError, OSError, EOFError) as e:
                errors.add("shard", "bad_tar", f"{shard}: {e}")
    chosen = [k for k in keys if k in lats][:want]
    if not chosen:
        raise ValueError(f"{path}: no readable latents in {len(list_shards(path))} shard(s) ({errors.summary()})")
    return (np.stack([lats[k] for k in chosen]).astype(np.float32),
            np.array([labels[k] for k in chosen], dtype=np.int64), errors)
