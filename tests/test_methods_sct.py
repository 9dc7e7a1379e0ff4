"""SCTLoss (TrigFlow sCT): tangent g vs float64 finite differences, gradient sign, weighting, options."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lct_fast.config import MethodConfig, OTConfig
from lct_fast.methods.sct import SCTConfig
from lct_fast.methods import SCTLoss, build_loss, sct_tangent
from test_methods_standins import tiny_trigflow

D = 4 * 8 * 8
SD = 0.5


def make(**kw) -> MethodConfig:
    ot = kw.pop("ot", "none")
    label_dropout = kw.pop("label_dropout", 0.0)
    return MethodConfig(name="sct", label_dropout=label_dropout, sct=SCTConfig(**kw), ot=OTConfig(method=ot))


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


class Recorder(nn.Module):
    """Wraps a TrigFlow net and records the grad-enabled (online) F calls."""

    def __init__(self, net):
        super().__init__()
        self.inner, self.backbone, self.sigma_data = net, net.backbone, net.sigma_data
        self.online = []

    def F(self, x_in, t, labels=None, *, dropout_seed=None):
        if torch.is_grad_enabled():
            self.online.append(dict(x_in=x_in.detach().clone(), t=t.detach().clone(), seed=dropout_seed,
                                    labels=labels))
        return self.inner.F(x_in, t, labels, dropout_seed=dropout_seed)

    def logvar(self, t):
        return self.inner.logvar(t)

    def forward(self, x, t, labels=None, *, dropout_seed=None):
        return self.inner(x, t, labels, dropout_seed=dropout_seed)


def close(a, b, tol):
    """max|a − b| <= tol · max|b| (FD references carry O(h²) + O(eps/h) error on the tensor's scale)."""
    err, scale = (a - b).abs().max().item(), b.abs().max().item()
    assert err <= tol * scale, f"max abs error {err:.3e} > {tol:g} x scale {scale:.3e}"


def f_along(net, x0, z, t, seed):
    """f⁻ at time t on the trajectory x_t = cos t·x0 + sin t·z (float64)."""
    ct, st = torch.cos(t).view(-1, 1, 1, 1), torch.sin(t).view(-1, 1, 1, 1)
    xt = ct * x0 + st * z
    return ct * xt - st * SD * net.F(xt / SD, t, dropout_seed=seed)


def F_along(net, x0, z, t, seed):
    ct, st = torch.cos(t).view(-1, 1, 1, 1), torch.sin(t).view(-1, 1, 1, 1)
    return net.F((ct * x0 + st * z) / SD, t, dropout_seed=seed)


@pytest.fixture(scope="module")
def fd_setup():
    net = tiny_trigflow(dropout=0.2).double().train()   # dropout on: the JVP must use one fixed mask
    g = gen(3)
    x0 = torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64) * SD
    z = torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64) * SD
    t = torch.tensor([0.05, 0.7, 1.45], dtype=torch.float64)
    return net, x0, z, t


@pytest.mark.parametrize("r", [1.0, 0.3, 0.0])
def test_tangent_matches_float64_finite_differences(fd_setup, r):
    net, x0, z, t = fd_setup
    seed, c, h = 1234, 0.1, 1e-6
    ct, st = torch.cos(t).view(-1, 1, 1, 1), torch.sin(t).view(-1, 1, 1, 1)
    xt = ct * x0 + st * z
    v = ct * z - st * x0
    g, F_minus, J, gnorm = sct_tangent(net, xt, t, v, None, sigma_data=SD, r=r, g_norm_c=c, dropout_seed=seed)
    assert not g.requires_grad and g.dtype == torch.float64
    # Reference 1 (independent of the rearrangement): at r = 1, g = cos t · df⁻/dt along the trajectory.
    dF = (F_along(net, x0, z, t + h, seed) - F_along(net, x0, z, t - h, seed)) / (2 * h)
    if r == 1.0:
        df = (f_along(net, x0, z, t + h, seed) - f_along(net, x0, z, t - h, seed)) / (2 * h)
        raw = ct * df
    else:
        Fm = F_along(net, x0, z, t, seed)
        raw = -ct ** 2 * (SD * Fm - v) - r * (ct * st * xt + ct * st * SD * dF)
    ref = raw / (raw.flatten(1).norm(dim=1).view(-1, 1, 1, 1) + c)
    close(g, ref, 1e-6)
    close(J, ct * st * SD * dF, 1e-6)
    close(gnorm, raw.flatten(1).norm(dim=1), 1e-6)
    torch.testing.assert_close(F_minus, F_along(net, x0, z, t, seed))


