"""Fused NsLN / adaLN-NsLN ops: torch.library custom ops over the Triton and CUDA kernels, one
``autograd.Function`` with ``backward`` and ``jvp``, and the ``triton``/``cuda`` backends of
``lct_fast.ops.nsln`` / ``nsln_modulate`` (SPEC §4).

Layers (developer guide): kernel launcher (:mod:`.nsln_triton`, ``csrc/nsln_kernels.cu``) →
``torch.library`` custom ops ``lct_fast::nsln_{fwd,bwd,jvp}_{triton,cuda}`` with fake implementations (so
``torch.compile`` traces around them) → :class:`NsLNFunction` (``setup_context``, ``backward``, ``jvp``) →
:func:`nsln_fused` / :func:`nsln_modulate_fused` → the dispatcher backends used by ``NsLN``/``NsLN2d``.

Forward-mode AD: ``torch.func.jvp`` goes through :meth:`NsLNFunction.jvp` (forward kernel, then a
tangent-only kernel). sCT's tangent pass uses ``torch.autograd.forward_ad`` dual tensors under
``no_grad``; there the functional API unpacks the duals and runs the single primal+tangent kernel
(one read of x and ẋ, one write of y and ẏ) and re-packs the result — the same numbers, one pass fewer.
"""
from __future__ import annotations

import importlib.util
from typing import Any, Callable, Optional, Tuple

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

from .dispatch import forward_ad_active, load_extension_ops, register_backend

IMPLS = ("triton", "cuda")
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_SPLIT_THRESHOLD = 8192  # rows wider than this take the split-row path


def set_split_threshold(n: int) -> int:
    """Set the row width above which the split-row path is used (tests lower it); returns the old one."""
    global _SPLIT_THRESHOLD
    if int(n) < 1:
        raise ValueError(f"split threshold must be >= 1, got {n}")
    old, _SPLIT_THRESHOLD = _SPLIT_THRESHOLD, int(n)
    return old


def get_split_threshold() -> int:
    return _SPLIT_THRESHOLD


