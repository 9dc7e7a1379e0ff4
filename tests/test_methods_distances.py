"""Robust distances (eqs. 6–8) and their gradients against closed forms."""
from __future__ import annotations

import math

import pytest
import torch

from lct_fast.methods import distances as Dm

C = 0.03

# closed forms of value and d/dm
CLOSED = {
    "l2": (lambda m, c: m, lambda m, c: 1.0),
    "pseudo_huber": (lambda m, c: math.sqrt(m + c * c) - c, lambda m, c: 0.5 / math.sqrt(m + c * c)),
    "cauchy": (lambda m, c: math.log(1 + m / (2 * c * c)), lambda m, c: 1.0 / (2 * c * c + m)),
    "geman_mcclure": (lambda m, c: 2 * m / (m + 4 * c * c), lambda m, c: 8 * c * c / (m + 4 * c * c) ** 2),
}


@pytest.mark.parametrize("name", sorted(CLOSED))
def test_value_and_grad_wrt_m(name):
    ms = [0.0, 1e-6, 1e-3, 0.05, 1.0, 30.0]
    m = torch.tensor(ms, dtype=torch.float64, requires_grad=True)
    d = Dm.robust_distance(name, m, C)
    d.sum().backward()
    val, der = CLOSED[name]
    for i, mv in enumerate(ms):
        assert d[i].item() == pytest.approx(val(mv, C), rel=1e-12, abs=1e-15)
        assert m.grad[i].item() == pytest.approx(der(mv, C), rel=1e-10)


@pytest.mark.parametrize("name", sorted(CLOSED))
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_grad_wrt_difference(name, reduction):
    # d/dx dist(m(x)) = dist'(m) * dm/dx, dm/dx = 2x/D (mean) or 2x (sum)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 2, 2, generator=g, dtype=torch.float64).requires_grad_(True)
    m = Dm.reduce_squared(x, reduction)
    D = 16
    ref_m = (x.detach() ** 2).flatten(1).sum(1) / (D if reduction == "mean" else 1)
    torch.testing.assert_close(m.detach(), ref_m)
    Dm.robust_distance(name, m, C).sum().backward()
    der = CLOSED[name][1]
    for b in range(3):
        scale = der(ref_m[b].item(), C) * 2 / (D if reduction == "mean" else 1)
        torch.testing.assert_close(x.grad[b], scale * x.detach()[b], rtol=1e-10, atol=1e-14)


def test_pseudo_huber_no_cancellation_float32():
    m = torch.tensor([1e-10], dtype=torch.float32)
    # naive sqrt(m + c^2) - c is exactly 0 in float32 here; the true value is m / (2c) to first order
    assert (torch.sqrt(m + 1.0) - 1.0).item() == 0.0
    assert Dm.pseudo_huber(m, 1.0).item() == pytest.approx(5e-11, rel=1e-6)


def test_robustness_ordering_for_outliers():
    # For a large residual the growth is PH (~sqrt) > Cauchy (~log) > GM (bounded by 2) (paper Fig. 2)
    m = torch.tensor([1e4], dtype=torch.float64)
    ph, ca, gm = (Dm.robust_distance(n, m, 1.0).item() for n in ("pseudo_huber", "cauchy", "geman_mcclure"))
    assert ph > ca > gm and gm < 2.0


def test_errors():
    with pytest.raises(ValueError, match="distance must be one of"):
        Dm.robust_distance("huber", torch.zeros(1), 1.0)
    with pytest.raises(ValueError, match="scale c > 0"):
        Dm.robust_distance("cauchy", torch.zeros(1), 0.0)
    with pytest.raises(ValueError, match="reduction"):
        Dm.reduce_squared(torch.zeros(1, 2), "max")
