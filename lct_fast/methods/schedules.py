"""Noise grids, curricula and scale schedules of the two training methods (SPEC §2–3).

Pure functions: no module state, no global RNG. Quantities that feed a sum of many small terms or a
difference of nearly equal numbers (Karras grid, erf pair probabilities) are computed in float64.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

__all__ = [
    "karras_sigmas", "curriculum_period", "curriculum_N", "pair_probs", "fixed_c", "adaptive_c",
    "robust_c", "C_NORMS", "EQ11_REF_DIM", "diffusion_cutoff", "sample_pair_indices", "sct_time_from_tau",
    "sample_sct_times", "tangent_warmup",
]


def karras_sigmas(n: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0, *,
                  device: Optional[torch.device] = None) -> torch.Tensor:
    """Karras grid σ_1 < … < σ_N (float64), σ_i = (σ_min^{1/ρ} + (i−1)/(N−1)·(σ_max^{1/ρ} − σ_min^{1/ρ}))^ρ.

    σ_1 = σ_min and σ_N = σ_max exactly (paper §3, Karras et al. 2022).
    """
    if n < 2:
        raise ValueError(f"karras_sigmas: need n >= 2 noise levels, got {n}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"karras_sigmas: need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    frac = torch.arange(n, dtype=torch.float64, device=device) / (n - 1)
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    sig = (lo + frac * (hi - lo)) ** rho
    # Pin the end points: (x^{1/ρ})^ρ is not exactly x in floating point.
    sig[0], sig[-1] = sigma_min, sigma_max
    return sig


def curriculum_period(total_steps: int, s0: int = 10, s1: int = 640) -> int:
    """K' = ⌊K / (log2⌊s1/s0⌋ + 1)⌋ of eq. 10 (iterations per doubling stage), at least 1.

    Runs shorter than the number of stages get K' = 1 (N doubles every iteration until s1) rather
    than a division by zero.
    """
    if total_steps < 1:
        raise ValueError(f"curriculum: total_steps (K) must be >= 1, got {total_steps}")
    if s0 < 1 or s1 < s0:
        raise ValueError(f"curriculum: need 1 <= s0 <= s1, got s0={s0}, s1={s1}")
    stages = math.log2(s1 // s0) + 1.0
    return max(1, int(math.floor(total_steps / stages)))


def curriculum_N(step: int, total_steps: int, s0: int = 10, s1: int = 640) -> int:
    """Number of discretisation levels N(k) = min(s0·2^⌊k/K'⌋, s1) + 1 (paper eq. 10)."""
    if step < 0:
        raise ValueError(f"curriculum: step must be >= 0, got {step}")
    kp = curriculum_period(total_steps, s0, s1)
    stage = step // kp
    # Cap the exponent before shifting so huge step counts cannot overflow.
    doublings = min(stage, 64)
    return int(min(s0 * (2 ** doublings), s1)) + 1


def pair_probs(sigmas: torch.Tensor, p_mean: float = -1.1, p_std: float = 2.0) -> torch.Tensor:
    """Discrete lognormal over adjacent pairs (σ_i, σ_{i+1}), i = 1..N−1 (iCT; float64, sums to 1).

    p(i) ∝ erf((ln σ_{i+1} − P_mean)/(√2·P_std)) − erf((ln σ_i − P_mean)/(√2·P_std)).
    """
    if sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ValueError(f"pair_probs: expected a 1-D grid of >= 2 sigmas, got shape {tuple(sigmas.shape)}")
    if p_std <= 0:
        raise ValueError(f"pair_probs: p_std must be > 0, got {p_std}")
    s = sigmas.to(torch.float64)
    e = torch.special.erf((torch.log(s) - p_mean) / (math.sqrt(2.0) * p_std))
    w = e[1:] - e[:-1]
    total = w.sum()
    if not bool(total > 0):
        raise ValueError("pair_probs: all pair probabilities are zero (grid far outside the lognormal mass)")
    return w / total


def fixed_c(data_dim: int, c0_coeff: float = 0.00054) -> float:
    """iCT's fixed robustness scale c0 = c0_coeff·√D (Song & Dhariwal 2023; paper §4.5)."""
    return c0_coeff * math.sqrt(data_dim)


def adaptive_c(n: int, a: float = -1.18, b: float = -0.72) -> float:
    """Adaptive scale c = exp(a·ln(N(k) − 1) + b) (paper eq. 11; authors' code used a=−1.15, b=−0.85)."""
    if n < 2:
        raise ValueError(f"adaptive_c: need N(k) >= 2, got {n}")
    return math.exp(a * math.log(n - 1) + b)


C_NORMS = ("sum", "mean")
EQ11_REF_DIM = 4 * 32 * 32
"""The data dimension of the paper's latents (CelebA-HQ 256 through SD-VAE: 4x32x32), where eq. 11 was fitted."""


def robust_c(mode: str, *, n: int, data_dim: int, c0_coeff: float = 0.00054, a: float = -1.18,
             b: float = -0.72, reduction: str = "mean", c_norm: str = "mean",
             ref_dim: int = EQ11_REF_DIM) -> float:
    """The scale c used by the robust distance on the per-sample ``reduction`` of the squared difference, at
    curriculum size N = n: ``fixed`` (iCT's c0 = c0_coeff·√D) or ``adaptive`` (eq. 11).

    ``c_norm`` is the norm on which those formulas define c (SPEC §2; the authors' training code is not public,
    and eq. 11 at N = 11 gives 0.032 ≈ 0.00054·√4096 = 0.035, which fits both readings):

    * ``sum`` — reading (a): iCT's definition, c on the squared norm summed over the D dims; eq. 11 is that c at
      the paper's D = ``ref_dim`` and scales like c0, by √(D/ref_dim), at other D;
    * ``mean`` — reading (b): both formulas applied to the per-dimension mean, a c √D× larger than iCT's for
      the same loss.

    The result is then converted to ``reduction``: √(Σ + c²) − c = √D·(√(m + (c/√D)²) − c/√D) with m = Σ/D,
    and ln(1 + Σ/(2c²)) = ln(1 + m/(2(c/√D)²)), so a c on the sum is c/√D on the mean. ``mean`` and ``sum``
    then train the same loss (identical Cauchy / Geman–McClure, √D× for pseudo-Huber, D× for L2).
    """
    if reduction not in C_NORMS:
        raise ValueError(f"robust_c: reduction must be 'mean' or 'sum', got {reduction!r}")
    if c_norm not in C_NORMS:
        raise ValueError(f"robust_c: c_norm must be 'sum' or 'mean', got {c_norm!r}")
    if mode == "fixed":
        c = fixed_c(data_dim, c0_coeff)
    elif mode == "adaptive":
        c = adaptive_c(n, a, b)
        if c_norm == "sum":
            c *= math.sqrt(data_dim / ref_dim)
    else:
        raise ValueError(f"robust_c: c_mode must be 'fixed' or 'adaptive', got {mode!r}")
    if c_norm == reduction:
        return c
    return c / math.sqrt(data_dim) if c_norm == "sum" else c * math.sqrt(data_dim)


def diffusion_cutoff(n: int, r: float) -> int:
    """⌊N·r⌋: pairs with 1-based index i ≤ this get the diffusion loss (paper eq. 9)."""
    if not 0.0 <= r <= 1.0:
        raise ValueError(f"diffusion_cutoff: r must be in [0, 1], got {r}")
    # A tiny epsilon guards against N·r landing just below an integer in floating point (e.g. 0.29·100).
    return int(math.floor(n * r + 1e-9))


def sample_pair_indices(probs: torch.Tensor, batch: int, generator: torch.Generator) -> torch.Tensor:
    """Draw ``batch`` 0-based pair indices j (pair (σ_{j+1}, σ_{j+2}) in 1-based terms) from ``probs``.

    Sampling happens on the generator's device; the result is a LongTensor there.
    """
    p = probs.to(device=generator.device)
    return torch.multinomial(p, batch, replacement=True, generator=generator)


def sct_time_from_tau(tau: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """t = arctan(e^τ / σ_d) ∈ (0, π/2) (sCM; τ is the log of the EDM noise level)."""
    return torch.atan(torch.exp(tau) / sigma_data)


def sample_sct_times(batch: int, p_mean: float, p_std: float, sigma_data: float, generator: torch.Generator,
                     *, device: Optional[torch.device] = None) -> torch.Tensor:
    """t = arctan(e^τ/σ_d), τ ~ N(P_mean, P_std²), as float32 [batch] on ``device``.

    Computed in float64 so that t stays strictly inside (0, π/2) for the extreme draws.
    """
    tau = torch.randn(batch, generator=generator, device=generator.device, dtype=torch.float64)
    t = sct_time_from_tau(tau * p_std + p_mean, sigma_data)
    return t.to(device=device if device is not None else generator.device, dtype=torch.float32)


def tangent_warmup(step: int, warmup: int) -> float:
    """Tangent warm-up factor r = min(1, k/H) (sCM §4); H = 0 disables the warm-up (r = 1)."""
    if warmup <= 0:
        return 1.0
    return min(1.0, max(0, step) / warmup)
