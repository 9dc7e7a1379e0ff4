"""Triton flash attention (SPEC §4) in the Triton interpreter on CPU: forward, log-sum-exp,
backward and the one-pass tangent against an explicit float64 softmax written in this file and
``torch.func.jvp`` of it; the forward-AD / torch.func / dispatcher paths; a small DiT's JVP pass.

Shapes are tiny (the interpreter runs every program in numpy) but include odd tails (17, 33 tokens),
a non-power-of-two head dim (24) and cross-attention lengths. The kernels compute in fp32 (bf16 dots do
not work in the interpreter); bf16 / realistic sizes live in tests/test_flash_attention_gpu.py.
"""
import math

import pytest
import torch
import torch.autograd.forward_ad as fwAD

pytest.importorskip("triton")

from lct_fast import ops  # noqa: E402
import lct_fast.ops.attention_fused as fa  # noqa: E402
from lct_fast.models import TrigFlowPrecond, build_backbone  # noqa: E402

from model_helpers import randomize, small_cfg  # noqa: E402

if torch.cuda.is_available():  # these tests are about the interpreter; the GPU file covers CUDA
    pytest.skip("CPU/interpreter tests", allow_module_level=True)


def _rand(shape, n, seed, dtype=torch.float32, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g, dtype=torch.float64).mul(scale).to(dtype) for _ in range(n)]


def _math(q, k, v, scale=None):
    """Explicit softmax attention in float64 with the log-sum-exp (independent of lct_fast)."""
    q, k, v = q.double(), k.double(), v.double()
    s = (q @ k.transpose(-1, -2)) * (scale if scale is not None else 1.0 / math.sqrt(q.shape[-1]))
    lse = torch.logsumexp(s, -1)
    return torch.exp(s - lse[..., None]) @ v, lse


def _close(a, b, tol):
    err = (a.double() - b.double()).abs().max().item()
    assert err <= tol, f"max error {err:.3g} > {tol:.3g}"


SHAPES = [((1, 2, 17, 16), 17), ((2, 1, 33, 32), 33), ((1, 1, 20, 24), 9)]  # (q shape, Lk)


@pytest.mark.parametrize("qshape,lk", SHAPES)
def test_forward_and_lse_match_float64_softmax(qshape, lk):
    q, = _rand(qshape, 1, 0)
    k, v = _rand(qshape[:2] + (lk, qshape[3]), 2, 1)
    o, lse = fa.flash_attention_with_lse(q, k, v)
    ro, rlse = _math(q, k, v)
    assert o.dtype == torch.float32 and lse.shape == qshape[:3]
    _close(o, ro, 2e-6)
    _close(lse, rlse, 2e-6)


def test_custom_scale_and_fp16():
    q, k, v = _rand((1, 2, 17, 16), 3, 2)
    _close(fa.flash_attention(q, k, v, scale=0.7), _math(q, k, v, 0.7)[0], 2e-6)
    qh, kh, vh = [t.half() for t in (q, k, v)]
    ref = _math(qh, kh, vh)[0]
    o = fa.flash_attention(qh, kh, vh)
    assert o.dtype == torch.float16
    # PyTorch's own fp16 error on the same inputs (fp16 matmuls and softmax) bounds ours (×2)
    own = torch.softmax((qh @ kh.transpose(-1, -2)) * 0.25, -1) @ vh
    _close(o, ref, 2 * (own.double() - ref).abs().max().item() + 1e-4)


def test_large_logits_no_nan():
    q, k, v = _rand((1, 1, 33, 16), 3, 3)
    q, k = q * 60, k * 60  # scores up to ~1e4: exp overflows without the running max
    tq, tk, tv = _rand((1, 1, 33, 16), 3, 4)
    o, od, lse, lsed = fa.flash_attention_jvp(q, k, v, tq, tk, tv)
    assert all(torch.isfinite(t).all() for t in (o, od, lse, lsed))
    ro, rod = torch.func.jvp(lambda a, b, c: _math(a, b, c)[0], (q.double(), k.double(), v.double()),
                             (tq.double(), tk.double(), tv.double()))
    _close(o, ro, 1e-4)
    assert torch.isfinite(rod).all()
    # near-one-hot rows: the tangent is tiny relative to the scores; compare with an absolute bound
    _close(od, rod, 1e-3 * rod.abs().max().item() + 1e-4)


