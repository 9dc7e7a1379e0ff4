"""Triton kernels for NsLN and its fused adaLN form: forward, backward and JVP (SPEC §4).

Layout: ``x`` is a contiguous ``[R, N]`` matrix (rows = B·T tokens); ``shift``/``scale`` are ``[B, N]``
with sample ``b = row // T``; ``bias`` is ``[N]``. Statistics are fp32 whatever the input dtype.

Two regimes, chosen on the row width ``N``:

* one pass (``N ≤ split_threshold``, default 8192): a program holds a whole row in registers and computes
  mean, variance (two-pass over registers, exact) and the output in one read of x;
* split rows (the UNet normalises each sample's C·H·W, up to ~10⁶ values): a stats kernel reduces each
  chunk of ``BLOCK`` columns to (count, sum, M2[, sum ẋ, co-moment]) and the chunks are combined with
  Chan's parallel formulas (stable, no E[x²] − E[x]² cancellation); then the apply kernel runs on a
  (row, chunk) grid with the precomputed statistics.

Backward (g = dy·(1 + scale), x̂ = (x − μ)·rstd):
    dx = rstd·(g − mean(g) − x̂·mean(g·x̂)),  dβ = Σ_rows dy,  dshift_b = Σ_{t∈b} dy,  dscale_b = Σ_{t∈b} dy·x̂.
The parameter reductions are fused into the dx kernel: each program walks a group of rows of one sample
and writes fp32 partial sums, reduced afterwards over the (few) groups.

JVP (SPEC §4): ẋ̂ = rstd·(ẋ_c − x̂·mean(x̂·ẋ_c)), ẋ_c = ẋ − mean(ẋ);
    ẏ = ẋ̂·(1 + scale) + x̂·scalė + shifṫ + β̇; the primal is written by the same kernel when asked.

Imported lazily (by :mod:`lct_fast.ops.nsln_fused`) so that ``TRITON_INTERPRET`` can be set first.
Under the interpreter the autotuner is bypassed and a fixed ``num_warps`` heuristic is used.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .dispatch import autotune, interpreting

INTERPRET = interpreting()  # fixed at import, like the kernels themselves
DEFAULT_SPLIT_THRESHOLD = 8192
SPLIT_BLOCK = 4096  # columns per program in the split-row path


# ---------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _fwd_kernel(X, Y, XD, YD, BIAS, BIASD, SHIFT, SCALE, SHIFTD, SCALED,
                MEAN, RSTD, MXD, CXD,
                N, T, eps,
                BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, SAVE_STATS: tl.constexpr,
                WRITE_Y: tl.constexpr, JVP: tl.constexpr,
                HAS_BIAS: tl.constexpr, HAS_MOD: tl.constexpr, HAS_XD: tl.constexpr,
                HAS_BIASD: tl.constexpr, HAS_SHIFTD: tl.constexpr, HAS_SCALED: tl.constexpr):
    """One (row, column chunk) program: y and/or ẏ. Without SPLIT the chunk is the whole row."""
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = cols < N
    off = row.to(tl.int64) * N + cols
    x = tl.load(X + off, mask=mask, other=0.0).to(tl.float32)
    if SPLIT:
        mean = tl.load(MEAN + row)
        rstd = tl.load(RSTD + row)
    else:
        # The sum is taken about the row's first value (a pivot): with mean ≫ std an fp32 sum of the raw
        # values loses the digits that carry the deviations (mean 1e3, std 1e-2, 1000 values: the split
        # path unshifted gave max|x̂ − exact| ≈ 7e-3 on an H200, where rounding the mean itself to fp32
        # costs at most 0.5·ulp(1e3)/1e-2 = 3e-3).
        pivot = tl.load(X + row.to(tl.int64) * N).to(tl.float32)
        mean = pivot + tl.sum(tl.where(mask, x - pivot, 0.0), axis=0) / N
        xc0 = tl.where(mask, x - mean, 0.0)
        var = tl.sum(xc0 * xc0, axis=0) / N
        rstd = 1.0 / tl.sqrt(var + eps)
        if SAVE_STATS:
            tl.store(MEAN + row, mean)
            tl.store(RSTD + row, rstd)
    xh = tl.where(mask, (x - mean) * rstd, 0.0)
    if HAS_MOD:
        moff = (row // T).to(tl.int64) * N + cols
        sc1 = 1.0 + tl.load(SCALE + moff, mask=mask, other=0.0).to(tl.float32)
    if WRITE_Y:
        y = xh
        if HAS_MOD:
            y = y * sc1 + tl.load(SHIFT + moff, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            y = y + tl.load(BIAS + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + off, y.to(Y.dtype.element_ty), mask=mask)
    if JVP:
        yd = tl.zeros([BLOCK_N], dtype=tl.float32)
        if HAS_XD:
            xd = tl.load(XD + off, mask=mask, other=0.0).to(tl.float32)
            if SPLIT:
                mxd = tl.load(MXD + row)
                cxd = tl.load(CXD + row)
                xdc = tl.where(mask, xd - mxd, 0.0)
            else:
                mxd = tl.sum(xd, axis=0) / N
                xdc = tl.where(mask, xd - mxd, 0.0)
                cxd = tl.sum(xh * xdc, axis=0) / N  # mean(x̂·ẋ_c)
            yd = rstd * (xdc - xh * cxd)  # ẋ̂ (SPEC §4)
            if HAS_MOD:
                yd = yd * sc1
        if HAS_SCALED:
            yd = yd + xh * tl.load(SCALED + moff, mask=mask, other=0.0).to(tl.float32)
        if HAS_SHIFTD:
            yd = yd + tl.load(SHIFTD + moff, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIASD:
            yd = yd + tl.load(BIASD + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(YD + off, yd.to(YD.dtype.element_ty), mask=mask)


@triton.jit
def _chunk_stats_kernel(X, XD, P, N, C, BLOCK_N: tl.constexpr, HAS_XD: tl.constexpr):
    """Split path: per (row, chunk) count-free moments: Σ(x − pivot), M2 about the chunk mean, and with a
    tangent Σẋ and the co-moment Σ(x − μ_c)(ẋ − ν_c). P is [R, C, 4] fp32. The pivot is the row's first
    value, so the sums carry the deviations, not the offset (see the one-pass path in _fwd_kernel)."""
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    cols = chunk * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = cols < N
    off = row.to(tl.int64) * N + cols
    cnt = tl.minimum(N - chunk * BLOCK_N, BLOCK_N).to(tl.float32)
    pivot = tl.load(X + row.to(tl.int64) * N).to(tl.float32)
    x = tl.where(mask, tl.load(X + off, mask=mask, other=0.0).to(tl.float32) - pivot, 0.0)
    sx = tl.sum(x, axis=0)
    xc = tl.where(mask, x - sx / cnt, 0.0)
    base = (row.to(tl.int64) * C + chunk) * 4
    tl.store(P + base, sx)
    tl.store(P + base + 1, tl.sum(xc * xc, axis=0))
    if HAS_XD:
        xd = tl.load(XD + off, mask=mask, other=0.0).to(tl.float32)
        sd = tl.sum(xd, axis=0)
        dc = tl.where(mask, xd - sd / cnt, 0.0)
        tl.store(P + base + 2, sd)
        tl.store(P + base + 3, tl.sum(xc * dc, axis=0))


@triton.jit
def _bwd_chunk_stats_kernel(X, DY, SCALE, MEAN, RSTD, P, N, T, C,
                            BLOCK_N: tl.constexpr, HAS_MOD: tl.constexpr):
    """Split path backward: per (row, chunk) Σg and Σg·x̂ with g = dy·(1 + scale). P is [R, C, 2]."""
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    cols = chunk * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = cols < N
    off = row.to(tl.int64) * N + cols
    x = tl.load(X + off, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(DY + off, mask=mask, other=0.0).to(tl.float32)
    if HAS_MOD:
        moff = (row // T).to(tl.int64) * N + cols
        g = g * (1.0 + tl.load(SCALE + moff, mask=mask, other=0.0).to(tl.float32))
    xh = tl.where(mask, (x - tl.load(MEAN + row)) * tl.load(RSTD + row), 0.0)
    base = (row.to(tl.int64) * C + chunk) * 2
    tl.store(P + base, tl.sum(g, axis=0))
    tl.store(P + base + 1, tl.sum(g * xh, axis=0))


@triton.jit
def _bwd_kernel(X, DY, DX, SCALE, MEAN, RSTD, MG, MGX, PDY, PDYX,
                N, T, RPG, S,
                BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, HAS_MOD: tl.constexpr,
                NEED_DX: tl.constexpr, NEED_PDY: tl.constexpr, NEED_PDYX: tl.constexpr):
    """Program (column chunk, row group): dx for each row of the group and fp32 partial sums of dy and
    dy·x̂ over the group's rows (a group never spans two samples, so dshift/dscale stay per sample)."""
    chunk = tl.program_id(0)
    grp = tl.program_id(1)
    b = grp // S
    r0 = b * T + (grp % S) * RPG
    r1 = tl.minimum(r0 + RPG, (b + 1) * T)
    cols = chunk * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = cols < N
    if HAS_MOD:
        sc1 = 1.0 + tl.load(SCALE + b.to(tl.int64) * N + cols, mask=mask, other=0.0).to(tl.float32)
    acc_dy = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc_dyx = tl.zeros([BLOCK_N], dtype=tl.float32)
    off = r0.to(tl.int64) * N + cols  # advanced by N per row (int64: R·N may exceed 2³¹)
    for row in range(r0, r1):
        x = tl.load(X + off, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + off, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        xh = tl.where(mask, (x - tl.load(MEAN + row)) * rstd, 0.0)
        if NEED_DX:
            if HAS_MOD:
                g = dy * sc1
            else:
                g = dy
            if SPLIT:
                mg = tl.load(MG + row)
                mgx = tl.load(MGX + row)
            else:
                mg = tl.sum(g, axis=0) / N
                mgx = tl.sum(g * xh, axis=0) / N
            dx = rstd * (g - mg - xh * mgx)
            tl.store(DX + off, dx.to(DX.dtype.element_ty), mask=mask)
        if NEED_PDY:
            acc_dy += dy
        if NEED_PDYX:
            acc_dyx += dy * xh
        off += N
    poff = grp.to(tl.int64) * N + cols
    if NEED_PDY:
        tl.store(PDY + poff, acc_dy, mask=mask)
    if NEED_PDYX:
        tl.store(PDYX + poff, acc_dyx, mask=mask)


# ---------------------------------------------------------------------------------------------
# launch helpers
# ---------------------------------------------------------------------------------------------

_WARPS = (1, 2, 4, 8, 16)


def _warps_for(block: int) -> int:
    """num_warps heuristic (also the interpreter's fixed choice): ~8–16 elements per thread."""
    return max(1, min(16, block // 256))


# A row chunk lives in registers: BLOCK_N / (32·num_warps) fp32 values per thread per live array. On sm_90
# cubins (benchmarks/triton_aot.py): the forward/JVP kernel spilled above 32 values per thread (64 → up to
# 1.3 KB/thread) and not at 32; the backward, which keeps x̂, dy, 1 + scale and two partial sums live,
# still spilled at 32 (552 B, fp32, one warp) and not at 16. Below one value per thread, threads idle.
MAX_PER_THREAD = {"fwd": 32, "bwd": 16}


def _prune_warps(kind: str):
    limit = MAX_PER_THREAD[kind]

    def prune(configs, named_args, **kwargs):
        block = kwargs.get("BLOCK_N", named_args.get("BLOCK_N"))
        keep = [c for c in configs if 32 * c.num_warps <= block <= limit * 32 * c.num_warps]
        keep = keep or [max(configs, key=lambda c: c.num_warps) if block > 32 * limit
                        else min(configs, key=lambda c: c.num_warps)]
        return keep
    return prune


def _tuned(kernel, key, kind: str):
    """Wrap ``kernel`` in triton.autotune over num_warps (GPU only). The key holds the row width and the
    constexpr flags: the forward, modulated and JVP variants keep different numbers of rows live, so one
    variant's choice must not be reused for another at the same width."""
    if INTERPRET:
        return None
    configs = [triton.Config({}, num_warps=w) for w in _WARPS]
    return autotune(kernel, configs, key=key, prune=_prune_warps(kind))


_FWD_TUNED = _tuned(_fwd_kernel, ["N", "BLOCK_N", "SPLIT", "WRITE_Y", "JVP", "HAS_MOD", "HAS_XD"], "fwd")
_BWD_TUNED = _tuned(_bwd_kernel, ["N", "BLOCK_N", "SPLIT", "HAS_MOD", "NEED_DX", "NEED_PDY", "NEED_PDYX"], "bwd")


def _launch(kernel, tuned, grid, *args, **meta):
    if tuned is not None:
        tuned[grid](*args, **meta)
    else:
        kernel[grid](*args, num_warps=_warps_for(meta["BLOCK_N"]), **meta)


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _plan(n: int, split_threshold: int) -> Tuple[bool, int, int]:
    """(split, BLOCK_N, number of column chunks) for a row width ``n``."""
    if n <= split_threshold:
        return False, triton.next_power_of_2(n), 1
    block = min(SPLIT_BLOCK, triton.next_power_of_2(split_threshold))
    return True, block, triton.cdiv(n, block)


def _dummy(x: torch.Tensor) -> torch.Tensor:
    return x  # never read: the matching constexpr flag prunes the load


def _row_stats(x: torch.Tensor, xd: Optional[torch.Tensor], eps: float, block: int, chunks: int):
    """Split path: mean, rstd (and mean ẋ, mean(x̂·ẋ_c)) per row from chunk moments (Chan et al.)."""
    r, n = x.shape
    p = torch.empty((r, chunks, 4), device=x.device, dtype=torch.float32)
    _chunk_stats_kernel[(r, chunks)](x, xd if xd is not None else _dummy(x), p, n, chunks,
                                     BLOCK_N=block, HAS_XD=xd is not None,
                                     num_warps=_warps_for(block))
    cnt = torch.full((chunks,), float(block), device=x.device, dtype=torch.float32)
    cnt[-1] = n - block * (chunks - 1)
    mean = p[:, :, 0].sum(1) / n  # about the pivot x[:, 0] until the end
    mu_c = p[:, :, 0] / cnt
    m2 = p[:, :, 1].sum(1) + (cnt * (mu_c - mean[:, None]).square()).sum(1)
    rstd = torch.rsqrt(m2 / n + eps)
    co = None
    if xd is not None:
        mxd = p[:, :, 2].sum(1) / n
        nu_c = p[:, :, 2] / cnt
        co = p[:, :, 3].sum(1) + (cnt * (mu_c - mean[:, None]) * (nu_c - mxd[:, None])).sum(1)
    mean = x[:, 0].float() + mean
    if xd is None:
        return mean.contiguous(), rstd.contiguous(), None, None
    cxd = co / n * rstd  # mean(x̂·ẋ_c)
    return mean.contiguous(), rstd.contiguous(), mxd.contiguous(), cxd.contiguous()


def _check(x: torch.Tensor, shift: Optional[torch.Tensor], scale: Optional[torch.Tensor]) -> int:
    if x.dim() != 2 or not x.is_contiguous():
        raise ValueError(f"nsln_triton: x must be a contiguous [R, N] matrix, got {tuple(x.shape)}")
    if (shift is None) != (scale is None):
        raise ValueError("nsln_triton: shift and scale must be given together")
    if scale is None:
        return 1
    b = scale.shape[0]
    if scale.shape != (b, x.shape[1]) or shift.shape != scale.shape or b == 0 or x.shape[0] % b:
        raise ValueError(f"nsln_triton: shift/scale must be [B, N] with R divisible by B; x {tuple(x.shape)}, "
                         f"shift {tuple(shift.shape)}, scale {tuple(scale.shape)}")
    return b


def forward(x: torch.Tensor, bias: Optional[torch.Tensor], shift: Optional[torch.Tensor],
            scale: Optional[torch.Tensor], eps: float, *, save_stats: bool = True,
            split_threshold: int = DEFAULT_SPLIT_THRESHOLD):
    """y = x̂·(1 + scale) + shift + β over rows of x [R, N]; returns (y, mean [R], rstd [R]) (fp32 stats)."""
    b = _check(x, shift, scale)
    r, n = x.shape
    y = torch.empty_like(x)
    mean = torch.empty(r, device=x.device, dtype=torch.float32)
    rstd = torch.empty(r, device=x.device, dtype=torch.float32)
    if r == 0 or n == 0:
        return y, mean, rstd
    split, block, chunks = _plan(n, split_threshold)
    if split:
        mean, rstd, _, _ = _row_stats(x, None, eps, block, chunks)
    d = _dummy(x)
    args = (x, y, d, d, bias if bias is not None else d, d, shift if shift is not None else d,
            scale if scale is not None else d, d, d, mean, rstd, d, d, n, r // b, eps)
    _launch(_fwd_kernel, _FWD_TUNED, (r, chunks), *args, BLOCK_N=block, SPLIT=split, SAVE_STATS=save_stats,
            WRITE_Y=True, JVP=False, HAS_BIAS=bias is not None, HAS_MOD=scale is not None, HAS_XD=False,
            HAS_BIASD=False, HAS_SHIFTD=False, HAS_SCALED=False)
    return y, mean, rstd


def jvp(x: torch.Tensor, xd: Optional[torch.Tensor], bias: Optional[torch.Tensor], biasd: Optional[torch.Tensor],
        shift: Optional[torch.Tensor], scale: Optional[torch.Tensor], shiftd: Optional[torch.Tensor],
        scaled: Optional[torch.Tensor], eps: float, *, with_primal: bool = True,
        split_threshold: int = DEFAULT_SPLIT_THRESHOLD) -> Tuple[Optional[torch.Tensor], torch.Tensor]:
    """Primal (if ``with_primal``) and tangent in one kernel; ``None`` tangents are zero."""
    b = _check(x, shift, scale)
    if (shiftd is not None or scaled is not None) and scale is None:
        raise ValueError("nsln_triton.jvp: shift/scale tangents given without shift/scale")
    r, n = x.shape
    y = torch.empty_like(x) if with_primal else None
    yd = torch.empty_like(x)
    if r == 0 or n == 0:
        return y, yd
    split, block, chunks = _plan(n, split_threshold)
    mean = rstd = mxd = cxd = None
    if split:
        mean, rstd, mxd, cxd = _row_stats(x, xd, eps, block, chunks)
    d = _dummy(x)
    opt = lambda t: t if t is not None else d  # noqa: E731
    args = (x, opt(y), opt(xd), yd, opt(bias), opt(biasd), opt(shift), opt(scale), opt(shiftd), opt(scaled),
            opt(mean), opt(rstd), opt(mxd), opt(cxd), n, r // b, eps)
    _launch(_fwd_kernel, _FWD_TUNED, (r, chunks), *args, BLOCK_N=block, SPLIT=split, SAVE_STATS=False,
            WRITE_Y=with_primal, JVP=True, HAS_BIAS=bias is not None, HAS_MOD=scale is not None,
            HAS_XD=xd is not None, HAS_BIASD=biasd is not None, HAS_SHIFTD=shiftd is not None,
            HAS_SCALED=scaled is not None)
    return y, yd


def backward(dy: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
             scale: Optional[torch.Tensor], *, num_samples: int = 1, need_dx: bool = True,
             need_dbias: bool = False, need_dshift: bool = False, need_dscale: bool = False,
             split_threshold: int = DEFAULT_SPLIT_THRESHOLD):
    """(dx, dbias [N] fp32, dshift [B, N] fp32, dscale [B, N] fp32); the unrequested ones are None.

    ``num_samples`` is B (rows per sample T = R / B); it must equal scale.shape[0] when scale is given.
    """
    r, n = x.shape
    b = scale.shape[0] if scale is not None else num_samples
    if dy.shape != x.shape or r % max(b, 1):
        raise ValueError(f"nsln_triton.backward: dy {tuple(dy.shape)} / x {tuple(x.shape)} / B={b} mismatch")
    t = r // b if b else 0
    dx = torch.empty_like(x) if need_dx else None
    need_pdy = need_dbias or need_dshift
    if r == 0 or n == 0:
        z = lambda *s: torch.zeros(*s, device=x.device, dtype=torch.float32)  # noqa: E731
        return dx, z(n) if need_dbias else None, z(b, n) if need_dshift else None, z(b, n) if need_dscale else None
    split, block, chunks = _plan(n, split_threshold)
    mg = mgx = None
    if split and need_dx:
        p = torch.empty((r, chunks, 2), device=x.device, dtype=torch.float32)
        _bwd_chunk_stats_kernel[(r, chunks)](x, dy, scale if scale is not None else x, mean, rstd, p, n, t, chunks,
                                             BLOCK_N=block, HAS_MOD=scale is not None,
                                             num_warps=_warps_for(block))
        mg, mgx = (p.sum(1) / n).unbind(1)
        mg, mgx = mg.contiguous(), mgx.contiguous()
    # groups per sample: enough programs to fill the GPU, but long enough row runs to amortise partials
    target = 4 * _num_sms(x.device)
    s = max(1, min(t, triton.cdiv(target, max(1, b * chunks))))
    rpg = triton.cdiv(t, s)
    s = triton.cdiv(t, rpg)
    pdy = torch.empty((b * s, n), device=x.device, dtype=torch.float32) if need_pdy else None
    pdyx = torch.empty((b * s, n), device=x.device, dtype=torch.float32) if need_dscale else None
    d = _dummy(x)
    opt = lambda v: v if v is not None else d  # noqa: E731
    args = (x, dy, opt(dx), opt(scale), mean, rstd, opt(mg), opt(mgx), opt(pdy), opt(pdyx), n, t, rpg, s)
    _launch(_bwd_kernel, _BWD_TUNED, (chunks, b * s), *args, BLOCK_N=block, SPLIT=split,
            HAS_MOD=scale is not None, NEED_DX=need_dx, NEED_PDY=need_pdy, NEED_PDYX=need_dscale)
    dshift = pdy.view(b, s, n).sum(1) if need_dshift else None
    dbias = None
    if need_dbias:
        dbias = dshift.sum(0) if dshift is not None else pdy.sum(0)
    dscale = pdyx.view(b, s, n).sum(1) if need_dscale else None
    return dx, dbias, dshift, dscale
