"""Dataset statistics: streaming accumulation and the ``stats.json`` contract (SPEC §1).

A latent dataset folder holds ``shard-%06d.tar`` files and one ``stats.json`` with the
count, shape and dtype of the stored latents, their mean/std per channel and per element,
the VAE used to encode them, its scale factor and the number of classes. The loader
normalises with these statistics: ``x0 = (latent - mean) / std * sigma_data``.

Statistics are accumulated in float64 with Chan et al.'s pairwise merge of
(count, mean, M2) so that batches of any size give the same result as one pass of numpy
over the whole data (up to float64 rounding). Standard deviations are population
standard deviations (``ddof=0``), as ``numpy.std`` computes by default.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np

STATS_FILE = "stats.json"
STATS_FORMAT = "lct_fast.latents/1"
#: dtypes a latent may be stored in (SPEC §1: float16 or float32).
ALLOWED_DTYPES = ("float16", "float32")


class StatsError(ValueError):
    """``stats.json`` is missing, unreadable or fails validation."""


class RunningStats:
    """Per-element running mean / M2 in float64, merged batch-wise (Chan et al. 1979).

    ``update`` takes a batch ``[N, C, H, W]`` (or one sample ``[C, H, W]``); per-channel
    statistics are derived exactly from the per-element ones because every element of a
    channel has the same count.
    """

    def __init__(self, shape: Sequence[int]):
        self.shape = tuple(int(s) for s in shape)
        self.count = 0
        self._mean = np.zeros(self.shape, dtype=np.float64)
        self._m2 = np.zeros(self.shape, dtype=np.float64)

    def update(self, batch: np.ndarray) -> None:
        """Merge a batch of samples into the running statistics."""
        x = np.asarray(batch, dtype=np.float64)
        if x.shape == self.shape:
            x = x[None]
        if x.shape[1:] != self.shape:
            raise ValueError(f"RunningStats: expected samples of shape {self.shape}, got {x.shape[1:]}")
        n_b = x.shape[0]
        if n_b == 0:
            return
        mean_b = x.mean(axis=0)
        m2_b = ((x - mean_b) ** 2).sum(axis=0)
        n_a = self.count
        n = n_a + n_b
        delta = mean_b - self._mean
        # Chan's parallel update: M2 = M2_a + M2_b + delta^2 * n_a * n_b / n.
        self._mean += delta * (n_b / n)
        self._m2 += m2_b + delta**2 * (n_a * n_b / n)
        self.count = n

    @property
    def mean_element(self) -> np.ndarray:
        return self._mean.copy()

    @property
    def std_element(self) -> np.ndarray:
        self._require_data()
        return np.sqrt(self._m2 / self.count)

    @property
    def mean_channel(self) -> np.ndarray:
        return self._mean.reshape(self.shape[0], -1).mean(axis=1)

    @property
    def std_channel(self) -> np.ndarray:
        """Population std over all samples and positions of each channel.

        Total M2 of a channel = sum over its elements of (M2_e + n·(mean_e − mean_c)²).
        """
        self._require_data()
        c = self.shape[0]
        mean_e = self._mean.reshape(c, -1)
        m2_e = self._m2.reshape(c, -1)
        mean_c = mean_e.mean(axis=1, keepdims=True)
        m2_c = (m2_e + self.count * (mean_e - mean_c) ** 2).sum(axis=1)
        return np.sqrt(m2_c / (self.count * mean_e.shape[1]))

    def _require_data(self) -> None:
        if self.count == 0:
            raise ValueError("RunningStats: no samples were added")


@dataclass
class Stats:
    """Validated contents of ``stats.json``.

    ``mean``/``std`` are per channel, shape ``[C]``; ``mean_element``/``std_element`` are
    per element, shape ``[C, H, W]`` (optional in files written by other tools).
    ``num_classes == 0`` means an unconditional dataset.
    """

    count: int
    shape: tuple[int, int, int]
    dtype: str
    mean: np.ndarray
    std: np.ndarray
    mean_element: Optional[np.ndarray] = None
    std_element: Optional[np.ndarray] = None
    vae: Optional[str] = None
    vae_scale: Optional[float] = None
    num_classes: int = 0
    vae_shift: Optional[float] = None
    shards: list[dict[str, Any]] = field(default_factory=list)
    path: str = ""
    class_names: Optional[list[str]] = None
    """Label id -> the class's name (the folder name when encoded with ``--class-dirs``), when known."""

    def to_json(self) -> dict[str, Any]:
        """The JSON-serialisable dict written to ``stats.json``."""
        out: dict[str, Any] = {
            "format": STATS_FORMAT,
            "count": int(self.count),
            "shape": [int(s) for s in self.shape],
            "dtype": self.dtype,
            "mean": [float(v) for v in self.mean],
            "std": [float(v) for v in self.std],
        }
        if self.mean_element is not None and self.std_element is not None:
            out["mean_element"] = np.asarray(self.mean_element, dtype=np.float64).tolist()
            out["std_element"] = np.asarray(self.std_element, dtype=np.float64).tolist()
        out["vae"] = self.vae
        out["vae_scale"] = None if self.vae_scale is None else float(self.vae_scale)
        if self.vae_shift is not None:
            out["vae_shift"] = float(self.vae_shift)
        out["num_classes"] = int(self.num_classes)
        if self.class_names is not None:
            out["class_names"] = list(self.class_names)
        out["shards"] = list(self.shards)
        return out