@pytest.mark.parametrize("which", ["qkv", "q", "k", "v", "kv"])
def test_fused_tangent_matches_jvp_of_math_reference(which):
    shape = (1, 2, 33, 16)
    q, k, v = _rand(shape, 3, 5)
    tans = dict(zip("qkv", _rand(shape, 3, 6)))
    tq, tk, tv = [tans[c] if c in which else None for c in "qkv"]
    o, od, lse, lsed = fa.flash_attention_jvp(q, k, v, tq, tk, tv)
    zero = lambda t: torch.zeros(shape, dtype=torch.float64) if t is None else t.double()  # noqa: E731
    (ro, rlse), (rod, rlsed) = torch.func.jvp(lambda a, b, c: _math(a, b, c), (q.double(), k.double(), v.double()),
                                              (zero(tq), zero(tk), zero(tv)))
    _close(o, ro, 2e-6)
    _close(lse, rlse, 2e-6)
    _close(od, rod, 5e-6 * max(1.0, rod.abs().max().item()))
    _close(lsed, rlsed, 5e-6 * max(1.0, rlsed.abs().max().item()))
    # SPEC §4's formula written out: Ṗ = P ⊙ (Ṡ − rowsum(P ⊙ Ṡ)), Ȯ = Ṗ·V + P·V̇
    qd, kd, vd = q.double(), k.double(), v.double()
    p = torch.softmax(qd @ kd.transpose(-1, -2) / 4, -1)
    sdot = (zero(tq) @ kd.transpose(-1, -2) + qd @ zero(tk).transpose(-1, -2)) / 4
    pdot = p * (sdot - (p * sdot).sum(-1, keepdim=True))
    _close(od, pdot @ vd + p @ zero(tv), 5e-6 * max(1.0, rod.abs().max().item()))


def _spy_kernels(monkeypatch):
    calls = []
    kern = fa._kernels()
    real = kern.attn_fwd

    def spy(*a, tangent=False, **kw):
        calls.append("jvp" if tangent else "fwd")
        return real(*a, tangent=tangent, **kw)

    monkeypatch.setattr(kern, "attn_fwd", spy)
    return calls


def test_forward_ad_under_no_grad_runs_one_fused_pass(monkeypatch):
    """The sCT pattern (lct_fast/methods/sct.py): dual tensors under torch.no_grad()."""
    calls = _spy_kernels(monkeypatch)
    shape = (2, 2, 17, 16)
    q, k, v, tq, tk, tv = _rand(shape, 6, 7)
    with torch.no_grad(), fwAD.dual_level():
        out = fa.flash_attention(fwAD.make_dual(q, tq), fwAD.make_dual(k, tk), fwAD.make_dual(v, tv))
        o, od = fwAD.unpack_dual(out)
    assert calls == ["jvp"]  # O and Ȯ from a single kernel launch
    ro, rod = torch.func.jvp(lambda a, b, c: _math(a, b, c)[0], (q.double(), k.double(), v.double()),
                             (tq.double(), tk.double(), tv.double()))
    _close(o, ro, 2e-6)
    _close(od, rod, 5e-6 * max(1.0, rod.abs().max().item()))


def test_torch_func_jvp_uses_the_function_jvp(monkeypatch):
    calls = _spy_kernels(monkeypatch)
    shape = (1, 2, 17, 16)
    q, k, v, tq, tk, tv = _rand(shape, 6, 8)
    o, od = torch.func.jvp(fa.flash_attention, (q, k, v), (tq, tk, tv))
    assert calls == ["fwd", "jvp"]
    ro, rod = torch.func.jvp(lambda a, b, c: _math(a, b, c)[0], (q.double(), k.double(), v.double()),
                             (tq.double(), tk.double(), tv.double()))
    _close(o, ro, 2e-6)
    _close(od, rod, 5e-6 * max(1.0, rod.abs().max().item()))
    # lse tangent through the Function as well
    (_, lse), (_, lsed) = torch.func.jvp(fa.flash_attention_with_lse, (q, k, v), (tq, tk, tv))
    (_, rlse), (_, rlsed) = torch.func.jvp(lambda a, b, c: _math(a, b, c), (q.double(), k.double(), v.double()),
                                           (tq.double(), tk.double(), tv.double()))
    _close(lsed, rlsed, 5e-6 * max(1.0, rlsed.abs().max().item()))


