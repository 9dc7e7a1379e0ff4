"""JVP-friendly flash attention (Triton): forward, backward and a one-pass tangent (SPEC §4).

O = softmax(Q·Kᵀ·s)·V on [B, H, L, Dh] with the log-sum-exp saved; its tangent
Ȯ = Ṗ·V + P·V̇, Ṗ = P ⊙ (Ṡ − rowsum(P ⊙ Ṡ)), Ṡ = (Q̇·Kᵀ + Q·K̇ᵀ)·s, computed in the same flash pass as O
(no L×L matrix is ever stored, so the JVP needs O(L) memory).

Layers (developer guide): Triton launchers (:mod:`lct_fast.ops.attention_triton`, imported lazily so that
``TRITON_INTERPRET`` can be set first) → ``torch.library`` custom ops ``lct_fast::flash_attn_fwd``,
``lct_fast::flash_attn_jvp``, ``lct_fast::flash_attn_bwd`` (with fake kernels) → the autograd.Function
:class:`FlashAttentionFunction` (``setup_context``, ``backward``, ``jvp``) → :func:`flash_attention`
→ the ``"triton"`` backend of :func:`lct_fast.ops.attention`. The reference is
:func:`lct_fast.ops.attention_reference`.

How the tangent is computed:

* ``torch.autograd.forward_ad`` dual tensors (the sCT target pass, ``lct_fast/methods/sct.py``):
  :func:`flash_attention` sees the tangents before ``apply`` and runs the fused forward+tangent kernel
  once; the Function's ``forward`` and ``jvp`` hand back its two results — one kernel for (O, Ȯ).
* ``torch.func.jvp``: functorch hides the tangents until ``jvp`` is called, so ``forward`` runs the
  forward kernel and ``jvp`` the fused kernel (which recomputes O alongside Ȯ).

Both work under ``torch.no_grad()``; neither needs a vmap rule. The tangent outputs are not themselves
differentiable by reverse mode (double differentiation through the kernel is not supported).

Dispatch: registered as backend ``"triton"`` for ``attention`` with ``supports_forward_ad=True``. By
default (policy ``"forward_ad"``) it is available only while forward-mode AD is active, on CUDA
tensors of dtype fp16/bf16/fp32 with Dh ≤ 256 and Triton importable — the plain forward/backward keep
PyTorch's SDPA flash kernels. ``set_flash_attention_policy("always")`` uses the Triton kernels for every
CUDA attention call.
"""
from __future__ import annotations

import importlib.util
import math
from typing import Any, Optional, Tuple

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

from .dispatch import forward_ad_active, register_backend

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
_POLICIES = ("forward_ad", "always")
_POLICY = "forward_ad"
# Tests set this to route the dispatcher to the Triton interpreter on CPU tensors.
_ALLOW_CPU_INTERPRETER = False


def _kernels():
    from . import attention_triton  # lazy: TRITON_INTERPRET must be set before @triton.jit runs

    return attention_triton


# ---------------------------------------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------------------------------------
def _check_inputs(q: Tensor, k: Tensor, v: Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"flash_attention expects q, k, v of shape [B, H, L, Dh]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[:2] != k.shape[:2] or k.shape != v.shape or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"flash_attention: incompatible shapes q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)} (need k.shape == v.shape and equal B, H, Dh)")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"flash_attention: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    if q.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"flash_attention: dtype {q.dtype} not supported; expected one of "
                         f"{[str(d) for d in _SUPPORTED_DTYPES]}")
    if q.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(f"flash_attention: head dim {q.shape[-1]} > {MAX_HEAD_DIM}")
    if q.shape[2] == 0 or k.shape[2] == 0:
        raise ValueError(f"flash_attention: empty sequence (Lq={q.shape[2]}, Lk={k.shape[2]})")


def _scale(q: Tensor, scale: Optional[float]) -> float:
    return float(scale) if scale is not None else 1.0 / math.sqrt(q.shape[-1])


