"""LatentLoader: rank/worker splitting, determinism, resume, corrupt data (SPEC §1)."""

from __future__ import annotations

import io
import itertools
import json
import os
import tarfile

import numpy as np
import pytest
import torch

from lct_fast.data import LatentLoader, ShardWriter, npy_bytes


def _dataset(tmp_path, n=60, per_shard=5, shape=(2, 2, 2), classes=3, name="ds"):
    """Latent i is filled with the value i, so a batch tells which samples it holds."""
    out = str(tmp_path / name)
    with ShardWriter(out, samples_per_shard=per_shard, dtype="float32") as w:
        for i in range(n):
            w.write(np.full(shape, float(i), np.float32), i % classes)
    return out


def _ids(x: torch.Tensor) -> list[int]:
    return [int(v) for v in x[:, 0, 0, 0]]


def _take(loader, n_batches):
    return [(x.clone(), y.clone()) for x, y in itertools.islice(loader, n_batches)]


@pytest.mark.parametrize("world_size,num_workers", [(1, 0), (3, 0), (2, 2)])
def test_one_epoch_split_covers_every_sample_once(tmp_path, world_size, num_workers):
    path = _dataset(tmp_path, n=61, per_shard=5)  # 13 shards, the last one partial
    seen = []
    for rank in range(world_size):
        loader = LatentLoader(path, batch_size=4, rank=rank, world_size=world_size, seed=3, normalize="none",
                              shuffle_buffer=16, num_workers=num_workers, resample=False)
        for x, y in loader:
            ids = _ids(x)
            assert [i % 3 for i in ids] == y.tolist()  # labels travel with their latents
            seen += ids
        assert loader.errors.total == 0
    assert sorted(seen) == list(range(61))


def test_shuffle_is_seeded_and_rank_dependent(tmp_path):
    path = _dataset(tmp_path)
    kw = dict(batch_size=8, normalize="none", shuffle_buffer=20, world_size=2)
    a = _ids(torch.cat([x for x, _ in _take(LatentLoader(path, rank=0, seed=1, **kw), 6)]))
    b = _ids(torch.cat([x for x, _ in _take(LatentLoader(path, rank=0, seed=1, **kw), 6)]))
    c = _ids(torch.cat([x for x, _ in _take(LatentLoader(path, rank=0, seed=2, **kw), 6)]))
    d = _ids(torch.cat([x for x, _ in _take(LatentLoader(path, rank=1, seed=1, **kw), 6)]))
    assert a == b and a != c
    assert a != sorted(a)  # actually shuffled
    # Resampled mode, two ranks: each rank draws from its own half of the shards.
    shard_of = lambda i: i // 5  # noqa: E731
    assert {shard_of(i) % 2 for i in a} == {0} and {shard_of(i) % 2 for i in d} == {1}


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("strip_counts", [False, True])
def test_resume_gives_the_same_next_batches(tmp_path, num_workers, strip_counts):
    path = _dataset(tmp_path, n=60, per_shard=5)
    if strip_counts:  # stats.json without per-shard counts: skipping must read instead
        f = os.path.join(path, "stats.json")
        raw = json.load(open(f))
        raw.pop("shards")
        json.dump(raw, open(f, "w"))
    kw = dict(batch_size=4, seed=5, normalize="channel", shuffle_buffer=8, num_workers=num_workers,
              resample=True, round_shards=2, world_size=2, rank=1)
    full = _take(LatentLoader(path, **kw), 12)
    for k in (3, 7):  # 7 batches = 28 samples: skips whole rounds (10 samples each) and part of one
        resumed_loader = LatentLoader(path, start_sample=k * 4, **kw)
        resumed = _take(resumed_loader, 12 - k)
        for (xa, ya), (xb, yb) in zip(full[k:], resumed):
            torch.testing.assert_close(xa, xb, rtol=0, atol=0)
            torch.testing.assert_close(ya, yb, rtol=0, atol=0)
        assert resumed_loader.samples_yielded == 12 * 4


def test_resume_one_epoch_mode(tmp_path):
    path = _dataset(tmp_path, n=30, per_shard=4)
    kw = dict(batch_size=3, seed=2, normalize="none", shuffle_buffer=10, resample=False)
    full = [x for x, _ in LatentLoader(path, **kw)]
    resumed = [x for x, _ in LatentLoader(path, start_sample=12, **kw)]
    assert len(resumed) == len(full) - 4
    for a, b in zip(full[4:], resumed):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="multiple of batch_size"):
        LatentLoader(path, start_sample=4, **kw)
    with pytest.raises(ValueError, match="num_workers <= 1"):
        LatentLoader(path, start_sample=3, num_workers=2, **kw)


