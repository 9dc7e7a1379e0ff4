"""The loader interface every data source implements, and the one place that builds the training loader.

A reader is an iterable of ``(x0 float32 [B, C, H, W], labels int64 [B])`` batches for one rank with

* ``start_sample``: this rank's samples already consumed when the stream was built; iterating it yields what
  an uninterrupted stream would have yielded after that many samples (exact resume);
* ``errors`` (:class:`~lct_fast.data.reader.DataErrors`): skipped samples and shard errors so far, and
  ``report()``: one line of it for the log.

:func:`build_loader` picks the reader named by ``data.reader`` from :data:`READERS` (``webdataset``: the
WebDataset reader of :mod:`lct_fast.data.reader`; ``dali``: NVIDIA DALI, :mod:`lct_fast.data.dali_reader`).
Adding a source is one module plus one :func:`register_reader`.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterator, Optional, Protocol, Tuple, runtime_checkable

import torch

from .reader import DataErrors, LatentLoader
from .synthetic import ensure_synthetic

__all__ = ["LatentSource", "READERS", "register_reader", "build_loader", "resolve_dataset"]


@runtime_checkable
class LatentSource(Protocol):
    start_sample: int

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]: ...

    @property
    def errors(self) -> DataErrors: ...

    def report(self) -> str: ...


#: reader name -> factory(path, *, batch_size, rank, world_size, seed, sigma_data, normalize, shuffle_buffer,
#: num_workers, resample, start_sample, device, stats, data_cfg) -> LatentSource; data_cfg carries a reader's own
#: settings (dali: data.dali_device)
READERS: Dict[str, Callable[..., LatentSource]] = {}


def register_reader(name: str, factory: Callable[..., LatentSource]) -> None:
    """Make ``data.reader=<name>`` build its loader with ``factory`` (same keyword arguments as the others)."""
    READERS[name] = factory


def _webdataset(path: str, *, device: Optional[torch.device] = None, data_cfg: Any = None, **kw: Any) -> LatentSource:
    return LatentLoader(path, **kw)


def _dali(path: str, *, data_cfg: Any = None, **kw: Any) -> LatentSource:
    from .dali_reader import DaliLoader  # optional: nvidia-dali is imported only when asked for

    return DaliLoader(path, dali_device=getattr(data_cfg, "dali_device", "cpu"), **kw)


register_reader("webdataset", _webdataset)
register_reader("dali", _dali)


def resolve_dataset(data_cfg: Any, root: Optional[str] = None) -> str:
    """Dataset folder for a ``DataConfig``-like object: ``path``, or the embedded synthetic dataset."""
    path = getattr(data_cfg, "path", "") or ""
    if path:
        return path
    return ensure_synthetic(getattr(data_cfg, "synthetic", None), root)


def build_loader(data_cfg: Any, *, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 sigma_data: float = 0.5, start_sample: int = 0, path: Optional[str] = None,
                 device: Optional[torch.device] = None, cache_root: Optional[str] = None,
                 stats: Any = None, epoch_history: Tuple[Tuple[int, int], ...] = ()) -> LatentSource:
    """This rank's stream for ``data_cfg`` (``DataConfig``: reader, path, normalize, shuffle_buffer, num_workers,
    resample, synthetic), positioned after ``start_sample`` samples. ``path`` overrides the resolved folder;
    ``stats``: its statistics when the caller has read them already (else the reader reads stats.json).
    ``epoch_history``: one-epoch mode only, the epoch's earlier ``(world_size, samples_per_rank)`` layouts (a resume
    on another number of ranks, see :mod:`lct_fast.data.reader`); passed only when there are some, so readers
    without one-epoch mode need not know the argument."""
    name = getattr(data_cfg, "reader", "webdataset")
    if name not in READERS:
        raise ValueError(f"data.reader: {name!r} is not one of {sorted(READERS)}")
    return READERS[name](
        path or resolve_dataset(data_cfg, cache_root), batch_size=batch_size, rank=rank, world_size=world_size,
        seed=seed, sigma_data=sigma_data, normalize=getattr(data_cfg, "normalize", "channel"),
        shuffle_buffer=getattr(data_cfg, "shuffle_buffer", 1000), num_workers=getattr(data_cfg, "num_workers", 0),
        resample=getattr(data_cfg, "resample", True), start_sample=start_sample, device=device, stats=stats,
        data_cfg=data_cfg, **({"epoch_history": tuple(epoch_history)} if epoch_history else {}))
