"""Forward-mode AD through full small backbones and both wrappers (sCT's tangent pass, SPEC §3):
torch.func.jvp == torch.autograd.forward_ad == float64 central finite difference."""

import pytest
import torch
import torch.autograd.forward_ad as fwAD

from lct_fast.models import TrigFlowPrecond, VEPrecond, build_backbone

from model_helpers import ARCHS, randomize as _randomize, small_cfg  # noqa: E402,F401


def _cfg(arch, **kw):
    return small_cfg(arch, **{"dropout": 0.1, "checkpointing": True, **kw})


def _three_ways(f, primals, tangents, h=1e-6):
    _, t_func = torch.func.jvp(f, primals, tangents)
    with fwAD.dual_level():
        out = f(*[fwAD.make_dual(p, t) for p, t in zip(primals, tangents)])
        t_fwad = fwAD.unpack_dual(out).tangent
    fd = (f(*[p + h * t for p, t in zip(primals, tangents)])
          - f(*[p - h * t for p, t in zip(primals, tangents)])) / (2 * h)
    return t_func, t_fwad, fd


@pytest.mark.parametrize("adn", [False, True], ids=["adagn", "double_norm"])
@pytest.mark.parametrize("arch", ["dit", "unet"])
@pytest.mark.parametrize("wrapper", ["ve", "trigflow", "trigflow_F"])
def test_jvp_equals_forward_ad_and_finite_difference(arch, wrapper, adn):
    torch.manual_seed(0)
    bb = _randomize(build_backbone(_cfg(arch, adaptive_double_norm=adn))).double().train()  # dropout on, shared seed
    labels = torch.tensor([0, 3])
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    dx = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    if wrapper == "ve":
        net = VEPrecond(bb)
        s, ds = torch.tensor([0.7, 3.0], dtype=torch.float64), torch.tensor([0.5, -1.0], dtype=torch.float64)
        f = lambda a, b: net(a, b, labels, dropout_seed=7)
    else:
        net = TrigFlowPrecond(bb, time_scale=1000.0)
        s, ds = torch.tensor([0.4, 1.1], dtype=torch.float64), torch.tensor([0.3, -0.2], dtype=torch.float64)
        call = net.F if wrapper == "trigflow_F" else net
        f = lambda a, b: call(a, b, labels, dropout_seed=7)
    t_func, t_fwad, fd = _three_ways(f, (x, s), (dx, ds))
    assert fd.abs().max() > 1e-2  # non-trivial tangent
    torch.testing.assert_close(t_func, t_fwad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(t_func, fd, rtol=1e-5, atol=1e-6)


def test_jvp_under_no_grad_and_bf16_autocast_runs():
    """The sCT pass: no_grad + bf16 autocast + jvp on fp32 inputs; checkpointing must stay off."""
    bb = _randomize(build_backbone(_cfg("dit", dropout=0.0)))
    net = TrigFlowPrecond(bb)
    x = torch.randn(2, 4, 8, 8)
    t = torch.tensor([0.5, 1.0])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out, tan = torch.func.jvp(lambda a, b: net.F(a, b), (x, t), (torch.ones_like(x), torch.ones_like(t)))
    assert out.dtype == torch.float32 and tan.dtype == torch.float32 and torch.isfinite(tan).all()
    with torch.no_grad():
        _, tan32 = torch.func.jvp(lambda a, b: net.F(a, b), (x, t), (torch.ones_like(x), torch.ones_like(t)))
    assert (tan - tan32).norm() < 0.1 * tan32.norm()
