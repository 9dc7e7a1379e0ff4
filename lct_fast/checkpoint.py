"""Checkpoints: DeepSpeed's sharded model/optimizer state plus our per-rank client state.

Layout of ``<run>/checkpoints/``::

    samples-000000032000/          one tag per save, named by samples seen
        (DeepSpeed's files)        model + optimizer (+ lr scheduler) shards
        client-rank00000.pt        samples seen, RNG states, EMA shard, loop counters (tensors/ints only)
        MANIFEST.json              every other file's relative path, size and SHA-256 (written after them)
        COMPLETE                   written by rank 0 last, after every rank finished writing
    latest                         the tag of the newest COMPLETE checkpoint (replaced atomically)

A crash during a save leaves a tag directory without ``COMPLETE`` and ``latest`` still pointing at the
previous checkpoint; :func:`find_resume_tag` never picks an incomplete tag. A complete tag whose files no longer
match its manifest (a file lost, truncated or corrupted on the storage after the save) is skipped with a message
naming the file, and the previous complete one is taken. Tags written before manifests existed resume with a
warning. The ranks share the hashing, each a strided part of the files.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import sys
from typing import Callable, Optional

import torch

__all__ = ["tag_for", "save", "load_client_state", "find_resume_tag", "rng_state", "set_rng_state",
           "write_manifest", "verify", "prune", "MANIFEST"]

MANIFEST = "MANIFEST.json"
_MARKERS = (MANIFEST, "COMPLETE")

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


def _files(tag_dir: str) -> list[str]:
    """Every file of a tag except the markers, as sorted paths relative to the tag."""
    out = []
    for root, _, names in os.walk(tag_dir):
        for n in names:
            rel = os.path.relpath(os.path.join(root, n), tag_dir)
            if rel not in _MARKERS and ".tmp" not in n:
                out.append(rel)
    return sorted(out)


def _sha256(path: str, chunk: int = 1 << 23) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                return h.hexdigest()
            h.update(b)


def _world() -> int:
    """Ranks in the process group (1 on one process or without a group)."""
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _shared(work: Callable[[int, int], dict]) -> dict:
    """``work(rank, world)`` on every rank of the process group (each a strided share), merged on every rank; on
    one process (or without a group) just ``work(0, 1)``."""
    world = _world()
    if world == 1:
        return work(0, 1)
    parts = [None] * world
    torch.distributed.all_gather_object(parts, work(torch.distributed.get_rank(), world))
    return {k: v for p in parts for k, v in p.items()}


def _from_main(fn: Callable[[], object]) -> object:
    """``fn()`` on the main rank, its result on every rank (ranks may see a shared folder at different moments:
    one listing keeps their strided shares aligned)."""
    if _world() == 1:
        return fn()
    box = [fn() if torch.distributed.get_rank() == 0 else None]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def write_manifest(ckpt_dir: str, tag: str, samples: int, *, is_main: bool) -> None:
    """Hash every file of ``tag`` (the ranks share the work; a collective under a process group) and write
    ``MANIFEST.json`` on the main rank."""
    tag_dir = os.path.join(ckpt_dir, tag)
    files = _from_main(lambda: _files(tag_dir))

    def hash_share(r: int, w: int) -> dict:
        out = {}
        for f in files[r::w]:
            full = os.path.join(tag_dir, f)
            try:  # an I/O error is reported through the gather, so no rank leaves the collective early
                out[f] = {"size": os.path.getsize(full), "sha256": _sha256(full)}
            except OSError as e:
                out[f] = {"error": f"{full}: {e}"}
        return out

    hashed = _shared(hash_share)
    bad = [v["error"] for v in hashed.values() if "error" in v]
    if bad:
        raise OSError(f"checkpoint {tag_dir}: cannot read back what was written: {'; '.join(bad[:3])}")
    if is_main:
        _atomic_write_text(os.path.join(tag_dir, MANIFEST), json.dumps(
            {"format": "lct_fast-checkpoint-manifest", "version": 1, "tag": tag, "samples": int(samples),
             "world_size": _world(), "files": {f: hashed[f] for f in files}}, indent=1) + "\n")


def verify(ckpt_dir: str, tag: str) -> Optional[list[str]]:
    """Problems of ``tag`` against its manifest (a missing file, a size or a checksum that differs), [] when
    every file matches, None when the tag has no manifest (written before manifests existed). The ranks share
    the hashing (a collective under a process group: every rank must call it on the same tag)."""
    tag_dir = os.path.join(ckpt_dir, tag)
    path = os.path.join(tag_dir, MANIFEST)

    def read_manifest():
        if not os.path.isfile(path):
            return None
        try:
            with open(path) as f:
                files = json.load(f)["files"]
            return {str(k): {"size": int(v["size"]), "sha256": str(v["sha256"])} for k, v in files.items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            return f"{path}: unreadable manifest ({e})"

    files = _from_main(read_manifest)  # the main rank reads it, every rank takes the same verdict
    if files is None:
        return None
    if isinstance(files, str):
        return [files]
    names = sorted(files)

    def check(r: int, w: int) -> dict:
        out = {}
        for name in names[r::w]:
            full, want = os.path.join(tag_dir, name), files[name]
            try:
                if not os.path.isfile(full):
                    out[name] = f"{full}: missing"
                elif os.path.getsize(full) != want["size"]:
                    out[name] = f"{full}: {os.path.getsize(full)} bytes, the manifest says {want['size']} (truncated?)"
                elif _sha256(full) != want["sha256"]:
                    out[name] = f"{full}: SHA-256 differs from the manifest (corrupted)"
            except OSError as e:  # unreadable: a problem to report, not an exception that skips the gather
                out[name] = f"{full}: unreadable ({e})"
        return out

    return [msg for _, msg in sorted(_shared(check).items())]


def prune(ckpt_dir: str, keep: int) -> list[str]:
    """Delete all but the newest ``keep`` complete tags, and incomplete tags older than the newest complete one
    (crash leftovers); never the tag ``latest`` names. Returns the deleted tags. Call on one rank."""
    if keep <= 0 or not os.path.isdir(ckpt_dir):
        return []
    tags = sorted(t for t in os.listdir(ckpt_dir) if _TAG.match(t))
    complete = [t for t in tags if is_complete(ckpt_dir, t)]
    if not complete:
        return []
    latest_path = os.path.join(ckpt_dir, "latest")
    latest = open(latest_path).read().strip() if os.path.exists(latest_path) else None
    kept = set(complete[-keep:]) | {latest}
    doomed = [t for t in tags if t not in kept and t < complete[-1]]
    for t in doomed:
        # the marker first: a crash mid-delete leaves an incomplete tag, never a "complete" one missing files
        try:
            os.remove(os.path.join(ckpt_dir, t, "COMPLETE"))
        except FileNotFoundError:
            pass
        shutil.rmtree(os.path.join(ckpt_dir, t), ignore_errors=True)
    return doomed


def save(engine, ckpt_dir: str, samples: int, client_state: dict, *, rank: int, keep: int = 0) -> str:
    """Save a complete checkpoint on every rank (a collective) and mark it latest when all are done; then keep
    only the newest ``keep`` (0: all)."""
    tag = tag_for(samples)
    tag_dir = os.path.join(ckpt_dir, tag)
    if rank == 0 and os.path.isdir(tag_dir):
        # A tag of the same samples seen already exists (a save this run fell back past, perhaps written by
        # another world size): move it aside whole, so none of its files mixes into this one.
        stale = f"{tag_dir}.stale{os.getpid()}"
        os.replace(tag_dir, stale)
        shutil.rmtree(stale, ignore_errors=True)
    torch.distributed.barrier()
    engine.save_checkpoint(ckpt_dir, tag=tag, save_latest=False)
    os.makedirs(tag_dir, exist_ok=True)
    path = client_state_path(ckpt_dir, tag, rank)
    torch.save(client_state, f"{path}.tmp")
    _fsync(f"{path}.tmp")
    os.replace(f"{path}.tmp", path)
    torch.distributed.barrier()
    # Every rank has finished writing: hash the files, then make the whole tag durable before marking it
    # COMPLETE, so a node crash after the marker cannot lose shards (DeepSpeed does not fsync its files).
    write_manifest(ckpt_dir, tag, samples, is_main=rank == 0)
    if rank == 0:
        for root, _, names in os.walk(tag_dir):
            for name in names:
                _fsync(os.path.join(root, name))
        _fsync(tag_dir)
        _atomic_write_text(os.path.join(tag_dir, "COMPLETE"), f"{samples}\n")
        _atomic_write_text(os.path.join(ckpt_dir, "latest"), tag + "\n")
    torch.distributed.barrier()
    if rank == 0:
        prune(ckpt_dir, keep)  # after the barrier: a slow delete holds up no collective
    return tag


def is_complete(ckpt_dir: str, tag: str) -> bool:
    return os.path.exists(os.path.join(ckpt_dir, tag, "COMPLETE"))


def complete_tags(ckpt_dir: str) -> list[str]:
    """Complete tags, newest first (the one ``latest`` names first when it is complete)."""
    if not os.path.isdir(ckpt_dir):
        return []
    tags = sorted((t for t in os.listdir(ckpt_dir) if _TAG.match(t) and is_complete(ckpt_dir, t)), reverse=True)
    latest = os.path.join(ckpt_dir, "latest")
    if os.path.exists(latest):
        tag = open(latest).read().strip()
        if tag in tags:
            tags.remove(tag)
            tags.insert(0, tag)
    return tags


def _say(m: str) -> None:
    print(f"lct_fast: {m}", file=sys.stderr)


def resume_problems(ckpt_dir: str, tag: str, say: Callable[[str], None] = _say) -> list[str]:
    """What is wrong with resuming from ``tag`` ([] when it matches its manifest; a tag written before manifests
    existed passes with a warning through ``say``). A collective under a process group (:func:`verify`)."""
    problems = verify(ckpt_dir, tag)
    if problems is None:
        say(f"warning: {ckpt_dir}/{tag} has no {MANIFEST} (written before checkpoints carried one): "
            f"resuming from it unverified")
        return []
    return problems


def find_resume_tag(ckpt_dir: str, *, check: bool = False, say: Callable[[str], None] = _say) -> str | None:
    """The tag to resume from: ``latest`` if complete, else the newest complete tag, else None. ``check``: verify
    each candidate (:func:`resume_problems`) and fall back past a damaged one, saying which file is bad."""
    for tag in complete_tags(ckpt_dir):
        problems = resume_problems(ckpt_dir, tag, say) if check else []
        if not problems:
            return tag
        say(f"checkpoint {ckpt_dir}/{tag} is damaged, skipping it: {'; '.join(problems[:3])}"
            f"{f' (and {len(problems) - 3} more)' if len(problems) > 3 else ''}")
    return None


def saved_world_size(ckpt_dir: str, tag: str) -> int:
    """The number of ranks that wrote ``tag``: its manifest's ``world_size``, else its client-state files."""
    try:
        with open(os.path.join(ckpt_dir, tag, MANIFEST)) as f:
            return int(json.load(f)["world_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return len(client_state_paths(ckpt_dir, tag))


UNIVERSAL = "universal"


def ensure_universal(ckpt_dir: str, tag: str, *, is_main: bool) -> str:
    """DeepSpeed's universal checkpoint of ``tag`` (``<tag>/universal``: every parameter's fp32 weights and Adam
    moments whole, re-partitioned at load for any world size), converted once by the main rank with DeepSpeed's
    own ``ds_to_universal`` into a temporary folder and renamed into place, so a crash mid-conversion leaves
    nothing that looks done. The other ranks wait for its ``DONE`` file (not in a collective); a failed
    conversion leaves ``universal.FAILED`` with the message, which they raise. Returns the folder."""
    import glob
    import subprocess
    import time

    out = os.path.join(ckpt_dir, tag, UNIVERSAL)
    done, failed = os.path.join(out, "DONE"), f"{out}.FAILED"
    if is_main and not os.path.isfile(done):
        for old in glob.glob(f"{out}.tmp*"):  # leftovers of a conversion that died with its process
            shutil.rmtree(old, ignore_errors=True)
        if os.path.exists(failed):
            os.remove(failed)
        tmp = f"{out}.tmp{os.getpid()}"
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
               os.path.join(ckpt_dir, tag), "--output_folder", tmp, "--inject_missing_state"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            msg = (f"{ckpt_dir}/{tag}: DeepSpeed's universal conversion failed ({' '.join(cmd)}):\n"
                   f"{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
            _atomic_write_text(failed, msg)
            raise RuntimeError(msg)
        for root, _, names in os.walk(tmp):  # durable before it is marked done
            for name in names:
                _fsync(os.path.join(root, name))
        _atomic_write_text(os.path.join(tmp, "DONE"), tag + "\n")
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    elif not is_main:
        # The other ranks wait on the file, not in a collective: the conversion of a large model can outlast
        # train.collective_timeout_s.
        while not os.path.isfile(done):
            if os.path.exists(failed):
                raise RuntimeError(open(failed).read())
            time.sleep(1.0)
    return out


def load_client_state_resharded(ckpt_dir: str, tag: str, rank: int, world: int) -> dict:
    """Rank ``rank``'s client state on ``world`` ranks. At the world size that wrote ``tag``: the rank's own.
    On another: samples seen and counters of rank 0 (every rank holds the same); the EMA whole under
    ``ema_full`` ({name: {param: tensor}}, stitched from every rank's ZeRO-3 partition, or rank 0's unpartitioned
    copy) for :meth:`lct_fast.ema.EMA.load_full` to cut this rank's share from; the global RNG state of the old
    rank of the same index where there was one (training draws from generators seeded by (seed, rank,
    samples), so these states matter only to third-party code)."""
    from .ema import consolidate

    paths = client_state_paths(ckpt_dir, tag)[:saved_world_size(ckpt_dir, tag)]
    if len(paths) == world:
        return load_client_state(ckpt_dir, tag, rank)
    first = torch.load(paths[0], map_location="cpu", weights_only=True)
    partitioned = any(k.startswith("shape/") for k in first["ema"]["meta"])
    # Unpartitioned (ZeRO 0-2), rank 0 holds the whole EMA: one file, not N copies of it, per process.
    states = [first] + ([torch.load(p, map_location="cpu", weights_only=True) for p in paths[1:]]
                        if partitioned else [])
    out = dict(first)
    out["ema_full"] = consolidate([s["ema"] for s in states])
    out["ema_updates"] = int(first["ema"]["meta"]["num_updates"])
    out["ema"] = None
    out["rng"] = states[rank]["rng"] if rank < len(states) else None
    return out


def load_client_state(ckpt_dir: str, tag: str, rank: int) -> dict:
    path = client_state_path(ckpt_dir, tag, rank)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: missing client state for rank {rank} (was the world size different?)")
    return torch.load(path, map_location="cpu", weights_only=True)
