"""Embedded synthetic dataset: caching, SD-VAE-like heavy tails, learnable class structure."""

from __future__ import annotations

import os
import types

import numpy as np
import pytest
import torch

from lct_fast.data import LatentLoader, build_loader, ensure_synthetic, load_stats, resolve_dataset


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("cache"))
    return root, ensure_synthetic(dict(num_samples=4096, channels=4, resolution=8, num_classes=4, seed=0), root)


def _all_normalized(path):
    loader = LatentLoader(path, batch_size=512, resample=False, shuffle_buffer=0, normalize="channel", sigma_data=1.0)
    xs, ys = zip(*loader)
    return torch.cat(xs).double().numpy(), torch.cat(ys).numpy()


def test_written_once_atomically_and_reused(synth):
    root, path = synth
    stats = load_stats(path)
    assert stats.count == 4096 and stats.shape == (4, 8, 8) and stats.num_classes == 4
    mtime = os.path.getmtime(os.path.join(path, "stats.json"))
    again = ensure_synthetic(types.SimpleNamespace(num_samples=4096, channels=4, resolution=8, num_classes=4, seed=0), root)
    assert again == path and os.path.getmtime(os.path.join(path, "stats.json")) == mtime
    assert [d for d in os.listdir(root) if d.startswith(".tmp")] == []  # no leftover temp folders
    other = ensure_synthetic(dict(num_samples=64, channels=4, resolution=8, num_classes=4, seed=1), root)
    assert other != path and load_stats(other).count == 64


def test_heavy_tailed_like_sd_vae_latents(synth):
    x, _ = _all_normalized(synth[1])  # per-channel standardised (sigma_data = 1)
    flat = x.ravel()
    assert abs(flat.mean()) < 1e-4 and abs(flat.std() - 1) < 1e-4
    q1, q3 = np.quantile(flat, [0.25, 0.75])
    assert -0.9 < q1 < -0.5 and 0.5 < q3 < 0.9  # the body
    assert flat.min() < -7.5 and flat.max() > 6.0  # impulsive outliers, paper Fig. 1: about -9 ... 7
    kurt = ((flat - flat.mean()) ** 4).mean() / flat.var() ** 2 - 3
    assert kurt > 1.5  # far heavier tails than a Gaussian (0)
    assert 0.0005 < np.mean(np.abs(flat) > 5) < 0.005  # spikes are sparse


def test_classes_are_learnable(synth):
    """1-nearest-neighbour on held-out samples recovers the class far above chance (25 %)."""
    x, y = _all_normalized(synth[1])
    x = x.reshape(len(x), -1)
    train, test = slice(0, 3072), slice(3072, 4096)
    d = (x[test] ** 2).sum(1)[:, None] + (x[train] ** 2).sum(1)[None] - 2 * x[test] @ x[train].T
    pred = y[train][d.argmin(axis=1)]
    assert np.mean(pred == y[test]) > 0.9


def test_config_without_path_uses_synthetic(tmp_path, monkeypatch):
    monkeypatch.setenv("LCT_FAST_CACHE", str(tmp_path / "envcache"))
    cfg = types.SimpleNamespace(
        path="", normalize="channel", shuffle_buffer=64, num_workers=0, resample=True,
        synthetic=types.SimpleNamespace(num_samples=256, channels=4, resolution=8, num_classes=3, seed=0),
    )
    path = resolve_dataset(cfg)
    assert path.startswith(str(tmp_path / "envcache"))
    loader = build_loader(cfg, batch_size=16, seed=0)
    x, y = next(iter(loader))
    assert x.shape == (16, 4, 8, 8) and y.dtype == torch.int64 and int(y.max()) < 3
    cfg.path = str(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="missing"):
        build_loader(cfg, batch_size=16)
