"""NsLN reference ops (paper eq. 12, SPEC §4): values, dtypes, tangents, gradients."""
import pytest
import torch
import torch.autograd.forward_ad as fwAD

from lct_fast import ops


def _eq12(x, beta, eps):
    """Eq. 12 written out independently in float64: (x − u(x)) / √(σ²(x) + ε) + β."""
    x = x.double()
    u = x.sum(-1, keepdim=True) / x.shape[-1]
    var = ((x - u) ** 2).sum(-1, keepdim=True) / x.shape[-1]
    y = (x - u) / torch.sqrt(var + eps)
    return y if beta is None else y + beta.double()


def test_nsln_matches_eq12():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 16, generator=g, dtype=torch.float64) * 3 + 1
    beta = torch.randn(16, generator=g, dtype=torch.float64)
    for eps in (1e-6, 1e-2):
        torch.testing.assert_close(ops.nsln(x, beta, eps=eps), _eq12(x, beta, eps), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ops.nsln_reference(x, None, eps=eps), _eq12(x, None, eps),
                                   rtol=1e-12, atol=1e-12)


def test_nsln_fp32_statistics_and_input_dtype():
    g = torch.Generator().manual_seed(1)
    # large common offset: statistics in bf16 would destroy the signal
    x = (torch.randn(4, 64, generator=g) + 300.0).to(torch.bfloat16)
    beta = torch.zeros(64, dtype=torch.bfloat16)
    y = ops.nsln(x, beta)
    assert y.dtype == torch.bfloat16
    ref = _eq12(x.double(), None, 1e-6)
    assert (y.double() - ref).abs().max() < 0.05


def test_nsln_modulate_broadcast_matches_formula():
    g = torch.Generator().manual_seed(2)
    for shape in [(2, 7, 8), (2, 3, 4, 8)]:
        x = torch.randn(*shape, generator=g, dtype=torch.float64)
        shift = torch.randn(2, 8, generator=g, dtype=torch.float64)
        scale = torch.randn(2, 8, generator=g, dtype=torch.float64)
        beta = torch.randn(8, generator=g, dtype=torch.float64)
        mid = (1,) * (len(shape) - 2)
        want = _eq12(x, None, 1e-6) * (1 + scale.view(2, *mid, 8)) + shift.view(2, *mid, 8) + beta
        torch.testing.assert_close(ops.nsln_modulate(x, shift, scale, beta), want, rtol=1e-12, atol=1e-12)
        want_nb = want - beta
        torch.testing.assert_close(ops.nsln_modulate(x, shift, scale), want_nb, rtol=1e-12, atol=1e-12)


def test_nsln_bad_shapes_raise():
    x = torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match="bias must have shape"):
        ops.nsln(x, torch.zeros(7))
    with pytest.raises(ValueError, match="shift must have shape"):
        ops.nsln_modulate(x, torch.zeros(2, 7), torch.zeros(2, 8))


def _fd(f, xs, ts, h=1e-6):
    plus = f(*[x + h * t for x, t in zip(xs, ts)])
    minus = f(*[x - h * t for x, t in zip(xs, ts)])
    return (plus - minus) / (2 * h)


def test_nsln_modulate_jvp_forward_ad_fd_agree():
    g = torch.Generator().manual_seed(3)
    args = [torch.randn(2, 5, 8, generator=g, dtype=torch.float64), torch.randn(2, 8, generator=g, dtype=torch.float64),
            torch.randn(2, 8, generator=g, dtype=torch.float64), torch.randn(8, generator=g, dtype=torch.float64)]
    tans = [torch.randn_like(a) for a in args]
    f = lambda x, sh, sc, b: ops.nsln_modulate(x, sh, sc, b)
    _, t_func = torch.func.jvp(f, tuple(args), tuple(tans))
    with fwAD.dual_level():
        out = f(*[fwAD.make_dual(a, t) for a, t in zip(args, tans)])
        t_fwad = fwAD.unpack_dual(out).tangent
    t_fd = _fd(f, args, tans)
    torch.testing.assert_close(t_func, t_fwad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(t_func, t_fd, rtol=1e-6, atol=1e-7)


def test_nsln_tangent_formula_matches_jvp():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 32, generator=g, dtype=torch.float64)
    xd = torch.randn(3, 32, generator=g, dtype=torch.float64)
    _, want = torch.func.jvp(lambda a: ops.nsln_reference(a, None), (x,), (xd,))
    torch.testing.assert_close(ops.nsln_tangent_reference(x, xd), want, rtol=1e-10, atol=1e-12)


def test_nsln_backward_gradcheck():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 6, generator=g, dtype=torch.float64, requires_grad=True)
    sh = torch.randn(2, 6, generator=g, dtype=torch.float64, requires_grad=True)
    sc = torch.randn(2, 6, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: ops.nsln_modulate(*a), (x, sh, sc, b))
    assert torch.autograd.gradcheck(lambda x, b: ops.nsln(x, b), (x, b))
