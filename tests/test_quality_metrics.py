"""lct_fast.quality: each metric against an independent reference, and its power to tell a Gaussian fit from
heavy-tailed data (the reason the benchmark uses it)."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import scipy.linalg
from scipy.spatial.distance import cdist

from lct_fast.quality import metrics as qm


def rng(seed=0):
    return np.random.default_rng(seed)


def test_sliced_wasserstein_1d_equals_sorted_coupling():
    # In 1-D every projection is ±1: SW_2 is the W_2 of the sorted (monotone) coupling.
    x, y = rng(0).normal(size=(500, 1)), rng(1).laplace(size=(500, 1)) + 0.3
    ref = np.sqrt(np.mean((np.sort(x[:, 0]) - np.sort(y[:, 0])) ** 2))
    assert qm.sliced_wasserstein(x, y, n_projections=64) == pytest.approx(ref, rel=1e-6)


def test_sliced_wasserstein_tells_gaussian_fit_from_heavy_tails():
    # Laplace data (excess kurtosis 3) vs a Gaussian with the *same* mean and covariance: the Fréchet distance
    # on the raw values cannot tell them apart (the fit matches both moments), SWD separates them well beyond
    # the sampling noise of two Laplace samples. (In many iid dims projections average towards a Gaussian:
    # 2 dims keep the tails visible.)
    d, n = 2, 8000
    data = rng(0).laplace(size=(n, d)) / np.sqrt(2)
    other = rng(1).laplace(size=(n, d)) / np.sqrt(2)
    fit = qm.GaussianFit.fit(data).sample(n, seed=2).astype(np.float64)
    noise = qm.sliced_wasserstein(data, other, seed=3)
    gap = qm.sliced_wasserstein(data, fit, seed=3)
    assert gap > 2.5 * noise, (gap, noise)
    assert qm.frechet_distance(data, fit) < 3 * qm.frechet_distance(data, other) + 1e-3


def test_knn_precision_recall_matches_bruteforce():
    real, fake = rng(0).normal(size=(60, 3)), rng(1).normal(size=(50, 3)) * 1.5 + 0.5
    k = 3

    def radii(a):
        return np.sort(cdist(a, a), axis=1)[:, k]          # column 0 is the point itself

    def covered(a, b):
        return (cdist(a, b) <= radii(b)[None]).any(axis=1).mean()

    p, r = qm.knn_precision_recall(real, fake, k=k)
    assert p == pytest.approx(covered(fake, real), abs=1e-12)
    assert r == pytest.approx(covered(real, fake), abs=1e-12)
    assert qm.knn_precision_recall(real, real, k=k) == (1.0, 1.0)
    assert qm.knn_precision_recall(real, real + 100.0, k=k) == (0.0, 0.0)


def test_frechet_distance_against_scipy_sqrtm():
    a = rng(0).normal(size=(400, 5)) @ rng(1).normal(size=(5, 5))
    b = rng(2).normal(size=(300, 5)) * 2 + 1
    ma, mb = a.mean(0), b.mean(0)
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    ref = np.sum((ma - mb) ** 2) + np.trace(ca + cb - 2 * scipy.linalg.sqrtm(ca @ cb).real)
    assert qm.frechet_distance(a, b) == pytest.approx(ref, rel=1e-6)
    assert qm.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)


def test_kernel_distance_matches_direct_unbiased_mmd():
    a, b = rng(0).normal(size=(30, 4)), rng(1).normal(size=(30, 4)) + 0.5
    kern = lambda x, y: (x @ y / 4 + 1) ** 3  # noqa: E731
    mmd = (sum(kern(a[i], a[j]) for i, j in itertools.permutations(range(30), 2)) / (30 * 29)
           + sum(kern(b[i], b[j]) for i, j in itertools.permutations(range(30), 2)) / (30 * 29)
           - 2 * np.mean([kern(x, y) for x in a for y in b]))
    mean, std = qm.kernel_distance(a, b, subsets=3, subset_size=30)
    assert mean == pytest.approx(mmd, rel=1e-9) and std == pytest.approx(0.0, abs=1e-9)
    same = qm.kernel_distance(rng(2).normal(size=(600, 4)), rng(3).normal(size=(600, 4)), subsets=5)[0]
    assert abs(same) < 0.1 * mmd


def test_gaussian_fit_moments_and_per_class_sampling():
    x = rng(0).normal(size=(5000, 2, 2)) @ np.array([[1.0, 0.5], [0.0, 2.0]]) + 3.0
    one = qm.GaussianFit.fit(x)
    s = one.sample(40000, seed=1).reshape(40000, -1)
    flat = x.reshape(5000, -1)
    np.testing.assert_allclose(s.mean(0), flat.mean(0), atol=0.05)
    np.testing.assert_allclose(np.cov(s, rowvar=False), np.cov(flat, rowvar=False), atol=0.1)
    labels = (np.arange(5000) % 2)
    x[labels == 1] += 10.0
    per = qm.GaussianFit.fit(x, labels)
    want = np.array([0, 1] * 500)
    s2 = per.sample(1000, labels=want, seed=2).reshape(1000, -1)
    assert (s2[want == 1].mean() - s2[want == 0].mean()) == pytest.approx(10.0, abs=0.3)
    with pytest.raises(ValueError, match="one label per sample"):
        per.sample(10, seed=0)


def test_tail_stats_gaussian_and_laplace():
    g = qm.tail_stats(rng(0).normal(size=(20000, 1, 4, 4)))[0]
    assert g["q1"] == pytest.approx(-0.674, abs=0.02) and g["q3"] == pytest.approx(0.674, abs=0.02)
    assert abs(g["excess_kurtosis"]) < 0.1
    lap = qm.tail_stats(rng(1).laplace(size=(20000, 1, 4, 4)))[0]
    assert lap["excess_kurtosis"] == pytest.approx(3.0, abs=0.3)
    assert lap["frac_beyond_4std"] > 10 * g["frac_beyond_4std"]


def test_class_accuracy_and_mean_std():
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    assert qm.class_accuracy(probs, np.array([0, 1, 1])) == pytest.approx(2 / 3)
    assert qm.mean_std([1.0, 3.0]) == (2.0, pytest.approx(np.sqrt(2.0)))
