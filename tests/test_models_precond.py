"""Preconditioning wrappers: boundary conditions, coefficient formulas, dtypes, build_model."""
from types import SimpleNamespace

import pytest
import torch

from model_helpers import randomize as _randomize, small_cfg  # noqa: E402

from lct_fast.methods import build_model
from lct_fast.models import TrigFlowPrecond, VEPrecond, build_backbone

try:
    from lct_fast.config import MethodConfig, ModelConfig
except ImportError:  # pragma: no cover
    ModelConfig = MethodConfig = None


def _cfg(arch="dit", **kw):
    return small_cfg(arch, **kw)


@pytest.mark.parametrize("arch", ["dit", "unet"])
def test_boundary_conditions_exact(arch):
    bb = _randomize(build_backbone(_cfg(arch=arch)))
    x = torch.randn(3, 4, 8, 8) * 5
    ve = VEPrecond(bb, sigma_data=0.5, sigma_min=0.002)
    assert ve.backbone(x, torch.zeros(3)).abs().max() > 1e-3  # F is not trivially zero
    with torch.no_grad():
        assert torch.equal(ve(x, torch.full((3,), 0.002)), x)
        assert torch.equal(ve(x, 0.002, torch.tensor([0, 1, 3])), x)
        tf = TrigFlowPrecond(bb, sigma_data=0.5)
        assert torch.equal(tf(x, torch.zeros(3)), x)
        assert torch.equal(tf(x, 0.0), x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = ve(x, torch.full((3,), 0.002))
        assert out.dtype == torch.float32 and torch.equal(out, x)
        x64 = x.double()
        assert torch.equal(VEPrecond(bb.double(), sigma_min=0.002)(x64, 0.002), x64)
        assert torch.equal(TrigFlowPrecond(bb)(x64, 0.0), x64)


def test_ve_coefficients_match_spec():
    bb = _randomize(build_backbone(_cfg())).double()
    ve = VEPrecond(bb, sigma_data=0.5, sigma_min=0.002)
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    s = torch.tensor([0.3, 7.0], dtype=torch.float64)
    sd, smin = 0.5, 0.002
    c_skip = sd**2 / ((s - smin) ** 2 + sd**2)
    c_out = (s - smin) * sd / torch.sqrt(s**2 + sd**2)
    c_in = 1 / torch.sqrt(s**2 + sd**2)
    with torch.no_grad():
        F = bb(x * c_in.view(-1, 1, 1, 1), 250 * torch.log(s))
        want = c_skip.view(-1, 1, 1, 1) * x + c_out.view(-1, 1, 1, 1) * F
        torch.testing.assert_close(ve(x, s), want, rtol=1e-12, atol=1e-12)
        # c_noise = noise_scale·ln σ
        ve1 = VEPrecond(bb, sigma_data=0.5, sigma_min=0.002, noise_scale=1.0)
        F1 = bb(x * c_in.view(-1, 1, 1, 1), torch.log(s))
        torch.testing.assert_close(ve1(x, s), c_skip.view(-1, 1, 1, 1) * x + c_out.view(-1, 1, 1, 1) * F1,
                                   rtol=1e-12, atol=1e-12)


def test_trigflow_matches_spec_and_F():
    bb = _randomize(build_backbone(_cfg(arch="unet"))).double()
    tf = TrigFlowPrecond(bb, sigma_data=0.5, time_scale=1000.0)
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    t = torch.tensor([0.4, 1.2], dtype=torch.float64)
    with torch.no_grad():
        F = bb(x / 0.5, 1000.0 * t)
        torch.testing.assert_close(tf.F(x / 0.5, t), F, rtol=1e-12, atol=1e-12)
        want = torch.cos(t).view(-1, 1, 1, 1) * x - torch.sin(t).view(-1, 1, 1, 1) * 0.5 * F
        torch.testing.assert_close(tf(x, t), want, rtol=1e-12, atol=1e-12)


def test_autocast_returns_fp32_and_logvar():
    bb = _randomize(build_backbone(_cfg()))
    tf = TrigFlowPrecond(bb)
    x = torch.randn(2, 4, 8, 8)
    t = torch.tensor([0.3, 1.0])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = tf(x, t)
        lv = tf.logvar(t)
    assert out.dtype == torch.float32 and lv.dtype == torch.float32 and lv.shape == (2,)
    ref = tf(x, t).detach()
    assert (out - ref).abs().max() < 0.1 * ref.abs().max()
    # the head is a linear map of the positional embedding of time_scale·t
    emb_t = bb.logvar_head
    from lct_fast.models import sinusoidal_embedding
    want = sinusoidal_embedding(tf.time_scale * t, 256) @ emb_t.weight.T + emb_t.bias
    torch.testing.assert_close(lv, want.reshape(-1), rtol=1e-5, atol=1e-5)


def test_build_model_picks_wrapper_and_reads_method_config():
    if MethodConfig is not None:
        ict, sct = MethodConfig(name="ict"), MethodConfig(name="sct")
    else:
        ict = SimpleNamespace(name="ict", sigma_data=0.5, ict=SimpleNamespace(sigma_min=0.002))
        sct = SimpleNamespace(name="sct", sigma_data=0.5, sct=SimpleNamespace(time_scale=1000.0))
    m = build_model(_cfg(), ict)
    assert isinstance(m, VEPrecond) and m.sigma_min == ict.ict.sigma_min and m.sigma_data == ict.sigma_data
    if MethodConfig is not None:
        assert m.noise_scale == ict.ict.noise_scale
    m = build_model(_cfg(arch="unet"), sct)
    assert isinstance(m, TrigFlowPrecond) and m.time_scale == sct.sct.time_scale
    with pytest.raises(ValueError, match="method.name"):
        build_model(_cfg(), SimpleNamespace(name="edm"))