@pytest.mark.parametrize("qshape,lk", SHAPES[:2])
def test_backward_matches_float64_gradients(qshape, lk):
    q, = _rand(qshape, 1, 9)
    k, v = _rand(qshape[:2] + (lk, qshape[3]), 2, 10)
    go, = _rand(qshape, 1, 11)
    glse, = _rand(qshape[:3], 1, 12)
    xs = [t.clone().requires_grad_() for t in (q, k, v)]
    o, lse = fa.flash_attention_with_lse(*xs)
    ((o * go).sum() + (lse * glse).sum()).backward()
    rs = [t.double().requires_grad_() for t in (q, k, v)]
    ro, rlse = _math(*rs)
    ((ro * go.double()).sum() + (rlse * glse.double()).sum()).backward()
    for a, b in zip(xs, rs):
        assert a.grad.dtype == torch.float32
        _close(a.grad, b.grad, 5e-6 * max(1.0, b.grad.abs().max().item()))
    # O alone (lse unused: its gradient arrives as None)
    xs2 = [t.clone().requires_grad_() for t in (q, k, v)]
    (fa.flash_attention(*xs2) * go).sum().backward()
    rs2 = [t.double().requires_grad_() for t in (q, k, v)]
    (_math(*rs2)[0] * go.double()).sum().backward()
    for a, b in zip(xs2, rs2):
        _close(a.grad, b.grad, 5e-6 * max(1.0, b.grad.abs().max().item()))


def test_non_contiguous_inputs_from_a_fused_qkv_projection():
    b, n, h, d = 2, 17, 2, 16
    qkv, = _rand((b, n, 3, h, d), 1, 13)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)  # how DiT's SelfAttention slices its qkv projection
    assert not q.is_contiguous()
    _close(fa.flash_attention(q, k, v), _math(q, k, v)[0], 2e-6)
    tq, tk, tv = _rand((b, n, 3, h, d), 1, 14)[0].permute(2, 0, 3, 1, 4)
    _, od = torch.func.jvp(fa.flash_attention, (q, k, v), (tq, tk, tv))
    _, rod = torch.func.jvp(lambda a, c, e: _math(a, c, e)[0], (q.double(), k.double(), v.double()),
                            (tq.double(), tk.double(), tv.double()))
    _close(od, rod, 5e-6 * max(1.0, rod.abs().max().item()))


def test_bad_inputs_raise_clear_errors():
    q, k, v = _rand((1, 2, 5, 16), 3, 15)
    with pytest.raises(ValueError, match=r"\[B, H, L, Dh\]"):
        fa.flash_attention(q[0], k, v)
    with pytest.raises(ValueError, match="incompatible shapes"):
        fa.flash_attention(q, k, v[..., :8])
    with pytest.raises(ValueError, match="dtype"):
        fa.flash_attention(q.double(), k.double(), v.double())
    with pytest.raises(ValueError, match="head dim"):
        big = torch.zeros(1, 1, 4, 512)
        fa.flash_attention(big, big, big)
    with pytest.raises(ValueError, match="tq has shape"):
        fa.flash_attention_jvp(q, k, v, tq=q[..., :8])