def _consumed(path, layouts, **kw):
    """Sample ids each layout's ranks consumed: layouts = [(world_size, batches per rank), ...] of one epoch
    (None: to the end); each layout after the first resumes with the earlier ones as its epoch_history."""
    seen, history = [], []
    for world, batches in layouts:
        for rank in range(world):
            loader = LatentLoader(path, rank=rank, world_size=world, epoch_history=history, **kw)
            for x, _ in itertools.islice(loader, batches):
                seen += _ids(x)
        history = history + [(world, batches * kw["batch_size"])] if batches is not None else history
    return seen


@pytest.mark.parametrize("layouts", [
    [(2, 3), (3, None)],            # 2 -> 3 ranks
    [(4, 2), (2, None)],            # 4 -> 2
    [(3, 1), (1, 2), (4, None)],    # 3 -> 1 -> 4: a re-split of a re-split
    [(2, 9), (3, None)],            # rank streams shorter than what they were asked for: exhausted ones add nothing
])
def test_one_epoch_mode_across_world_sizes_takes_every_sample_once(tmp_path, layouts):
    """A change of world size mid-epoch (the trainer's resume on M ranks of an N-rank checkpoint): over the old
    ranks' consumed samples and the new ranks' streams, every sample id of the epoch appears exactly once."""
    path = _dataset(tmp_path, n=61, per_shard=5)
    kw = dict(batch_size=4, seed=3, normalize="none", shuffle_buffer=16, resample=False)
    seen = _consumed(path, layouts, **kw)
    assert sorted(seen) == list(range(61))
    # The new ranks' share is balanced to within one sample, and it is not simply the old order.
    world = layouts[-1][0]
    history = [(w, b * 4) for w, b in layouts[:-1]]
    sizes = [sum(x.shape[0] for x, _ in LatentLoader(path, rank=r, world_size=world, epoch_history=history, **kw))
             for r in range(world)]
    assert max(sizes) - min(sizes) <= 1


def test_one_epoch_mode_resplit_resumes_exactly_and_refuses_bad_settings(tmp_path):
    path = _dataset(tmp_path, n=40, per_shard=4)
    kw = dict(batch_size=3, seed=2, normalize="none", shuffle_buffer=10, resample=False, world_size=3, rank=1,
              epoch_history=[(2, 6)])
    full = [x for x, _ in LatentLoader(path, **kw)]
    resumed = [x for x, _ in LatentLoader(path, start_sample=6, **kw)]  # a same-size resume inside the new layout
    assert len(resumed) == len(full) - 2
    for a, b in zip(full[2:], resumed):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="one-epoch mode"):
        LatentLoader(path, **{**kw, "resample": True})
    with pytest.raises(ValueError, match="num_workers <= 1"):
        LatentLoader(path, num_workers=2, **kw)
    with pytest.raises(ValueError, match="world_size > 0"):
        LatentLoader(path, **{**kw, "epoch_history": [(0, 3)]})


