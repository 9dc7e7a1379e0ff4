"""MeanFlow (arXiv 2505.13447; lct_fast.methods.meanflow): the JVP target against float64 finite differences, the
loss at the optimum and 1-step samples on a Gaussian toy with a closed-form average velocity, the guided
velocity of eq. 21, the sampler (eq. 12), and bad settings."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lct_fast.config import ConfigError, load_config
from lct_fast.methods import build_loss, build_model
from lct_fast.methods.meanflow import (MeanFlowLoss, meanflow_at_sigma, meanflow_jvp, meanflow_sample,
                                       meanflow_times)
from lct_fast.sample import generate


def _tiny_net(dtype=torch.float64, seed=0):
    """The tiny_meanflow network at width 32 with every parameter perturbed (the zero-initialised output and
    modulation layers would make u and its derivatives vanish)."""
    cfg = load_config("tiny_meanflow", ["model.width=32", "model.ops_backend=reference"])
    torch.manual_seed(seed)
    net = build_model(cfg.model, cfg.method).to(dtype)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=dtype))
    return cfg, net.eval()


def test_jvp_and_target_match_finite_differences_of_u_along_the_flow():
    """du/dt = v·∂_z u + ∂_t u at fixed r: the JVP with tangent (v, 0, 1) over (z, r, t) equals the central
    difference of u(z_t + εv, r, t + ε) in float64; the loss's target v − (t − r)·du/dt and its squared residual
    follow (p = 0: plain L2)."""
    cfg, net = _tiny_net()
    g = torch.Generator().manual_seed(3)
    b = 6
    x = torch.randn(b, 4, 8, 8, generator=g, dtype=torch.float64)
    eps = torch.randn(b, 4, 8, 8, generator=g, dtype=torch.float64)
    t = torch.tensor([0.9, 0.7, 0.5, 0.3, 0.6, 0.2], dtype=torch.float64)
    r = torch.tensor([0.1, 0.7, 0.2, 0.0, 0.55, 0.05], dtype=torch.float64)  # one r = t
    labels = torch.tensor([0, 1, 2, 3, 4, 1])  # 4 = the null class
    z = (1 - t).view(-1, 1, 1, 1) * x + t.view(-1, 1, 1, 1) * eps
    v = eps - x
    u, dudt = meanflow_jvp(net, z, r, t, v, labels)

    @torch.no_grad()
    def u_at(e):
        tt = t + e
        return net.F(z + e * v, tt, labels, h=tt - r)

    h = 1e-6
    fd = (u_at(h) - u_at(-h)) / (2 * h)
    torch.testing.assert_close(u, net.F(z, t, labels, h=t - r), rtol=1e-12, atol=1e-12)
    assert float(fd.abs().mean()) > 0.05  # a live derivative, not zeros
    torch.testing.assert_close(dudt, fd, rtol=1e-6, atol=1e-8)
    # A wrong tangent (the paper's Table 1b (v, 0, 0): no ∂_t u) is far outside that tolerance.
    with torch.no_grad():
        dz_only = (net.F(z + h * v, t, labels, h=t - r) - net.F(z - h * v, t, labels, h=t - r)) / (2 * h)
    assert (dz_only - fd).abs().max() > 1e-3

    # The loss on this exact draw: per sample ‖u − (v − (t − r)·FD)‖² (the online pass equals u here).
    loss = MeanFlowLoss(data_dim=256, sigma_data=1.0, label_dropout=0.0, p_mean=-0.4, p_std=1.0, ratio=0.25,
                        norm_p=0.0, norm_eps=1e-3)
    from lct_fast.methods.base import Draw

    d = Draw(x0=x, bshape=(b, 1, 1, 1), labels=labels, z=eps, t=(r, t), dropout_seed=0,
             ot_ratio=torch.ones(()))
    per_sample = loss.loss(net, net, d, step=0, generator=g).detach()
    want = (u - (v - (t - r).view(-1, 1, 1, 1) * fd)).flatten(1).square().sum(1)
    torch.testing.assert_close(per_sample, want, rtol=1e-7, atol=1e-9)
    assert float(per_sample[1]) == pytest.approx(float((u[1] - v[1]).square().sum()), rel=1e-12)  # r = t: flow matching
    # p = 1: each sample's loss is ‖Δ‖²/(‖Δ‖² + c)
    loss.norm_p = 1.0
    weighted = loss.loss(net, net, d, step=0, generator=g).detach()
    torch.testing.assert_close(weighted, want / (want + 1e-3), rtol=1e-7, atol=1e-9)


# ------------------------------------------------------------------------------------------ Gaussian toy
MU = torch.tensor([0.7, -0.4], dtype=torch.float64)
SD = torch.tensor([0.5, 1.3], dtype=torch.float64)   # data N(MU, diag(SD²)), noise N(0, I)


def _m(t):
    return (1 - t)[:, None] * MU


def _s(t):
    return torch.sqrt((1 - t)[:, None] ** 2 * SD ** 2 + t[:, None] ** 2)


def exact_u(z, r, t):
    """The toy's average velocity: each coordinate's flow keeps its standardised value, so
    z_r = m_r + s_r·(z_t − m_t)/s_t and u = (z_t − z_r)/(t − r); at r = t the instantaneous velocity."""
    zs = (z - _m(t)) / _s(t)
    same = (t - r).abs() < 1e-12
    dt = torch.where(same, torch.ones_like(t), t - r)[:, None]
    u = (z - _m(r) - _s(r) * zs) / dt
    # d/dt (m_t + s_t·ξ) = −MU + ξ·((t − 1)·SD² + t)/s_t
    v = -MU + zs * ((t - 1)[:, None] * SD ** 2 + t[:, None]) / _s(t)
    return torch.where(same[:, None], v, u)


class ExactToy(nn.Module):
    """A 'network' that is the closed form: F(z, t, labels, h) = u(z, t − h, t) (differentiable, so the JVP of
    the engine goes through it)."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Linear(1, 1)  # unused; unwrap() stops at a module with .backbone
        self.backbone.num_classes = 0

    def F(self, z, t, labels=None, *, dropout_seed=None, h=None):
        t = torch.as_tensor(t, dtype=z.dtype).expand(z.shape[0]) if torch.as_tensor(t).dim() == 0 else t
        h = torch.zeros_like(t) if h is None else torch.as_tensor(h, dtype=z.dtype).expand(z.shape[0])
        r = t - h
        zs = (z - _m(t)) / _s(t)
        # average velocity, written so that r -> t is smooth: (z − m_r − s_r·ξ)/(t − r) with the limit at h = 0
        small = h.abs() < 1e-9
        hh = torch.where(small, torch.ones_like(h), h)[:, None]
        avg = (z - _m(r) - _s(r) * zs) / hh
        inst = -MU + zs * ((t - 1)[:, None] * SD ** 2 + t[:, None]) / _s(t)
        return torch.where(small[:, None], inst, avg)