def test_loss_gradient_is_the_sCM_gradient(fd_setup):
    """At θ = θ⁻: ∇θ L = ∇θ Σ_b −(2/D)/(‖g_b‖+c)·cos t_b·F_θ,bᵀ·(df⁻/dt)_b (sCM form), with df⁻/dt by FD."""
    net = tiny_trigflow(dropout=0.0).double()
    rec = Recorder(net)
    x0 = torch.randn(4, 4, 8, 8, generator=gen(1), dtype=torch.float64) * SD
    fn = SCTLoss.from_config(make(adaptive_weight=False, tangent_warmup=0), data_dim=D, total_steps=10)
    loss = fn(rec, x0, None, step=0, generator=gen(2))
    net.zero_grad()
    loss.sum().backward()
    got = [p.grad.clone() for p in net.parameters()]

    call = rec.online[0]
    t = call["t"]
    ct, st = torch.cos(t).view(-1, 1, 1, 1), torch.sin(t).view(-1, 1, 1, 1)
    xt = call["x_in"] * SD
    z = (xt - ct * x0) / st
    h = 1e-6
    with torch.no_grad():
        df = (f_along(net, x0, z, t + h, None) - f_along(net, x0, z, t - h, None)) / (2 * h)
        gnorm = (ct * df).flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    net.zero_grad()
    F = net.F(call["x_in"], t)
    surrogate = (-(2.0 / D) / (gnorm + 0.1) * ct * F * df).sum()
    surrogate.backward()
    for a, b in zip(got, (p.grad for p in net.parameters())):
        close(a, b, 1e-5)


def test_adaptive_weight_prior_and_cauchy_forms():
    net = tiny_trigflow(adaptive_weight=True)
    with torch.no_grad():
        net.backbone.logvar_head.bias.fill_(0.3)
    x0 = torch.randn(16, 4, 8, 8, generator=gen(5)) * SD
    base = SCTLoss.from_config(make(adaptive_weight=False), data_dim=D, total_steps=10)
    m = base(net, x0, None, step=20_000, generator=gen(6)).detach()          # = ‖F_θ − F⁻ − g‖²/D
    assert base.metrics["r"].item() == 1.0
    rec = Recorder(net)
    ada = SCTLoss.from_config(make(adaptive_weight=True, prior_weight=True), data_dim=D, total_steps=10)
    got = ada(rec, x0, None, step=20_000, generator=gen(6))
    t = rec.online[0]["t"]
    w = net.logvar(t).detach()
    # prior weight λ = 1/(σ_d tan t) on the squared term only: e^{−w}·λ·m + w (EDM2 / sCM form)
    torch.testing.assert_close(got, torch.exp(-w) * m / (SD * torch.tan(t)) + w, rtol=1e-5, atol=1e-7)
    cc = 0.02
    cau = SCTLoss.from_config(make(adaptive_weight=False, distance="cauchy", cauchy_c=cc), data_dim=D, total_steps=10)
    got_c = cau(net, x0, None, step=20_000, generator=gen(6))
    torch.testing.assert_close(got_c, 2 * cc * cc * torch.log1p(m / (2 * cc * cc)), rtol=1e-5, atol=1e-9)
    # default Cauchy scale: the documented c0 rule 0.00054·√D
    assert SCTLoss.from_config(make(distance="cauchy"), data_dim=D, total_steps=1).cauchy_c == pytest.approx(0.00054 * 16)


def test_warmup_r_and_metrics():
    net = tiny_trigflow()
    fn = SCTLoss.from_config(make(adaptive_weight=False, tangent_warmup=100), data_dim=D, total_steps=10)
    x0 = torch.randn(8, 4, 8, 8, generator=gen(1)) * SD
    for step, r in [(0, 0.0), (25, 0.25), (100, 1.0), (500, 1.0)]:
        fn(net, x0, None, step=step, generator=gen(1))
        assert fn.metrics["r"].item() == r
    for k in ("loss", "td_abs", "g_norm_mean", "g_norm_max", "g_norm_min", "r", "ot_cost_ratio"):
        assert fn.metrics[k].ndim == 0 and not fn.metrics[k].requires_grad
    assert fn.metrics["g_norm_min"] <= fn.metrics["g_norm_mean"] <= fn.metrics["g_norm_max"]


