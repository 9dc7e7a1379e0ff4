"""The base every method's loss shares: the common prologue once, then the method's own lines.

Contract (every method): ``loss = spec.loss(method_cfg, data_dim=D, total_steps=K, coupler=None, teacher=None)``;
``per_sample = loss(net, x0, labels, step=k, generator=g, target_net=net⁻)`` -> [B] float32 (float64 for float64
inputs); ``loss.metrics`` holds detached 0-dim tensors of the last call; ``loss.diagnostics(target_net, x0,
labels, generator=g)`` -> dict of 0-dim tensors is the extra, costlier divergence check the trainer runs at its
log interval only.

The prologue draws, from the step's generator and in this order: the method's times (:meth:`MethodLoss.draw_times`),
the noise z (standard normal times ``noise_std``), the shared dropout seed of both passes, the label dropout
(classifier-free training), then pairs z with x0 through the coupler (minibatch OT, latent CT §4.4). A method then
only writes :meth:`MethodLoss.loss`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

from ..profiler.phases import phase
from . import schedules
from .common import Coupler, draw_seed, drop_labels, identity_coupler, null_class, prepare_batch, randn_like_gen

__all__ = ["Draw", "MethodLoss", "TrigFlowTimes"]


@dataclass
class Draw:
    """One micro-batch after the prologue."""

    x0: torch.Tensor
    """Clean latents, at least float32."""
    bshape: Tuple[int, ...]
    """(B, 1, 1, ...): broadcasts a per-sample value over a latent."""
    labels: Optional[torch.Tensor]
    """The labels the network sees (dropped ones = the null class), or None."""
    z: torch.Tensor
    """Noise paired with x0 (after the coupling)."""
    t: Any
    """The method's own draw (:meth:`MethodLoss.draw_times`): times, or level indices."""
    dropout_seed: int
    """Dropout seed shared by the online and the target pass."""
    ot_ratio: torch.Tensor
    """Coupled vs drawn pairing cost (1 without coupling), 0-dim."""


class MethodLoss:
    """Base of the losses: holds the shared settings and runs the prologue; subclasses define
    :meth:`draw_times` and :meth:`loss`."""

    def __init__(self, *, data_dim: int, sigma_data: float, label_dropout: float, noise_std: float,
                 coupler: Optional[Coupler]) -> None:
        if data_dim < 1:
            raise ValueError(f"{type(self).__name__}: data_dim must be >= 1, got {data_dim}")
        self.data_dim = int(data_dim)
        self.sigma_data = float(sigma_data)
        self.label_dropout = float(label_dropout)
        self.noise_std = float(noise_std)
        # (x0, z, labels) -> (z paired with x0, cost ratio vs identity): per micro-batch (methods.common.couple_noise)
        # or across ranks (lct_fast.ot_global); None pairs z with x0 as drawn.
        self.coupler = coupler or identity_coupler
        self.metrics: Dict[str, torch.Tensor] = {}

    def draw_times(self, batch: int, generator: torch.Generator, x0: torch.Tensor, step: int) -> Any:
        raise NotImplementedError

    def loss(self, net: nn.Module, target_net: nn.Module, d: Draw, *, step: int,
             generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def diagnostics(self, target_net: nn.Module, x0: torch.Tensor, labels: Optional[torch.Tensor], *,
                    generator: torch.Generator) -> Dict[str, torch.Tensor]:
        """Extra divergence diagnostics for the log interval (none unless the method has some)."""
        return {}

    def prologue(self, x0: torch.Tensor, labels: Optional[torch.Tensor], *, step: int,
                 generator: torch.Generator, target_net: nn.Module) -> Draw:
        x0, bshape = prepare_batch(type(self).__name__, x0, self.data_dim)
        t = self.draw_times(x0.shape[0], generator, x0, step)
        z = randn_like_gen(x0, generator)
        if self.noise_std != 1.0:
            z = z * self.noise_std
        dropout_seed = draw_seed(generator)
        if self.label_dropout > 0 and labels is not None:
            labels = drop_labels(labels, self.label_dropout, null_class(target_net), generator)
        with phase("ot"):
            z, ot_ratio = self.coupler(x0, z, labels)
        return Draw(x0=x0, bshape=bshape, labels=labels, z=z, t=t, dropout_seed=dropout_seed, ot_ratio=ot_ratio)

    def __call__(self, net: nn.Module, x0: torch.Tensor, labels: Optional[torch.Tensor], *, step: int,
                 generator: torch.Generator, target_net: Optional[nn.Module] = None) -> torch.Tensor:
        """Per-sample loss [B] (float32, or float64 for float64 inputs)."""
        target_net = net if target_net is None else target_net
        d = self.prologue(x0, labels, step=step, generator=generator, target_net=target_net)
        return self.loss(net, target_net, d, step=step, generator=generator)


class TrigFlowTimes:
    """The TrigFlow time draw of sCT, sCD and the diffusion teacher (sCM §2): t = arctan(e^τ/σ_d),
    τ ~ N(``p_mean``, ``p_std``²)."""

    p_mean: float
    p_std: float
    sigma_data: float

    def draw_times(self, batch: int, generator: torch.Generator, x0: torch.Tensor, step: int) -> torch.Tensor:
        return schedules.sample_sct_times(batch, self.p_mean, self.p_std, self.sigma_data, generator,
                                          device=x0.device).to(x0.dtype)
