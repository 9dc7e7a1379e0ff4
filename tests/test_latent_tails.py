"""benchmarks/bench_latent_tails.py's summary of a latent set against scipy's moments: the worst channel's
kurtosis, the channels' median, the extremes and the neighbour-difference statistics."""
import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

scipy_stats = pytest.importorskip("scipy.stats")


def test_summary_finds_planted_outliers():
    from benchmarks.bench_latent_tails import VARIANTS, summary

    rng = np.random.default_rng(0)
    z = rng.standard_normal((4000, 4, 8, 8))
    spikes = rng.random(z[:, 2].shape) < 0.005           # salt-and-pepper outliers in channel 2 only
    z[:, 2][spikes] = rng.choice([-12.0, 12.0], size=int(spikes.sum()))
    row = summary("t", VARIANTS["committed"], z, psnr=20.0, steps=None, seconds=0.0)

    ref = [scipy_stats.kurtosis(z[:, c].ravel(), fisher=True) for c in range(4)]
    assert row["kurtosis_max"] == pytest.approx(max(ref), abs=0.01)
    assert row["kurtosis_max"] > 10 and abs(row["kurtosis_median"]) < 0.5   # one heavy channel, three Gaussian
    std2 = z[:, 2].std()
    assert row["max"] == pytest.approx(round((12.0 - z[:, 2].mean()) / std2, 1), abs=0.11)
    # a Gaussian channel has 0.006 % beyond 4 std; the spiked one ~0.5 %, averaged over 4 channels ~0.13 %
    assert 0.08 < row["beyond_4std_pct"] < 0.2
    d = z[:, :, 1:] - z[:, :, :-1]
    ref_d = max(scipy_stats.kurtosis(d[:, c].ravel(), fisher=True) for c in range(4))
    assert row["diff_kurtosis_max"] == pytest.approx(ref_d, abs=0.01)
    assert (row["channels"], row["latent"], row["steps"], row["train_s"]) == (4, "8x8", "", "")
