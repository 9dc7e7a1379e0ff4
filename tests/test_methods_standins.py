"""Small stand-in backbone + VE/TrigFlow preconditioners following the shared model contract.

The methods tests use them for unit checks that need float64 or full control of the network (the
real ``lct_fast.models`` wrappers compute in float32 by contract). The integration/training tests use
the real ``lct_fast.methods.build_model`` when it is importable. The tests in this file check that the
stand-ins honour the contract (boundary condition, shared dropout masks, TrigFlow identities), since
the methods tests rely on those properties.
"""
from __future__ import annotations

import math
from typing import Optional

import pytest
import torch
from torch import nn
import torch.nn.functional as Fn


class TinyBackbone(nn.Module):
    """Conv net ``backbone(x_in, c_noise, labels=None, *, dropout_seed=None) -> F`` (+ ``logvar``)."""

    def __init__(self, channels: int = 4, width: int = 32, num_classes: int = 0, dropout: float = 0.0,
                 adaptive_weight: bool = False, emb_dim: int = 16, max_period: float = 1000.0,
                 base_freq: float = 1.0) -> None:
        super().__init__()
        self.num_classes, self.dropout, self.emb_dim = num_classes, dropout, emb_dim
        # Frequencies base_freq .. base_freq/max_period per unit of c_noise. TrigFlow stand-ins use
        # base_freq = 1/time_scale so that frequencies in t stay <= 1 (sCM: large Fourier scales make
        # the JVP unstable).
        freqs = base_freq * torch.exp(-math.log(max_period) * torch.arange(emb_dim // 2) / (emb_dim // 2))
        self.register_buffer("freqs", freqs, persistent=False)
        self.emb = nn.Linear(emb_dim, width)
        self.label_emb = nn.Embedding(num_classes + 1, width) if num_classes else None
        self.inp = nn.Conv2d(channels, width, 3, padding=1)
        self.mid = nn.Conv2d(width, width, 3, padding=1)
        self.out = nn.Conv2d(width, channels, 3, padding=1)
        self.logvar_head = nn.Linear(emb_dim, 1) if adaptive_weight else None

    def _temb(self, c_noise: torch.Tensor) -> torch.Tensor:
        args = c_noise.to(self.freqs.dtype)[:, None] * self.freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=1)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, labels: Optional[torch.Tensor] = None, *,
                dropout_seed: Optional[int] = None) -> torch.Tensor:
        e = self.emb(self._temb(c_noise))
        if self.label_emb is not None:
            if labels is None:
                labels = torch.full((x.shape[0],), self.num_classes, dtype=torch.long, device=x.device)
            e = e + self.label_emb(labels)
        h = Fn.silu(self.inp(x) + e[:, :, None, None])
        h = Fn.silu(self.mid(h))
        if self.dropout > 0 and self.training:
            gen = None
            if dropout_seed is not None:
                gen = torch.Generator(device=h.device).manual_seed(int(dropout_seed))
            keep = torch.rand(h.shape, generator=gen, device=h.device, dtype=h.dtype) >= self.dropout
            h = h * keep / (1.0 - self.dropout)
        return self.out(h)

    def logvar(self, c_noise: torch.Tensor) -> torch.Tensor:
        return self.logvar_head(self._temb(c_noise)).squeeze(-1)


def _as_batch(v, x: torch.Tensor) -> torch.Tensor:
    v = torch.as_tensor(v, device=x.device, dtype=x.dtype)
    return v.expand(x.shape[0]) if v.ndim == 0 else v


class StandinVEPrecond(nn.Module):
    """VE preconditioning of SPEC §2 (c_skip, c_out, c_in, c_noise = 250 ln σ)."""

    def __init__(self, backbone: nn.Module, *, sigma_data: float = 0.5, sigma_min: float = 0.002) -> None:
        super().__init__()
        self.backbone, self.sigma_data, self.sigma_min = backbone, sigma_data, sigma_min

    def forward(self, x, sigma, labels=None, *, dropout_seed=None):
        s = _as_batch(sigma, x)
        sd, sm = self.sigma_data, self.sigma_min
        view = (-1,) + (1,) * (x.ndim - 1)
        c_skip = sd ** 2 / ((s - sm) ** 2 + sd ** 2)
        c_out = (s - sm) * sd / torch.sqrt(s ** 2 + sd ** 2)
        c_in = 1.0 / torch.sqrt(s ** 2 + sd ** 2)
        F = self.backbone(c_in.view(view) * x, 250.0 * torch.log(s), labels, dropout_seed=dropout_seed)
        return c_skip.view(view) * x + c_out.view(view) * F


class StandinTrigFlowPrecond(nn.Module):
    """TrigFlow wrapper of SPEC §3: f = cos t·x_t − sin t·σ_d·F(x_t/σ_d, time_scale·t)."""

    def __init__(self, backbone: nn.Module, *, sigma_data: float = 0.5, time_scale: float = 1000.0) -> None:
        super().__init__()
        self.backbone, self.sigma_data, self.time_scale = backbone, sigma_data, time_scale

    def F(self, x_in, t, labels=None, *, dropout_seed=None):
        return self.backbone(x_in, self.time_scale * _as_batch(t, x_in), labels, dropout_seed=dropout_seed)

    def forward(self, x_t, t, labels=None, *, dropout_seed=None):
        t = _as_batch(t, x_t)
        view = (-1,) + (1,) * (x_t.ndim - 1)
        F = self.F(x_t / self.sigma_data, t, labels, dropout_seed=dropout_seed)
        return torch.cos(t).view(view) * x_t - torch.sin(t).view(view) * self.sigma_data * F

    def logvar(self, t):
        return self.backbone.logvar(self.time_scale * t)


def tiny_ve(seed: int = 0, **kw) -> StandinVEPrecond:
    torch.manual_seed(seed)  # parameter init only (tests' own weights), never used during training
    return StandinVEPrecond(TinyBackbone(**kw))


def tiny_trigflow(seed: int = 0, **kw) -> StandinTrigFlowPrecond:
    torch.manual_seed(seed)
    kw.setdefault("base_freq", 1e-3)
    return StandinTrigFlowPrecond(TinyBackbone(**kw))


# ------------------------------------------------------------------------------- stand-in contract tests
def test_ve_boundary_condition():
    net = tiny_ve()
    x = torch.randn(3, 4, 8, 8)
    torch.testing.assert_close(net(x, torch.full((3,), 0.002)), x, rtol=0, atol=0)


def test_dropout_seed_shares_mask():
    net = tiny_ve(dropout=0.5).train()
    x, s = torch.randn(2, 4, 8, 8), torch.full((2,), 1.0)
    a, b = net(x, s, dropout_seed=7), net(x, s, dropout_seed=7)
    c = net(x, s, dropout_seed=8)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (a - c).abs().max() > 1e-4


def test_trigflow_identities():
    net = tiny_trigflow(adaptive_weight=True).double()
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    t = torch.tensor([0.3, 1.2], dtype=torch.float64)
    F = net.F(x / 0.5, t)
    f = net(x, t)
    expect = torch.cos(t).view(-1, 1, 1, 1) * x - torch.sin(t).view(-1, 1, 1, 1) * 0.5 * F
    torch.testing.assert_close(f, expect)
    assert net.logvar(t).shape == (2,)


if __name__ == "__main__":
    pytest.main([__file__, "-q"])