def _add_member(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def _corrupt_dataset(tmp_path):
    """6 good shards (ids 0..29), a truncated shard, a garbage shard, and a shard of bad samples."""
    path = _dataset(tmp_path, n=30, per_shard=5, classes=3)
    # Truncated shard holding ids 100..104 (class 1): cut inside the data of the 3rd sample's latent.
    trunc_buf = io.BytesIO()
    with tarfile.open(fileobj=trunc_buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for i in range(5):
            _add_member(tf, f"x{100 + i:09d}.latent.npy", npy_bytes(np.full((2, 2, 2), 100.0 + i, np.float32)))
            _add_member(tf, f"x{100 + i:09d}.cls", b"1")
    raw = trunc_buf.getvalue()
    with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
        third = [m for m in tf.getmembers() if m.name.endswith(".latent.npy")][2]
    open(os.path.join(path, "shard-000006.tar"), "wb").write(raw[: third.offset_data + 40])
    open(os.path.join(path, "shard-000007.tar"), "wb").write(b"this is not a tar file" * 50)
    with tarfile.open(os.path.join(path, "shard-000008.tar"), "w", format=tarfile.USTAR_FORMAT) as tf:
        obj = io.BytesIO()
        np.save(obj, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
        bad = {
            "bad_npy_garbage": {"latent.npy": b"\x93NUMPY garbage", "cls": b"0"},
            "bad_npy_object": {"latent.npy": obj.getvalue(), "cls": b"0"},
            "bad_shape": {"latent.npy": npy_bytes(np.zeros((2, 2, 3), np.float32)), "cls": b"0"},
            "bad_dtype": {"latent.npy": npy_bytes(np.zeros((2, 2, 2), np.int32)), "cls": b"0"},
            "non_finite": {"latent.npy": npy_bytes(np.full((2, 2, 2), np.inf, np.float32)), "cls": b"0"},
            "bad_cls": {"latent.npy": npy_bytes(np.full((2, 2, 2), 200.0, np.float32)), "cls": b"7"},
            "missing_latent": {"cls": b"0"},
            "good": {"latent.npy": npy_bytes(np.full((2, 2, 2), 300.0, np.float32)), "cls": b"0"},
        }
        for key, files in bad.items():
            for suffix, data in files.items():
                _add_member(tf, f"{key}.{suffix}", data)
    return path


@pytest.mark.parametrize("num_workers", [0, 2])
def test_corrupt_data_is_skipped_counted_and_not_fatal(tmp_path, num_workers):
    path = _corrupt_dataset(tmp_path)
    loader = LatentLoader(path, batch_size=4, normalize="none", shuffle_buffer=0, resample=False,
                          num_workers=num_workers)
    ids = sorted(i for x, _ in loader for i in _ids(x))
    # Every intact sample arrives: the 30 good ones, the 2 before the cut, and the good one of shard 8.
    assert ids == list(range(30)) + [100, 101, 300]
    err = loader.errors
    for reason, n in [("bad_shape", 1), ("bad_dtype", 1), ("non_finite", 1), ("bad_cls", 1)]:
        assert err.reasons.get(reason) == n, err.reasons
    assert err.reasons["bad_npy"] == 2  # garbage bytes and a pickled object array
    assert err.reasons["missing_latent"] >= 1
    assert err.reasons["corrupt_tar"] >= 2  # the truncated shard and the garbage file
    assert err.shard_errors >= 2 and err.skipped_samples >= 7
    assert "shard-000007.tar" in " ".join(err.examples)
    assert "bad_npy" in loader.report()


def test_resampled_stream_survives_corrupt_shards(tmp_path):
    path = _corrupt_dataset(tmp_path)
    loader = LatentLoader(path, batch_size=8, normalize="none", shuffle_buffer=8, resample=True, seed=0)
    batches = _take(loader, 30)
    assert len(batches) == 30 and loader.errors.total > 0
    ids = {i for x, _ in batches for i in _ids(x)}
    assert ids <= set(range(30)) | {100, 101, 300}


def test_missing_listed_shard_is_reported(tmp_path):
    path = _dataset(tmp_path, n=20, per_shard=5)
    os.remove(os.path.join(path, "shard-000002.tar"))
    loader = LatentLoader(path, batch_size=5, normalize="none", shuffle_buffer=0, resample=False)
    ids = sorted(i for x, _ in loader for i in _ids(x))
    assert ids == [i for i in range(20) if not 10 <= i < 15]
    assert loader.errors.reasons == {"missing_shard": 1}


def test_npy_decoder_matches_numpy_and_refuses_bad_input():
    from lct_fast.data.reader import NpyDecoder

    dec = NpyDecoder()
    for a in (np.arange(24, dtype=np.float16).reshape(2, 3, 4),
              np.asfortranarray(np.arange(24, dtype=np.float32).reshape(2, 3, 4))):
        buf = io.BytesIO()
        np.save(buf, a)
        for _ in range(2):  # second call uses the cached header
            got = dec(buf.getvalue())
            assert got.dtype == a.dtype and np.array_equal(got, np.load(io.BytesIO(buf.getvalue())))
    obj = io.BytesIO()
    np.save(obj, np.array([1, None], dtype=object), allow_pickle=True)
    for bad, match in [(b"garbage!!!!", "magic"), (npy_bytes(np.zeros(3))[:-2], "expected 24"),
                       (obj.getvalue(), "pickle")]:
        with pytest.raises(ValueError, match=match):
            dec(bad)
