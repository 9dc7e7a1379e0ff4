"""ICTLoss (discrete-time iLCT): pairing, λ weighting, c, diffusion-loss selection, OT, dropout, RNG."""
from __future__ import annotations

import math
import sys
import types

import pytest
import torch
from torch import nn

from lct_fast.config import MethodConfig, OTConfig
from lct_fast.methods.ict import ICTConfig
from lct_fast.methods import ICTLoss, build_loss, schedules
from test_methods_standins import tiny_ve

D = 4 * 8 * 8


def make(**ict_kw) -> MethodConfig:
    ot = ict_kw.pop("ot", "none")
    label_dropout = ict_kw.pop("label_dropout", 0.0)
    return MethodConfig(name="ict", label_dropout=label_dropout, ict=ICTConfig(**ict_kw), ot=OTConfig(method=ot))


class Recorder(nn.Module):
    """Wraps a VE net and records every call (inputs, σ, labels, seed, grad mode, output)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.inner = net
        self.backbone = getattr(net, "backbone", None)
        self.calls = []

    def forward(self, x, sigma, labels=None, *, dropout_seed=None):
        out = self.inner(x, sigma, labels, dropout_seed=dropout_seed)
        self.calls.append(dict(x=x.detach().clone(), sigma=sigma.detach().clone(), labels=labels,
                               seed=dropout_seed, grad=torch.is_grad_enabled(), out=out.detach().clone()))
        return out


class Scale(nn.Module):
    """f(x, σ) = a·x with a learnable scalar a (a closed-form toy consistency model)."""

    def __init__(self, a: float = 1.0) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a))

    def forward(self, x, sigma, labels=None, *, dropout_seed=None):
        return self.a * x


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def data(b=64, seed=1):
    return torch.randn(b, 4, 8, 8, generator=gen(seed)) * 0.5


def test_pairs_share_z_and_lambda_weight_closed_form():
    # f = identity: TD = (σ_{i+1} − σ_i)·z, so λ·m = (σ_{i+1} − σ_i)·mean(z²) for L2.
    rec = Recorder(Scale(1.0))
    loss_fn = ICTLoss.from_config(make(distance="l2", diffusion_weight=0.0), data_dim=D, total_steps=1000)
    x0 = data()
    loss = loss_fn(rec, x0, None, step=0, generator=gen())
    online, target = rec.calls
    assert online["grad"] and not target["grad"]
    s_hi, s_lo = online["sigma"].double(), target["sigma"].double()
    grid = schedules.karras_sigmas(11)
    idx_hi = torch.searchsorted(grid, s_hi.clamp(max=80.0) * (1 - 1e-6))   # position of σ_{i+1} in the grid
    torch.testing.assert_close(grid[idx_hi - 1].float(), s_lo.float())    # adjacent levels
    z = (online["x"] - x0) / online["sigma"].view(-1, 1, 1, 1)
    torch.testing.assert_close(target["x"], x0 + target["sigma"].view(-1, 1, 1, 1) * z, atol=1e-5, rtol=1e-5)
    expect = (grid[idx_hi] - grid[idx_hi - 1]).float() * z.flatten(1).square().mean(1)
    torch.testing.assert_close(loss, expect, rtol=2e-4, atol=1e-6)
    assert loss.dtype == torch.float32 and loss.shape == (64,)


@pytest.mark.parametrize("distance", ["l2", "pseudo_huber", "cauchy", "geman_mcclure"])
@pytest.mark.parametrize("c_mode", ["fixed", "adaptive"])
def test_distance_and_c_applied(distance, c_mode):
    net = Recorder(tiny_ve())
    cfg = make(distance=distance, c_mode=c_mode, diffusion_weight=0.0)
    loss_fn = ICTLoss.from_config(cfg, data_dim=D, total_steps=294_000)
    step = 42_000                                    # N = 21
    loss = loss_fn(net, data(16), None, step=step, generator=gen(3))
    online, target = net.calls
    m = (online["out"] - target["out"]).flatten(1).square().mean(1)
    c = 0.00054 * math.sqrt(D) if c_mode == "fixed" else math.exp(-1.18 * math.log(20) - 0.72)
    d = {"l2": m, "pseudo_huber": torch.sqrt(m + c * c) - c, "cauchy": torch.log(1 + m / (2 * c * c)),
         "geman_mcclure": 2 * m / (m + 4 * c * c)}[distance]
    lam = 1.0 / (online["sigma"].double() - target["sigma"].double())
    torch.testing.assert_close(loss, (lam * d.double()).float(), rtol=1e-3, atol=1e-6)
    assert loss_fn.metrics["c"].item() == pytest.approx(c, rel=1e-6)
    assert loss_fn.metrics["num_levels"].item() == 21


def test_diffusion_loss_selects_exactly_smallest_levels():
    # unweighted, batch-averaged form (the paper's eq. 9 as written); the default weighting is tested below
    cfg_on = make(distance="cauchy", diffusion_r=0.25, diffusion_weight=0.7, diffusion_sigma_weight="none",
                  diffusion_average="batch")
    cfg_off = make(distance="cauchy", diffusion_weight=0.0)
    x0 = data(128)
    rec_on, rec_off = Recorder(tiny_ve()), Recorder(tiny_ve())
    on = ICTLoss.from_config(cfg_on, data_dim=D, total_steps=1000)(rec_on, x0, None, step=0, generator=gen(5))
    off = ICTLoss.from_config(cfg_off, data_dim=D, total_steps=1000)(rec_off, x0, None, step=0, generator=gen(5))
    grid = schedules.karras_sigmas(11).float()
    s_hi = rec_on.calls[0]["sigma"]
    i = (s_hi[:, None] == grid[None]).float().argmax(1)          # 0-based position of σ_{i+1} = 1-based i
    sel = i <= math.floor(11 * 0.25)                              # i <= 2
    assert 0 < int(sel.sum()) < 128
    f_hi = rec_on.calls[0]["out"]
    extra = 0.7 * (f_hi - x0).flatten(1).square().mean(1)
    torch.testing.assert_close(on - off, torch.where(sel, extra, torch.zeros_like(extra)), rtol=1e-4, atol=1e-6)
    # the selected samples are exactly those at the smallest levels
    assert s_hi[sel].max() < s_hi[~sel].min()
    assert s_hi[sel].max() <= grid[2] + 1e-7
    # metrics
    m = ICTLoss.from_config(cfg_on, data_dim=D, total_steps=1000)
    m(Recorder(tiny_ve()), x0, None, step=0, generator=gen(5))
    assert m.metrics["diffusion_frac"].item() == pytest.approx(sel.float().mean().item())
    assert m.metrics["diffusion_cutoff"].item() == 2


def test_default_diffusion_term_is_edm_weighted_mean_over_selected_times_five():
    # Defaults = the authors' released code: 5 · mean over the selected samples of (1/σ² + 1/σ_d²)·m_diff at
    # the online level σ = σ_{i+1}; the per-sample vector's batch mean must equal exactly that plus the
    # consistency term's batch mean.
    x0 = data(128)
    rec_on = Recorder(tiny_ve())
    on = ICTLoss.from_config(make(distance="cauchy"), data_dim=D, total_steps=1000)(rec_on, x0, None, step=0, generator=gen(5))
    off = ICTLoss.from_config(make(distance="cauchy", diffusion_weight=0.0), data_dim=D, total_steps=1000)(
        Recorder(tiny_ve()), x0, None, step=0, generator=gen(5))
    s_hi = rec_on.calls[0]["sigma"].double()
    grid = schedules.karras_sigmas(11)
    sel = s_hi <= grid[2] + 1e-9
    assert 0 < int(sel.sum()) < 128
    m_diff = (rec_on.calls[0]["out"].double() - x0.double()).flatten(1).square().mean(1)
    edm = 1 / s_hi ** 2 + 1 / 0.5 ** 2
    expect = 5.0 * (edm * m_diff)[sel].mean()
    torch.testing.assert_close((on - off).double().mean(), expect, rtol=1e-4, atol=0)
    assert bool(((on - off)[~sel] == 0).all())


@pytest.mark.parametrize("c_mode", ["fixed", "adaptive"])
@pytest.mark.parametrize("c_norm", ["sum", "mean"])
@pytest.mark.parametrize("distance, power", [("cauchy", 0.0), ("pseudo_huber", 0.5)])
def test_mean_and_sum_reductions_train_the_same_loss(c_mode, c_norm, distance, power):
    """c is defined on one norm (c_norm) and converted to the reduction: √(Σ + c²) − c = √D·(√(m + (c/√D)²) − c/√D)
    and ln(1 + Σ/2c²) = ln(1 + m/2(c/√D)²), so the sum-reduced loss is D^power × the mean-reduced one, gradients
    included (Cauchy: identical)."""
    from lct_fast import methods as models  # build_model: the method's preconditioning
    from lct_fast.config import ModelConfig
    mcfg = ModelConfig(arch="dit", size="custom", width=32, depth=1, heads=2, patch_size=2, in_channels=4,
                       resolution=8, num_classes=0)
    x0 = data(16)
    out = {}
    for reduction in ("mean", "sum"):
        cfg = make(reduction=reduction, distance=distance, c_mode=c_mode, c_norm=c_norm, diffusion_weight=0.0)
        torch.manual_seed(0)
        net = models.build_model(mcfg, cfg).double()
        with torch.no_grad():  # a non-trivial output (adaLN-zero starts at F = 0)
            for p in net.parameters():
                p.add_(0.05 * torch.randn_like(p))
        fn = ICTLoss.from_config(cfg, data_dim=D, total_steps=1000)
        loss = fn(net, x0.double(), None, step=400, generator=gen(3))
        loss.mean().backward()
        out[reduction] = (fn.c_at(fn.num_levels(400)), loss.detach(),
                          torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None]))
    (c_m, l_m, g_m), (c_s, l_s, g_s) = out["mean"], out["sum"]
    assert c_s == pytest.approx(c_m * math.sqrt(D), rel=1e-12)
    k = D ** power
    torch.testing.assert_close(l_s, k * l_m, rtol=1e-9, atol=0)
    torch.testing.assert_close(g_s, k * g_m, rtol=1e-7, atol=1e-12 * float(g_s.abs().max()))


@pytest.mark.parametrize("r, p_mean", [(0.0, -1.1), (0.05, -1.1), (0.25, 4.0)])
def test_empty_diffusion_selection_adds_zero_never_nan(r, p_mean):
    # r = 0 or floor(11·0.05) = 0: no level qualifies; p_mean = 4 with a narrow std: all pairs at the top.
    kw = dict(distance="cauchy", diffusion_r=r, p_mean=p_mean, p_std=0.05)
    x0 = data(32)
    on_fn = ICTLoss.from_config(make(diffusion_weight=1.0, **kw), data_dim=D, total_steps=1000)
    on = on_fn(tiny_ve(), x0, None, step=0, generator=gen(2))
    off = ICTLoss.from_config(make(diffusion_weight=0.0, **kw), data_dim=D, total_steps=1000)(
        tiny_ve(), x0, None, step=0, generator=gen(2))
    assert torch.isfinite(on).all()
    torch.testing.assert_close(on, off, rtol=0, atol=0)
    assert on_fn.metrics["diffusion_frac"].item() == 0.0


def test_diffusion_unselected_nonfinite_does_not_leak():
    # Above σ = 0.09 the toy net outputs 1e20 at both levels: TD = 0 there but the diffusion residual
    # (1e20)² overflows to inf. Those pairs are not selected (i > 2), so their loss must be exactly 0,
    # not 0·inf = NaN.
    class HugeAbove(nn.Module):
        def forward(self, x, sigma, labels=None, *, dropout_seed=None):
            return torch.where((sigma > 0.09).view(-1, 1, 1, 1), torch.full_like(x, 1e20), x)
    rec = Recorder(HugeAbove())
    fn = ICTLoss.from_config(make(distance="cauchy", diffusion_r=0.25), data_dim=D, total_steps=1000)
    loss = fn(rec, data(64), None, step=0, generator=gen(9))
    assert not torch.isnan(loss).any()
    top = rec.calls[1]["sigma"] > 0.09
    assert int(top.sum()) > 0
    assert bool((loss[top] == 0).all())


def test_shared_dropout_seed_and_target_without_graph():
    net = Recorder(tiny_ve(dropout=0.3).train())
    fn = ICTLoss.from_config(make(), data_dim=D, total_steps=1000)
    loss = fn(net, data(8), None, step=0, generator=gen())
    a, b = net.calls
    assert a["seed"] is not None and a["seed"] == b["seed"]
    loss.mean().backward()
    assert all(p.grad is not None for p in net.parameters())
    # online and target at the *same* input and σ with the shared seed give identical outputs
    x, s = a["x"], a["sigma"]
    torch.testing.assert_close(net.inner(x, s, dropout_seed=a["seed"]), net.inner(x, s, dropout_seed=b["seed"]))


def test_separate_target_net_gets_no_gradient():
    online, target = tiny_ve(seed=0), tiny_ve(seed=0)
    fn = ICTLoss.from_config(make(), data_dim=D, total_steps=1000)
    fn(online, data(8), None, step=0, generator=gen(), target_net=target).mean().backward()
    assert all(p.grad is not None for p in online.parameters())
    assert all(p.grad is None for p in target.parameters())


def test_generator_only_randomness():
    fn = ICTLoss.from_config(make(), data_dim=D, total_steps=1000)
    net, x0 = tiny_ve(), data(16)
    state = torch.get_rng_state()
    a = fn(net, x0, None, step=5, generator=gen(11))
    assert torch.equal(state, torch.get_rng_state()), "global RNG state was touched"
    b = fn(net, x0, None, step=5, generator=gen(11))
    c = fn(net, x0, None, step=5, generator=gen(12))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, c)


@pytest.mark.parametrize("p", [0.0, 0.5, 0.9])
def test_label_dropout(p):
    net = Recorder(tiny_ve(num_classes=10))
    fn = ICTLoss.from_config(make(label_dropout=p), data_dim=D, total_steps=1000)
    labels = torch.arange(512) % 10
    fn(net, torch.zeros(512, 4, 8, 8), labels, step=0, generator=gen())
    got = net.calls[0]["labels"]
    assert got is net.calls[1]["labels"]             # both passes see the same labels
    dropped = (got == 10).float().mean().item()
    if p == 0.0:
        assert torch.equal(got, labels)
    else:
        assert dropped == pytest.approx(p, abs=0.07)
        keep = got != 10
        assert torch.equal(got[keep], labels[keep])


def _fake_or_real_couple(monkeypatch):
    """Use lct_fast.ot.couple when it imports; otherwise a scipy Hungarian stand-in."""
    try:
        import lct_fast.ot  # noqa: F401
        return
    except Exception:
        from scipy.optimize import linear_sum_assignment

        def couple(x0, z, method="exact", *, backend="auto", **kw):
            C = torch.cdist(x0.flatten(1).double(), z.flatten(1).double()) ** 2
            _, cols = linear_sum_assignment(C.numpy())
            return torch.as_tensor(cols, dtype=torch.long)
        monkeypatch.setitem(sys.modules, "lct_fast.ot", types.SimpleNamespace(couple=couple))


def test_ot_coupling_is_optimal_and_shared_by_both_levels(monkeypatch):
    from scipy.optimize import linear_sum_assignment
    _fake_or_real_couple(monkeypatch)
    rec = Recorder(Scale(1.0))
    x0 = data(32) + 0.5
    fn = ICTLoss.from_config(make(ot="exact"), data_dim=D, total_steps=1000)
    fn(rec, x0, None, step=0, generator=gen(4))
    on, tg = rec.calls
    z = (on["x"] - x0) / on["sigma"].view(-1, 1, 1, 1)
    torch.testing.assert_close(tg["x"], x0 + tg["sigma"].view(-1, 1, 1, 1) * z, atol=1e-5, rtol=1e-5)
    # the used pairing has the optimal assignment cost of this batch (independent scipy reference)
    C = torch.cdist(x0.flatten(1).double(), z.flatten(1).double()) ** 2
    r, cidx = linear_sum_assignment(C.numpy())
    opt = C[r, cidx].sum().item()
    used = (x0 - z).flatten(1).double().square().sum().item()
    assert used == pytest.approx(opt, rel=1e-4)
    # z is a permutation of the unpaired draw: replay the identity pairing with OT off
    rec2 = Recorder(Scale(1.0))
    ICTLoss.from_config(make(ot="none"), data_dim=D, total_steps=1000)(rec2, x0, None, step=0, generator=gen(4))
    z_id = (rec2.calls[0]["x"] - x0) / rec2.calls[0]["sigma"].view(-1, 1, 1, 1)
    ratio = used / (x0 - z_id).flatten(1).double().square().sum().item()
    assert fn.metrics["ot_cost_ratio"].item() == pytest.approx(ratio, rel=1e-3) and ratio < 1.0


def test_build_loss_and_errors():
    assert isinstance(build_loss(make(), data_dim=D, total_steps=10), ICTLoss)
    with pytest.raises(ValueError, match="data_dim"):
        ICTLoss.from_config(make(), data_dim=D, total_steps=10)(tiny_ve(), torch.zeros(2, 3, 8, 8), None, step=0, generator=gen())



def test_coupler_is_injectable():
    """The trainer swaps in a global (all-gather) coupler; the loss must use whatever it is given."""
    loss = ICTLoss.from_config(make(), data_dim=D, total_steps=10)
    seen = []

    def reverse(x0, z, labels=None):
        seen.append(z.shape)
        return z.flip(0), torch.tensor(0.5)

    loss.coupler = reverse
    loss(tiny_ve(), torch.randn(4, 4, 8, 8), None, step=0, generator=gen())
    assert seen == [torch.Size([4, 4, 8, 8])] and float(loss.metrics["ot_cost_ratio"]) == 0.5


def test_real_model_integration():
    """The real VEPrecond/backbone from lct_fast.models through the loss (forward, backward, metrics)."""
    from lct_fast import methods as models  # build_model: the method's preconditioning
    from lct_fast.config import ModelConfig
    mcfg = ModelConfig(arch="dit", size="custom", width=32, depth=1, heads=2, patch_size=2, in_channels=4,
                       resolution=8, num_classes=3, dropout=0.1)
    cfg = make(label_dropout=0.2, diffusion_r=0.25)
    torch.manual_seed(0)
    net = models.build_model(mcfg, cfg)
    fn = build_loss(cfg, data_dim=D, total_steps=100)
    loss = fn(net, data(8), torch.arange(8) % 3, step=3, generator=gen())
    assert loss.shape == (8,) and torch.isfinite(loss).all()
    loss.mean().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
    for k in ("loss", "td_abs", "c", "num_levels", "diffusion_frac", "ot_cost_ratio"):
        assert fn.metrics[k].ndim == 0 and not fn.metrics[k].requires_grad
