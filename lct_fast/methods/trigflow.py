"""TrigFlow diffusion (``trigflow``; sCM 2410.11081 §2, SPEC §3b): the teacher that sCD distils.

x_t = cos t·x0 + sin t·z with z ~ N(0, σ_d²I), t = arctan(e^τ/σ_d), τ ~ N(P_mean, P_std²). The network predicts
the velocity v = dx_t/dt = cos t·z − sin t·x0 as σ_d·F_θ(x_t/σ_d, t) (the same ``TrigFlowPrecond.F`` as sCT), with
the learned adaptive weight w(t) of EDM2/sCM:

    L = e^{−w(t)}·‖σ_d·F_θ(x_t/σ_d, t) − v‖²/D + w(t).

At the optimum σ_d·F = E[v | x_t], so integrating dx_t/dt = σ_d·F(x_t/σ_d, t) from t = π/2 (pure noise
σ_d·z) to 0 (the probability-flow ODE) transports the noise to the data distribution
(:func:`lct_fast.sample.trigflow_ode`). ``tests/test_methods_trigflow.py`` checks both on a Gaussian toy
where E[v | x_t] is known in closed form.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from torch import nn

from ..profiling import phase
from . import schedules
from .common import (Coupler, adaptive_weighting, config_coupler, draw_seed, drop_labels, identity_coupler,
                     null_class, prepare_batch, randn_like_gen, unwrap)

__all__ = ["TrigFlowLoss"]


class TrigFlowLoss:
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
        if data_dim < 1:
            raise ValueError(f"TrigFlowLoss: data_dim must be >= 1, got {data_dim}")
        if not p_std > 0:
            raise ValueError(f"TrigFlowLoss: p_std must be > 0, got {p_std}")
        self.data_dim, self.total_steps = int(data_dim), int(total_steps)
        self.sigma_data, self.label_dropout = float(sigma_data), float(label_dropout)
        self.p_mean, self.p_std = float(p_mean), float(p_std)
        self.adaptive_weight = bool(adaptive_weight)
        self.coupler = coupler or identity_coupler
        self.metrics: Dict[str, torch.Tensor] = {}

    @classmethod
    def from_config(cls, cfg: Any, *, data_dim: int, total_steps: int, coupler: Optional[Coupler] = None
                    ) -> "TrigFlowLoss":
        """From a ``MethodConfig`` (``sigma_data``, ``label_dropout``, ``trigflow``)."""
        tf = cfg.trigflow
        return cls(data_dim=data_dim, total_steps=total_steps, sigma_data=cfg.sigma_data,
                   label_dropout=cfg.label_dropout, p_mean=tf.p_mean, p_std=tf.p_std,
                   adaptive_weight=tf.adaptive_weight,
                   coupler=coupler if coupler is not None else config_coupler(cfg.ot))

    def diagnostics(self, target_net: nn.Module, x0: torch.Tensor, labels: Optional[torch.Tensor], *,
                    generator: torch.Generator) -> Dict[str, torch.Tensor]:
        """No extra divergence diagnostics (diffusion training has no tangent to run away)."""
        return {}

    def __call__(self, net: nn.Module, x0: torch.Tensor, labels: Optional[torch.Tensor], *, step: int,
                 generator: torch.Generator, target_net: Optional[nn.Module] = None) -> torch.Tensor:
        """Per-sample loss [B] (float32, or float64 for float64 inputs)."""
        target_net = net if target_net is None else target_net
        x0, bshape = prepare_batch("TrigFlowLoss", x0, self.data_dim)
        batch, dev, sd = x0.shape[0], x0.device, self.sigma_data
        t = schedules.sample_sct_times(batch, self.p_mean, self.p_std, sd, generator, device=dev).to(x0.dtype)
        z = randn_like_gen(x0, generator) * sd
        dropout_seed = draw_seed(generator)
        if self.label_dropout > 0 and labels is not None:
            labels = drop_labels(labels, self.label_dropout, null_class(target_net), generator)
        with phase("ot"):
            z, ot_ratio = self.coupler(x0, z, labels)
        ct, st = torch.cos(t).view(bshape), torch.sin(t).view(bshape)
        x_t = ct * x0 + st * z
        v = ct * z - st * x0
        online = unwrap(net)
        with phase("online_forward"):
            f = online.F(x_t / sd, t, labels, dropout_seed=dropout_seed).to(x0.dtype)
        m = (sd * f - v).flatten(1).square().mean(dim=1)                  # ‖σ_d·F − v‖²/D
        loss, w = adaptive_weighting(online, t, m, self.adaptive_weight, "trigflow.adaptive_weight")
        with torch.no_grad():
            self.metrics = {
                "loss": loss.detach().mean().float(),
                "velocity_mse": m.detach().mean().float(),
                "logvar_mean": w.detach().mean().float(),
                "t_mean": t.mean().float(),
                "ot_cost_ratio": ot_ratio.detach().float(),
            }
        return loss