def _empty(like: Tensor) -> Tensor:
    return like.new_empty((0,), dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# torch.library custom ops: Triton
# ---------------------------------------------------------------------------------------------


def _tk():
    from . import nsln_triton  # lazy: TRITON_INTERPRET must be set before the kernels are created

    return nsln_triton


@torch.library.custom_op("lct_fast::nsln_fwd_triton", mutates_args=())
def _fwd_triton(x: Tensor, bias: Optional[Tensor], shift: Optional[Tensor], scale: Optional[Tensor],
                eps: float, split_threshold: int) -> Tuple[Tensor, Tensor, Tensor]:
    y, mean, rstd = _tk().forward(x, bias, shift, scale, eps, split_threshold=split_threshold)
    return y, mean, rstd


@torch.library.custom_op("lct_fast::nsln_bwd_triton", mutates_args=())
def _bwd_triton(dy: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, scale: Optional[Tensor], num_samples: int,
                need_dx: bool, need_dbias: bool, need_dshift: bool, need_dscale: bool,
                split_threshold: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    dx, db, dsh, dsc = _tk().backward(dy, x, mean, rstd, scale, num_samples=num_samples, need_dx=need_dx,
                                      need_dbias=need_dbias, need_dshift=need_dshift, need_dscale=need_dscale,
                                      split_threshold=split_threshold)
    # (distinct empty tensors: custom-op outputs may not alias each other)
    return (dx if dx is not None else x.new_empty((0,)), db if db is not None else _empty(x),
            dsh if dsh is not None else _empty(x), dsc if dsc is not None else _empty(x))


@torch.library.custom_op("lct_fast::nsln_jvp_triton", mutates_args=())
def _jvp_triton(x: Tensor, xd: Optional[Tensor], bias: Optional[Tensor], biasd: Optional[Tensor],
                shift: Optional[Tensor], scale: Optional[Tensor], shiftd: Optional[Tensor],
                scaled: Optional[Tensor], eps: float, with_primal: bool,
                split_threshold: int) -> Tuple[Tensor, Tensor]:
    y, yd = _tk().jvp(x, xd, bias, biasd, shift, scale, shiftd, scaled, eps, with_primal=with_primal,
                      split_threshold=split_threshold)
    return (y if y is not None else x.new_empty((0,))), yd


# ---------------------------------------------------------------------------------------------
# fake (meta) implementations, shared by both backends
# ---------------------------------------------------------------------------------------------


def _fwd_fake(x, bias, shift, scale, eps, split_threshold):
    r = x.shape[0]
    return torch.empty_like(x), x.new_empty((r,), dtype=torch.float32), x.new_empty((r,), dtype=torch.float32)


def _bwd_fake(dy, x, mean, rstd, scale, num_samples, need_dx, need_dbias, need_dshift, need_dscale,
              split_threshold):
    n = x.shape[1]
    b = scale.shape[0] if scale is not None else num_samples
    f32 = dict(dtype=torch.float32)
    return (torch.empty_like(x) if need_dx else x.new_empty((0,)),
            x.new_empty((n,), **f32) if need_dbias else x.new_empty((0,), **f32),
            x.new_empty((b, n), **f32) if need_dshift else x.new_empty((0,), **f32),
            x.new_empty((b, n), **f32) if need_dscale else x.new_empty((0,), **f32))


def _jvp_fake(x, xd, bias, biasd, shift, scale, shiftd, scaled, eps, with_primal, split_threshold):
    return (torch.empty_like(x) if with_primal else x.new_empty((0,))), torch.empty_like(x)


torch.library.register_fake("lct_fast::nsln_fwd_triton")(_fwd_fake)
torch.library.register_fake("lct_fast::nsln_bwd_triton")(_bwd_fake)
torch.library.register_fake("lct_fast::nsln_jvp_triton")(_jvp_fake)


# ---------------------------------------------------------------------------------------------
# CUDA extension (csrc/nsln.cpp registers lct_fast::nsln_{fwd,bwd,jvp}_cuda)
# ---------------------------------------------------------------------------------------------

def cuda_ops_loaded() -> Tuple[bool, str]:
    """Import ``lct_fast._C`` once; True when it registered the NsLN CUDA ops (fakes added then)."""
    return load_extension_ops({"nsln_fwd_cuda": _fwd_fake, "nsln_bwd_cuda": _bwd_fake, "nsln_jvp_cuda": _jvp_fake})


def _ops(impl: str) -> Tuple[Callable, Callable, Callable]:
    if impl == "triton":
        return (torch.ops.lct_fast.nsln_fwd_triton, torch.ops.lct_fast.nsln_bwd_triton,
                torch.ops.lct_fast.nsln_jvp_triton)
    if impl == "cuda":
        ok, why = cuda_ops_loaded()
        if not ok:
            raise RuntimeError(f"nsln: CUDA backend requested but {why}")
        return torch.ops.lct_fast.nsln_fwd_cuda, torch.ops.lct_fast.nsln_bwd_cuda, torch.ops.lct_fast.nsln_jvp_cuda
    raise ValueError(f"nsln: unknown fused implementation {impl!r}; expected one of {list(IMPLS)}")


# ---------------------------------------------------------------------------------------------
# autograd.Function
# ---------------------------------------------------------------------------------------------


def _c(t: Optional[Tensor]) -> Optional[Tensor]:
    return t.contiguous() if t is not None else None


def _rows(t: Tensor) -> Tensor:
    return t.reshape(-1, t.shape[-1]).contiguous()


class NsLNFunction(torch.autograd.Function):
    """y = x̂·(1 + scale) + shift + β (shift/scale optional) with hand-written backward and JVP.

    Outputs (y, mean, rstd); mean/rstd are fp32 statistics kept for backward (non-differentiable).
    x is [..., N]; with shift/scale [B, N], x's leading dim is B and the middle dims are the tokens.
    """

    @staticmethod
    def forward(x: Tensor, bias: Optional[Tensor], shift: Optional[Tensor], scale: Optional[Tensor],
                eps: float, impl: str) -> Tuple[Tensor, Tensor, Tensor]:
        fwd, _, _ = _ops(impl)
        y, mean, rstd = fwd(_rows(x), _c(bias), _c(shift), _c(scale), eps, _SPLIT_THRESHOLD)
        return y.view(x.shape), mean, rstd

    @staticmethod
    def setup_context(ctx: Any, inputs: Tuple[Any, ...], output: Tuple[Tensor, Tensor, Tensor]) -> None:
        x, bias, shift, scale, eps, impl = inputs
        _, mean, rstd = output
        ctx.mark_non_differentiable(mean, rstd)
        ctx.save_for_backward(x, bias, shift, scale, mean, rstd)
        ctx.save_for_forward(x, bias, shift, scale)
        ctx.eps, ctx.impl, ctx.split = eps, impl, _SPLIT_THRESHOLD

    @staticmethod
    def backward(ctx: Any, dy: Tensor, _dmean: Any, _drstd: Any):
        x, bias, shift, scale, mean, rstd = ctx.saved_tensors
        nx, nb, nsh, nsc = ctx.needs_input_grad[:4]
        _, bwd, _ = _ops(ctx.impl)
        b = scale.shape[0] if scale is not None else 1
        dx, db, dsh, dsc = bwd(_rows(dy), _rows(x), mean, rstd, _c(scale), b, nx, nb and bias is not None,
                               nsh and shift is not None, nsc and scale is not None, ctx.split)
        return (dx.view(x.shape) if nx else None,
                db.to(bias.dtype) if nb and bias is not None else None,
                dsh.to(shift.dtype) if nsh and shift is not None else None,
                dsc.to(scale.dtype) if nsc and scale is not None else None,
                None, None)

    @staticmethod
    def jvp(ctx: Any, xd: Optional[Tensor], biasd: Optional[Tensor], shiftd: Optional[Tensor],
            scaled: Optional[Tensor], _eps: Any, _impl: Any):
        x, bias, shift, scale = ctx.saved_tensors
        _, _, jvp = _ops(ctx.impl)
        _, yd = jvp(_rows(x), _rows(xd) if xd is not None else None, _c(bias), _c(biasd), _c(shift), _c(scale),
                    _c(shiftd), _c(scaled), ctx.eps, False, ctx.split)
        return yd.view(x.shape), None, None


def _dual_parts(ts: Tuple[Optional[Tensor], ...]):
    """(primals, tangents) of possibly-dual tensors at the current forward-AD level."""
    prim, tan = [], []
    for t in ts:
        if t is None:
            prim.append(None)
            tan.append(None)
        else:
            p, d = fwAD.unpack_dual(t)
            prim.append(p)
            tan.append(d)
    return prim, tan


def _apply(x: Tensor, bias: Optional[Tensor], shift: Optional[Tensor], scale: Optional[Tensor], eps: float,
           impl: str) -> Tensor:
    ts = (x, bias, shift, scale)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ts)
    if not needs_grad:
        prim, tan = _dual_parts(ts)
        if any(d is not None for d in tan):
            # forward_ad dual tensors (sCT's no-grad tangent pass): primal + tangent in one kernel
            _, _, jvp = _ops(impl)
            px, pb, psh, psc = prim
            dx, db, dsh, dsc = tan
            y, yd = jvp(_rows(px), _rows(dx) if dx is not None else None, _c(pb), _c(db), _c(psh), _c(psc),
                        _c(dsh), _c(dsc), eps, True, _SPLIT_THRESHOLD)
            return fwAD.make_dual(y.view(x.shape), yd.view(x.shape))
        if not forward_ad_active(*ts):
            fwd, _, _ = _ops(impl)
            return fwd(_rows(x), _c(bias), _c(shift), _c(scale), eps, _SPLIT_THRESHOLD)[0].view(x.shape)
    return NsLNFunction.apply(x, bias, shift, scale, eps, impl)[0]


# ---------------------------------------------------------------------------------------------
# functional API
# ---------------------------------------------------------------------------------------------


def _check_common(x: Tensor, bias: Optional[Tensor], op: str) -> None:
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"{op}: x must be [..., N] with N > 0, got shape {tuple(x.shape)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{op}: fused kernels take fp32/bf16/fp16 inputs, got {x.dtype} (use backend='reference')")
    if bias is not None and tuple(bias.shape) != (x.shape[-1],):
        raise ValueError(f"{op}: bias must have shape [{x.shape[-1]}] (last dim of x {tuple(x.shape)}), "
                         f"got {tuple(bias.shape)}")


