"""lct_fast.ops.linear / conv2d: the same primal, tangent and gradients as F.linear / F.conv2d, without the
zero weight-tangent products PyTorch's forward-AD rules execute (counted by lct_fast.profiler.flops.FlopCounter)."""

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

from lct_fast import ops
from lct_fast.profiler.flops import FlopCounter
from lct_fast.models.layers import Conv2d, Linear

CONV_GEOMS = [dict(stride=1, padding=1, dilation=1, groups=1), dict(stride=2, padding=0, dilation=1, groups=1),
              dict(stride=1, padding=2, dilation=2, groups=3)]


def _dual(fn, x, tx):
    with torch.no_grad(), fwAD.dual_level():
        p, t = fwAD.unpack_dual(fn(fwAD.make_dual(x, tx)))
    return p, t


def test_linear_tangent_equals_pytorch_and_runs_two_gemms():
    g = torch.Generator().manual_seed(0)
    x, tx = torch.randn(2, 7, 13, generator=g, dtype=torch.float64), torch.randn(2, 7, 13, generator=g, dtype=torch.float64)
    w, b = torch.randn(5, 13, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)
    p_ref, t_ref = _dual(lambda z: F.linear(z, w, b), x, tx)
    with FlopCounter(bucket=lambda: "j") as fc:
        p, t = _dual(lambda z: ops.linear(z, w, b), x, tx)
    torch.testing.assert_close(p, p_ref, rtol=0, atol=0)
    torch.testing.assert_close(t, t_ref, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(t, tx @ w.T)  # the independent formula
    assert fc.flops["j"] == 2 * (2 * 14 * 13 * 5) and not fc.wasted
    # PyTorch's own rule runs a third product on a broadcast zero: the thing we avoid
    with FlopCounter(bucket=lambda: "j") as fc_ref:
        _dual(lambda z: F.linear(z, w, b), x, tx)
    assert fc_ref.wasted["j"] == 2 * 14 * 13 * 5


def test_linear_with_weight_and_bias_tangents_under_func_jvp():
    g = torch.Generator().manual_seed(1)
    args = [torch.randn(4, 6, generator=g, dtype=torch.float64), torch.randn(3, 6, generator=g, dtype=torch.float64),
            torch.randn(3, generator=g, dtype=torch.float64)]
    tans = [torch.randn_like(a) for a in args]
    out, tan = torch.func.jvp(ops.linear, tuple(args), tuple(tans))
    ref_out, ref_tan = torch.func.jvp(F.linear, tuple(args), tuple(tans))
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(tan, ref_tan)
    # only the bias has a tangent
    _, tb = torch.func.jvp(lambda b: ops.linear(args[0], args[1], b), (args[2],), (tans[2],))
    torch.testing.assert_close(tb, tans[2].expand(4, 3))


def test_linear_backward_and_double_ad_match():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True)
    with fwAD.dual_level():  # forward AD active with gradients on: our Function carries the graph
        y = ops.linear(fwAD.make_dual(x, torch.ones_like(x)), w, b)
        p, t = fwAD.unpack_dual(y)
        loss = (p.square().sum() + t.sin().sum())
    grads = torch.autograd.grad(loss, (x, w, b))
    y2 = F.linear(x, w, b)
    t2 = F.linear(torch.ones_like(x), w)
    ref = torch.autograd.grad(y2.square().sum() + t2.sin().sum(), (x, w, b))
    for a, r in zip(grads, ref):
        torch.testing.assert_close(a, r)