def test_target_net_gets_no_grad_and_rng_untouched():
    online = tiny_trigflow(adaptive_weight=True)
    target = copy.deepcopy(online)
    fn = SCTLoss.from_config(make(), data_dim=D, total_steps=10)
    x0 = torch.randn(8, 4, 8, 8, generator=gen(1)) * SD
    state = torch.get_rng_state()
    a = fn(online, x0, None, step=3, generator=gen(4), target_net=target)
    assert torch.equal(state, torch.get_rng_state())
    a.mean().backward()
    assert all(p.grad is not None for p in online.parameters())
    assert all(p.grad is None for p in target.parameters())
    b = fn(online, x0, None, step=3, generator=gen(4), target_net=target)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_jvp_fp32_inside_bf16_autocast_and_bf16_option():
    net = tiny_trigflow(adaptive_weight=True)
    x0 = torch.randn(8, 4, 8, 8, generator=gen(1)) * SD
    ref = SCTLoss.from_config(make(), data_dim=D, total_steps=10)(net, x0, None, step=10**6, generator=gen(2)).detach()
    lo = SCTLoss.from_config(make(jvp_dtype="bf16"), data_dim=D, total_steps=10)
    got = lo(net, x0, None, step=10**6, generator=gen(2)).detach()
    assert torch.isfinite(got).all() and got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=0.1, atol=0.02)   # bf16 tangent: close, not equal


def test_fp32_jvp_ignores_ambient_bf16_autocast(fd_setup):
    net, x0, z, t = (a.float() if torch.is_tensor(a) else a for a in fd_setup)
    net = copy.deepcopy(net).float()
    ct, st = torch.cos(t).view(-1, 1, 1, 1), torch.sin(t).view(-1, 1, 1, 1)
    xt, v = ct * x0 + st * z, ct * z - st * x0
    kw = dict(sigma_data=SD, r=1.0, g_norm_c=0.1, dropout_seed=5)
    ref = sct_tangent(net, xt, t, v, None, **kw)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        same = sct_tangent(net, xt, t, v, None, jvp_dtype="fp32", **kw)[0]
        low = sct_tangent(net, xt, t, v, None, jvp_dtype="bf16", **kw)[0]
    torch.testing.assert_close(same, ref, rtol=0, atol=0)
    assert (low - ref).abs().max() > 0          # bf16 really changed the pass ...
    close(low, ref, 0.1)                         # ... but stays close


def test_label_dropout_same_in_both_passes():
    net = Recorder(tiny_trigflow(num_classes=5))
    fn = SCTLoss.from_config(make(label_dropout=0.5, adaptive_weight=False), data_dim=D, total_steps=10)
    labels = torch.arange(400) % 5
    fn(net, torch.zeros(400, 4, 8, 8), labels, step=0, generator=gen())
    got = net.online[0]["labels"]
    assert (got == 5).float().mean().item() == pytest.approx(0.5, abs=0.08)
    assert torch.equal(got[got != 5], labels[got != 5])


def test_ot_option_reduces_pairing_cost():
    pytest.importorskip("lct_fast.ot")
    net = tiny_trigflow()
    x0 = torch.randn(32, 4, 8, 8, generator=gen(1)) * SD + 0.3
    fn = SCTLoss.from_config(make(ot="exact", adaptive_weight=False), data_dim=D, total_steps=10)
    assert torch.isfinite(fn(net, x0, None, step=0, generator=gen(2))).all()
    assert 0.0 < fn.metrics["ot_cost_ratio"].item() < 1.0


def test_errors_and_build():
    assert isinstance(build_loss(make(), data_dim=D, total_steps=1), SCTLoss)
    with pytest.raises(AttributeError, match="logvar"):
        class NoHead(nn.Module):
            def __init__(self):
                super().__init__()
                self.inner = tiny_trigflow()
                self.backbone = self.inner.backbone

            def F(self, *a, **k):
                return self.inner.F(*a, **k)
        SCTLoss.from_config(make(adaptive_weight=True), data_dim=D, total_steps=1)(
            NoHead(), torch.zeros(2, 4, 8, 8), None, step=0, generator=gen())