def nsln_fused(x: Tensor, bias: Optional[Tensor], *, eps: float = 1e-6, impl: str = "triton") -> Tensor:
    """NsLN over the last dim with the fused kernels: (x − μ)·rstd + β, fp32 statistics, x's dtype out."""
    _check_common(x, bias, "nsln")
    return _apply(x, bias, None, None, eps, impl)


def nsln_modulate_fused(x: Tensor, shift: Tensor, scale: Tensor, bias: Optional[Tensor] = None, *,
                        eps: float = 1e-6, impl: str = "triton") -> Tensor:
    """Fused adaLN form x̂·(1 + scale) + shift (+ β); x [B, …, N], shift/scale [B, N]."""
    _check_common(x, bias, "nsln_modulate")
    if x.dim() < 2:
        raise ValueError(f"nsln_modulate: x must be [B, ..., N], got shape {tuple(x.shape)}")
    want = (x.shape[0], x.shape[-1])
    for name, t in (("shift", shift), ("scale", scale)):
        if t is None or tuple(t.shape) != want:
            raise ValueError(f"nsln_modulate: {name} must have shape [B, N] = {list(want)} for x of shape "
                             f"{tuple(x.shape)}, got {None if t is None else tuple(t.shape)}")
    return _apply(x, bias, shift, scale, eps, impl)