@pytest.mark.parametrize("geom", CONV_GEOMS)
def test_conv2d_tangent_and_grad_match(geom):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 6, 9, 9, generator=g, dtype=torch.float64)
    tx = torch.randn_like(x)
    w = torch.randn(6, 6 // geom["groups"], 3, 3, generator=g, dtype=torch.float64)
    b = torch.randn(6, generator=g, dtype=torch.float64)
    p_ref, t_ref = _dual(lambda z: F.conv2d(z, w, b, **geom), x, tx)
    with FlopCounter(bucket=lambda: "c") as fc:
        p, t = _dual(lambda z: ops.conv2d(z, w, b, **geom), x, tx)
    torch.testing.assert_close(p, p_ref, rtol=0, atol=0)
    torch.testing.assert_close(t, t_ref)
    torch.testing.assert_close(t, F.conv2d(tx, w, None, **geom))
    assert not fc.wasted
    # gradients through our Function (used when forward AD is active with grad on)
    xr, wr, br = (a.clone().requires_grad_() for a in (x, w, b))
    with fwAD.dual_level():
        y = fwAD.unpack_dual(ops.conv2d(fwAD.make_dual(xr, tx), wr, br, **geom)).primal
    gr = torch.autograd.grad(y.square().sum(), (xr, wr, br))
    xs, ws, bs = (a.clone().requires_grad_() for a in (x, w, b))
    gs = torch.autograd.grad(F.conv2d(xs, ws, bs, **geom).square().sum(), (xs, ws, bs))
    for a, r in zip(gr, gs):
        torch.testing.assert_close(a, r)
    _, tw = torch.func.jvp(lambda ww: ops.conv2d(x, ww, b, **geom), (w,), (torch.ones_like(w),))
    torch.testing.assert_close(tw, F.conv2d(x, torch.ones_like(w), None, **geom))


def test_layers_keep_nn_state_and_default_path():
    lin, conv = Linear(4, 3), Conv2d(2, 3, 2, stride=2)
    assert isinstance(lin, torch.nn.Linear) and isinstance(conv, torch.nn.Conv2d)
    assert set(lin.state_dict()) == {"weight", "bias"}
    x = torch.randn(5, 4)
    torch.testing.assert_close(lin(x), F.linear(x, lin.weight, lin.bias), rtol=0, atol=0)
    xc = torch.randn(1, 2, 4, 4)
    torch.testing.assert_close(conv(xc), F.conv2d(xc, conv.weight, conv.bias, stride=2), rtol=0, atol=0)


@pytest.mark.parametrize("preset", ["tiny_sct", "tiny_sct_unet"])
def test_sct_loss_is_bit_identical_to_pytorchs_rule(monkeypatch, preset):
    """Training does not change: the sCT loss and its gradient from our layers equal, bit for bit, those from
    PyTorch's own forward-AD rule (which adds x·0 to the same product)."""
    from lct_fast.config import load_config
    from lct_fast.methods import build_loss
    from lct_fast.methods import build_model

    sets = ["model.arch=unet", "model.unet_channels=16", "model.channel_mult=[1,2]", "model.num_res_blocks=1",
            "model.attn_resolutions=[4]", "model.head_channels=8", "model.norm=groupnorm",
            "model.adaptive_double_norm=false"] if preset.endswith("unet") else []
    cfg = load_config("tiny_sct", sets + ["method.sct.tangent_warmup=0"])
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, 4, 8, 8, generator=g)
    labels = torch.randint(0, 4, (6,), generator=g)

    def run():
        torch.manual_seed(0)
        net = build_model(cfg.model, cfg.method)
        for p in net.parameters():  # leave the zero init: a non-trivial tangent everywhere
            torch.nn.init.normal_(p, std=0.05)
        loss_fn = build_loss(cfg.method, data_dim=256, total_steps=100)
        loss = loss_fn(net, x0, labels, step=50, generator=torch.Generator().manual_seed(1)).mean()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in net.parameters()]

    ours = run()
    monkeypatch.setattr(Linear, "forward", torch.nn.Linear.forward)
    monkeypatch.setattr(Conv2d, "forward", torch.nn.Conv2d.forward)
    theirs = run()
    assert torch.equal(ours[0], theirs[0])
    assert all(torch.equal(a, b) for a, b in zip(ours[1], theirs[1]))


@pytest.mark.parametrize("op", ["linear", "conv2d"])
def test_bf16_autocast_tangent_and_backward(op):
    """Under bf16 autocast: the tangent dtype and value match PyTorch's own rule, and the backward through our
    Function (forward AD active, gradients on) runs and matches autocast's gradients."""
    g = torch.Generator().manual_seed(4)
    if op == "linear":
        x, w, b = torch.randn(6, 16, generator=g), torch.randn(8, 16, generator=g), torch.randn(8, generator=g)
        ours, ref = (lambda a, ww, bb: ops.linear(a, ww, bb)), F.linear
    else:
        x, w, b = torch.randn(2, 4, 6, 6, generator=g), torch.randn(5, 4, 3, 3, generator=g), torch.randn(5, generator=g)
        ours = lambda a, ww, bb: ops.conv2d(a, ww, bb, 1, 1)  # noqa: E731
        ref = lambda a, ww, bb: F.conv2d(a, ww, bb, 1, 1)  # noqa: E731
    tx = torch.randn_like(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        p, t = _dual(lambda z: ours(z, w, b), x, tx)
        p_ref, t_ref = _dual(lambda z: ref(z, w, b), x, tx)
        # with weight and bias tangents as well (torch.func.jvp)
        _, tt = torch.func.jvp(lambda ww, bb: ours(x, ww, bb), (w, b), (torch.ones_like(w), torch.ones_like(b)))
        _, tt_ref = torch.func.jvp(lambda ww, bb: ref(x, ww, bb), (w, b), (torch.ones_like(w), torch.ones_like(b)))
    assert p.dtype == p_ref.dtype == t.dtype == t_ref.dtype == torch.bfloat16
    torch.testing.assert_close(t, t_ref)
    assert tt.dtype == tt_ref.dtype
    torch.testing.assert_close(tt.float(), tt_ref.float(), rtol=2e-2, atol=2e-2)
    xr, wr, br = (a.clone().requires_grad_() for a in (x, w, b))
    with torch.autocast("cpu", dtype=torch.bfloat16), fwAD.dual_level():
        y = fwAD.unpack_dual(ours(fwAD.make_dual(xr, tx), wr, br)).primal
    grads = torch.autograd.grad(y.float().square().sum(), (xr, wr, br))
    xs, ws, bs = (a.clone().requires_grad_() for a in (x, w, b))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y2 = ref(xs, ws, bs)
    ref_grads = torch.autograd.grad(y2.float().square().sum(), (xs, ws, bs))
    for a, r in zip(grads, ref_grads):
        assert a.dtype == r.dtype == torch.float32
        torch.testing.assert_close(a, r, rtol=2e-2, atol=2e-2 * float(r.abs().max()))
