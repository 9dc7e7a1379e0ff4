"""TrigFlow diffusion (``trigflow``; sCM 2410.11081 §2, SPEC §3b): the teacher that sCD distils.

x_t = cos t·x0 + sin t·z with z ~ N(0, σ_d²I), t = arctan(e^τ/σ_d), τ ~ N(P_mean, P_std²). The network predicts
the velocity v = dx_t/dt = cos t·z − sin t·x0 as σ_d·F_θ(x_t/σ_d, t) (the same ``TrigFlowPrecond.F`` as sCT), with
the learned adaptive weight w(t) of EDM2/sCM:

    L = e^{−w(t)}·‖σ_d·F_θ(x_t/σ_d, t) − v‖²/D + w(t).

At the optimum σ_d·F = E[v | x_t], so integrating dx_t/dt = σ_d·F(x_t/σ_d, t) from t = π/2 (pure noise
σ_d·z) to 0 (the probability-flow ODE) transports the noise to the data distribution
(:func:`trigflow_ode`). ``tests/test_methods_trigflow.py`` checks both on a Gaussian toy
where E[v | x_t] is known in closed form.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch import nn

from ..profiler.phases import phase
from ..validate import choice, positive
from . import schedules
from .base import Draw, MethodLoss, TrigFlowTimes
from .common import Coupler, adaptive_weighting, config_coupler, unwrap
from ..registry import MethodSpec, register
from .sampling import Sampler, conditioned
from .sct import ADAPTIVE_LOSS_NOTE, check_adaptive_weight, trigflow_at_sigma, trigflow_precond

__all__ = ["TrigFlowConfig", "TrigFlowLoss", "trigflow_times", "trigflow_ode", "SPEC"]


@dataclass
class TrigFlowConfig:
    """TrigFlow diffusion (method trigflow): the teacher that sCD distils (sCM §2, SPEC §3b)."""

    p_mean: float = -0.4
    """Time sampling tau ~ N(p_mean, p_std^2), t = arctan(e^tau / sigma_d); the sCM tables' teacher values:
    -0.4 / 1.0 for ImageNet 512 (64x64 latents), -0.8 / 1.6 for ImageNet 64."""
    p_std: float = 1.0
    """Time sampling standard deviation."""
    adaptive_weight: bool = True
    """Learned adaptive weighting e^{-w(t)} * loss + w(t) (needs model.adaptive_weight)."""
    solver: str = "heun"
    """Probability-flow ODE solver for sampling: heun (2nd order, EDM's correction) | ddim (1st order)."""
    spacing: str = "uniform"
    """Sampling times: uniform in t | edm (EDM's rho-spaced sigma grid mapped to t = arctan(sigma / sigma_d))."""
    guidance: float = 1.0
    """Classifier-free guidance scale of the ODE sampler's velocity (1 = none); launch/sample.py --cfg-scale
    overrides it."""

    def __post_init__(self) -> None:
        positive("method.trigflow.p_std", self.p_std)
        positive("method.trigflow.guidance", self.guidance)
        choice("method.trigflow.solver", self.solver, ["heun", "ddim"])
        choice("method.trigflow.spacing", self.spacing, ["uniform", "edm"])




class TrigFlowLoss(TrigFlowTimes, MethodLoss):
    """TrigFlow velocity-prediction loss with the adaptive weight; ``__call__(net, x0, labels, ...)`` -> [B].

    Args:
        data_dim: D = C·H·W of one latent.
        total_steps: K (unused; the common loss interface).
        sigma_data, label_dropout: as for sCT (label dropout trains the unconditional branch for CFG).
        p_mean, p_std: the time distribution (teacher settings of the sCM tables: −0.4/1.0 at 512², −0.8/1.6 at 64²).
        adaptive_weight: learn w(t) (needs ``net.logvar``); else w = 0.
        coupler: ``(x0, z, labels) -> (z paired with x0, cost ratio)`` with the labels the network sees; None
            keeps the drawn pairing.
    """

    def __init__(self, *, data_dim: int, total_steps: int, sigma_data: float, label_dropout: float, p_mean: float,
                 p_std: float, adaptive_weight: bool, coupler: Optional[Coupler] = None) -> None:
        super().__init__(data_dim=data_dim, sigma_data=sigma_data, label_dropout=label_dropout,
                         noise_std=sigma_data, coupler=coupler)
        if not p_std > 0:
            raise ValueError(f"TrigFlowLoss: p_std must be > 0, got {p_std}")
        self.total_steps = int(total_steps)
        self.p_mean, self.p_std = float(p_mean), float(p_std)
        self.adaptive_weight = bool(adaptive_weight)

    @classmethod
    def from_config(cls, cfg: Any, *, data_dim: int, total_steps: int, coupler: Optional[Coupler] = None
                    ) -> "TrigFlowLoss":
        """From a ``MethodConfig`` (``sigma_data``, ``label_dropout``, ``trigflow``)."""
        tf = cfg.trigflow
        return cls(data_dim=data_dim, total_steps=total_steps, sigma_data=cfg.sigma_data,
                   label_dropout=cfg.label_dropout, p_mean=tf.p_mean, p_std=tf.p_std,
                   adaptive_weight=tf.adaptive_weight,
                   coupler=coupler if coupler is not None else config_coupler(cfg.ot))

    def loss(self, net: nn.Module, target_net: nn.Module, d: Draw, *, step: int,
             generator: torch.Generator) -> torch.Tensor:
        """Per-sample loss [B] (float32, or float64 for float64 inputs)."""
        x0, bshape, labels, z, t, sd = d.x0, d.bshape, d.labels, d.z, d.t, self.sigma_data
        ct, st = torch.cos(t).view(bshape), torch.sin(t).view(bshape)
        x_t = ct * x0 + st * z
        v = ct * z - st * x0
        online = unwrap(net)
        with phase("online_forward"):
            f = online.F(x_t / sd, t, labels, dropout_seed=d.dropout_seed).to(x0.dtype)
        m = (sd * f - v).flatten(1).square().mean(dim=1)                  # ‖σ_d·F − v‖²/D
        loss, w = adaptive_weighting(online, t, m, self.adaptive_weight, "trigflow.adaptive_weight")
        with torch.no_grad():
            self.metrics = {
                "loss": loss.detach().mean().float(),
                "velocity_mse": m.detach().mean().float(),
                "logvar_mean": w.detach().mean().float(),
                "t_mean": t.mean().float(),
                "ot_cost_ratio": d.ot_ratio.detach().float(),
            }
        return loss


# ------------------------------------------------------------------------------------------ sampling
def trigflow_times(steps: int, *, spacing: str = "uniform", sigma_data: float = 0.5, sigma_max: float = 80.0,
                   sigma_min: float = 0.002, rho: float = 7.0) -> tuple:
    """``steps + 1`` TrigFlow times from π/2 (pure noise) down to 0.

    ``uniform``: equal steps in t. ``edm``: π/2, then t = arctan(σ_i/σ_d) over EDM's ρ-spaced σ grid from
    σ_max to σ_min (steps − 1 values), then 0. Measured on the Gaussian toy of tests/test_methods_trigflow.py
    (Heun, 20k samples, sample std / data std): 8 steps uniform 0.93–1.01, edm 1.50–1.68; 24 steps uniform
    1.00–1.01, edm 1.035–1.046; 64 steps both within 1 %. Uniform is the default."""
    if steps < 1:
        raise ValueError(f"sample: trigflow ODE needs steps >= 1, got {steps}")
    if spacing == "uniform":
        return tuple(math.pi / 2 * (1 - i / steps) for i in range(steps)) + (0.0,)
    if spacing != "edm":
        raise ValueError(f"sample: trigflow time spacing must be uniform | edm, got {spacing!r}")
    k = steps - 1  # σ_max … σ_min, ρ-spaced as the iCT training grid (schedules.karras_sigmas), descending
    sigmas = [] if k == 0 else [sigma_max] if k == 1 else reversed(
        schedules.karras_sigmas(k, sigma_min, sigma_max, rho).tolist())
    return (math.pi / 2, *(math.atan(s / sigma_data) for s in sigmas), 0.0)


def trigflow_ode(net: nn.Module, z: torch.Tensor, labels: Optional[torch.Tensor], *, sigma_data: float,
                 ts: Sequence[float], solver: str = "heun", cfg_scale: float = 1.0,
                 null_label: Optional[int] = None) -> torch.Tensor:
    """Integrate the probability-flow ODE dx_t/dt = σ_d·F(x_t/σ_d, t) from x_{π/2} = σ_d·z down the times ``ts``
    (descending, ending at 0).

    ``ddim`` (= ``euler``): x_s = cos(t−s)·x_t − sin(t−s)·σ_d·F, which keeps the predicted (x̂0, ẑ) pair fixed: it is
    Euler's method on the equivalent VE ODE dx̃/dσ = (x̃ − x̂0)/σ with x̃ = x/cos t, σ = σ_d·tan t. ``heun``: EDM's
    second-order correction on that VE ODE (slopes (x̃ − x̂0)/σ averaged; the first step from t = π/2, where
    σ = ∞, and the last one to t = 0 stay first order, as in EDM). Averaging the TrigFlow velocities themselves
    would not be second order: the velocity of a fixed (x̂0, ẑ) pair changes along the step. ``cfg_scale``
    s ≠ 1: F = F_u + s·(F_c − F_u), F_u at ``null_label``."""
    if solver not in ("heun", "ddim", "euler"):
        raise ValueError(f"sample: trigflow solver must be heun | ddim | euler, got {solver!r}")
    ts = [float(t) for t in ts]
    if len(ts) < 2 or any(b >= a for a, b in zip(ts, ts[1:])) or ts[-1] < 0 or ts[0] > math.pi / 2 + 1e-9:
        raise ValueError(f"sample: trigflow times must descend within [0, π/2] and be >= 2, got {ts}")
    sd = float(sigma_data)
    guided = cfg_scale != 1.0 and labels is not None
    if guided and null_label is None:
        raise ValueError("sample: cfg_scale != 1 needs null_label (the model's null class id)")

    from ..models.precond import classifier_free_guidance

    def F(x_in: torch.Tensor, tt: torch.Tensor, lab: Optional[torch.Tensor]) -> torch.Tensor:
        return net.F(x_in, tt, lab).to(x_in.dtype)

    def velocity(x: torch.Tensor, t: float) -> torch.Tensor:
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.float32)
        return sd * classifier_free_guidance(F, x / sd, tt, labels, cfg_scale if guided else 1.0,
                                             null_label if guided else 0)

    def denoised(x: torch.Tensor, t: float) -> torch.Tensor:  # x̂0 = cos t·x − sin t·σ_d·F
        return math.cos(t) * x - math.sin(t) * velocity(x, t)

    x = sd * z
    with torch.no_grad():
        for t, s in zip(ts, ts[1:]):
            d1 = denoised(x, t)
            z_hat = (x - math.cos(t) * d1) / math.sin(t)
            x_next = math.cos(s) * d1 + math.sin(s) * z_hat          # the DDIM step (exact for fixed x̂0, ẑ)
            if solver == "heun" and s > 0 and t < math.pi / 2 - 1e-9:
                sig_t, sig_s = sd * math.tan(t), sd * math.tan(s)
                xt_ve, xs_ve = x / math.cos(t), x_next / math.cos(s)
                slope1 = (xt_ve - d1) / sig_t
                slope2 = (xs_ve - denoised(x_next, s)) / sig_s
                x_next = math.cos(s) * (xt_ve + (sig_s - sig_t) * 0.5 * (slope1 + slope2))
            x = x_next
    return x


