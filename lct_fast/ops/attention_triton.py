"""Triton kernels for flash attention with a one-pass tangent (SPEC §4) and their launchers.

Imported lazily by :mod:`lct_fast.ops.attention_fused` (``TRITON_INTERPRET`` must be set before the
``@triton.jit`` functions below are created, so this module is only imported on first use).

Kernels, all on [B, H, L, Dh] tensors with unit stride on the last dim and fp32 accumulation:

* ``_attn_fwd_kernel`` — one pass over K/V blocks with the online-softmax max ``m`` and sum ``ℓ``
  (log2 domain, so ``exp2``); writes O and the natural-log log-sum-exp. With ``TANGENT`` it also keeps
  the running Σ P̃·V̇, Σ (P̃⊙Ṡ)·V (one shared accumulator) and rowsum(P̃⊙Ṡ) and writes
  Ȯ = (Σ P̃V̇ + Σ (P̃⊙Ṡ)V)/ℓ − (Σ rowsum(P̃⊙Ṡ)/ℓ)·O and the log-sum-exp tangent rowsum(P⊙Ṡ)
  (SPEC §4's flash form; Ṡ = (Q̇·Kᵀ + Q·K̇ᵀ)·s).
* ``_attn_bwd_dkdv_kernel`` / ``_attn_bwd_dq_kernel`` — FlashAttention-2 style backward from the saved
  log-sum-exp and Δ = rowsum(dO⊙O): dV = Pᵀ·dO, dS = P⊙(dO·Vᵀ − Δ), dK = s·dSᵀ·Q, dQ = s·dS·K.
  Two kernels (one owns a K/V block, one a Q block), so no atomics and deterministic results.

On a GPU the launch configuration is autotuned; under the Triton interpreter (CPU tests) a fixed small
configuration is used, since autotuning there is both slow and meaningless.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ..precision import tf32_allowed
from .dispatch import autotune, interpreting

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


# ---------------------------------------------------------------------------------------------------------
# Forward (+ tangent) kernel
# ---------------------------------------------------------------------------------------------------------
@triton.jit
def _attn_fwd_kernel(
    Q, K, V, TQ, TK, TV, O, TO, LSE, TLSE,
    s_qb, s_qh, s_ql, s_kb, s_kh, s_kl, s_vb, s_vh, s_vl,
    s_tqb, s_tqh, s_tql, s_tkb, s_tkh, s_tkl, s_tvb, s_tvh, s_tvl,
    H, LQ, LK, D, sm_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    TANGENT: tl.constexpr, HAS_TQ: tl.constexpr, HAS_TK: tl.constexpr, HAS_TV: tl.constexpr,
    EVEN_N: tl.constexpr, PREC: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < LQ
    mask_d = offs_d < D
    qk_scale = sm_scale * 1.4426950408889634  # log2(e): softmax through exp2

    q_ptrs = Q + b * s_qb + h * s_qh + offs_m[:, None] * s_ql + offs_d[None, :]
    q = tl.load(q_ptrs, mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    if TANGENT and HAS_TQ:
        tq = tl.load(TQ + b * s_tqb + h * s_tqh + offs_m[:, None] * s_tql + offs_d[None, :],
                     mask=mask_m[:, None] & mask_d[None, :], other=0.0)

    k_base = K + b * s_kb + h * s_kh
    v_base = V + b * s_vb + h * s_vh
    tk_base = TK + b * s_tkb + h * s_tkh
    tv_base = TV + b * s_tvb + h * s_tvh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if TANGENT:
        r_i = tl.zeros([BLOCK_M], dtype=tl.float32)       # Σ rowsum(P̃⊙Ṡ)
        acc_t = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)  # Σ P̃V̇ + Σ (P̃⊙Ṡ)V

    for start_n in range(0, LK, BLOCK_N):
        offs_n = start_n + offs_n0
        mask_n = offs_n < LK
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(k_base + offs_n[:, None] * s_kl + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * s_vl + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        if not EVEN_N:
            s = tl.where(mask_n[None, :], s, float("-inf"))
        # every K block holds at least one valid key, so m_new is finite and no NaN appears
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        if TANGENT:
            acc_t = acc_t * alpha[:, None]
            if HAS_TQ or HAS_TK:
                # Ṡ = (Q̇·Kᵀ + Q·K̇ᵀ)·s in natural units (tail keys: P̃ = 0 there, Ṡ finite)
                sd = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
                if HAS_TQ:
                    sd += tl.dot(tq, tl.trans(k), input_precision=PREC)
                if HAS_TK:
                    tk = tl.load(tk_base + offs_n[:, None] * s_tkl + offs_d[None, :], mask=kv_mask, other=0.0)
                    sd += tl.dot(q, tl.trans(tk), input_precision=PREC)
                ps = p * (sd * sm_scale)
                r_i = r_i * alpha + tl.sum(ps, 1)
                acc_t += tl.dot(ps.to(v.dtype), v, input_precision=PREC)
            if HAS_TV:
                tv = tl.load(tv_base + offs_n[:, None] * s_tvl + offs_d[None, :], mask=kv_mask, other=0.0)
                acc_t += tl.dot(p.to(tv.dtype), tv, input_precision=PREC)
        m_i = m_new

    inv_l = 1.0 / l_i
    o = acc * inv_l[:, None]
    row = bh * LQ + offs_m
    out_ptrs = row[:, None] * D + offs_d[None, :]
    out_mask = mask_m[:, None] & mask_d[None, :]
    tl.store(O + out_ptrs, o.to(O.dtype.element_ty), mask=out_mask)
    tl.store(LSE + row, (m_i + tl.log2(l_i)) * 0.6931471805599453, mask=mask_m)
    if TANGENT:
        mu = r_i * inv_l  # rowsum(P⊙Ṡ) = tangent of the log-sum-exp
        ot = acc_t * inv_l[:, None] - mu[:, None] * o
        tl.store(TO + out_ptrs, ot.to(TO.dtype.element_ty), mask=out_mask)
        tl.store(TLSE + row, mu, mask=mask_m)


# ---------------------------------------------------------------------------------------------------------
# Backward kernels
# ---------------------------------------------------------------------------------------------------------
@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    s_qb, s_qh, s_ql, s_kb, s_kh, s_kl, s_vb, s_vh, s_vl,
    H, LQ, LK, D, sm_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr,
):
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = offs_n < LK
    mask_d = offs_d < D
    qk_scale = sm_scale * 1.4426950408889634
    kv_mask = mask_n[:, None] & mask_d[None, :]
    k = tl.load(K + b * s_kb + h * s_kh + offs_n[:, None] * s_kl + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + b * s_vb + h * s_vh + offs_n[:, None] * s_vl + offs_d[None, :], mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    q_base = Q + b * s_qb + h * s_qh
    for start_m in range(0, LQ, BLOCK_M):
        offs_m = start_m + offs_m0
        mask_m = offs_m < LQ
        q_mask = mask_m[:, None] & mask_d[None, :]
        q = tl.load(q_base + offs_m[:, None] * s_ql + offs_d[None, :], mask=q_mask, other=0.0)
        row = bh * LQ + offs_m
        do = tl.load(DO + row[:, None] * D + offs_d[None, :], mask=q_mask, other=0.0)
        lse2 = tl.load(LSE + row, mask=mask_m, other=0.0) * 1.4426950408889634
        delta = tl.load(DELTA + row, mask=mask_m, other=0.0)
        st = tl.dot(k, tl.trans(q), input_precision=PREC) * qk_scale          # [N, M]
        pt = tl.exp2(st - lse2[None, :])
        pt = tl.where(mask_m[None, :], pt, 0.0)
        dv += tl.dot(pt.to(do.dtype), do, input_precision=PREC)
        dpt = tl.dot(v, tl.trans(do), input_precision=PREC)                   # (dO·Vᵀ)ᵀ
        dst = pt * (dpt - delta[None, :])
        dk += tl.dot(dst.to(q.dtype), q, input_precision=PREC)
    out = (bh * LK + offs_n)[:, None] * D + offs_d[None, :]
    tl.store(DK + out, (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ,
    s_qb, s_qh, s_ql, s_kb, s_kh, s_kl, s_vb, s_vh, s_vl,
    H, LQ, LK, D, sm_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_N: tl.constexpr,
    PREC: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < LQ
    mask_d = offs_d < D
    qk_scale = sm_scale * 1.4426950408889634
    q_mask = mask_m[:, None] & mask_d[None, :]
    q = tl.load(Q + b * s_qb + h * s_qh + offs_m[:, None] * s_ql + offs_d[None, :], mask=q_mask, other=0.0)
    row = bh * LQ + offs_m
    do = tl.load(DO + row[:, None] * D + offs_d[None, :], mask=q_mask, other=0.0)
    lse2 = tl.load(LSE + row, mask=mask_m, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + row, mask=mask_m, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    k_base = K + b * s_kb + h * s_kh
    v_base = V + b * s_vb + h * s_vh
    for start_n in range(0, LK, BLOCK_N):
        offs_n = start_n + offs_n0
        mask_n = offs_n < LK
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(k_base + offs_n[:, None] * s_kl + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * s_vl + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        p = tl.exp2(s - lse2[:, None])
        if not EVEN_N:
            p = tl.where(mask_n[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
    tl.store(DQ + row[:, None] * D + offs_d[None, :], (dq * sm_scale).to(DQ.dtype.element_ty), mask=q_mask)


# ---------------------------------------------------------------------------------------------------------
# Launch configurations
# ---------------------------------------------------------------------------------------------------------
def _configs(blocks, warps=(4, 8), stages=(2, 3, 4)):
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bm, bn in blocks for w in warps for s in stages]


# fp32 values a thread holds live in registers, per kernel: accumulators (×BLOCK_D) and score tiles
# (×BLOCK_N). fwd: O and S/P; jvp: O, Ȯ-accumulator, S and Ṡ; dkdv: dK, dV, P and dP; dq: dQ, P and dP.
_LIVE = {"fwd": (("m", 1), ("m", 1)), "jvp": (("m", 2), ("m", 2)),
         "dkdv": (("n", 2), ("m", 2)), "dq": (("m", 1), ("m", 2))}
MAX_LIVE_PER_THREAD = 192  # of 255 registers; the rest holds pointers, offsets and softmax state


def live_per_thread(kind: str, bm: int, bn: int, bd: int, warps: int) -> float:
    """Estimated live fp32 values per thread of a tile configuration (register-pressure model).

    Calibrated on sm_90 cubins (benchmarks/triton_aot.py, results/triton_aot-sm90-*.md): every
    configuration above 192 spilled ≥ 400 B per thread; at or below it at most ~200 B."""
    (acc_rows, n_acc), (tile_rows, n_tiles) = _LIVE[kind]
    rows = {"m": bm, "n": bn}
    return (n_acc * rows[acc_rows] * bd + n_tiles * bm * bn) / (32 * warps)


def _prune(kind: str):
    """Drop configurations that exceed shared memory or would spill registers (see live_per_thread)."""
    tangent = kind != "fwd"

    def prune(configs, named_args, **kwargs):
        bd = kwargs.get("BLOCK_D", named_args.get("BLOCK_D", 64))
        q = named_args.get("Q")
        elem = q.element_size() if hasattr(q, "element_size") else 2
        keep = []
        for c in configs:
            bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
            tiles = bm * bd + c.num_stages * bn * bd * (4 if tangent else 2)  # elements held in smem
            if tiles * elem > 200 * 1024 or (bd >= 256 and bm * bn > 64 * 64):
                continue
            if live_per_thread(kind, bm, bn, bd, c.num_warps) > MAX_LIVE_PER_THREAD:
                continue
            keep.append(c)
        if not keep:  # nothing fits the model: keep the least register-hungry configuration
            keep = [min(configs, key=lambda c: live_per_thread(kind, c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"],
                                                               bd, c.num_warps))]
        return keep
    return prune


_FWD_KEY = ["LQ", "LK", "BLOCK_D", "TANGENT", "HAS_TQ", "HAS_TK", "HAS_TV", "PREC"]
_BWD_KEY = ["LQ", "LK", "BLOCK_D", "PREC"]

# Candidate tiles per kernel. Tensor-core dots (bf16/fp16, and fp32 as TF32 when the user allows it):
_MMA_TILES = {"fwd": [(128, 64), (128, 128), (64, 64), (128, 32)],
              "jvp": [(64, 64), (128, 64), (64, 32), (128, 32)],
              "dkdv": [(32, 128), (64, 128), (32, 64), (64, 64)],
              "dq": [(128, 32), (128, 64), (64, 64), (64, 32)]}
# Exact fp32 ("ieee") dots run on the FMA units with both operands spread over registers: on sm_90 the
# MMA tiles above spill 0.5–17 KB per thread (benchmarks/triton_aot.py). These are the spill-free (or
# near: the five-dot tangent kernel has none at all above 16×32) tiles at 8 warps for Dh = 64.
_IEEE_TILES = {"fwd": [(64, 32), (32, 64), (32, 32), (16, 64)],
               "jvp": [(16, 32)],
               "dkdv": [(32, 32), (16, 64), (16, 32)],
               "dq": [(64, 32), (32, 64), (32, 32), (16, 64)]}
_KERNELS = {"fwd": "_attn_fwd_kernel", "jvp": "_attn_fwd_kernel", "dkdv": "_attn_bwd_dkdv_kernel",
            "dq": "_attn_bwd_dq_kernel"}
_tuned_cache: dict = {}


def _tuned(ieee: bool = False):
    """Autotuned (fwd, jvp, dkdv, dq) kernel wrappers for MMA or exact-fp32 dots, built once on first GPU use
    (never under the interpreter)."""
    if ieee not in _tuned_cache:
        out = []
        for kind in ("fwd", "jvp", "dkdv", "dq"):
            if ieee:
                configs = _configs(_IEEE_TILES[kind], warps=(8,), stages=(2,))
            else:
                configs = _configs(_MMA_TILES[kind], stages=(2, 3, 4) if kind == "fwd" else (2, 3))
            out.append(autotune(globals()[_KERNELS[kind]], configs,
                                key=_FWD_KEY if kind in ("fwd", "jvp") else _BWD_KEY, prune=_prune(kind)))
        _tuned_cache[ieee] = tuple(out)
    return _tuned_cache[ieee]


_INTERP_BLOCK = 16  # smallest tile tl.dot accepts


# ---------------------------------------------------------------------------------------------------------
# Launchers (plain tensors in, new tensors out; no autograd)
# ---------------------------------------------------------------------------------------------------------
def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _strides(t: Optional[torch.Tensor]) -> Tuple[int, int, int]:
    return (0, 0, 0) if t is None else (t.stride(0), t.stride(1), t.stride(2))


def _precision(dtype: torch.dtype) -> str:
    """fp32 inputs: exact fp32 dots unless the user allowed TF32 for matmuls (as cuBLAS would).
    16-bit inputs: the backend default ("tf32", meaning plain tensor-core MMA for fp16/bf16)."""
    if dtype == torch.float32 and not tf32_allowed():
        return "ieee"
    return "tf32"


def _block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def attn_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
             tq: Optional[torch.Tensor] = None, tk: Optional[torch.Tensor] = None,
             tv: Optional[torch.Tensor] = None, tangent: bool = False):
    """Run the forward kernel. Returns ``(o, lse)`` or, with ``tangent``, ``(o, ȯ, lse, lse_dot)``."""
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    tq = _unit_last(tq) if tq is not None else None
    tk = _unit_last(tk) if tk is not None else None
    tv = _unit_last(tv) if tv is not None else None
    B, H, LQ, D = q.shape
    LK = k.shape[2]
    o = torch.empty((B, H, LQ, D), device=q.device, dtype=q.dtype)
    lse = torch.empty((B, H, LQ), device=q.device, dtype=torch.float32)
    to = torch.empty_like(o) if tangent else o
    tlse = torch.empty_like(lse) if tangent else lse
    BD = _block_d(D)
    args = (q, k, v, tq if tq is not None else q, tk if tk is not None else k, tv if tv is not None else v,
            o, to, lse, tlse, *_strides(q), *_strides(k), *_strides(v), *_strides(tq), *_strides(tk),
            *_strides(tv), H, LQ, LK, D, float(scale))
    flags = dict(BLOCK_D=BD, TANGENT=tangent, HAS_TQ=tangent and tq is not None,
                 HAS_TK=tangent and tk is not None, HAS_TV=tangent and tv is not None,
                 PREC=_precision(q.dtype))
    if interpreting():
        grid = (triton.cdiv(LQ, _INTERP_BLOCK), B * H)
        _attn_fwd_kernel[grid](*args, BLOCK_M=_INTERP_BLOCK, BLOCK_N=_INTERP_BLOCK,
                               EVEN_N=LK % _INTERP_BLOCK == 0, **flags)
    else:
        fwd, jvp, _, _ = _tuned(flags["PREC"] == "ieee")
        kern = jvp if tangent else fwd
        grid = lambda meta: (triton.cdiv(LQ, meta["BLOCK_M"]), B * H)  # noqa: E731
        # EVEN_N depends on the tuned BLOCK_N; all candidates are ≤ 128 and powers of two
        kern[grid](*args, EVEN_N=LK % 128 == 0, **flags)
    return (o, to, lse, tlse) if tangent else (o, lse)


def attn_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
             lse: torch.Tensor, scale: float, dlse: Optional[torch.Tensor] = None):
    """FlashAttention-2 backward from the saved log-sum-exp; returns ``(dq, dk, dv)`` in q's dtype.

    ``dlse`` (optional) is the gradient w.r.t. the log-sum-exp output: since ∂lse/∂S = P it enters as
    dS = P⊙(dO·Vᵀ − Δ + dlse), i.e. Δ ← Δ − dlse.
    """
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    do = do.contiguous()
    B, H, LQ, D = q.shape
    LK = k.shape[2]
    delta = (do.float() * o.float()).sum(-1)  # Δ = rowsum(dO⊙O), O(L·Dh) memory
    if dlse is not None:
        delta = delta - dlse.float()
    delta = delta.contiguous()
    lse = lse.contiguous()
    dq = torch.empty((B, H, LQ, D), device=q.device, dtype=q.dtype)
    dk = torch.empty((B, H, LK, D), device=q.device, dtype=k.dtype)
    dv = torch.empty((B, H, LK, D), device=q.device, dtype=v.dtype)
    strides = (*_strides(q), *_strides(k), *_strides(v))
    common = (H, LQ, LK, D, float(scale))
    BD, prec = _block_d(D), _precision(q.dtype)
    if interpreting():
        bs = _INTERP_BLOCK
        _attn_bwd_dkdv_kernel[(triton.cdiv(LK, bs), B * H)](
            q, k, v, do, lse, delta, dk, dv, *strides, *common, BLOCK_M=bs, BLOCK_N=bs, BLOCK_D=BD, PREC=prec)
        _attn_bwd_dq_kernel[(triton.cdiv(LQ, bs), B * H)](
            q, k, v, do, lse, delta, dq, *strides, *common, BLOCK_M=bs, BLOCK_N=bs, BLOCK_D=BD,
            EVEN_N=LK % bs == 0, PREC=prec)
    else:
        _, _, dkdv, dqk = _tuned(prec == "ieee")
        dkdv[lambda meta: (triton.cdiv(LK, meta["BLOCK_N"]), B * H)](
            q, k, v, do, lse, delta, dk, dv, *strides, *common, BLOCK_D=BD, PREC=prec)
        dqk[lambda meta: (triton.cdiv(LQ, meta["BLOCK_M"]), B * H)](
            q, k, v, do, lse, delta, dq, *strides, *common, BLOCK_D=BD, EVEN_N=LK % 128 == 0, PREC=prec)
    return dq, dk, dv


__all__ = ["attn_bwd", "attn_fwd", "interpreting", "LOG2E", "LN2"]
