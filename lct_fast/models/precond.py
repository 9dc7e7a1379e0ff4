"""Preconditioning wrappers, kept separate from the backbones (contract; SPEC §2, §3).

Coefficients are computed in fp32 (fp64 when the inputs are fp64, for finite-difference tests) and
the results are returned in that dtype; the backbone itself runs in whatever autocast dtype the
caller set up.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn as nn

Scalar = Union[float, torch.Tensor]


def _coef_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def _as_batch(v: Scalar, x: torch.Tensor, name: str) -> torch.Tensor:
    """σ or t as a [B] tensor of the coefficient dtype on x's device (scalars broadcast)."""
    # convert Python scalars straight to the coefficient dtype (σ_min must stay bit-exact in fp64 too)
    t = torch.as_tensor(v, dtype=_coef_dtype(x), device=x.device)
    if t.dim() == 0:
        return t.expand(x.shape[0])
    if t.shape != (x.shape[0],):
        raise ValueError(f"{name} must be a scalar or have shape [{x.shape[0]}], got {tuple(t.shape)}")
    return t


def _device_of(module: nn.Module) -> torch.device:
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _bcast(c: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return c.reshape(-1, *([1] * (x.dim() - 1)))


class VEPrecond(nn.Module):
    """f_θ(x, σ) = c_skip(σ)·x + c_out(σ)·F_θ(c_in(σ)·x, c_noise(σ)) (SPEC §2, iCT/ECT form).

    c_skip = σ_d²/((σ − σ_min)² + σ_d²), c_out = (σ − σ_min)·σ_d/√(σ² + σ_d²), c_in = 1/√(σ² + σ_d²),
    c_noise = noise_scale·ln σ (iCT / CM: 250). At σ = σ_min, c_skip = 1 and c_out = 0 exactly, so
    f(x, σ_min) == x.
    """

    def __init__(self, backbone: nn.Module, *, sigma_data: float = 0.5, sigma_min: float = 0.002,
                 noise_scale: float = 250.0) -> None:
        super().__init__()
        if sigma_data <= 0 or sigma_min <= 0 or noise_scale <= 0:
            raise ValueError(f"VEPrecond: sigma_data ({sigma_data}), sigma_min ({sigma_min}) and noise_scale "
                             f"({noise_scale}) must be > 0")
        self.backbone = backbone
        self.sigma_data = float(sigma_data)
        self.sigma_min = float(sigma_min)
        self.noise_scale = float(noise_scale)

    def coefficients(self, sigma: torch.Tensor):
        """(c_skip, c_out, c_in, c_noise) for σ (already in the coefficient dtype)."""
        sd, smin = self.sigma_data, self.sigma_min
        c_skip = sd**2 / ((sigma - smin) ** 2 + sd**2)
        c_out = (sigma - smin) * sd / torch.sqrt(sigma**2 + sd**2)
        c_in = 1.0 / torch.sqrt(sigma**2 + sd**2)
        c_noise = self.noise_scale * torch.log(sigma)
        return c_skip, c_out, c_in, c_noise

    def forward(self, x: torch.Tensor, sigma: Scalar, labels: Optional[torch.Tensor] = None, *,
                dropout_seed: Optional[int] = None, **conditions: Optional[Scalar]) -> torch.Tensor:
        dt = _coef_dtype(x)
        x = x.to(dt)
        sigma = _as_batch(sigma, x, "sigma")
        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        kw = {k: _as_batch(v, x, k) for k, v in conditions.items() if v is not None}
        out = self.backbone(_bcast(c_in, x) * x, c_noise, labels, dropout_seed=dropout_seed, **kw).to(dt)
        return _bcast(c_skip, x) * x + _bcast(c_out, x) * out

    def logvar(self, sigma: Scalar) -> torch.Tensor:
        """Adaptive weight head at c_noise(σ), [B] float32."""
        s = torch.as_tensor(sigma, dtype=torch.float32, device=_device_of(self.backbone))
        return self.backbone.logvar(self.noise_scale * torch.log(s.reshape(-1)))


class TrigFlowPrecond(nn.Module):
    """TrigFlow parameterisation (SPEC §3): f_θ(x_t, t) = cos t·x_t − sin t·σ_d·F_θ(x_t/σ_d, t),
    with the backbone called at c_noise = time_scale·t. f(x, 0) == x exactly (cos 0 = 1, sin 0 = 0).
    sCM conditions on c_noise(t) = t (time_scale 1): a larger scale multiplies ∂F/∂t, and with it the
    tangent, by the same factor (sCM Fig. 4).
    """

    def __init__(self, backbone: nn.Module, *, sigma_data: float = 0.5, time_scale: float = 1.0) -> None:
        super().__init__()
        if sigma_data <= 0:
            raise ValueError(f"TrigFlowPrecond: sigma_data must be > 0, got {sigma_data}")
        self.backbone = backbone
        self.sigma_data = float(sigma_data)
        self.time_scale = float(time_scale)

    def F(self, x_in: torch.Tensor, t: Scalar, labels: Optional[torch.Tensor] = None, *,
          dropout_seed: Optional[int] = None, **conditions: Optional[Scalar]) -> torch.Tensor:
        """Raw network F_θ(x_in, t) = backbone(x_in, time_scale·t) in (≥)fp32; sCT takes its JVP
        with respect to (x_in, t). ``conditions``: the method's extra scalar inputs by name (e.g. the CFG scale
        ``guidance`` of a guidance-conditioned student), passed as given; the JVP gives them no tangent."""
        dt = _coef_dtype(x_in)
        t = _as_batch(t, x_in, "t")
        kw = {k: _as_batch(v, x_in, k) for k, v in conditions.items() if v is not None}
        return self.backbone(x_in.to(dt), self.time_scale * t, labels, dropout_seed=dropout_seed, **kw).to(dt)

    def forward(self, x_t: torch.Tensor, t: Scalar, labels: Optional[torch.Tensor] = None, *,
                dropout_seed: Optional[int] = None, **conditions: Optional[Scalar]) -> torch.Tensor:
        dt = _coef_dtype(x_t)
        x_t = x_t.to(dt)
        t = _as_batch(t, x_t, "t")
        out = self.F(x_t / self.sigma_data, t, labels, dropout_seed=dropout_seed, **conditions)
        return _bcast(torch.cos(t), x_t) * x_t - _bcast(torch.sin(t), x_t) * self.sigma_data * out

    def logvar(self, t: Scalar) -> torch.Tensor:
        """w_φ(t): the backbone's head at c_noise = time_scale·t, [B] float32."""
        tt = torch.as_tensor(t, dtype=torch.float32, device=_device_of(self.backbone))
        return self.backbone.logvar(self.time_scale * tt.reshape(-1))


def classifier_free_guidance(fn, x: torch.Tensor, t, labels: Optional[torch.Tensor],
                             scale: Union[float, torch.Tensor], null_label: int) -> torch.Tensor:
    """``fn(x, t, labels)`` guided: out_u + s·(out_c − out_u), out_u at ``null_label``, both halves in one call
    (``t`` a scalar or one value per sample; ``scale`` a float or one value per sample). Without labels or at a
    float s = 1, ``fn(x, t, labels)``. The same form serves the consistency function f, F and the velocity σ_d·F:
    all are affine in the network output."""
    per_sample = isinstance(scale, torch.Tensor)
    if labels is None or (not per_sample and scale == 1.0):
        return fn(x, t, labels)
    null = torch.full_like(labels, int(null_label))
    t2 = torch.cat([t, t]) if isinstance(t, torch.Tensor) and t.dim() > 0 else t
    cond, uncond = fn(torch.cat([x, x]), t2, torch.cat([labels, null])).chunk(2)
    if per_sample:
        scale = scale.to(cond.dtype).view((-1,) + (1,) * (cond.dim() - 1))
    return uncond + scale * (cond - uncond)

