"""Attention op: values vs an independent softmax, forward-mode AD path, tangent formula (SPEC §4)."""
import math

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

from lct_fast import ops
import lct_fast.ops.attention_pytorch as attn_mod


def _qkv(seed, dtype=torch.float64, shape=(2, 3, 5, 4)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g, dtype=dtype) for _ in range(3)]


def _naive(q, k, v):
    """Row-by-row softmax in float64, written independently of the op."""
    s = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    e = torch.exp(s - s.max(-1, keepdim=True).values)
    return (e / e.sum(-1, keepdim=True)) @ v.double()


def test_attention_matches_naive_softmax():
    q, k, v = _qkv(0)
    torch.testing.assert_close(ops.attention(q, k, v), _naive(q, k, v), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ops.attention_reference(q, k, v), _naive(q, k, v), rtol=1e-10, atol=1e-12)


def test_attention_reference_bf16_output_dtype():
    q, k, v = [t.to(torch.bfloat16) for t in _qkv(1, torch.float32)]
    o = ops.attention_reference(q, k, v)
    assert o.dtype == torch.bfloat16
    assert (o.double() - _naive(q, k, v)).abs().max() < 2e-2


def test_sdpa_lacks_forward_ad_so_explicit_path_is_used(monkeypatch):
    q, k, v = _qkv(2, torch.float32)
    # The reason for the explicit path: PyTorch's fused SDPA has no forward-AD rule.
    with pytest.raises((NotImplementedError, RuntimeError)):
        torch.func.jvp(F.scaled_dot_product_attention, (q, k, v), (q, k, v))
    calls = []
    real = attn_mod.attention_reference

    def spy(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(attn_mod, "attention_reference", spy)
    ops.attention(q, k, v)
    assert calls == []  # plain forward: SDPA
    torch.func.jvp(lambda a, b, c: ops.attention(a, b, c), (q, k, v), (q, k, v))
    assert len(calls) == 1
    with fwAD.dual_level():
        ops.attention(fwAD.make_dual(q, k), k, v)
    assert len(calls) == 2


def test_attention_tangent_matches_spec_formula_fd_and_forward_ad():
    q, k, v = _qkv(3)
    dq, dk, dv = _qkv(4)
    f = lambda a, b, c: ops.attention(a, b, c)
    _, t_func = torch.func.jvp(f, (q, k, v), (dq, dk, dv))
    with fwAD.dual_level():
        out = f(fwAD.make_dual(q, dq), fwAD.make_dual(k, dk), fwAD.make_dual(v, dv))
        t_fwad = fwAD.unpack_dual(out).tangent
    # SPEC §4: Ṡ = (Q̇Kᵀ + QK̇ᵀ)s, Ṗ = P ⊙ (Ṡ − rowsum(P ⊙ Ṡ)), Ȯ = ṖV + PV̇
    s = 1 / math.sqrt(q.shape[-1])
    P = torch.softmax(q @ k.transpose(-1, -2) * s, -1)
    Sd = (dq @ k.transpose(-1, -2) + q @ dk.transpose(-1, -2)) * s
    Pd = P * (Sd - (P * Sd).sum(-1, keepdim=True))
    want = Pd @ v + P @ dv
    h = 1e-6
    fd = (f(q + h * dq, k + h * dk, v + h * dv) - f(q - h * dq, k - h * dk, v - h * dv)) / (2 * h)
    torch.testing.assert_close(t_func, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(t_fwad, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fd, want, rtol=1e-6, atol=1e-8)


def test_attention_backward_matches_naive():
    q, k, v = [t.requires_grad_() for t in _qkv(5)]
    g = torch.randn(2, 3, 5, 4, dtype=torch.float64)
    got = torch.autograd.grad((ops.attention(q, k, v) * g).sum(), (q, k, v))
    want = torch.autograd.grad((_naive(q, k, v) * g).sum(), (q, k, v))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_attention_shape_errors():
    q = torch.randn(2, 3, 5, 4)
    with pytest.raises(ValueError, match=r"\[B, H, L, Dh\]"):
        ops.attention(q[0], q[0], q[0])
    with pytest.raises(ValueError, match="incompatible"):
        ops.attention(q, q[..., :3], q)
