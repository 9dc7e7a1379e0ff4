"""Schedules of lct_fast.methods against hand-computed numbers from the paper's formulas."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lct_fast.methods import schedules as S


# ------------------------------------------------------------------------------------------- Karras grid
def test_karras_grid_matches_formula():
    n, smin, smax, rho = 11, 0.002, 80.0, 7.0
    sig = S.karras_sigmas(n, smin, smax, rho)
    assert sig.dtype == torch.float64
    ref = [(smin ** (1 / rho) + (i - 1) / (n - 1) * (smax ** (1 / rho) - smin ** (1 / rho))) ** rho
           for i in range(1, n + 1)]
    np.testing.assert_allclose(sig.numpy(), ref, rtol=1e-14)
    assert sig[0].item() == smin and sig[-1].item() == smax
    # Hand value: middle level (0.002^{1/7} + 0.5(80^{1/7} - 0.002^{1/7}))^7 = ((0.41156 + 1.87017)/2)^7 = 1.14087^7 ≈ 2.5152
    assert sig[5].item() == pytest.approx(((0.002 ** (1 / 7) + 80 ** (1 / 7)) / 2) ** 7, rel=1e-13)
    assert sig[5].item() == pytest.approx(2.5152, rel=1e-4)
    assert bool((sig[1:] > sig[:-1]).all())


def test_karras_grid_rejects_bad_input():
    with pytest.raises(ValueError, match="n >= 2"):
        S.karras_sigmas(1)
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        S.karras_sigmas(5, 1.0, 0.5)


# ------------------------------------------------------------------------------------- curriculum eq. 10
@pytest.mark.parametrize("k, expect", [
    (0, 11), (41_999, 11), (42_000, 21), (83_999, 21), (84_000, 41), (126_000, 81), (167_999, 81),
    (168_000, 161), (210_000, 321), (251_999, 321), (252_000, 641), (293_999, 641), (400_000, 641),
])
def test_curriculum_stage_boundaries_K294000(k, expect):
    # K' = floor(294000 / (log2(floor(640/10)) + 1)) = floor(294000 / 7) = 42000 by hand.
    assert S.curriculum_period(294_000, 10, 640) == 42_000
    assert S.curriculum_N(k, 294_000, 10, 640) == expect


def test_curriculum_non_power_of_two_and_short_runs():
    # s1/s0 = 1280/10 = 128 -> log2 = 7 -> K' = floor(1000/8) = 125
    assert S.curriculum_period(1000, 10, 1280) == 125
    assert S.curriculum_N(124, 1000, 10, 1280) == 11 and S.curriculum_N(125, 1000, 10, 1280) == 21
    # floor(100/30)=3 -> log2(3)=1.585 -> K' = floor(90 / 2.585) = 34
    assert S.curriculum_period(90, 30, 100) == 34
    assert S.curriculum_N(34, 90, 30, 100) == 61 and S.curriculum_N(68, 90, 30, 100) == 101
    # K < number of stages: K' clamps to 1 instead of dividing by zero.
    assert S.curriculum_period(3, 10, 640) == 1
    assert S.curriculum_N(2, 3, 10, 640) == 41
    with pytest.raises(ValueError, match="total_steps"):
        S.curriculum_period(0)


# ----------------------------------------------------------------------------------------- pair p(i)
@pytest.mark.parametrize("n", [11, 21, 641])
def test_pair_probs_erf_formula_and_normalised(n):
    sig = S.karras_sigmas(n)
    p = S.pair_probs(sig, -1.1, 2.0)
    assert p.shape == (n - 1,) and p.dtype == torch.float64
    assert p.sum().item() == pytest.approx(1.0, abs=1e-12)
    raw = [math.erf((math.log(sig[i + 1].item()) + 1.1) / (math.sqrt(2) * 2.0))
           - math.erf((math.log(sig[i].item()) + 1.1) / (math.sqrt(2) * 2.0)) for i in range(n - 1)]
    np.testing.assert_allclose(p.numpy(), np.array(raw) / sum(raw), rtol=1e-10)
    assert bool((p > 0).all())


def test_pair_index_sampling_frequencies():
    p = S.pair_probs(S.karras_sigmas(11))
    g = torch.Generator().manual_seed(0)
    j = S.sample_pair_indices(p, 40_000, g)
    freq = torch.bincount(j, minlength=10).double() / 40_000
    # 4 sigma of a binomial proportion
    tol = 4 * torch.sqrt(p * (1 - p) / 40_000) + 1e-4
    assert bool(((freq - p).abs() <= tol).all()), (freq, p)


# --------------------------------------------------------------------------------------------- scale c
def test_adaptive_c_eq11_values():
    # c = exp(-1.18 ln(N-1) - 0.72) = (N-1)^-1.18 * e^-0.72, computed as powers of ten independently.
    for n, hand in [(11, 0.03216), (21, 0.01420), (641, 0.0002374)]:
        ref = 10 ** (-1.18 * math.log10(n - 1)) * math.exp(-0.72)
        assert S.adaptive_c(n) == pytest.approx(ref, rel=1e-12)
        assert S.adaptive_c(n) == pytest.approx(hand, rel=2e-3)
        assert S.robust_c("adaptive", n=n, data_dim=4096) == S.adaptive_c(n)
    # authors' code coefficients
    assert S.adaptive_c(11, -1.15, -0.85) == pytest.approx(10 ** -1.15 * math.exp(-0.85), rel=1e-12)


def test_fixed_c0():
    assert S.robust_c("fixed", n=11, data_dim=4096) == pytest.approx(0.00054 * 64)
    assert S.robust_c("fixed", n=641, data_dim=256) == pytest.approx(0.00054 * 16)
    with pytest.raises(ValueError, match="c_mode"):
        S.robust_c("bogus", n=11, data_dim=4)
    with pytest.raises(ValueError, match="c_norm"):
        S.robust_c("fixed", n=11, data_dim=4, c_norm="max")


@pytest.mark.parametrize("D", [256, 1024, 4096, 16384])
def test_each_reading_starts_at_its_stated_c0(D):
    """SPEC §2's two readings, for any D, on the per-dimension mean and on the sum (c_sum = √D·c_mean).
    (a) c_norm=sum: iCT's c0 = 0.00054·√D on the summed norm, i.e. 0.00054 on the mean; eq. 11 is the summed-norm
    c at D = 4096, so on the mean it is eq. 11 / 64 whatever D (0.03216 / 64 = 0.000503 at N = 11).
    (b) c_norm=mean: 0.00054·√D and eq. 11 applied to the mean as they are."""
    rd = math.sqrt(D)
    eq11 = 10 ** (-1.18 * math.log10(10)) * math.exp(-0.72)     # N = 11
    want = {("sum", "fixed"): 0.00054, ("sum", "adaptive"): eq11 / 64,
            ("mean", "fixed"): 0.00054 * rd, ("mean", "adaptive"): eq11}
    for (c_norm, mode), c_mean in want.items():
        assert S.robust_c(mode, n=11, data_dim=D, reduction="mean", c_norm=c_norm) == pytest.approx(c_mean, rel=1e-12)
        assert S.robust_c(mode, n=11, data_dim=D, reduction="sum", c_norm=c_norm) == pytest.approx(c_mean * rd,
                                                                                                 rel=1e-12)
    # At the paper's D the two readings of eq. 11 differ by exactly √D on the same reduction.
    assert S.robust_c("adaptive", n=11, data_dim=4096, c_norm="mean") == pytest.approx(
        64 * S.robust_c("adaptive", n=11, data_dim=4096, c_norm="sum"), rel=1e-12)


def test_diffusion_cutoff():
    assert S.diffusion_cutoff(11, 0.25) == 2 and S.diffusion_cutoff(641, 0.25) == 160
    assert S.diffusion_cutoff(11, 0.0) == 0 and S.diffusion_cutoff(11, 1.0) == 11
    assert S.diffusion_cutoff(100, 0.29) == 29   # 100*0.29 = 28.999999999999996 in floating point


# ------------------------------------------------------------------------------------------------ sCT
def test_sct_time_distribution():
    g = torch.Generator().manual_seed(1)
    t = S.sample_sct_times(50_000, -1.0, 1.4, 0.5, g).double()
    assert t.dtype == torch.float64 and bool(((t > 0) & (t < math.pi / 2)).all())
    tau = torch.log(0.5 * torch.tan(t))          # invert t = arctan(e^tau / sigma_d)
    assert tau.mean().item() == pytest.approx(-1.0, abs=0.03)
    assert tau.std().item() == pytest.approx(1.4, abs=0.03)


def test_tangent_warmup():
    assert S.tangent_warmup(0, 10_000) == 0.0
    assert S.tangent_warmup(2_500, 10_000) == 0.25
    assert S.tangent_warmup(10_000, 10_000) == 1.0 and S.tangent_warmup(50_000, 10_000) == 1.0
    assert S.tangent_warmup(0, 0) == 1.0
