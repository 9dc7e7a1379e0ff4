"""Discrete-time improved latent consistency training (``ict``; latent CT paper 2502.01441, SPEC §2).

Per sample: draw a pair (σ_i, σ_{i+1}) of the Karras grid of N(k) levels (eq. 10) from the discrete
lognormal, noise x0 at both levels with the *same* z (OT-coupled if enabled, §4.4), and compare
the online f_θ(x_{i+1}, σ_{i+1}) with the stop-gradient target f_θ⁻(x_i, σ_i) (θ⁻ = sg θ, same dropout
mask) through a robust distance (eqs. 6–8) weighted by λ = 1/(σ_{i+1} − σ_i); on the smallest ⌊N·r⌋
pairs add the diffusion loss (eq. 9).

Every improvement of Table 2a is a switch (see :class:`ICTLoss`), so iLCT and the ablation rows are
presets of the same object.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch import nn

from ..profiler.phases import phase
from ..validate import ConfigError, choice, positive, unit
from . import schedules
from .base import Draw, MethodLoss
from .common import Coupler, config_coupler
from .distances import reduce_squared, robust_distance
from ..registry import MethodSpec, register
from .sampling import Sampler, check_steps, conditioned, eval_no_grad, guided, next_noise

__all__ = ["ICTConfig", "ICTLoss", "ict_sigmas", "ict_sample", "SPEC"]


@dataclass
class ICTConfig:
    sigma_min: float = 0.002
    """Smallest noise level (boundary condition f(x, sigma_min) = x)."""
    sigma_max: float = 80.0
    """Largest noise level (1-step sampling starts at sigma_max * z)."""
    rho: float = 7.0
    """Karras grid exponent."""
    s0: int = 10
    """Curriculum: initial number of discretisation steps (eq. 10)."""
    s1: int = 640
    """Curriculum: final number of discretisation steps (eq. 10)."""
    p_mean: float = -1.1
    """Discrete lognormal pair sampling: mean of ln sigma."""
    p_std: float = 2.0
    """Discrete lognormal pair sampling: std of ln sigma."""
    distance: str = "cauchy"
    """Robust distance: l2 | pseudo_huber (eq. 7) | cauchy (eq. 6) | geman_mcclure (eq. 8)."""
    reduction: str = "mean"
    """Per-sample reduction of the squared difference over the D latent dims: mean | sum. c is converted to it
    (see c_norm), so both train the same loss (identical Cauchy / Geman-McClure, sqrt(D) x pseudo-Huber)."""
    c_mode: str = "adaptive"
    """Robustness scale c: fixed (c0 = c0_coeff * sqrt(D), iCT) | adaptive (eq. 11)."""
    c_norm: str = "mean"
    """The norm on which c0 and eq. 11 define c (SPEC §2): sum (reading a: iCT's summed squared norm; eq. 11 is
    c at the paper's D = c_ref_dim and scales by sqrt(D / c_ref_dim)) | mean (reading b: both applied to the
    per-dimension mean, a c sqrt(D) x larger than iCT's). With reduction=mean, reading a gives c0 = c0_coeff and
    eq. 11 / 64; reading b gives c0 = c0_coeff * sqrt(D) and eq. 11 as is."""
    c_ref_dim: int = 4096
    """Reading a: the data dimension at which eq. 11 was fitted (the paper's 4x32x32 latents)."""
    c0_coeff: float = 0.00054
    """Fixed c: c0 = c0_coeff * sqrt(D) on the c_norm norm."""
    c_a: float = -1.18
    """Adaptive c (eq. 11): c = exp(c_a * ln(N(k) - 1) + c_b). Authors' code used -1.15."""
    c_b: float = -0.72
    """Adaptive c (eq. 11) intercept. Authors' code used -0.85."""
    diffusion_r: float = 0.25
    """Diffusion loss (eq. 9) on pair indices i <= floor(N * r); 0 disables it."""
    diffusion_weight: float = 5.0
    """Weight of the diffusion loss term (the authors' released code: 5)."""
    diffusion_sigma_weight: str = "edm"
    """Per-sigma weighting of the diffusion loss at the online level: edm (1/sigma^2 + 1/sigma_d^2, the
    authors' code; it puts the term on the scale of the consistency term) | none | lambda | snr."""
    diffusion_average: str = "selected"
    """Average of the diffusion term: selected (over the samples whose pair gets it, the authors' code) | batch
    (over the whole batch, i.e. diluted by the selected fraction)."""
    sigma_mid: float = 0.821
    """Intermediate noise level for 2-step sampling."""
    noise_scale: float = 250.0
    """The backbone sees c_noise = noise_scale * ln(sigma) (iCT / CM: 250) in its positional embedding."""

    def __post_init__(self) -> None:
        positive("method.ict.sigma_min", self.sigma_min)
        positive("method.ict.noise_scale", self.noise_scale)
        if self.sigma_max <= self.sigma_min:
            raise ConfigError(f"method.ict.sigma_max: expected > sigma_min={self.sigma_min}, got {self.sigma_max}")
        positive("method.ict.rho", self.rho)
        positive("method.ict.s0", self.s0)
        if self.s1 < self.s0:
            raise ConfigError(f"method.ict.s1: expected >= s0={self.s0}, got {self.s1}")
        positive("method.ict.p_std", self.p_std)
        choice("method.ict.distance", self.distance, ["l2", "pseudo_huber", "cauchy", "geman_mcclure"])
        choice("method.ict.reduction", self.reduction, ["mean", "sum"])
        choice("method.ict.c_mode", self.c_mode, ["fixed", "adaptive"])
        choice("method.ict.c_norm", self.c_norm, ["sum", "mean"])
        positive("method.ict.c_ref_dim", self.c_ref_dim)
        positive("method.ict.c0_coeff", self.c0_coeff)
        unit("method.ict.diffusion_r", self.diffusion_r, closed=True)
        positive("method.ict.diffusion_weight", self.diffusion_weight, allow_zero=True)
        choice("method.ict.diffusion_sigma_weight", self.diffusion_sigma_weight, ["edm", "none", "lambda", "snr"])
        choice("method.ict.diffusion_average", self.diffusion_average, ["selected", "batch"])
        if not self.sigma_min < self.sigma_mid < self.sigma_max:
            raise ConfigError(f"method.ict.sigma_mid: expected in (sigma_min, sigma_max), got {self.sigma_mid}")




class ICTLoss(MethodLoss):
    """iCT/iLCT loss with the latent CT paper's switches.

    Switches (explicit arguments; :meth:`from_config` reads them from ``MethodConfig.ict``): ``distance``
    (l2 | pseudo_huber | cauchy | geman_mcclure), ``c_mode`` (fixed c0 = c0_coeff·√D | adaptive eq. 11 with
    c_a, c_b) on the ``c_norm`` norm (sum | mean: SPEC §2's two readings), converted to ``reduction``;
    ``diffusion_weight`` / ``diffusion_r`` (0 disables eq. 9), and the noise ``coupler`` (§4.4).

    Args:
        data_dim: D = C·H·W of one latent.
        total_steps: K, the number of optimizer iterations of the run (curriculum length).
        coupler: ``(x0, z, labels) -> (z paired with x0, cost ratio)`` with the labels the network sees; None
            keeps the drawn pairing.
    """

    def __init__(self, *, data_dim: int, total_steps: int, sigma_data: float, label_dropout: float,
                 sigma_min: float, sigma_max: float, rho: float, s0: int, s1: int, p_mean: float, p_std: float,
                 distance: str, reduction: str, c_mode: str, c0_coeff: float, c_a: float, c_b: float,
                 c_norm: str = "mean", c_ref_dim: int = schedules.EQ11_REF_DIM,
                 diffusion_r: float, diffusion_weight: float, diffusion_sigma_weight: str,
                 diffusion_average: str = "selected", coupler: Optional[Coupler] = None) -> None:
        super().__init__(data_dim=data_dim, sigma_data=sigma_data, label_dropout=label_dropout, noise_std=1.0,
                         coupler=coupler)
        if total_steps < 1:
            raise ValueError(f"ICTLoss: total_steps must be >= 1, got {total_steps}")
        self.total_steps = int(total_steps)
        self.sigma_min, self.sigma_max, self.rho = float(sigma_min), float(sigma_max), float(rho)
        self.s0, self.s1 = int(s0), int(s1)
        self.p_mean, self.p_std = float(p_mean), float(p_std)
        self.distance, self.reduction = str(distance), str(reduction)
        self.c_mode, self.c0_coeff = str(c_mode), float(c0_coeff)
        self.c_a, self.c_b = float(c_a), float(c_b)
        self.c_norm, self.c_ref_dim = str(c_norm), int(c_ref_dim)
        self.diffusion_r, self.diffusion_weight = float(diffusion_r), float(diffusion_weight)
        self.diffusion_sigma_weight = str(diffusion_sigma_weight)
        self.diffusion_average = str(diffusion_average)
        # Fail at construction, not at step 1, on a bad switch value.
        robust_distance(self.distance, torch.zeros(1), 1.0)
        reduce_squared(torch.zeros(1, 1), self.reduction)
        self.c_at(2)
        if self.diffusion_sigma_weight not in ("edm", "none", "lambda", "snr"):
            raise ValueError(f"ICTLoss: diffusion_sigma_weight must be edm|none|lambda|snr, "
                             f"got {self.diffusion_sigma_weight!r}")
        if self.diffusion_average not in ("selected", "batch"):
            raise ValueError(f"ICTLoss: diffusion_average must be selected|batch, got {self.diffusion_average!r}")
        self._grid_cache: dict = {}

    @classmethod
    def from_config(cls, cfg: Any, *, data_dim: int, total_steps: int, coupler: Optional[Coupler] = None
                    ) -> "ICTLoss":
        """From a ``MethodConfig`` (``sigma_data``, ``label_dropout``, ``ict``); ``coupler``: the trainer's
        (default: the per-micro-batch coupling of ``cfg.ot``)."""
        ict = cfg.ict
        return cls(data_dim=data_dim, total_steps=total_steps, sigma_data=cfg.sigma_data,
                   label_dropout=cfg.label_dropout, sigma_min=ict.sigma_min, sigma_max=ict.sigma_max, rho=ict.rho,
                   s0=ict.s0, s1=ict.s1, p_mean=ict.p_mean, p_std=ict.p_std, distance=ict.distance,
                   reduction=ict.reduction, c_mode=ict.c_mode, c0_coeff=ict.c0_coeff, c_a=ict.c_a, c_b=ict.c_b,
                   c_norm=ict.c_norm, c_ref_dim=ict.c_ref_dim,
                   diffusion_r=ict.diffusion_r, diffusion_weight=ict.diffusion_weight,
                   diffusion_sigma_weight=ict.diffusion_sigma_weight,
                   diffusion_average=getattr(ict, "diffusion_average", "selected"),
                   coupler=coupler if coupler is not None else config_coupler(cfg.ot))

    # ------------------------------------------------------------------ schedules
    def num_levels(self, step: int) -> int:
        """N(k) (eq. 10)."""
        return schedules.curriculum_N(step, self.total_steps, self.s0, self.s1)

    def c_at(self, n: int) -> float:
        """Robustness scale c for N(k) = n (fixed c0 or eq. 11)."""
        return schedules.robust_c(self.c_mode, n=n, data_dim=self.data_dim, c0_coeff=self.c0_coeff,
                                  a=self.c_a, b=self.c_b, reduction=self.reduction, c_norm=self.c_norm,
                                  ref_dim=self.c_ref_dim)

    def _grid(self, n: int):
        """(σ grid float64 on CPU, pair probabilities float64) for N = n, cached per n."""
        if n not in self._grid_cache:
            sig = schedules.karras_sigmas(n, self.sigma_min, self.sigma_max, self.rho)
            self._grid_cache[n] = (sig, schedules.pair_probs(sig, self.p_mean, self.p_std))
        return self._grid_cache[n]

    def _diffusion_sigma_weight(self, sig_hi: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        """Per-σ factor of the diffusion term at the online level σ: EDM's 1/σ² + 1/σ_d² (= 1/c_out² of the
        EDM denoiser, so the term weighs F's error at unit scale), 1, λ(σ_i), or SNR/(1+SNR) = σ_d²/(σ²+σ_d²)."""
        if self.diffusion_sigma_weight == "edm":
            return 1.0 / sig_hi.square() + 1.0 / self.sigma_data ** 2
        if self.diffusion_sigma_weight == "lambda":
            return lam
        if self.diffusion_sigma_weight == "snr":
            sd2 = self.sigma_data ** 2
            return sd2 / (sig_hi.square() + sd2)
        return torch.ones_like(sig_hi)

    # ------------------------------------------------------------------ loss
    def draw_times(self, batch: int, generator: torch.Generator, x0: torch.Tensor, step: int) -> torch.Tensor:
        """The pair index j (0-based: levels σ_j, σ_{j+1}) of each sample, from the discrete lognormal."""
        _, probs = self._grid(self.num_levels(step))
        return schedules.sample_pair_indices(probs, batch, generator).cpu()

    def loss(self, net: nn.Module, target_net: nn.Module, d: Draw, *, step: int,
             generator: torch.Generator) -> torch.Tensor:
        """Per-sample loss [B]. See the module docstring."""
        x0, bshape, labels, z, j, dropout_seed = d.x0, d.bshape, d.labels, d.z, d.t, d.dropout_seed
        batch, dev = x0.shape[0], x0.device
        n = self.num_levels(step)
        sig_grid, _ = self._grid(n)
        sig_lo64, sig_hi64 = sig_grid[j], sig_grid[j + 1]
        lam = (1.0 / (sig_hi64 - sig_lo64)).to(device=dev, dtype=x0.dtype)        # λ(σ_i), float64 difference
        sig_lo = sig_lo64.to(device=dev, dtype=x0.dtype)
        sig_hi = sig_hi64.to(device=dev, dtype=x0.dtype)
        x_hi = x0 + sig_hi.view(bshape) * z
        x_lo = x0 + sig_lo.view(bshape) * z

        with phase("online_forward"):
            f_hi = net(x_hi, sig_hi, labels, dropout_seed=dropout_seed).to(x0.dtype)
        # target θ⁻ = sg(θ): no graph, same dropout mask via the shared seed
        with torch.no_grad(), phase("target_forward"):
            f_lo = target_net(x_lo, sig_lo, labels, dropout_seed=dropout_seed).to(x0.dtype)

        td = f_hi - f_lo
        m = reduce_squared(td, self.reduction)
        c = self.c_at(n)
        loss = lam * robust_distance(self.distance, m, c)

        # Eq. 9: diffusion loss on pairs with 1-based index i = j+1 <= floor(N·r). torch.where (not a
        # multiply by the mask) so that a non-finite value on an unselected sample cannot leak as NaN.
        cutoff = schedules.diffusion_cutoff(n, self.diffusion_r)
        sel = ((j + 1) <= cutoff).to(dev)
        if self.diffusion_weight > 0 and cutoff > 0:
            m_diff = reduce_squared(f_hi - x0, self.reduction)
            w = self.diffusion_weight * self._diffusion_sigma_weight(sig_hi, lam)
            diff_frac = sel.float().mean()
            if self.diffusion_average == "selected":
                # The batch mean of the returned per-sample loss then adds w·mean over the *selected* samples
                # (the authors' code); a batch without selected samples adds 0.
                w = w / diff_frac.clamp_min(1.0 / batch)
            loss = loss + torch.where(sel, w * m_diff, torch.zeros_like(m_diff))
        else:
            diff_frac = torch.zeros((), device=dev)

        with torch.no_grad():
            self.metrics = {
                "loss": loss.detach().mean().float(),
                "td_abs": td.detach().abs().mean().float(),
                "td_m": m.detach().mean().float(),
                "c": torch.tensor(c, dtype=torch.float32, device=dev),
                "num_levels": torch.tensor(float(n), device=dev),
                "diffusion_cutoff": torch.tensor(float(cutoff), device=dev),
                "diffusion_frac": diff_frac.detach().float(),
                "lambda_mean": lam.detach().mean().float(),
                "ot_cost_ratio": d.ot_ratio.detach().float(),
            }
        return loss


# ------------------------------------------------------------------------------------------ sampling
def ict_sigmas(steps: int, *, sigma_max: float = 80.0, sigma_mid: float = 0.821, sigma_min: float = 0.002,
               rho: float = 7.0) -> tuple[float, ...]:
    """Noise levels of ``steps``-step iCT sampling: (σ_max,), (σ_max, σ_mid), and for k > 2 steps σ_max
    followed by k−1 levels Karras-spaced (ρ) from σ_mid towards σ_min (σ_min itself excluded — f there is
    the identity)."""
    check_steps(steps)
    if not sigma_min < sigma_mid < sigma_max:
        raise ValueError(f"sample: need sigma_min < sigma_mid < sigma_max, got {sigma_min}, {sigma_mid}, {sigma_max}")
    if steps == 1:
        return (float(sigma_max),)
    # the training grid's ρ-spacing (schedules.karras_sigmas) from σ_min to σ_mid, its interior descending
    grid = schedules.karras_sigmas(steps, sigma_min, sigma_mid, rho).tolist()
    return (float(sigma_max), float(sigma_mid)) + tuple(reversed(grid[1:-1]))


def ict_sample(net: nn.Module, z: torch.Tensor, labels: Optional[torch.Tensor] = None, *,
               sigmas: Sequence[float] = (80.0,), sigma_min: float = 0.002,
               noise: Optional[Sequence[torch.Tensor]] = None,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """iCT sampling (SPEC §2) from standard-normal ``z`` through the levels ``sigmas`` (first = σ_max).

    x = f(σ_0·z, σ_0); x = f(x + √(σ_i² − σ_min²)·z_i, σ_i) for i ≥ 1, with z_i = ``noise[i-1]`` or drawn
    from ``generator``. Runs under no_grad in eval mode; returns float32.
    """
    if len(sigmas) < 1:
        raise ValueError("sample: sigmas must hold at least one noise level")
    if any(s <= sigma_min for s in sigmas):
        raise ValueError(f"sample: every sigma must be > sigma_min={sigma_min}, got {tuple(sigmas)}")
    z = z.float()
    with eval_no_grad(net):
        x = net(sigmas[0] * z, float(sigmas[0]), labels).float()
        for i, s in enumerate(sigmas[1:]):
            zi = next_noise(i, z, noise, generator)
            x = net(x + math.sqrt(s * s - sigma_min * sigma_min) * zi, float(s), labels).float()
    return x


def ict_sampler(method_cfg: Any, steps: int, *, schedule: Optional[Sequence[float]] = None, cfg_scale: float = 1.0,
                null_label: int = 0, conditions: Optional[dict] = None) -> Sampler:
    """``steps``-step iCT sampling (σ_mid from the config; explicit ``schedule`` = the σ levels)."""
    icfg = method_cfg.ict
    sigmas = tuple(schedule) if schedule is not None else ict_sigmas(
        steps, sigma_max=icfg.sigma_max, sigma_mid=icfg.sigma_mid, sigma_min=icfg.sigma_min, rho=getattr(icfg, "rho", 7.0))

    def run(net: nn.Module, noise: torch.Tensor, labels: Optional[torch.Tensor]) -> torch.Tensor:
        return ict_sample(guided(conditioned(net, conditions), cfg_scale, null_label), noise[0], labels, sigmas=sigmas,
                          sigma_min=icfg.sigma_min, noise=noise[1:])

    return Sampler(schedule=sigmas, draws=len(sigmas), run=run)


def _precond(backbone: nn.Module, method_cfg: Any) -> nn.Module:
    from ..models.precond import VEPrecond

    ict = method_cfg.ict
    return VEPrecond(backbone, sigma_data=float(getattr(method_cfg, "sigma_data", 0.5)),
                     sigma_min=float(getattr(ict, "sigma_min", 0.002)),
                     noise_scale=float(getattr(ict, "noise_scale", 250.0)))


def _loss(method_cfg: Any, *, data_dim: int, total_steps: int, coupler: Optional[Coupler] = None,
          teacher: Any = None) -> ICTLoss:
    return ICTLoss.from_config(method_cfg, data_dim=data_dim, total_steps=total_steps, coupler=coupler)


SPEC = register(MethodSpec(
    name="ict", summary="discrete-time improved latent consistency training (iLCT)",
    sections=(("ict", ICTConfig),), precond=_precond, loss=_loss, sampler=ict_sampler,
    nfe=lambda method_cfg, steps: steps, probe_level=1.0, schedule_arg="sigmas", sampler_keys=("ict.sigma_mid",),
    loss_note=("raw loss = λ(σ)·ρ(d; c) between adjacent levels of an N(k)-level grid (iCT eqs. 9-11): as N(k) "
               "doubles the levels move closer and c shrinks with it (adaptive c), so the same error costs more "
               "and the raw loss rises by design")))
