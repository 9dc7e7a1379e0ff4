"""The DALI reader (data.reader=dali) on its CPU pipeline: the same samples as the WebDataset reader, exact
resume, rank sharding, a truncated or corrupt shard skipped and counted, and the tiny preset training on it."""
import itertools
import os

import numpy as np
import pytest
import torch

pytest.importorskip("nvidia.dali")

from lct_fast.config import load_config  # noqa: E402
from lct_fast.data import LatentLoader, ShardWriter, build_loader  # noqa: E402
from lct_fast.data.dali_reader import DaliLoader, validate_shard  # noqa: E402

SHAPE = (3, 4, 4)


def _dataset(path, shards=3, per_shard=20, classes=5, raw=None):
    rng = np.random.default_rng(0)
    with ShardWriter(str(path), samples_per_shard=per_shard, dtype="float32", num_classes=classes) as w:
        for i in range(shards * per_shard):
            lat = rng.standard_normal(SHAPE).astype(np.float32) + i % 7
            w.write(lat, i % classes)
            if raw is not None:
                raw.append((lat, i % classes))
    return str(path)


def _rows(batches):
    x = torch.cat([b[0] for b in batches]).reshape(-1, int(np.prod(SHAPE)))
    y = torch.cat([b[1] for b in batches])
    rows = torch.cat([x, y[:, None].float()], 1).numpy()
    return rows[np.lexsort(rows.T[::-1])]


def test_one_epoch_is_the_same_multiset_as_the_webdataset_reader(tmp_path):
    path = _dataset(tmp_path / "d")
    dali = list(itertools.islice(iter(DaliLoader(path, batch_size=6, shuffle_buffer=0)), 10))   # 60 samples
    wds = list(LatentLoader(path, batch_size=6, shuffle_buffer=0, resample=False))
    assert sum(b[0].shape[0] for b in wds) == 60
    np.testing.assert_array_equal(_rows(dali), _rows(wds))
    assert dali[0][0].dtype == torch.float32 and dali[0][1].dtype == torch.int64


def test_ranks_split_the_samples(tmp_path):
    path = _dataset(tmp_path / "d")
    parts = [list(itertools.islice(iter(DaliLoader(path, batch_size=6, shuffle_buffer=0, rank=r, world_size=2)), 5))
             for r in range(2)]
    wds = list(LatentLoader(path, batch_size=6, shuffle_buffer=0, resample=False))
    np.testing.assert_array_equal(_rows(parts[0] + parts[1]), _rows(wds))
    a, b = _rows(parts[0]), _rows(parts[1])
    assert not any((a[:, None] == b[None]).all(-1).any(1))  # disjoint


def test_shuffled_stream_is_seeded_and_resumes_exactly(tmp_path):
    path = _dataset(tmp_path / "d")
    mk = lambda **kw: DaliLoader(path, batch_size=6, shuffle_buffer=32, seed=7, **kw)  # noqa: E731
    full = [x for x, _ in itertools.islice(iter(mk()), 14)]          # past one epoch (10 batches)
    again = [x for x, _ in itertools.islice(iter(mk()), 14)]
    assert all(torch.equal(p, q) for p, q in zip(full, again))
    resumed = mk(start_sample=6 * 5)
    tail = [x for x, _ in itertools.islice(iter(resumed), 9)]
    assert all(torch.equal(p, q) for p, q in zip(full[5:], tail))
    assert resumed.samples_yielded == 6 * 14
    other = [x for x, _ in itertools.islice(iter(DaliLoader(path, batch_size=6, shuffle_buffer=32, seed=8)), 3)]
    assert not all(torch.equal(p, q) for p, q in zip(full, other))  # the seed matters
    in_order = [x for x, _ in itertools.islice(iter(DaliLoader(path, batch_size=6, shuffle_buffer=0)), 10)]
    assert not all(torch.equal(p, q) for p, q in zip(full, in_order))  # and the stream is shuffled