def write_stats(stats: Stats, directory: str) -> str:
    """Write ``stats.json`` atomically (temp file + rename) and return its path."""
    path = os.path.join(directory, STATS_FILE)
    tmp = path + f".tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(stats.to_json(), f, indent=1)
        f.write("\n")
    os.replace(tmp, path)
    return path


def _err(path: str, key: str, msg: str) -> StatsError:
    return StatsError(f"{path}: key '{key}': {msg}")


def _float_array(raw: Any, path: str, key: str, shape: tuple[int, ...]) -> np.ndarray:
    try:
        arr = np.asarray(raw, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise _err(path, key, f"expected numbers with shape {list(shape)}, got {type(raw).__name__} ({exc})")
    if arr.shape != shape:
        raise _err(path, key, f"expected shape {list(shape)}, got {list(arr.shape)}")
    if not np.all(np.isfinite(arr)):
        raise _err(path, key, "contains NaN or Inf")
    return arr


def _optional_float(raw: dict, key: str, path: str) -> Optional[float]:
    value = raw.get(key)
    if value is None:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise _err(path, key, f"expected a finite number or null, got {value!r}")
    return float(value)


def load_stats(path: str) -> Stats:
    """Read and validate ``stats.json`` (``path`` is the dataset folder or the file itself).

    Raises ``FileNotFoundError`` naming the path when the folder or file is missing and
    ``StatsError`` naming the path and the offending key when the content is malformed.
    """
    file = os.path.join(path, STATS_FILE) if os.path.isdir(path) else path
    if not os.path.exists(file):
        parent = os.path.dirname(file) or "."
        if not os.path.isdir(parent):
            raise FileNotFoundError(f"latent dataset folder not found: {parent}")
        raise FileNotFoundError(
            f"{file}: missing stats.json; a latent dataset folder needs shard-%06d.tar files and a "
            f"stats.json (write it with lct_fast.data.ShardWriter or launch/encode.py)"
        )
    try:
        with open(file) as f:
            raw = json.load(f)
    except json.JSONDecodeError as exc:
        raise StatsError(f"{file}: not valid JSON ({exc})") from exc
    if not isinstance(raw, dict):
        raise StatsError(f"{file}: expected a JSON object, got {type(raw).__name__}")
    for key in ("count", "shape", "dtype", "mean", "std"):
        if key not in raw:
            raise _err(file, key, "required key is missing")

    count = raw["count"]
    if not isinstance(count, int) or isinstance(count, bool) or count <= 0:
        raise _err(file, "count", f"expected a positive integer, got {count!r}")
    shape = raw["shape"]
    if (
        not isinstance(shape, list)
        or len(shape) != 3
        or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape)
    ):
        raise _err(file, "shape", f"expected [C, H, W] with positive integers, got {shape!r}")
    shape_t = (shape[0], shape[1], shape[2])
    dtype = raw["dtype"]
    if dtype not in ALLOWED_DTYPES:
        raise _err(file, "dtype", f"expected one of {list(ALLOWED_DTYPES)}, got {dtype!r}")

    mean = _float_array(raw["mean"], file, "mean", (shape_t[0],))
    std = _float_array(raw["std"], file, "std", (shape_t[0],))
    if np.any(std < 0):
        raise _err(file, "std", "standard deviations must be >= 0")
    mean_e = std_e = None
    if ("mean_element" in raw) != ("std_element" in raw):
        missing = "std_element" if "mean_element" in raw else "mean_element"
        raise _err(file, missing, "per-element statistics need both mean_element and std_element")
    if "mean_element" in raw:
        mean_e = _float_array(raw["mean_element"], file, "mean_element", shape_t)
        std_e = _float_array(raw["std_element"], file, "std_element", shape_t)
        if np.any(std_e < 0):
            raise _err(file, "std_element", "standard deviations must be >= 0")

    vae = raw.get("vae")
    if vae is not None and not isinstance(vae, str):
        raise _err(file, "vae", f"expected a string or null, got {vae!r}")
    vae_scale = _optional_float(raw, "vae_scale", file)
    vae_shift = _optional_float(raw, "vae_shift", file)
    num_classes = raw.get("num_classes", 0)
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 0:
        raise _err(file, "num_classes", f"expected an integer >= 0, got {num_classes!r}")
    class_names = raw.get("class_names")
    if class_names is not None and (not isinstance(class_names, list) or not all(isinstance(c, str) for c in class_names)
                                    or len(class_names) != num_classes):
        raise _err(file, "class_names", f"expected a list of {num_classes} names (one per class id), got {class_names!r}")
    shards = raw.get("shards", [])
    if not isinstance(shards, list) or not all(
        isinstance(s, dict) and isinstance(s.get("name"), str) and isinstance(s.get("count"), int) for s in shards
    ):
        raise _err(file, "shards", "expected a list of {'name': str, 'count': int}")
    return Stats(
        count=count,
        shape=shape_t,
        dtype=dtype,
        mean=mean,
        std=std,
        mean_element=mean_e,
        std_element=std_e,
        vae=vae,
        vae_scale=vae_scale,
        num_classes=num_classes,
        vae_shift=vae_shift,
        shards=shards,
        path=file,
        class_names=class_names,
    )
