"""Non-scaling LayerNorm (paper eq. 12) and its fused adaLN form (SPEC §4): the PyTorch reference.

NsLN_β(x) = (x − mean(x)) / √(var(x) + ε) + β over the last dim: the LayerNorm scale is fixed to 1
and not trained; only β is learned. Statistics are taken in fp32 (or fp64 for fp64 inputs) and the
result is returned in the input dtype, so bf16 activations do not lose the mean/variance.

The reference is built from differentiable PyTorch ops, so backward, ``torch.func.jvp`` and
``torch.autograd.forward_ad`` all work; :func:`nsln_tangent_reference` writes out SPEC §4's tangent
for kernels that implement the JVP by hand.
"""
from __future__ import annotations

__all__ = ["nsln_reference", "nsln_modulate_reference", "nsln_tangent_reference"]

from typing import Optional

import torch
import torch.nn.functional as F



def _stat_dtype(x: torch.Tensor) -> torch.dtype:
    # fp32 statistics for half inputs; keep fp64 for the float64 finite-difference tests
    return torch.promote_types(x.dtype, torch.float32)


def _check_bias(x: torch.Tensor, bias: Optional[torch.Tensor], name: str = "bias") -> None:
    if bias is not None and tuple(bias.shape) != (x.shape[-1],):
        raise ValueError(f"nsln: {name} must have shape [{x.shape[-1]}] (last dim of x {tuple(x.shape)}), "
                         f"got {tuple(bias.shape)}")


def _normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x̂ = (x − μ)·rstd over the last dim, in the statistics dtype (biased variance, as LayerNorm)."""
    xs = x.to(_stat_dtype(x))
    # F.layer_norm without affine is exactly (x − μ)/√(var + ε) and has native backward/forward-AD rules
    return F.layer_norm(xs, (xs.shape[-1],), None, None, eps)


def nsln_reference(x: torch.Tensor, bias: Optional[torch.Tensor], *, eps: float = 1e-6) -> torch.Tensor:
    """NsLN over the last dim (eq. 12): (x − μ)·rstd + β, fp32 statistics, output in x's dtype."""
    _check_bias(x, bias)
    y = _normalize(x, eps)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.to(x.dtype)


def _broadcast_bn(t: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
    """View a [B, N] modulation tensor as [B, 1, …, 1, N] to broadcast over x's middle dims."""
    if t.dim() != 2 or t.shape[0] != x.shape[0] or t.shape[1] != x.shape[-1]:
        raise ValueError(f"nsln_modulate: {name} must have shape [B, N] = [{x.shape[0]}, {x.shape[-1]}] "
                         f"for x of shape {tuple(x.shape)}, got {tuple(t.shape)}")
    return t.reshape(t.shape[0], *([1] * (x.dim() - 2)), t.shape[1])


def nsln_modulate_reference(
    x: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Fused adaLN form (SPEC §4): x̂·(1 + scale) + shift (+ β).

    x is [B, …, N]; shift/scale are [B, N] and broadcast over the middle dims; β ([N]) is added
    after the modulation, as SPEC §4 writes it.
    """
    if x.dim() < 2:
        raise ValueError(f"nsln_modulate: x must be [B, ..., N], got shape {tuple(x.shape)}")
    _check_bias(x, bias)
    xh = _normalize(x, eps)
    sh = _broadcast_bn(shift, x, "shift").to(xh.dtype)
    sc = _broadcast_bn(scale, x, "scale").to(xh.dtype)
    y = xh * (1 + sc) + sh
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.to(x.dtype)


def nsln_tangent_reference(x: torch.Tensor, x_dot: torch.Tensor, *, eps: float = 1e-6) -> torch.Tensor:
    """Tangent of x̂ = (x − μ)·rstd along x_dot (SPEC §4), for hand-written kernel JVPs:

    ẋ̂ = rstd·(ẋ − mean(ẋ)) − x̂·mean(x̂·(ẋ − mean(ẋ)))·rstd.
    """
    dt = _stat_dtype(x)
    xs, ds = x.to(dt), x_dot.to(dt)
    mu = xs.mean(-1, keepdim=True)
    var = (xs - mu).square().mean(-1, keepdim=True)
    rstd = torch.rsqrt(var + eps)
    xh = (xs - mu) * rstd
    dc = ds - ds.mean(-1, keepdim=True)
    return (rstd * dc - xh * (xh * dc).mean(-1, keepdim=True) * rstd).to(x.dtype)
