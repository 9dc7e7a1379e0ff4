"""Shard writer, statistics and stats.json validation (SPEC §1)."""

from __future__ import annotations

import json
import os
import tarfile

import numpy as np
import pytest
import torch

from lct_fast.data import LatentLoader, RunningStats, ShardWriter, StatsError, load_stats


def _write(tmp_path, latents, labels=None, **kw):
    out = str(tmp_path / "ds")
    kw.setdefault("samples_per_shard", 7)
    with ShardWriter(out, **kw) as w:
        for i, lat in enumerate(latents):
            w.write(lat, None if labels is None else int(labels[i]), {"i": i})
    return out


def _read_all(path, **kw):
    loader = LatentLoader(path, resample=False, shuffle_buffer=0, **kw)
    xs, ys = zip(*loader)
    return torch.cat(xs).numpy(), torch.cat(ys).numpy(), loader


def test_round_trip_exact_values(tmp_path):
    rng = np.random.default_rng(0)
    lat = rng.normal(size=(40, 3, 4, 5)).astype(np.float32) * 3 + 1
    labels = rng.integers(0, 5, size=40)
    path = _write(tmp_path, lat, labels, dtype="float32", vae="my-vae", vae_scale=0.18215)

    # Raw mode: bit-exact latents and labels, in write order (one worker, no shuffle).
    x, y, _ = _read_all(path, batch_size=6, normalize="none")
    np.testing.assert_array_equal(x, lat)
    np.testing.assert_array_equal(y, labels)

    # Channel normalisation: x0 = (latent - mean)/std * sigma_d with numpy float64 stats.
    mean = lat.astype(np.float64).mean(axis=(0, 2, 3)).reshape(1, 3, 1, 1)
    std = lat.astype(np.float64).std(axis=(0, 2, 3)).reshape(1, 3, 1, 1)
    x, y, loader = _read_all(path, batch_size=6, normalize="channel", sigma_data=0.5)
    np.testing.assert_allclose(x, (lat - mean) / std * 0.5, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(loader.denormalize(torch.from_numpy(x)).numpy(), lat, rtol=1e-5, atol=1e-5)

    # Element normalisation.
    mean_e = lat.astype(np.float64).mean(axis=0)
    std_e = lat.astype(np.float64).std(axis=0)
    x, _, loader = _read_all(path, batch_size=6, normalize="element", sigma_data=0.7)
    np.testing.assert_allclose(x, (lat - mean_e) / std_e * 0.7, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(loader.denormalize(torch.from_numpy(x)).numpy(), lat, rtol=1e-5, atol=1e-5)


def test_float16_storage_and_unconditional_labels(tmp_path):
    rng = np.random.default_rng(1)
    lat = rng.normal(size=(10, 2, 3, 3)).astype(np.float32)
    path = _write(tmp_path, lat, dtype="float16")
    stats = load_stats(path)
    assert stats.dtype == "float16" and stats.num_classes == 0
    x, y, _ = _read_all(path, batch_size=4, normalize="none")
    np.testing.assert_array_equal(x, lat.astype(np.float16).astype(np.float32))
    # Unconditional: every label is num_classes (= 0), the null class id.
    np.testing.assert_array_equal(y, np.zeros(10, dtype=np.int64))


def test_stats_match_numpy(tmp_path):
    rng = np.random.default_rng(2)
    lat = (rng.standard_t(df=3, size=(101, 4, 3, 2)) * np.array([1, 2, 3, 4]).reshape(4, 1, 1) + 5).astype(np.float16)
    path = _write(tmp_path, lat, dtype="float16", stats_batch=9)  # several Chan merges
    stats = load_stats(path)
    ref = lat.astype(np.float64)
    np.testing.assert_allclose(stats.mean, ref.mean(axis=(0, 2, 3)), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(stats.std, ref.std(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(stats.mean_element, ref.mean(axis=0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(stats.std_element, ref.std(axis=0), rtol=1e-12)
    assert stats.count == 101 and stats.shape == (4, 3, 2)


@pytest.mark.parametrize("splits", [[1] * 10, [3, 7], [10], [2, 5, 3]])
def test_running_stats_any_batching(splits):
    rng = np.random.default_rng(3)
    data = rng.normal(size=(10, 2, 2, 2)) * 1e3 + 1e6  # large offset: naive sum-of-squares would lose digits
    rs = RunningStats((2, 2, 2))
    start = 0
    for n in splits:
        rs.update(data[start : start + n])
        start += n
    np.testing.assert_allclose(rs.mean_element, data.mean(axis=0), rtol=1e-13)
    np.testing.assert_allclose(rs.std_element, data.std(axis=0), rtol=1e-9)
    np.testing.assert_allclose(rs.std_channel, data.std(axis=(0, 2, 3)), rtol=1e-9)


def test_stats_json_and_shard_layout(tmp_path):
    lat = np.arange(15 * 2 * 2 * 2, dtype=np.float32).reshape(15, 2, 2, 2)
    path = _write(tmp_path, lat, labels=[i % 3 for i in range(15)], dtype="float32", vae="v", vae_scale=0.5)
    files = sorted(os.listdir(path))
    assert files == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar", "stats.json"]
    raw = json.load(open(os.path.join(path, "stats.json")))
    assert raw["count"] == 15 and raw["shape"] == [2, 2, 2] and raw["dtype"] == "float32"
    assert raw["vae"] == "v" and raw["vae_scale"] == 0.5 and raw["num_classes"] == 3
    assert [s["count"] for s in raw["shards"]] == [7, 7, 1]
    assert np.array(raw["mean_element"]).shape == (2, 2, 2) and len(raw["mean"]) == 2
    keys = []
    for name in files[:3]:
        with tarfile.open(os.path.join(path, name)) as tf:
            names = tf.getnames()
            keys += sorted({n.split(".")[0] for n in names})
            assert {n.split(".", 1)[1] for n in names} == {"latent.npy", "cls", "json"}
    assert keys == [f"{i:010d}" for i in range(15)]


def test_writer_rejects_bad_input(tmp_path):
    with ShardWriter(str(tmp_path / "a")) as w:
        w.write(np.zeros((2, 2, 2)), 1)
        with pytest.raises(ValueError, match="shape"):
            w.write(np.zeros((2, 2, 3)), 1)
        with pytest.raises(ValueError, match="class"):
            w.write(np.zeros((2, 2, 2)), None)
        with pytest.raises(ValueError, match="NaN"):
            w.write(np.full((2, 2, 2), np.nan), 1)
    with pytest.raises(FileExistsError, match="already holds a dataset"):
        ShardWriter(str(tmp_path / "a"))
    ShardWriter(str(tmp_path / "a"), overwrite=True).abort()
    assert not os.path.exists(tmp_path / "a" / "stats.json")


def test_writer_exception_leaves_no_stats_or_tmp(tmp_path):
    out = tmp_path / "b"
    with pytest.raises(RuntimeError):
        with ShardWriter(str(out), samples_per_shard=3) as w:
            for i in range(5):
                w.write(np.zeros((1, 2, 2)))
            raise RuntimeError("boom")
    assert sorted(os.listdir(out)) == ["shard-000000.tar"]  # finished shard only, no .tmp, no stats.json
    with pytest.raises(FileNotFoundError, match="missing stats.json"):
        LatentLoader(str(out), batch_size=2)


def test_missing_folder_and_stats_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found: .*nope"):
        LatentLoader(str(tmp_path / "nope"), batch_size=2)
    path = _write(tmp_path, np.zeros((3, 1, 2, 2), np.float32))
    stats_file = os.path.join(path, "stats.json")
    good = json.load(open(stats_file))

    def broken(mutate, match):
        raw = json.loads(json.dumps(good))
        mutate(raw)
        json.dump(raw, open(stats_file, "w"))
        with pytest.raises(StatsError, match=match):
            LatentLoader(path, batch_size=2)

    broken(lambda r: r.pop("std"), r"stats\.json: key 'std': required key is missing")
    broken(lambda r: r.update(mean=[0.0, 1.0]), r"stats\.json: key 'mean': expected shape \[1\]")
    broken(lambda r: r.update(shape=[1, 2]), r"key 'shape'")
    broken(lambda r: r.update(dtype="int8"), r"key 'dtype'")
    broken(lambda r: r.update(count=-1), r"key 'count'")
    broken(lambda r: r.update(std=[-1.0]), r"key 'std'")
    broken(lambda r: r.update(num_classes="x"), r"key 'num_classes'")
    broken(lambda r: r.pop("std_element"), r"key 'std_element'")
    open(stats_file, "w").write("{not json")
    with pytest.raises(StatsError, match="stats.json: not valid JSON"):
        load_stats(path)
    # element mode needs per-element stats
    raw = dict(good)
    raw.pop("mean_element"), raw.pop("std_element")
    json.dump(raw, open(stats_file, "w"))
    with pytest.raises(StatsError, match="key 'mean_element'"):
        LatentLoader(path, batch_size=2, normalize="element")
    os.remove(stats_file)
    with pytest.raises(FileNotFoundError, match=r"stats\.json"):
        load_stats(path)