# ---------------------------------------------------------------------------------------------------------
# torch.library custom ops
# ---------------------------------------------------------------------------------------------------------
@torch.library.custom_op("lct_fast::flash_attn_fwd", mutates_args=())
def flash_attn_fwd(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tuple[Tensor, Tensor]:
    """(O, log-sum-exp) of softmax(Q·Kᵀ·s)·V; lse in fp32 and natural log."""
    return _kernels().attn_fwd(q, k, v, scale)


@flash_attn_fwd.register_fake
def _(q, k, v, scale):
    return q.new_empty(q.shape), q.new_empty(q.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("lct_fast::flash_attn_jvp", mutates_args=())
def flash_attn_jvp(q: Tensor, k: Tensor, v: Tensor, tq: Optional[Tensor], tk: Optional[Tensor],
                   tv: Optional[Tensor], scale: float) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(O, Ȯ, lse, lse tangent) in one flash pass; a missing tangent counts as zero and is skipped."""
    return _kernels().attn_fwd(q, k, v, scale, tq, tk, tv, tangent=True)


@flash_attn_jvp.register_fake
def _(q, k, v, tq, tk, tv, scale):
    lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
    return q.new_empty(q.shape), q.new_empty(q.shape), lse, torch.empty_like(lse)


@torch.library.custom_op("lct_fast::flash_attn_bwd", mutates_args=())
def flash_attn_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor,
                   dlse: Optional[Tensor], scale: float) -> Tuple[Tensor, Tensor, Tensor]:
    """(dQ, dK, dV) from the upstream gradients of O and lse (optional) and the saved O and lse."""
    return _kernels().attn_bwd(do, q, k, v, o, lse, scale, dlse)


@flash_attn_bwd.register_fake
def _(do, q, k, v, o, lse, dlse, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


# ---------------------------------------------------------------------------------------------------------
# autograd.Function
# ---------------------------------------------------------------------------------------------------------
class _Precomputed:
    """Results of the fused kernel computed before ``apply`` (forward-AD dual tensors)."""

    __slots__ = ("o", "lse", "o_dot", "lse_dot")

    def __init__(self, o: Tensor, o_dot: Tensor, lse: Tensor, lse_dot: Tensor) -> None:
        self.o, self.o_dot, self.lse, self.lse_dot = o, o_dot, lse, lse_dot


class FlashAttentionFunction(torch.autograd.Function):
    """O, lse = attention(q, k, v), both differentiable (lse: fp32 log-sum-exp of the scaled scores).

    ``backward`` runs the Triton FA2 backward (the lse gradient folds into Δ); ``jvp`` returns
    (Ȯ, lse tangent) from the fused kernel.
    """

    @staticmethod
    def forward(q: Tensor, k: Tensor, v: Tensor, scale: float, pre: Optional[_Precomputed]):
        if pre is not None:
            return pre.o, pre.lse
        return flash_attn_fwd(q, k, v, scale)

    @staticmethod
    def setup_context(ctx: Any, inputs: Tuple[Any, ...], output: Tuple[Tensor, Tensor]) -> None:
        q, k, v, scale, pre = inputs
        o, lse = output
        ctx.scale, ctx.pre = scale, pre
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(q, k, v, o, lse)
        if pre is None:
            ctx.save_for_forward(q, k, v)

    @staticmethod
    def backward(ctx: Any, do: Optional[Tensor], dlse: Optional[Tensor]):
        q, k, v, o, lse = ctx.saved_tensors
        if do is None and dlse is None:
            return None, None, None, None, None
        if do is None:
            do = torch.zeros_like(o)
        dq, dk, dv = flash_attn_bwd(do, q, k, v, o, lse, dlse, ctx.scale)
        return dq, dk, dv, None, None

    @staticmethod
    def jvp(ctx: Any, tq: Optional[Tensor], tk: Optional[Tensor], tv: Optional[Tensor], _ts: Any, _tp: Any):
        pre = ctx.pre
        if pre is not None and pre.o_dot is not None:
            return pre.o_dot, pre.lse_dot
        q, k, v = ctx.saved_tensors
        _, o_dot, _, lse_dot = flash_attn_jvp(q, k, v, tq, tk, tv, ctx.scale)
        return o_dot, lse_dot


def _tangent(t: Tensor) -> Optional[Tensor]:
    return fwAD.unpack_dual(t).tangent


def _functorch_active() -> bool:
    """True inside a torch.func transform: its tensors are wrappers whose duals must not be unpacked
    here (results would live at the wrong functorch level), so the Function's own ``jvp`` is used."""
    try:
        return bool(torch._C._functorch.get_interpreter_stack())
    except (AttributeError, RuntimeError):  # pragma: no cover - torch internals moved
        return True


def flash_attention_with_lse(q: Tensor, k: Tensor, v: Tensor, *, scale: Optional[float] = None
                             ) -> Tuple[Tensor, Tensor]:
    """(O, lse) = flash attention on [B, H, L, Dh]; O in q's dtype, lse [B, H, L] fp32 (natural log).

    Both outputs are differentiable (backward, ``torch.func.jvp``, ``torch.autograd.forward_ad``).
    """
    _check_inputs(q, k, v)
    s = _scale(q, scale)
    pre = None
    tangents = [None, None, None] if _functorch_active() else [_tangent(t) for t in (q, k, v)]
    if any(t is not None for t in tangents):
        # dual tensors: one fused pass gives O and Ȯ; forward()/jvp() below just return them
        prim = [fwAD.unpack_dual(t).primal for t in (q, k, v)]
        o, o_dot, lse, lse_dot = flash_attn_jvp(*prim, *tangents, s)
        pre = _Precomputed(o, o_dot, lse, lse_dot)
    return FlashAttentionFunction.apply(q, k, v, s, pre)


def flash_attention(q: Tensor, k: Tensor, v: Tensor, *, scale: Optional[float] = None) -> Tensor:
    """softmax(Q·Kᵀ·s)·V on [B, H, L, Dh] (s = 1/√Dh by default) with the Triton flash kernels."""
    return flash_attention_with_lse(q, k, v, scale=scale)[0]


def flash_attention_jvp(q: Tensor, k: Tensor, v: Tensor, tq: Optional[Tensor] = None,
                        tk: Optional[Tensor] = None, tv: Optional[Tensor] = None, *,
                        scale: Optional[float] = None) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Direct fused call (no autograd): ``(O, Ȯ, lse, lse_dot)``; ``None`` tangents are zero."""
    _check_inputs(q, k, v)
    for name, t in (("tq", tq), ("tk", tk), ("tv", tv)):
        ref = {"tq": q, "tk": k, "tv": v}[name]
        if t is not None and (t.shape != ref.shape or t.dtype != ref.dtype):
            raise ValueError(f"flash_attention_jvp: {name} has shape {tuple(t.shape)} / {t.dtype}, "
                             f"expected {tuple(ref.shape)} / {ref.dtype}")
    return flash_attn_jvp(q, k, v, tq, tk, tv, _scale(q, scale))


# ---------------------------------------------------------------------------------------------------------
# Dispatcher integration
# ---------------------------------------------------------------------------------------------------------
def set_flash_attention_policy(policy: str) -> None:
    """``"forward_ad"`` (default): the Triton backend only while forward-mode AD is active;
    ``"always"``: also for plain forward/backward."""
    global _POLICY
    if policy not in _POLICIES:
        raise ValueError(f"flash attention policy {policy!r} is not one of {list(_POLICIES)}")
    _POLICY = policy


def get_flash_attention_policy() -> str:
    return _POLICY


def flash_attention_available(q: Tensor, k: Tensor, v: Tensor) -> Tuple[bool, str]:
    """Whether the ``"triton"`` attention backend can take these inputs, and if not, why."""
    if not (q.is_cuda or _ALLOW_CPU_INTERPRETER):
        return False, "inputs are not CUDA tensors"
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed"
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in _SUPPORTED_DTYPES:
        return False, f"dtype {q.dtype} not in fp16/bf16/fp32"
    if q.dim() != 4 or q.shape[-1] > MAX_HEAD_DIM or k.shape != v.shape:
        return False, f"shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} not supported"
    if _POLICY == "forward_ad" and not forward_ad_active(q, k, v):
        return False, ("no forward-mode AD active: plain forward/backward use SDPA "
                       "(set_flash_attention_policy('always') to change)")
    return True, ""


def _attention_triton(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return flash_attention(q, k, v)


# flash_attention is the "triton" backend of lct_fast.ops.attention
register_backend("attention", "triton", _attention_triton, available=flash_attention_available,
                 supports_forward_ad=True)


__all__ = [
    "FlashAttentionFunction",
    "MAX_HEAD_DIM",
    "flash_attention",
    "flash_attention_available",
    "flash_attention_jvp",
    "flash_attention_with_lse",
    "get_flash_attention_policy",
    "set_flash_attention_policy",
]