def test_real_model_integration():
    from lct_fast import methods as models  # build_model: the method's preconditioning
    from lct_fast.config import ModelConfig
    mcfg = ModelConfig(arch="dit", size="custom", width=32, depth=1, heads=2, patch_size=2, in_channels=4,
                       resolution=8, num_classes=3, dropout=0.1, adaptive_weight=True)
    cfg = make(label_dropout=0.2)
    torch.manual_seed(0)
    net = models.build_model(mcfg, cfg).train()
    fn = build_loss(cfg, data_dim=D, total_steps=100)
    x0 = torch.randn(8, 4, 8, 8, generator=gen(1)) * SD
    loss = fn(net, x0, torch.arange(8) % 3, step=5000, generator=gen(2))
    assert loss.shape == (8,) and torch.isfinite(loss).all()
    loss.mean().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
    assert fn.metrics["r"].item() == 0.5


def test_real_model_tangent_vs_finite_differences():
    """g from the real DiT/TrigFlowPrecond (float64 inputs promote the wrapper) vs float64 FD."""
    from lct_fast import methods as models  # build_model: the method's preconditioning
    from lct_fast.config import ModelConfig
    mcfg = ModelConfig(arch="dit", size="custom", width=32, depth=1, heads=2, patch_size=2, in_channels=4,
                       resolution=8, ops_backend="reference")
    torch.manual_seed(0)
    net = models.build_model(mcfg, make()).double()
    g = gen(3)
    x0 = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64) * SD
    z = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64) * SD
    t = torch.tensor([0.3, 1.2], dtype=torch.float64)
    ct, st = torch.cos(t).view(-1, 1, 1, 1), torch.sin(t).view(-1, 1, 1, 1)
    xt, v = ct * x0 + st * z, ct * z - st * x0
    gg, *_ = sct_tangent(net, xt, t, v, None, sigma_data=SD, r=1.0, g_norm_c=0.1)
    h = 1e-6
    df = (f_along(net, x0, z, t + h, None) - f_along(net, x0, z, t - h, None)) / (2 * h)
    raw = ct * df
    ref = raw / (raw.flatten(1).norm(dim=1).view(-1, 1, 1, 1) + 0.1)
    close(gg, ref, 1e-6)


def test_derivative_split_matches_finite_differences():
    # dF/dt along the trajectory = ∂F/∂t + ∇ₓF·(dx_t/dt)/σ_d: each term against float64 central differences.
    from lct_fast.methods.sct import derivative_split

    net = tiny_trigflow(base_freq=1.0).double()
    net.time_scale = 1.0
    g = gen(3)
    x_t = torch.randn(4, 4, 8, 8, generator=g, dtype=torch.float64) * SD
    v = torch.randn(4, 4, 8, 8, generator=g, dtype=torch.float64) * SD
    t = torch.tensor([0.2, 0.6, 1.0, 1.4], dtype=torch.float64)
    dfdt, dxf = derivative_split(net, x_t, t, v, None, sigma_data=SD)
    h = 1e-6
    with torch.no_grad():
        ft = (net.F(x_t / SD, t + h) - net.F(x_t / SD, t - h)) / (2 * h)
        fx = (net.F((x_t + h * v) / SD, t) - net.F((x_t - h * v) / SD, t)) / (2 * h)
    assert float(dfdt) == pytest.approx(float(ft.square().mean().sqrt()), rel=1e-5)
    assert float(dxf) == pytest.approx(float(fx.square().mean().sqrt()), rel=1e-5)
    # a time scale s multiplies the ∂F/∂t term by s (why c_noise = t)
    net.time_scale = 1000.0
    dfdt_big, dxf_big = derivative_split(net, x_t, t / 1000.0, v, None, sigma_data=SD)
    assert float(dfdt_big) == pytest.approx(1000.0 * float(dfdt), rel=1e-4)
    assert float(dxf_big) == pytest.approx(float(dxf), rel=1e-6)


def test_diagnostics_keys_and_rng_isolation():
    net = tiny_trigflow()
    fn = SCTLoss.from_config(make(adaptive_weight=False), data_dim=D, total_steps=10)
    x0 = torch.randn(8, 4, 8, 8, generator=gen(1)) * SD
    state = torch.get_rng_state()
    out = fn.diagnostics(net, x0, None, generator=gen(2))
    assert torch.equal(state, torch.get_rng_state())
    assert set(out) == {"dFdt_rms", "dxF_v_rms"} and all(torch.isfinite(v) for v in out.values())