def test_closed_form_average_velocity_is_the_optimum():
    """At the exact u the residual is Δ = (E[v|z_t] − v)·s_r/s_t per coordinate (the identity with the marginal
    velocity holds and (t − r)·∂_z u = 1 − s_r/s_t), so the plain-L2 loss (p = 0) at the optimum is
    Σ_d (s_r/s_t)²·Var(v_d | z_t), Var(v|z_t) = 1 + SD² − (t − (1 − t)·SD²)²/s_t². Monte Carlo over 40 000
    draws of the loss's own (r, t) sampler; a perturbed field (u + 0.05) scores D·0.05² higher on the same draws."""
    toy = ExactToy()
    torch.testing.assert_close(toy.F(torch.zeros(3, 2, dtype=torch.float64), torch.full((3,), 0.4, dtype=torch.float64),
                                     h=torch.full((3,), 0.3, dtype=torch.float64)),
                               exact_u(torch.zeros(3, 2, dtype=torch.float64), torch.full((3,), 0.1, dtype=torch.float64),
                                       torch.full((3,), 0.4, dtype=torch.float64)))
    n = 40_000
    g = torch.Generator().manual_seed(0)
    x0 = MU + SD * torch.randn(n, 2, generator=g, dtype=torch.float64)
    loss = MeanFlowLoss(data_dim=2, sigma_data=1.0, label_dropout=0.0, p_mean=-0.4, p_std=1.0, ratio=0.5,
                        norm_p=0.0, norm_eps=1e-3)
    d = loss.prologue(x0, None, step=0, generator=g, target_net=toy)
    r, t = d.t
    assert 0.45 < float((r < t).double().mean()) < 0.55
    got = loss.loss(toy, toy, d, step=0, generator=g).detach()
    st, sr = _s(t), _s(r)
    var_v = 1 + SD ** 2 - (t[:, None] - (1 - t)[:, None] * SD ** 2) ** 2 / st ** 2
    want = ((sr / st) ** 2 * var_v).sum(1)
    assert float(got.mean()) == pytest.approx(float(want.mean()), rel=0.02)
    # per time group too (r = t: the flow-matching residual Var(v|z_t))
    fm = r == t
    assert float(got[fm].mean()) == pytest.approx(float(want[fm].mean()), rel=0.03)

    # Stationarity, the property that makes it the optimum: the residual is uncorrelated with any function of
    # (z_t, r, t), here 1 and the standardised z_t, within Monte Carlo error. The flow-matching field (the
    # instantaneous velocity at every h: what ratio = 0 learns) fails it on the r < t samples.
    def residual(field):
        x, eps = d.x0, d.z
        z = (1 - t)[:, None] * x + t[:, None] * eps
        u, dudt = meanflow_jvp(field, z, r, t, eps - x, None)
        return u - (eps - x - (t - r)[:, None] * dudt), (z - _m(t)) / _s(t)

    class Instant(ExactToy):
        def F(self, z, t, labels=None, *, dropout_seed=None, h=None):
            return super().F(z, t, labels, h=None)

    jump = ~fm
    for field, stationary in ((toy, True), (Instant(), False)):
        delta, zs = residual(field)
        scores = []
        for feat in (torch.ones_like(zs), zs):
            prod = (delta * feat)[jump]
            scores.append(float((prod.mean(0) / (prod.std(0) / math.sqrt(prod.shape[0]))).abs().max()))
        assert (max(scores) < 4) if stationary else (max(scores) > 20), (stationary, scores)