# ---------------------------------------------------------------------------------------------
# backend registration (lct_fast.ops dispatcher)
# ---------------------------------------------------------------------------------------------

_HAS_TRITON = importlib.util.find_spec("triton") is not None


def _common_ok(tensors: Tuple[Any, ...]) -> Tuple[bool, str]:
    x = tensors[0]
    if not isinstance(x, Tensor) or not x.is_cuda:
        return False, "inputs are not CUDA tensors"
    if x.dtype not in SUPPORTED_DTYPES:
        return False, f"dtype {x.dtype} not supported by the fused kernels (fp32/bf16/fp16)"
    if any(isinstance(t, Tensor) and t.device != x.device for t in tensors[1:]):
        return False, "inputs on different devices"
    return True, ""


def triton_available(*tensors: Any) -> Tuple[bool, str]:
    """Triton backend: triton importable and CUDA inputs of a supported dtype."""
    if not _HAS_TRITON:
        return False, "triton not importable"
    return _common_ok(tensors)


def cuda_available(*tensors: Any) -> Tuple[bool, str]:
    """CUDA backend: lct_fast._C built with the NsLN ops and CUDA inputs of a supported dtype."""
    ok, why = _common_ok(tensors)
    if not ok:
        return ok, why
    return cuda_ops_loaded()


def _backend_fns(impl: str):
    def nsln_backend(x: Tensor, bias: Optional[Tensor], *, eps: float = 1e-6) -> Tensor:
        return nsln_fused(x, bias, eps=eps, impl=impl)

    def nsln_modulate_backend(x: Tensor, shift: Tensor, scale: Tensor, bias: Optional[Tensor] = None, *,
                              eps: float = 1e-6) -> Tensor:
        return nsln_modulate_fused(x, shift, scale, bias, eps=eps, impl=impl)

    nsln_backend.__name__ = f"nsln_{impl}"
    nsln_modulate_backend.__name__ = f"nsln_modulate_{impl}"
    return nsln_backend, nsln_modulate_backend


# Named *_op so they cannot be mistaken for (or shadow) the kernel modules ops/nsln_triton.py and _C.
nsln_triton_op, nsln_modulate_triton_op = _backend_fns("triton")
nsln_cuda_op, nsln_modulate_cuda_op = _backend_fns("cuda")

register_backend("nsln", "triton", nsln_triton_op, available=triton_available)
register_backend("nsln_modulate", "triton", nsln_modulate_triton_op, available=triton_available)
register_backend("nsln", "cuda", nsln_cuda_op, available=cuda_available)
register_backend("nsln_modulate", "cuda", nsln_modulate_cuda_op, available=cuda_available)
