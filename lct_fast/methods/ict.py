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

from typing import Any, Dict, Optional


import torch
from torch import nn

from . import schedules
from ..profiling import phase
from .common import Coupler, config_coupler, draw_seed, identity_coupler, drop_labels, null_class, prepare_batch, randn_like_gen
from .distances import reduce_squared, robust_distance

__all__ = ["ICTLoss"]


class ICTLoss:
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
        if data_dim < 1:
            raise ValueError(f"ICTLoss: data_dim must be >= 1, got {data_dim}")
        if total_steps < 1:
            raise ValueError(f"ICTLoss: total_steps must be >= 1, got {total_steps}")
        self.data_dim = int(data_dim)
        self.total_steps = int(total_steps)
        self.sigma_data = float(sigma_data)
        self.label_dropout = float(label_dropout)
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
        # (x0, z, labels) -> (z paired with x0, cost ratio vs identity): per micro-batch (methods.common.couple_noise)
        # or across ranks (lct_fast.ot_global); None pairs z with x0 as drawn.
        self.coupler = coupler or identity_coupler
        # Fail at construction, not at step 1, on a bad switch value.
        robust_distance(self.distance, torch.zeros(1), 1.0)
        reduce_squared(torch.zeros(1, 1), self.reduction)
        self.c_at(2)
        if self.diffusion_sigma_weight not in ("edm", "none", "lambda", "snr"):
            raise ValueError(f"ICTLoss: diffusion_sigma_weight must be edm|none|lambda|snr, "
                             f"got {self.diffusion_sigma_weight!r}")
        if self.diffusion_average not in ("selected", "batch"):
            raise ValueError(f"ICTLoss: diffusion_average must be selected|batch, got {self.diffusion_average!r}")
        self.metrics: Dict[str, torch.Tensor] = {}
        self._grid_cache: Dict[int, tuple] = {}

    @classmethod
    def from_config(cls, cfg: Any, *, data_dim: int, total_steps: int, coupler: Optional[Coupler] = None
                    ) -> "ICTLoss":
        """From a ``MethodConfig`` (``sigma_data``, ``label_dropout``, ``ict``); ``coupler`` from
        :func:`lct_fast.methods.build_loss` (default: the per-micro-batch coupling of ``cfg.ot``)."""
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

    def diagnostics(self, target_net: nn.Module, x0: torch.Tensor, labels: Optional[torch.Tensor], *,
                    generator: torch.Generator) -> Dict[str, torch.Tensor]:
        """Extra divergence diagnostics for the log interval (none beyond the per-step metrics)."""
        return {}

    # ------------------------------------------------------------------ loss
    def __call__(self, net: nn.Module, x0: torch.Tensor, labels: Optional[torch.Tensor], *, step: int,
                 generator: torch.Generator, target_net: Optional[nn.Module] = None) -> torch.Tensor:
        """Per-sample loss [B] (float32, or float64 for float64 inputs). See the module docstring."""
        target_net = net if target_net is None else target_net
        x0, bshape = prepare_batch("ICTLoss", x0, self.data_dim)
        batch, dev = x0.shape[0], x0.device

        n = self.num_levels(step)
        sig_grid, probs = self._grid(n)
        # All randomness from the passed generator, in a fixed order (reproducible per step seed).
        j = schedules.sample_pair_indices(probs, batch, generator).cpu()          # 0-based: pair (j, j+1)
        z = randn_like_gen(x0, generator)                                           # VE noise, unit std
        dropout_seed = draw_seed(generator)
        if self.label_dropout > 0 and labels is not None:
            labels = drop_labels(labels, self.label_dropout, null_class(target_net), generator)

        # §4.4: couple before noising; the same (permuted) z serves both levels.
        with phase("ot"):
            z, ot_ratio = self.coupler(x0, z, labels)

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
                "ot_cost_ratio": ot_ratio.detach().float(),
            }
        return loss