def test_sampler_follows_eq_12_and_is_exact_for_the_exact_field():
    """One step x = ε − u(ε, 0, 1) and two steps through t_mid transport ε exactly onto the data distribution's
    quantile map (the field is exact): x = MU + SD·ε per coordinate."""
    toy = ExactToy()
    eps = torch.randn(5, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for ts in ((1.0, 0.0), meanflow_times(2, t_mid=0.3), meanflow_times(4)):
        x = meanflow_sample(toy, eps, ts=ts).double()
        torch.testing.assert_close(x, MU + SD * eps, rtol=1e-5, atol=1e-5)
    assert meanflow_times(3) == (1.0, 1 - 1 / 3, 1 - 2 / 3, 0.0)
    with pytest.raises(ValueError, match="strictly from 1 to 0"):
        meanflow_sample(toy, eps, ts=(1.0, 0.5))
    with pytest.raises(ValueError, match="strictly from 1 to 0"):
        meanflow_sample(toy, eps, ts=(1.0, 0.6, 0.7, 0.0))


class AffineField(nn.Module):
    """u(z, t, h) = A(t, h)·z + b(t, h) with A, b from a small MLP of (t, h): the toy's exact solution is in this
    family."""

    def __init__(self):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(2, 64), nn.SiLU(), nn.Linear(64, 64), nn.SiLU(), nn.Linear(64, 6))
        self.backbone = self.mlp
        self.mlp.num_classes = 0

    def F(self, z, t, labels=None, *, dropout_seed=None, h=None):
        t = torch.as_tensor(t, dtype=z.dtype).expand(z.shape[0]) if torch.as_tensor(t).dim() == 0 else t
        h = torch.zeros_like(t) if h is None else torch.as_tensor(h, dtype=z.dtype).expand(z.shape[0])
        out = self.mlp(torch.stack([t, h], dim=1).to(z.dtype))
        a, b = out[:, :4].reshape(-1, 2, 2), out[:, 4:]
        return torch.einsum("bij,bj->bi", a, z) + b


