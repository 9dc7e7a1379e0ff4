"""Checkpoints: DeepSpeed's sharded model/optimizer state plus our per-rank client state.

Layout of ``<run>/checkpoints/``::

    samples-000000032000/          one tag per save, named by samples seen
        (DeepSpeed's files)        model + optimizer (+ lr scheduler) shards
        client-rank00000.pt        samples seen, RNG states, EMA shard, loop counters (tensors/ints only)
        COMPLETE                   written by rank 0 after every rank finished writing
    latest                         the tag of the newest COMPLETE checkpoint (replaced atomically)

A crash during a save leaves a tag directory without ``COMPLETE`` and ``latest`` still pointing at the
previous checkpoint; :func:`find_resume_tag` never picks an incomplete tag.
"""

from __future__ import annotations

import os
import random
import re

import torch

__all__ = ["tag_for", "save", "load_client_state", "find_resume_tag", "rng_state", "set_rng_state"]

_TAG = re.compile(r"^samples-(\d{12})$")


def tag_for(samples: int) -> str:
    return f"samples-{samples:012d}"


def rng_state() -> dict:
    """Global RNG states (tensors only, so torch.load(weights_only=True) reads them back).

    Training randomness comes from per-step generators seeded by (seed, rank, samples); these global
    states only matter for third-party code that draws from the default generators."""
    state = {"torch": torch.get_rng_state(),
             "python": torch.tensor(list(random.getstate()[1]), dtype=torch.int64)}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    py = state["python"].tolist()
    random.setstate((3, tuple(py), None))


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


_CLIENT = "client-rank{rank:05d}.pt"
_CLIENT_RE = re.compile(r"client-rank(\d{5})\.pt")


def client_state_path(ckpt_dir: str, tag: str, rank: int) -> str:
    """Where rank ``rank``'s client state (samples, RNG, EMA shard) of checkpoint ``tag`` lives."""
    return os.path.join(ckpt_dir, tag, _CLIENT.format(rank=rank))


def client_state_paths(ckpt_dir: str, tag: str) -> list[str]:
    """Every rank's client-state file of ``tag``, in rank order (FileNotFoundError naming the folder when none
    is there, or when a rank in between is missing)."""
    folder = os.path.join(ckpt_dir, tag)
    ranks = sorted(int(m.group(1)) for m in map(_CLIENT_RE.fullmatch, os.listdir(folder)) if m) \
        if os.path.isdir(folder) else []
    if not ranks:
        raise FileNotFoundError(f"{folder}: no client-state files ({_CLIENT.format(rank=0)}, ...)")
    if ranks != list(range(len(ranks))):
        raise FileNotFoundError(f"{folder}: client-state files for ranks {ranks}, expected 0..{len(ranks) - 1}")
    return [client_state_path(ckpt_dir, tag, r) for r in ranks]


def save(engine, ckpt_dir: str, samples: int, client_state: dict, *, rank: int) -> str:
    """Save a complete checkpoint on every rank (a collective) and mark it latest when all are done."""
    tag = tag_for(samples)
    engine.save_checkpoint(ckpt_dir, tag=tag, save_latest=False)
    tag_dir = os.path.join(ckpt_dir, tag)
    os.makedirs(tag_dir, exist_ok=True)
    path = client_state_path(ckpt_dir, tag, rank)
    torch.save(client_state, f"{path}.tmp")
    _fsync(f"{path}.tmp")
    os.replace(f"{path}.tmp", path)
    torch.distributed.barrier()
    if rank == 0:
        # Every rank has finished writing: make the whole tag durable before marking it COMPLETE, so a node
        # crash after the marker cannot lose shards (DeepSpeed does not fsync its files).
        for name in os.listdir(tag_dir):
            _fsync(os.path.join(tag_dir, name))
        _fsync(tag_dir)
        _atomic_write_text(os.path.join(tag_dir, "COMPLETE"), f"{samples}\n")
        _atomic_write_text(os.path.join(ckpt_dir, "latest"), tag + "\n")
    torch.distributed.barrier()
    return tag


def is_complete(ckpt_dir: str, tag: str) -> bool:
    return os.path.exists(os.path.join(ckpt_dir, tag, "COMPLETE"))


def find_resume_tag(ckpt_dir: str) -> str | None:
    """The tag to resume from: ``latest`` if complete, else the newest complete tag, else None."""
    if not os.path.isdir(ckpt_dir):
        return None
    latest = os.path.join(ckpt_dir, "latest")
    if os.path.exists(latest):
        tag = open(latest).read().strip()
        if is_complete(ckpt_dir, tag):
            return tag
    tags = sorted(t for t in os.listdir(ckpt_dir) if _TAG.match(t) and is_complete(ckpt_dir, t))
    return tags[-1] if tags else None


def load_client_state(ckpt_dir: str, tag: str, rank: int) -> dict:
    path = client_state_path(ckpt_dir, tag, rank)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: missing client state for rank {rank} (was the world size different?)")
    return torch.load(path, map_location="cpu", weights_only=True)
