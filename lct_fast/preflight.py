"""Checks a run can make before any process group or engine starts (and under ``--dry-run``): the data folder, its
shards and statistics against the model, what the evaluation needs of it, the resume tag and a teacher's files.

Each user error is a :class:`lct_fast.validate.ConfigError` of one line: what is wrong, where (the path, the key),
and what to do (the key to set). The command lines print it and exit 2; a traceback is left for real bugs.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, List, Optional

from .validate import ConfigError

__all__ = ["DataFacts", "data_facts", "check_model_matches_data", "preflight"]


@dataclass(frozen=True)
class DataFacts:
    """What a run needs to know of its data before reading it."""

    path: str
    """The folder (empty for the embedded data set, written at start-up)."""
    count: int
    shape: tuple
    num_classes: int


def _missing_path(path: str) -> str:
    """Name the part of ``path`` that is missing: its nearest existing ancestor."""
    parent = os.path.dirname(os.path.abspath(path))
    while parent and not os.path.isdir(parent) and parent != os.path.dirname(parent):
        parent = os.path.dirname(parent)
    return parent


def data_facts(data_cfg: Any) -> DataFacts:
    """Count, latent shape and classes of the run's data, from ``stats.json`` and the shard list (the embedded
    data set: from its settings). Raises ``ConfigError`` naming ``data.path`` when the folder is unusable."""
    from .data.reader import list_shards
    from .data.stats import StatsError, load_stats

    path = getattr(data_cfg, "path", "") or ""
    if not path:
        s = data_cfg.synthetic
        return DataFacts("", int(s.num_samples), (int(s.channels), int(s.resolution), int(s.resolution)),
                         int(s.num_classes))
    if not os.path.exists(path):
        return _fail(f"data.path: {os.path.abspath(path)} does not exist (the nearest existing folder is "
                     f"{_missing_path(path)}); set data.path to a folder written by launch/encode.py")
    if not os.path.isdir(path):
        return _fail(f"data.path: {os.path.abspath(path)} is a file; expected the folder launch/encode.py writes "
                     "(shard-*.tar and stats.json)")
    try:
        stats = load_stats(path)
    except (StatsError, OSError) as e:
        return _fail(f"data.path: {e}")
    try:
        list_shards(path)
    except FileNotFoundError as e:
        return _fail(f"data.path: {e}")
    return DataFacts(os.path.abspath(path), int(stats.count), tuple(stats.shape), int(stats.num_classes))


def _fail(msg: str):
    raise ConfigError(msg)


def check_model_matches_data(cfg: Any, facts: DataFacts) -> None:
    """The model's latent shape and classes against the data's."""
    m = cfg.model
    where = facts.path or "the embedded data set (data.synthetic)"
    expect = (m.in_channels, m.resolution, m.resolution)
    if tuple(facts.shape) != expect:
        raise ConfigError(f"model.in_channels/resolution: the model takes latents of shape {expect} but {where} holds "
                          f"{tuple(facts.shape)}; set model.in_channels={facts.shape[0]} "
                          f"model.resolution={facts.shape[1]}")
    if m.num_classes and facts.num_classes > m.num_classes:
        raise ConfigError(f"model.num_classes: {where} has {facts.num_classes} classes, the model "
                          f"{m.num_classes}; set model.num_classes={facts.num_classes}")


def eval_size(cfg: Any, facts: DataFacts) -> Optional[int]:
    """The number of samples the in-training latent evaluation can use: ``train.eval.n``, or half the data set
    when it is smaller than two disjoint sets of that size; None when the run does not evaluate latents."""
    if not cfg.train.eval_interval or cfg.train.eval.vae:
        return None
    return max(2, min(int(cfg.train.eval.n), facts.count // 2))


def preflight(cfg: Any, *, run_dir: Optional[str] = None, resume: Optional[str] = None) -> List[str]:
    """Every check above, plus the resume tag and a distilling method's teacher files; returns notes (one line
    each) about what the run will adapt to its data."""
    from . import checkpoint as ckpt
    from .methods import get_method
    from .run_dir import RunDir

    notes: List[str] = []
    facts = data_facts(cfg.data)
    check_model_matches_data(cfg, facts)
    n = eval_size(cfg, facts)
    if n is not None and n < cfg.train.eval.n:
        if facts.count < 4:
            raise ConfigError(f"train.eval.n: {facts.path or 'the data set'} has {facts.count} latents, too few for "
                              f"the evaluation's two disjoint sets; set train.eval_interval=0")
        notes.append(f"evaluation: train.eval.n={cfg.train.eval.n} needs {2 * cfg.train.eval.n} latents (two disjoint "
                     f"sets), the data has {facts.count}: evaluating {n} samples (set train.eval.n to choose)")
    if resume and resume != "auto":
        folder = RunDir(run_dir or "").checkpoints
        if not ckpt.is_complete(folder, resume):
            raise ConfigError(f"--resume {resume}: {folder}/{resume} is not a complete checkpoint; use --resume auto "
                              f"or one of {sorted(t for t in os.listdir(folder) if ckpt.is_complete(folder, t))}"
                              if os.path.isdir(folder) else
                              f"--resume {resume}: {folder} has no checkpoints; use --resume auto to start fresh")
    spec = get_method(cfg.method.name)
    if spec.teacher is not None:
        from .distill import teacher_config

        section, teacher_method = spec.teacher
        teacher_config(getattr(cfg.method, section), f"method.{section}", spec.name, teacher_method)
    return notes