@pytest.mark.parametrize("damage", ["truncate", "bad_header", "orphan_member", "bad_label"])
def test_a_damaged_shard_is_skipped_and_counted(tmp_path, damage):
    raw = []
    path = _dataset(tmp_path / "d", raw=raw)
    shard = os.path.join(path, "shard-000001.tar")
    if damage == "truncate":
        size = os.path.getsize(shard)
        with open(shard, "r+b") as f:
            f.truncate(size // 2 + 100)
    elif damage == "bad_header":
        data = bytearray(open(shard, "rb").read())
        i = data.index(b"'shape': (3, 4, 4)")
        data[i:i + 18] = b"'shape': (3, 4, 5)"
        open(shard, "wb").write(bytes(data))
    else:  # rewrite the shard with one more member: a .cls without its latent, or a label out of range
        import io
        import tarfile

        members = []
        with tarfile.open(shard) as tar:
            for m in tar:
                members.append((m, tar.extractfile(m).read()))
        with tarfile.open(shard, "w") as tar:
            for m, data in members:
                if damage == "bad_label" and m.name.endswith(".cls") and not any(
                        x[0].name == "bad" for x in members):
                    data = b"99"
                    damage = "done"
                m.size = len(data)
                tar.addfile(m, io.BytesIO(data))
            if damage == "orphan_member":
                info = tarfile.TarInfo("zzz.cls")
                info.size = 1
                tar.addfile(info, io.BytesIO(b"1"))
    assert validate_shard(shard, SHAPE, True, 5)[1] is not None or damage == "truncate"
    loader = DaliLoader(path, batch_size=5, shuffle_buffer=0)
    assert loader.errors.shard_errors == 1 and "invalid_shard" in loader.errors.reasons
    assert loader.errors.skipped_samples == 20       # the whole shard, as stats.json counts it
    assert "skipped 20 samples and 1 shard errors" in loader.report()
    assert "shard-000001.tar" in loader.errors.examples[0]
    got = list(itertools.islice(iter(loader), 8))   # one epoch of the two good shards: 40 samples
    back = [(loader.normalizer.denormalize(x), y) for x, y in got]
    expect = [(torch.from_numpy(lat)[None], torch.tensor([c])) for lat, c in raw[:20] + raw[40:]]
    np.testing.assert_allclose(_rows(back), _rows(expect), rtol=1e-5, atol=1e-5)


def test_build_loader_picks_the_reader_and_bad_input_is_clear(tmp_path, monkeypatch):
    path = _dataset(tmp_path / "d")
    cfg = load_config("tiny", ["data.reader=dali", f"data.path={path}", "data.shuffle_buffer=8"]).data
    loader = build_loader(cfg, batch_size=4, seed=0)
    assert isinstance(loader, DaliLoader) and next(iter(loader))[0].shape == (4, *SHAPE)
    import lct_fast.data.dali_reader as DR

    monkeypatch.setattr(DR, "dali_available", lambda: (False, "nvidia-dali is not importable (test)"))
    with pytest.raises(ImportError, match="data.reader=dali: nvidia-dali"):
        build_loader(cfg, batch_size=4)
    from lct_fast.config import ConfigError

    with pytest.raises(ConfigError, match="data.reader"):
        load_config("tiny", ["data.reader=tfrecord"])


def test_tiny_preset_trains_on_the_dali_reader(tmp_path):
    """The trainer builds its stream through build_loader: the tiny preset trains on DALI like on WebDataset."""
    from lct_fast.trainer import Trainer

    sets = ["model.width=32", "train.global_batch=8", "train.log_interval=16", "train.ckpt_interval=0",
            "train.sample_interval=0", "train.eval_interval=0", "optim.warmup_samples=0", "data.shuffle_buffer=64"]
    runs = {}
    for reader, kind in (("dali", DaliLoader), ("webdataset", LatentLoader)):
        tr = Trainer(load_config("tiny", sets + [f"data.reader={reader}"]), str(tmp_path / reader))
        summary = tr.run(max_samples=64)
        assert type(tr.loader) is kind
        runs[reader] = summary
        assert summary["samples"] == 64 and np.isfinite(summary["final"]["loss"])
    # Same data, model, seeds and steps: the two streams differ only in sample order, so the losses agree in
    # scale (a wrong normalisation or label decoding would move them by far more).
    a, b = runs["dali"]["final"]["loss"], runs["webdataset"]["final"]["loss"]
    assert 0.5 < a / b < 2.0


def test_non_finite_latents_are_dropped_and_counted(tmp_path):
    raw = []
    path = _dataset(tmp_path / "d", shards=1, raw=raw)
    loader = DaliLoader(path, batch_size=5, shuffle_buffer=0)
    real = loader._to_torch

    def poisoned(out):
        x = out[0].as_array().copy()
        x[2] = np.nan
        return real(type("Out", (), {"__getitem__": lambda self, i: _Arr(x) if i == 0 else out[i]})())

    class _Arr:
        def __init__(self, a):
            self.a = a

        def as_array(self):
            return self.a

    loader._to_torch = poisoned
    x, y = next(iter(loader))
    assert x.shape[0] == 4 and y.shape[0] == 4 and torch.isfinite(x).all()
    assert loader.errors.skipped_samples == 1 and loader.errors.reasons == {"non_finite": 1}