def test_dispatcher_registration_and_policy(monkeypatch):
    q, k, v, tq = _rand((1, 2, 17, 16), 4, 16)
    assert "triton" in ops.registered_backends("attention")
    ok, why = fa.flash_attention_available(q, k, v)
    assert not ok and "CUDA" in why  # CPU tensors: never picked by "auto"
    assert ops.chosen_backend("attention", "auto", q, k, v) == "reference"
    monkeypatch.setattr(fa, "_ALLOW_CPU_INTERPRETER", True)
    ops.reset_backend_log()
    try:
        # default policy: plain forward keeps SDPA (reference backend); forward-AD picks the kernel
        assert ops.chosen_backend("attention", "auto", q, k, v) == "reference"
        with fwAD.dual_level():
            qd = fwAD.make_dual(q, tq)
            assert ops.chosen_backend("attention", "auto", qd, k, v) == "triton"
            od = fwAD.unpack_dual(ops.attention(qd, k, v)).tangent
        _, rod = torch.func.jvp(lambda a: _math(a, k, v)[0], (q.double(),), (tq.double(),))
        _close(od, rod, 5e-6 * max(1.0, rod.abs().max().item()))
        fa.set_flash_attention_policy("always")
        assert ops.chosen_backend("attention", "auto", q, k, v) == "triton"
        with pytest.raises(ValueError, match="policy"):
            fa.set_flash_attention_policy("sometimes")
    finally:
        fa.set_flash_attention_policy("forward_ad")
        ops.reset_backend_log()


def test_dit_jvp_pass_matches_reference_backend(monkeypatch):
    """sCT's tangent pass (dual tensors, no_grad) through a small DiT: Triton attention == reference."""
    monkeypatch.setattr(fa, "_ALLOW_CPU_INTERPRETER", True)
    calls = _spy_kernels(monkeypatch)
    torch.manual_seed(0)
    net = TrigFlowPrecond(randomize(build_backbone(small_cfg("dit", dropout=0.0))))
    g = torch.Generator().manual_seed(17)
    x = torch.randn(2, 4, 8, 8, generator=g)
    dx = torch.randn(2, 4, 8, 8, generator=g)
    t, dt = torch.tensor([0.4, 1.1]), torch.tensor([0.3, -0.2])
    labels = torch.tensor([0, 2])
    attn = [m for m in net.modules() if type(m).__name__ == "SelfAttention"]
    assert attn

    def tangent_pass(backend):
        for m in attn:
            m.backend = backend
        with torch.no_grad(), fwAD.dual_level():
            out = net.F(fwAD.make_dual(x, dx), fwAD.make_dual(t, dt), labels)
            return fwAD.unpack_dual(out)

    f_ref, j_ref = tangent_pass("reference")
    assert calls == []
    f_tri, j_tri = tangent_pass("triton")
    assert calls == ["jvp"] * len(attn)
    assert j_ref.abs().max() > 1e-3  # non-trivial tangent
    _close(f_tri, f_ref, 1e-5 * max(1.0, f_ref.abs().max().item()))
    _close(j_tri, j_ref, 1e-5 * max(1.0, j_ref.abs().max().item()))


def test_dual_tensors_with_grad_enabled_give_tangent_and_gradient():
    """Forward-AD and reverse-mode together: tangent from the fused pass, gradient from the backward."""
    q, k, v, tq, go = _rand((1, 2, 17, 16), 5, 18)
    qg = q.clone().requires_grad_()
    with fwAD.dual_level():
        o, od = fwAD.unpack_dual(fa.flash_attention(fwAD.make_dual(qg, tq), k, v))
        (o * go).sum().backward()
    rq = q.double().requires_grad_()
    (_math(rq, k, v)[0] * go.double()).sum().backward()
    _close(qg.grad, rq.grad, 5e-6 * max(1.0, rq.grad.abs().max().item()))
    _, rod = torch.func.jvp(lambda a: _math(a, k, v)[0], (q.double(),), (tq.double(),))
    _close(od.detach(), rod, 5e-6 * max(1.0, rod.abs().max().item()))


def test_fp32_dot_precision_follows_torch_tf32_setting():
    """fp32 inputs take exact (IEEE) dots unless TF32 is allowed, through either of torch's APIs; reading
    the legacy flag after the new API was used raises in torch, which must not reach the kernel launch."""
    from lct_fast.ops import attention_triton as K

    saved = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert K._precision(torch.float32) == "ieee"
        torch.set_float32_matmul_precision("high")
        assert K._precision(torch.float32) == "tf32"
        torch.backends.cuda.matmul.fp32_precision = "ieee"  # the new API
        assert K._precision(torch.float32) == "ieee"
        assert K._precision(torch.bfloat16) == K._precision(torch.float16) == "tf32"
    finally:
        torch.set_float32_matmul_precision(saved)
