"""Triton flash attention on a CUDA device: realistic sizes, bf16 and fp32, backward, tangent,
the dispatcher and a DiT JVP pass. Skipped without CUDA.

bf16 criterion (as FlashAttention's own tests): error vs a float64 reference on the same (bf16-rounded)
inputs at most 2× the error of PyTorch's plain bf16 math (bf16 matmuls and softmax, its JVP from
torch.func.jvp, its gradients from autograd) plus a small floor.
"""
import math

import pytest
import torch
import torch.autograd.forward_ad as fwAD

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

triton = pytest.importorskip("triton")

from lct_fast import ops  # noqa: E402
import lct_fast.ops.attention_fused as fa  # noqa: E402
from lct_fast.models import TrigFlowPrecond, build_backbone  # noqa: E402

from model_helpers import randomize, small_cfg  # noqa: E402


def _rand(shape, n, seed, dtype):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(*shape, generator=g, device="cuda", dtype=torch.float32).to(dtype) for _ in range(n)]


def _math(q, k, v):
    """Explicit softmax attention in the inputs' dtype (bf16 math or float64 reference)."""
    s = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
    return torch.softmax(s, -1) @ v


def _err(a, b):
    return (a.double() - b.double()).abs().max().item()


def _assert_within(ours, own, ref, floor):
    e_ours, e_own = _err(ours, ref), _err(own, ref)
    assert e_ours <= 2 * e_own + floor, f"error {e_ours:.3g} > 2 x PyTorch bf16 error {e_own:.3g} + {floor:.1g}"


CASES = [(256, 64), (1000, 64), (1024, 128), (256, 32), (256, 256), (1000, 72)]


@pytest.mark.parametrize("L,D", CASES)
def test_bf16_forward_tangent_backward_within_2x_torch_error(L, D):
    shape = (2, 4, L, D)
    q, k, v, tq, tk, tv, go = _rand(shape, 7, L + D, torch.bfloat16)
    dbl = [t.double() for t in (q, k, v, tq, tk, tv)]
    ref, ref_t = torch.func.jvp(_math, tuple(dbl[:3]), tuple(dbl[3:]))
    own, own_t = torch.func.jvp(_math, (q, k, v), (tq, tk, tv))
    o, od, _, _ = fa.flash_attention_jvp(q, k, v, tq, tk, tv)
    assert o.dtype == od.dtype == torch.bfloat16
    _assert_within(o, own, ref, 1e-3)
    _assert_within(od, own_t, ref_t, 1e-3 * ref_t.abs().max().item())
    _assert_within(fa.flash_attention(q, k, v), own, ref, 1e-3)
    # forward-AD (sCT pattern) gives the same tangent as the direct fused call
    with torch.no_grad(), fwAD.dual_level():
        out = fa.flash_attention(*[fwAD.make_dual(p, t) for p, t in zip((q, k, v), (tq, tk, tv))])
        torch.testing.assert_close(fwAD.unpack_dual(out).tangent, od, rtol=0, atol=0)
    # backward
    xs = [t.clone().requires_grad_() for t in (q, k, v)]
    (fa.flash_attention(*xs).float() * go.float()).sum().backward()
    bs = [t.clone().requires_grad_() for t in (q, k, v)]
    (_math(*bs).float() * go.float()).sum().backward()
    rs = [t.clone().requires_grad_() for t in dbl[:3]]
    (_math(*rs) * go.double()).sum().backward()
    for a, b, r in zip(xs, bs, rs):
        _assert_within(a.grad, b.grad, r.grad, 1e-3 * r.grad.abs().max().item())


@pytest.mark.parametrize("L", [256, 1000])
def test_fp32_tight_against_float64(L):
    shape = (2, 4, L, 64)
    q, k, v, tq, tk, tv = _rand(shape, 6, 3, torch.float32)
    dbl = [t.double() for t in (q, k, v, tq, tk, tv)]
    ref, ref_t = torch.func.jvp(_math, tuple(dbl[:3]), tuple(dbl[3:]))
    o, od = torch.func.jvp(fa.flash_attention, (q, k, v), (tq, tk, tv))
    assert _err(o, ref) < 1e-5 and _err(od, ref_t) < 1e-4 * max(1.0, ref_t.abs().max().item())


def test_large_logits_finite_on_gpu():
    q, k, v, tq, tk, tv = _rand((1, 2, 1000, 64), 6, 4, torch.bfloat16)
    o, od, lse, lsed = fa.flash_attention_jvp(q * 40, k * 40, v, tq, tk, tv)
    assert all(torch.isfinite(t.float()).all() for t in (o, od, lse, lsed))


def test_auto_dispatch_picks_triton_only_under_forward_ad():
    q, k, v, tq = _rand((1, 2, 256, 64), 4, 5, torch.bfloat16)
    assert ops.chosen_backend("attention", "auto", q, k, v) == "reference"  # plain forward: SDPA
    with fwAD.dual_level():
        assert ops.chosen_backend("attention", "auto", fwAD.make_dual(q, tq), k, v) == "triton"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dit_jvp_pass_matches_reference_path(dtype):
    """sCT target pass (dual tensors, no_grad, optional bf16 autocast) through a DiT with 256 tokens."""
    torch.manual_seed(0)
    cfg = small_cfg("dit", dropout=0.0, width=256, heads=4, depth=2, resolution=32)
    net = TrigFlowPrecond(randomize(build_backbone(cfg))).cuda()
    g = torch.Generator(device="cuda").manual_seed(1)
    x, dx = [torch.randn(4, 4, 32, 32, generator=g, device="cuda") for _ in range(2)]
    t = torch.rand(4, generator=g, device="cuda") * 1.5
    dt = torch.randn(4, generator=g, device="cuda")
    attn = [m for m in net.modules() if type(m).__name__ == "SelfAttention"]

    def run(backend, amp):
        for m in attn:
            m.backend = backend
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp), fwAD.dual_level():
            f, j = fwAD.unpack_dual(net.F(fwAD.make_dual(x, dx), fwAD.make_dual(t, dt)))
        return f.float(), j.float()

    f32, j32 = run("reference", False)
    if dtype == torch.float32:
        f, j = run("triton", False)
        torch.testing.assert_close(f, f32, rtol=1e-4, atol=1e-4 * f32.abs().max().item())
        torch.testing.assert_close(j, j32, rtol=1e-4, atol=1e-4 * j32.abs().max().item())
    else:
        fr, jr = run("reference", True)
        f, j = run("triton", True)
        _assert_within(f, fr, f32, 1e-3 * f32.abs().max().item())
        _assert_within(j, jr, j32, 1e-3 * j32.abs().max().item())
