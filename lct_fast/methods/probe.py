"""The denoising probe: a training figure comparable across curriculum stages, loss weightings and methods.

Every method's network gives a clean estimate x̂0 of x0 from a noised x0 + σ·z (a consistency function, or a
diffusion model's denoiser); the spec's ``at_sigma`` says how it is called. On a fixed batch with fixed noise,
the error of that estimate at a few fixed σ, per dimension and over the batch's variance,

    e(σ) = mean‖x̂0(x0 + σz) − x0‖² / mean‖x0 − mean(x0)‖²,

is 0 for a perfect denoiser and 1 for one that predicts the batch mean. Unlike the raw loss (whose c, grid
and learned weight move over training) it means the same thing at every step. At large σ a one-step
consistency model draws a sample instead of the posterior mean, so there e(σ) tends to ~2 as it improves: the
probe tracks stability and progress of one run, the sample metrics (``train.eval``) track quality.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

import torch
from torch import nn

from ..registry import get_method
from .sampling import eval_no_grad

__all__ = ["PROBE_SIGMAS", "probe_key", "denoising_probe"]

PROBE_SIGMAS = (0.1, 1.0, 10.0)
"""The probe's noise levels as multiples of σ_d: mostly signal, equal parts, mostly noise."""


def probe_key(k: float) -> str:
    """Metrics key of the probe at σ = k·σ_d (``probe_err@0.1sd``)."""
    return f"probe_err@{k:g}sd"


def denoising_probe(net: nn.Module, method_cfg: Any, x0: torch.Tensor, z: torch.Tensor,
                    labels: Optional[torch.Tensor] = None,
                    levels: Sequence[float] = PROBE_SIGMAS) -> Dict[str, float]:
    """e(σ) at σ = k·σ_d for each k in ``levels`` (see the module docstring), in eval mode without autograd;
    ``net`` is the method's preconditioned network (a collective under ZeRO-3: every rank calls it)."""
    spec = get_method(method_cfg.name)
    sd = float(method_cfg.sigma_data)
    x0, z = x0.float(), z.float()
    var = (x0 - x0.mean(0, keepdim=True)).square().mean().clamp_min(1e-12)
    out = {}
    with eval_no_grad(net):
        for k in levels:
            scale, level = spec.at_sigma(k * sd, sd)
            est = net(scale * (x0 + k * sd * z), float(level), labels).float()
            out[probe_key(k)] = float((est - x0).square().mean() / var)
    return out