def trigflow_sampler(method_cfg: Any, steps: int, *, schedule: Optional[Sequence[float]] = None,
                     cfg_scale: float = 1.0, null_label: int = 0, conditions: Optional[dict] = None) -> Sampler:
    """``steps`` solver steps of the probability-flow ODE (one noise draw; the ODE is deterministic)."""
    tf = method_cfg.trigflow
    sigma_data = float(getattr(method_cfg, "sigma_data", 0.5))
    ts = tuple(schedule) if schedule is not None else trigflow_times(steps, spacing=tf.spacing, sigma_data=sigma_data)

    def run(net: nn.Module, noise: torch.Tensor, labels: Optional[torch.Tensor]) -> torch.Tensor:
        return trigflow_ode(conditioned(net, conditions), noise[0], labels, sigma_data=sigma_data, ts=ts, solver=tf.solver,
                            cfg_scale=cfg_scale, null_label=null_label if cfg_scale != 1.0 else None)

    return Sampler(schedule=ts, draws=1, run=run)


def trigflow_nfe(method_cfg: Any, steps: int) -> int:
    """Heun takes two evaluations per step but for its first (from t = π/2) and last (to t = 0) steps; DDIM one."""
    return max(2 * steps - 2, steps) if method_cfg.trigflow.solver == "heun" else steps


def _loss(method_cfg: Any, *, data_dim: int, total_steps: int, coupler: Optional[Coupler] = None,
          teacher: Any = None) -> TrigFlowLoss:
    return TrigFlowLoss.from_config(method_cfg, data_dim=data_dim, total_steps=total_steps, coupler=coupler)


SPEC = register(MethodSpec(
    name="trigflow", summary="TrigFlow diffusion (the teacher sCD distils), sampled with its probability-flow ODE",
    sections=(("trigflow", TrigFlowConfig),),
    precond=lambda backbone, m: trigflow_precond(backbone, float(getattr(m, "sigma_data", 0.5)), 1.0),
    loss=_loss, sampler=trigflow_sampler, nfe=trigflow_nfe, probe_level=0.7,
    default_cfg_scale=lambda m: float(m.trigflow.guidance), at_sigma=trigflow_at_sigma, loss_note=ADAPTIVE_LOSS_NOTE,
    check=lambda cfg: check_adaptive_weight(cfg, cfg.method.trigflow.adaptive_weight,
                                            "method.trigflow.adaptive_weight")))