def test_training_on_the_gaussian_toy_gives_one_step_samples_with_the_data_moments():
    """MeanFlowLoss trains the affine field; its 1-step samples' mean and covariance match the data's, far closer
    than the untrained field's (the guard that the test can fail). The paper's time sampler with its CIFAR-10
    ratio (75 % r != t) and p = 0, the plain squared loss (p = 1 reaches the same fixed point more noisily:
    measured covariance error 0.26 against 0.04 at this budget)."""
    torch.manual_seed(0)
    net = AffineField()
    mu, sd = MU.float(), SD.float()
    loss = MeanFlowLoss(data_dim=2, sigma_data=1.0, label_dropout=0.0, p_mean=-0.4, p_std=1.0, ratio=0.75,
                        norm_p=0.0, norm_eps=1e-3)
    cov = torch.diag(sd ** 2)

    def moments_err():
        eps = torch.randn(20_000, 2, generator=torch.Generator().manual_seed(9))
        x = meanflow_sample(net, eps, ts=(1.0, 0.0))
        return float((x.mean(0) - mu).norm()), float((torch.cov(x.T) - cov).norm() / cov.norm())

    before = moments_err()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 1500)
    g = torch.Generator().manual_seed(1)
    for step in range(1500):
        x0 = mu + sd * torch.randn(1024, 2, generator=g)
        opt.zero_grad()
        loss(net, x0, None, step=step, generator=g).mean().backward()
        opt.step()
        sched.step()
    mean_err, cov_err = moments_err()
    assert mean_err < 0.08 and cov_err < 0.1, (mean_err, cov_err, before)   # measured 0.036, 0.044
    assert before[0] > 10 * mean_err and before[1] > 5 * cov_err, (before, mean_err, cov_err)


# ------------------------------------------------------------------------------------------ guidance
class LabelField(nn.Module):
    """F = label-dependent constant (h-independent): u_c = label + 1, u_∅ = −1 (null class 4)."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Linear(1, 1)
        self.backbone.num_classes = 4

    def F(self, z, t, labels=None, *, dropout_seed=None, h=None):
        lab = labels.to(z.dtype).view(-1, *([1] * (z.dim() - 1)))
        return torch.where(lab == 4, -torch.ones_like(z), (lab + 1) * torch.ones_like(z))


def test_guided_velocity_is_eq_21_inside_its_interval_only():
    loss = MeanFlowLoss(data_dim=4, sigma_data=1.0, label_dropout=0.0, p_mean=-0.4, p_std=1.0, ratio=0.25,
                        norm_p=1.0, norm_eps=1e-3, guidance=0.6, guidance_mix=0.3, guidance_interval=(0.2, 0.8))
    net = LabelField()
    z = torch.zeros(4, 1, 2, 2)
    v = torch.full((4, 1, 2, 2), 2.0)
    t = torch.tensor([0.5, 0.9, 0.5, 0.1])
    labels = torch.tensor([1, 1, 4, 2])
    got = loss.guided_velocity(net, z, t, v, labels)
    # sample 0: in the interval, labelled: ω·v + κ·u_c + (1 − ω − κ)·u_∅ = 0.6·2 + 0.3·2 + 0.1·(−1)
    assert torch.allclose(got[0], torch.full_like(got[0], 0.6 * 2 + 0.3 * 2 + 0.1 * -1.0))
    for i in (1, 2, 3):  # outside [0.2, 0.8], a dropped label, outside again: the data velocity
        assert torch.equal(got[i], v[i])


def test_guided_loss_uses_the_guided_velocity_as_tangent_and_in_the_target():
    """With guidance (ω 0.8, κ 0.5, interval [0.2, 0.8]) on the perturbed tiny network (which depends on h, z and
    the label): ṽ from two independent eval-mode passes at h = 0, the derivative of u along ṽ by float64 central
    differences, and the loss's per-sample ‖u − (ṽ − (t − r)·FD)‖² (p = 0) agree."""
    from lct_fast.methods.base import Draw

    cfg, net = _tiny_net()
    g = torch.Generator().manual_seed(5)
    b = 5
    x = torch.randn(b, 4, 8, 8, generator=g, dtype=torch.float64)
    eps = torch.randn(b, 4, 8, 8, generator=g, dtype=torch.float64)
    t = torch.tensor([0.5, 0.7, 0.9, 0.3, 0.6], dtype=torch.float64)   # the third outside the interval
    r = torch.tensor([0.1, 0.2, 0.4, 0.3, 0.5], dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 3, 4])                              # the last dropped (null class 4)
    loss = MeanFlowLoss(data_dim=256, sigma_data=1.0, label_dropout=0.0, p_mean=-0.4, p_std=1.0, ratio=0.25,
                        norm_p=0.0, norm_eps=1e-3, guidance=0.8, guidance_mix=0.5, guidance_interval=(0.2, 0.8))
    z = (1 - t).view(-1, 1, 1, 1) * x + t.view(-1, 1, 1, 1) * eps
    v = eps - x
    with torch.no_grad():
        u_c = net.F(z, t, labels, h=torch.zeros_like(t))
        u_u = net.F(z, t, torch.full_like(labels, 4), h=torch.zeros_like(t))
    on = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0], dtype=torch.float64).view(-1, 1, 1, 1)
    v_guided = on * (0.8 * v + 0.5 * u_c + (1 - 0.8 - 0.5) * u_u) + (1 - on) * v
    torch.testing.assert_close(loss.guided_velocity(net, z, t, v, labels), v_guided, rtol=1e-12, atol=1e-12)

    @torch.no_grad()
    def u_at(e):
        return net.F(z + e * v_guided, t + e, labels, h=t + e - r)

    h = 1e-6
    fd = (u_at(h) - u_at(-h)) / (2 * h)
    d = Draw(x0=x, bshape=(b, 1, 1, 1), labels=labels, z=eps, t=(r, t), dropout_seed=0, ot_ratio=torch.ones(()))
    got = loss.loss(net, net, d, step=0, generator=g).detach()
    u = u_at(0.0)
    want = (u - (v_guided - (t - r).view(-1, 1, 1, 1) * fd)).flatten(1).square().sum(1)
    torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-9)
    # the unguided target differs on the guided samples (so the comparison above can fail)
    plain = (u - (v - (t - r).view(-1, 1, 1, 1) * fd)).flatten(1).square().sum(1)
    assert float((plain - want).abs()[[0, 1, 3]].min()) > 1e-3


def test_diagnostics_split_du_dt_into_its_time_and_space_terms():
    """``dudt_t_rms`` and ``dudt_z_rms`` are the RMS of ∂_t u (with ∂_h u) and of (ε − x)·∂_z u at the draw the
    generator gives, each against float64 central differences."""
    cfg, net = _tiny_net()
    loss = build_loss(cfg.method, data_dim=256, total_steps=10)
    x0 = torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    got = loss.diagnostics(net, x0, labels, generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    r, t = loss.draw_times(6, g, x0, 0)
    eps = torch.randn(x0.shape, generator=g, dtype=x0.dtype)
    z = (1 - t).view(-1, 1, 1, 1) * x0 + t.view(-1, 1, 1, 1) * eps
    h = 1e-6
    with torch.no_grad():
        d_t = (net.F(z, t + h, labels, h=t + h - r) - net.F(z, t - h, labels, h=t - h - r)) / (2 * h)
        d_z = (net.F(z + h * (eps - x0), t, labels, h=t - r) - net.F(z - h * (eps - x0), t, labels, h=t - r)) / (2 * h)
    assert float(got["dudt_t_rms"]) == pytest.approx(float(d_t.square().mean().sqrt()), rel=1e-6)
    assert float(got["dudt_z_rms"]) == pytest.approx(float(d_z.square().mean().sqrt()), rel=1e-6)


# ------------------------------------------------------------------------------------------ presets, errors
def test_tiny_preset_network_conditions_on_t_and_t_minus_r_and_probes_like_a_denoiser():
    cfg = load_config("tiny_meanflow")
    net = build_model(cfg.model, cfg.method)
    assert hasattr(net.backbone, "h_embed")
    assert cfg.method.sigma_data == 1.0 and cfg.method.meanflow.ratio == 0.25 and cfg.method.meanflow.p_mean == -0.4
    # at_sigma: z_t = (1 − t)·(x + σ·ε) with t = σ/(1 + σ)
    scale, t = meanflow_at_sigma(3.0, 1.0)
    assert t == pytest.approx(0.75) and scale == pytest.approx(0.25)
    # forward = the clean estimate z − t·u(z, t, t): the exact field's is the posterior mean E[x|z_t]
    toy = ExactToy()
    from lct_fast.methods.meanflow import MeanFlowPrecond

    pre = MeanFlowPrecond(toy)
    pre.F = toy.F  # the closed form as the network
    zt = torch.randn(4, 2, dtype=torch.float64)
    tt = torch.full((4,), 0.6, dtype=torch.float64)
    st = _s(tt)
    post = MU + (1 - 0.6) * SD ** 2 / st ** 2 * (zt - _m(tt))   # E[x | z_t] for Gaussian x
    torch.testing.assert_close(pre(zt, tt), post, rtol=1e-10, atol=1e-10)


def test_settings_the_model_was_not_trained_for_are_clear_errors():
    guided = load_config("tiny_meanflow", ["method.meanflow.guidance_mix=0.5"])
    net = build_model(guided.model, guided.method)
    with pytest.raises(ValueError, match="trained with guidance in its target"):
        generate(net, guided.method, n=2, shape=(4, 8, 8), num_classes=4, steps=1, cfg_scale=2.0)
    plain = load_config("tiny_meanflow")
    x = generate(build_model(plain.model, plain.method), plain.method, n=2, shape=(4, 8, 8), num_classes=4,
                 steps=1, cfg_scale=2.0).latents  # sampling-time CFG on an unguided model is allowed
    assert torch.isfinite(x).all()
    fm = load_config("tiny_meanflow", ["method.meanflow.ratio=0"])  # flow matching: samples, with a warning
    import lct_fast.methods.meanflow as mfm

    mfm._WARNED_RATIO0.clear()
    with pytest.warns(RuntimeWarning, match="never saw a jump"):
        generate(build_model(fm.model, fm.method), fm.method, n=2, shape=(4, 8, 8), num_classes=4, steps=1)
    with pytest.raises(ValueError, match="guidance=3.0"):
        generate(net, guided.method, n=2, shape=(4, 8, 8), num_classes=4, steps=1, guidance=3.0)
    for sets, match in ((["method.meanflow.ratio=1.5"], "method.meanflow.ratio"),
                        (["method.meanflow.guidance_mix=1.0"], "guidance_mix"),
                        (["method.meanflow.guidance_t_min=0.9", "method.meanflow.guidance_t_max=0.5"], "t_min"),
                        (["model.adaptive_weight=true"], "model.adaptive_weight"),
                        (["method.meanflow.guidance=2.0", "model.num_classes=0"], "class-conditional"),
                        (["method.meanflow.t_mid=1.0"], "t_mid")):
        with pytest.raises(ConfigError, match=match):
            load_config("tiny_meanflow", sets)


def test_loss_built_from_the_preset_trains_the_tiny_network_one_step():
    """The registry path: build_loss / build_model of the preset, a backward pass reaching the h embedding."""
    cfg, net = _tiny_net(torch.float32)
    net.train()
    loss = build_loss(cfg.method, data_dim=256, total_steps=10)
    x0 = torch.randn(8, 4, 8, 8)
    out = loss(net, x0, torch.randint(0, 4, (8,)), step=0, generator=torch.Generator().manual_seed(0))
    assert out.shape == (8,) and torch.isfinite(out).all()
    out.mean().backward()
    assert net.backbone.h_embed.mlp[2].weight.grad.abs().sum() > 0
    assert math.isfinite(loss.metrics["mse"]) and loss.metrics["jvp_abs"] > 0


def test_trains_exports_samples_and_evaluates_through_the_clis(tmp_path):
    """launch/train.py (with in-training evaluation and guidance in training) -> export.py -> sample.py at 1 and
    2 steps -> evaluate.py, as for every other method; the offline evaluation equals the in-training one."""
    import json
    import os
    import subprocess
    import sys

    import numpy as np

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items()
           if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(DS_ACCELERATOR="cpu", PYTHONPATH=root, OMP_NUM_THREADS="1")
    run = str(tmp_path / "run")
    sets = ["model.width=32", "train.global_batch=8", "train.log_interval=8", "optim.warmup_samples=0",
            "data.shuffle_buffer=64", "train.total_samples=48", "train.eval_interval=48", "train.eval.n=200",
            "train.eval.steps=[1, 2]", "train.eval.ema=ema_0.999", "train.ckpt_interval=0",
            "train.sample_interval=0", "method.meanflow.guidance_mix=0.5"]

    def cli(*args):
        proc = subprocess.run([sys.executable, *args], cwd=root, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    cli("launch/train.py", "--config", "configs/tiny_meanflow.json", "--out", run,
        *[a for s in sets for a in ("--set", s)])
    rows = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    assert all(math.isfinite(r["mse"]) for r in rows if "mse" in r) and "probe_err@1sd" in rows[-1]
    last = [r for r in rows if "eval/ema" in r][-1]
    cli("launch/export.py", "--run", run)
    weights = os.path.join(run, "export", "ema_0.999.safetensors")
    for steps in ("1", "2"):
        out = str(tmp_path / f"samples{steps}")
        cli("launch/sample.py", "--checkpoint", weights, "--steps", steps, "--n", "6", "--out", out)
        lat = np.load(os.path.join(out, "latents.npy"), allow_pickle=False)
        assert lat.shape == (6, 4, 8, 8) and np.isfinite(lat).all()
    bad = subprocess.run([sys.executable, "launch/sample.py", "--checkpoint", weights, "--steps", "1", "--n", "2",
                          "--cfg-scale", "2", "--out", str(tmp_path / "bad")], cwd=root, env=env,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "trained with guidance in its target" in bad.stderr
    assert "Traceback" not in bad.stderr
    out = str(tmp_path / "eval")
    cli("launch/evaluate.py", "--checkpoint", weights, "--num-samples", "200", "--steps", "1", "2", "--out", out)
    offline = json.load(open(os.path.join(out, "metrics.json")))["metrics"]
    for k in ("1", "2"):
        assert offline[k]["mw1"] == pytest.approx(last[f"eval/{k}step/mw1"], rel=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton/CUDA kernels take CUDA tensors (their CPU "
                    "interpreter tests are tests/test_flash_attention.py and tests/test_nsln_kernels.py)")
def test_jvp_pass_through_the_fused_kernels_equals_the_reference():
    """The MeanFlow JVP on the engine's own kernels (GPU): with model.ops_backend=auto on CUDA the fused JVP
    attention and the NsLN-modulation tangent kernel carry the pass, and u, du/dt equal the PyTorch reference
    within fp32 rounding."""
    from lct_fast import ops

    torch.backends.cuda.matmul.allow_tf32 = False
    _, ref = _tiny_net(torch.float32)
    cfg_f = load_config("tiny_meanflow", ["model.width=32", "model.ops_backend=auto"])
    fused = build_model(cfg_f.model, cfg_f.method)
    fused.load_state_dict(ref.state_dict())
    ref, fused = ref.cuda().eval(), fused.cuda().eval()
    g = torch.Generator().manual_seed(4)
    x, eps = torch.randn(2, 4, 8, 8, generator=g).cuda(), torch.randn(2, 4, 8, 8, generator=g).cuda()
    t, r = torch.tensor([0.8, 0.4]).cuda(), torch.tensor([0.2, 0.4]).cuda()
    labels = torch.tensor([1, 4]).cuda()
    z = (1 - t).view(-1, 1, 1, 1) * x + t.view(-1, 1, 1, 1) * eps
    ops.reset_backend_log()
    u_f, d_f = meanflow_jvp(fused, z, r, t, eps - x, labels)
    chosen = {(op, c) for (op, _, _, c) in ops.backend_choices()}
    assert ("attention", "reference") not in chosen and ("nsln_modulate", "reference") not in chosen, chosen
    u_r, d_r = meanflow_jvp(ref, z, r, t, eps - x, labels)
    assert float(d_r.abs().max()) > 1e-2
    torch.testing.assert_close(u_f, u_r, rtol=1e-4, atol=1e-5 * max(1.0, float(u_r.abs().max())))
    torch.testing.assert_close(d_f, d_r, rtol=1e-4, atol=1e-5 * max(1.0, float(d_r.abs().max())))
