"""Triton kernels for the GPU Sinkhorn OT coupling (SPEC §4).

Three persistent kernels, one Triton program per independent problem (grid ``(P,)``), each running its whole
loop on the device with device-side termination, so the pipeline

    cost (one fp32 bmm, torch) -> reduce & scale (torch) -> Sinkhorn -> rounding -> 2-opt

issues a fixed, small number of launches and never synchronises with the host:

``_sinkhorn_kernel``   log-domain Sinkhorn with an ε schedule read from a device array. Each iteration is the
                       fused row update f_i = ε·log a − ε·LSE_j((g_j − C_ij)/ε) (online max/sum over column
                       tiles, base-2 exponentials) followed by the column update
                       g_j = ε·log b − ε·LSE_i((f_i − C_ij)/ε) over the same row-major tiles (coalesced loads,
                       no transposed copy). The loop stops early on the device once the row potentials stop
                       changing at the final ε (``max|Δf| ≤ tol·ε``; with ``tol = 0`` only at an exact fixed
                       point, so the result equals the full fixed budget bit for bit).
``_round_kernel``      mutual-best greedy rounding of the reduced cost R = C − f − g to a permutation: each
                       round every free row picks its cheapest free column and every free column its cheapest
                       free row; mutual pairs are fixed. Rounds stop on the device when no row is free or after
                       ``max_rounds``; leftovers are paired k-th free row with k-th free column. Same algorithm
                       and tie rules (first index) as :func:`lct_fast.ops.sinkhorn_pytorch.round_to_permutation`.
``_two_opt_kernel``    parallel 2-opt polish: every row picks its best swap partner, mutually chosen pairs with
                       a positive gain swap at once; stops when a round swaps nothing. Same as
                       :func:`lct_fast.ops.sinkhorn_pytorch.two_opt`.

Cross-thread communication inside a program goes through small global scratch vectors separated by
``tl.debug_barrier()`` (a CTA barrier: stores before it are visible to the whole program after it).

Kernels are created when this module is imported: on a machine without a GPU set ``TRITON_INTERPRET=1``
before importing it (tests/conftest.py does). :mod:`lct_fast.ops` registers it as backend ``triton`` of the
``sinkhorn_log`` / ``sinkhorn_assignment`` ops and imports it lazily, on first use with CUDA tensors.
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import torch
import triton
import triton.language as tl

from . import sinkhorn_ops as _pipe
from .dispatch import interpreting
from .sinkhorn_pytorch import sinkhorn_log

__all__ = [
    "sinkhorn_log_triton",
    "round_to_permutation_triton",
    "two_opt_triton",
    "sinkhorn_assignment_triton",
    "interpreting",
]

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453


# ------------------------------------------------------------------------------------------ kernels
@triton.jit
def _sinkhorn_kernel(C, F, G, SCHED, n, iters, log_w, tol, eps_final,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Log-domain Sinkhorn for problem ``program_id(0)``; f and g (zero-initialised) are updated in place."""
    pid = tl.program_id(0)
    Cp = C + pid.to(tl.int64) * n * n
    Fp = F + pid * n
    Gp = G + pid * n
    rm = tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    it = n * 0
    done = n * 0
    while (it < iters) & (done == 0):
        eps = tl.load(SCHED + it)
        k = 1.4426950408889634 / eps          # work in base 2: exp(x/ε) = exp2(x·log2(e)/ε)
        back = eps * 0.6931471805599453       # ε·ln 2 converts a base-2 LSE back
        delta = eps * 0.0
        # Row update f_i = ε log a − ε LSE_j((g_j − C_ij)/ε): online max/sum over column tiles.
        for r0 in range(0, n, BLOCK_M):
            rows = r0 + rm
            rmask = rows < n
            m = tl.full([BLOCK_M], -1.0e30, tl.float32)
            s = tl.zeros([BLOCK_M], tl.float32)
            for c0 in range(0, n, BLOCK_N):
                cols = c0 + rn
                cmask = cols < n
                gj = tl.load(Gp + cols, mask=cmask, other=0.0)
                c = tl.load(Cp + rows[:, None] * n + cols[None, :], mask=rmask[:, None] & cmask[None, :],
                            other=0.0)
                v = tl.where(cmask[None, :], (gj[None, :] - c) * k, float("-inf"))
                m_new = tl.maximum(m, tl.max(v, axis=1))
                s = s * tl.exp2(m - m_new) + tl.sum(tl.exp2(v - m_new[:, None]), axis=1)
                m = m_new
            f_new = eps * log_w - back * (m + tl.log2(s))
            f_old = tl.load(Fp + rows, mask=rmask, other=0.0)
            delta = tl.maximum(delta, tl.max(tl.where(rmask, tl.abs(f_new - f_old), 0.0), axis=0))
            tl.store(Fp + rows, f_new, mask=rmask)
        tl.debug_barrier()
        # Column update g_j = ε log b − ε LSE_i((f_i − C_ij)/ε) on the same row-major tiles, reduced over rows.
        for c0 in range(0, n, BLOCK_N):
            cols = c0 + rn
            cmask = cols < n
            m = tl.full([BLOCK_N], -1.0e30, tl.float32)
            s = tl.zeros([BLOCK_N], tl.float32)
            for r0 in range(0, n, BLOCK_M):
                rows = r0 + rm
                rmask = rows < n
                fi = tl.load(Fp + rows, mask=rmask, other=0.0)
                c = tl.load(Cp + rows[:, None] * n + cols[None, :], mask=rmask[:, None] & cmask[None, :],
                            other=0.0)
                v = tl.where(rmask[:, None], (fi[:, None] - c) * k, float("-inf"))
                m_new = tl.maximum(m, tl.max(v, axis=0))
                s = s * tl.exp2(m - m_new) + tl.sum(tl.exp2(v - m_new[None, :]), axis=0)
                m = m_new
            tl.store(Gp + cols, eps * log_w - back * (m + tl.log2(s)), mask=cmask)
        tl.debug_barrier()
        # Device-side convergence: only at the final ε, once f no longer moves.
        done = ((eps <= eps_final) & (delta <= tol * eps)).to(tl.int32)
        it += 1


@triton.jit
def _round_kernel(C, F, G, PERM, TAKEN, BESTC, BESTR, FREER, FREEC, n, max_rounds,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Mutual-best greedy rounding of R = C − f − g for problem ``program_id(0)``.

    PERM (int32, −1 = free) and TAKEN (int32, 0 = free column) come initialised from the host; BESTC/BESTR/
    FREER/FREEC are scratch of size n per problem.
    """
    pid = tl.program_id(0)
    Cp = C + pid.to(tl.int64) * n * n
    Fp = F + pid * n
    Gp = G + pid * n
    Pp = PERM + pid * n
    Tp = TAKEN + pid * n
    BCp = BESTC + pid * n
    BRp = BESTR + pid * n
    rm = tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    big = n + BLOCK_M + BLOCK_N
    rnd = n * 0
    nfree = n + 0
    while (rnd < max_rounds) & (nfree > 0):
        # Each free row: cheapest free column (first index on ties).
        for r0 in range(0, n, BLOCK_M):
            rows = r0 + rm
            rmask = rows < n
            rfree = (tl.load(Pp + rows, mask=rmask, other=0) < 0) & rmask
            fr = tl.load(Fp + rows, mask=rmask, other=0.0)
            best = tl.full([BLOCK_M], float("inf"), tl.float32)
            bidx = tl.full([BLOCK_M], -1, tl.int32)
            for c0 in range(0, n, BLOCK_N):
                cols = c0 + rn
                cmask = cols < n
                cfree = (tl.load(Tp + cols, mask=cmask, other=1) == 0) & cmask
                gc = tl.load(Gp + cols, mask=cmask, other=0.0)
                c = tl.load(Cp + rows[:, None] * n + cols[None, :], mask=rmask[:, None] & cmask[None, :],
                            other=0.0)
                r = tl.where(rfree[:, None] & cfree[None, :], c - fr[:, None] - gc[None, :], float("inf"))
                tmin = tl.min(r, axis=1)
                tidx = tl.min(tl.where(r == tmin[:, None], cols[None, :], big), axis=1)
                upd = tmin < best
                bidx = tl.where(upd, tidx, bidx)
                best = tl.where(upd, tmin, best)
            tl.store(BCp + rows, bidx, mask=rmask)
        # Each free column: cheapest free row.
        for c0 in range(0, n, BLOCK_N):
            cols = c0 + rn
            cmask = cols < n
            cfree = (tl.load(Tp + cols, mask=cmask, other=1) == 0) & cmask
            gc = tl.load(Gp + cols, mask=cmask, other=0.0)
            best = tl.full([BLOCK_N], float("inf"), tl.float32)
            bidx = tl.full([BLOCK_N], -1, tl.int32)
            for r0 in range(0, n, BLOCK_M):
                rows = r0 + rm
                rmask = rows < n
                rfree = (tl.load(Pp + rows, mask=rmask, other=0) < 0) & rmask
                fr = tl.load(Fp + rows, mask=rmask, other=0.0)
                c = tl.load(Cp + rows[:, None] * n + cols[None, :], mask=rmask[:, None] & cmask[None, :],
                            other=0.0)
                r = tl.where(rfree[:, None] & cfree[None, :], c - fr[:, None] - gc[None, :], float("inf"))
                tmin = tl.min(r, axis=0)
                tidx = tl.min(tl.where(r == tmin[None, :], rows[:, None], big), axis=0)
                upd = tmin < best
                bidx = tl.where(upd, tidx, bidx)
                best = tl.where(upd, tmin, best)
            tl.store(BRp + cols, bidx, mask=cmask)
        tl.debug_barrier()
        # Fix mutually-best pairs (disjoint by construction, so the scatter into TAKEN has no duplicates).
        cnt = n * 0
        for r0 in range(0, n, BLOCK_M):
            rows = r0 + rm
            rmask = rows < n
            rfree = (tl.load(Pp + rows, mask=rmask, other=0) < 0) & rmask
            bc = tl.load(BCp + rows, mask=rmask, other=-1)
            valid = rfree & (bc >= 0)
            back = tl.load(BRp + bc, mask=valid, other=-1)
            mutual = valid & (back == rows)
            tl.store(Pp + rows, bc, mask=mutual)
            tl.store(Tp + bc, tl.full([BLOCK_M], 1, tl.int32), mask=mutual)
            cnt += tl.sum((rfree & (mutual == 0)).to(tl.int32), axis=0)
        tl.debug_barrier()
        nfree = cnt
        rnd += 1
    # Completion after the round budget: k-th free row (ascending) gets the k-th free column (ascending).
    FRp = FREER + pid * n
    FCp = FREEC + pid * n
    off = n * 0
    for r0 in range(0, n, BLOCK_M):
        rows = r0 + rm
        rmask = rows < n
        rfree = ((tl.load(Pp + rows, mask=rmask, other=0) < 0) & rmask).to(tl.int32)
        rank = tl.cumsum(rfree, axis=0) - 1 + off
        tl.store(FRp + rank, rows, mask=rfree != 0)
        off += tl.sum(rfree, axis=0)
    off = n * 0
    for c0 in range(0, n, BLOCK_M):
        cols = c0 + rm
        cmask = cols < n
        cfree = ((tl.load(Tp + cols, mask=cmask, other=1) == 0) & cmask).to(tl.int32)
        rank = tl.cumsum(cfree, axis=0) - 1 + off
        tl.store(FCp + rank, cols, mask=cfree != 0)
        off += tl.sum(cfree, axis=0)
    tl.debug_barrier()
    for k0 in range(0, n, BLOCK_M):
        ks = k0 + rm
        kmask = ks < off
        fr_idx = tl.load(FRp + ks, mask=kmask, other=0)
        fc_idx = tl.load(FCp + ks, mask=kmask, other=0)
        tl.store(Pp + fr_idx, fc_idx, mask=kmask)


@triton.jit
def _two_opt_kernel(C, PERM, D, PARTNER, GAIN, NEWP, n, rounds,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Parallel 2-opt on PERM (int32, in place) for problem ``program_id(0)``; D/PARTNER/GAIN/NEWP scratch."""
    pid = tl.program_id(0)
    Cp = C + pid.to(tl.int64) * n * n
    Pp = PERM + pid * n
    Dp = D + pid * n
    Qp = PARTNER + pid * n
    Wp = GAIN + pid * n
    Np = NEWP + pid * n
    rm = tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    big = n + BLOCK_M + BLOCK_N
    rnd = n * 0
    changed = n + 1
    while (rnd < rounds) & (changed > 0):
        for r0 in range(0, n, BLOCK_M):           # d_i = C[i, perm[i]]
            rows = r0 + rm
            rmask = rows < n
            pr = tl.load(Pp + rows, mask=rmask, other=0)
            tl.store(Dp + rows, tl.load(Cp + rows * n + pr, mask=rmask, other=0.0), mask=rmask)
        tl.debug_barrier()
        # gain(i, j) = (d_i + d_j − C[i, perm j]) − C[j, perm i]; best partner per row (first index on ties).
        for r0 in range(0, n, BLOCK_M):
            rows = r0 + rm
            rmask = rows < n
            pi = tl.load(Pp + rows, mask=rmask, other=0)
            di = tl.load(Dp + rows, mask=rmask, other=0.0)
            best = tl.full([BLOCK_M], float("-inf"), tl.float32)
            bidx = rows
            for c0 in range(0, n, BLOCK_N):
                cols = c0 + rn
                cmask = cols < n
                pj = tl.load(Pp + cols, mask=cmask, other=0)
                dj = tl.load(Dp + cols, mask=cmask, other=0.0)
                msk = rmask[:, None] & cmask[None, :]
                a_ij = tl.load(Cp + rows[:, None] * n + pj[None, :], mask=msk, other=0.0)
                a_ji = tl.load(Cp + cols[None, :] * n + pi[:, None], mask=msk, other=0.0)
                gain = tl.where(cmask[None, :], di[:, None] + dj[None, :] - a_ij - a_ji, float("-inf"))
                tmax = tl.max(gain, axis=1)
                tidx = tl.min(tl.where(gain == tmax[:, None], cols[None, :], big), axis=1)
                upd = tmax > best
                bidx = tl.where(upd, tidx, bidx)
                best = tl.where(upd, tmax, best)
            tl.store(Qp + rows, bidx, mask=rmask)
            tl.store(Wp + rows, best, mask=rmask)
        tl.debug_barrier()
        cnt = n * 0
        for r0 in range(0, n, BLOCK_M):           # apply the mutual, improving swaps into NEWP
            rows = r0 + rm
            rmask = rows < n
            q = tl.load(Qp + rows, mask=rmask, other=0)
            w = tl.load(Wp + rows, mask=rmask, other=0.0)
            qq = tl.load(Qp + q, mask=rmask, other=-1)
            swap = rmask & (w > 0) & (qq == rows) & (q != rows)
            own = tl.load(Pp + rows, mask=rmask, other=0)
            other = tl.load(Pp + q, mask=swap, other=0)
            tl.store(Np + rows, tl.where(swap, other, own), mask=rmask)
            cnt += tl.sum(swap.to(tl.int32), axis=0)
        tl.debug_barrier()
        for r0 in range(0, n, BLOCK_M):
            rows = r0 + rm
            rmask = rows < n
            tl.store(Pp + rows, tl.load(Np + rows, mask=rmask, other=0), mask=rmask)
        tl.debug_barrier()
        changed = cnt
        rnd += 1


# ----------------------------------------------------------------------------------------- launchers
def _blocks(n: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps). The interpreter pays per tile step, so it gets one big tile."""
    p2 = triton.next_power_of_2(max(n, 16))
    if interpreting():
        return min(p2, 256), min(p2, 256), 4
    return min(p2, 32), min(p2, 128), 4


def _check_square(C: torch.Tensor, who: str) -> None:
    if C.dim() != 3 or C.shape[1] != C.shape[2]:
        raise ValueError(f"sinkhorn_triton: {who} expects C of shape [P, n, n], got {tuple(C.shape)}")
    if not (C.is_cuda or interpreting()):
        raise ValueError(f"sinkhorn_triton: {who} needs a CUDA tensor (or TRITON_INTERPRET=1), got device {C.device}")

def sinkhorn_log_triton(C: torch.Tensor, eps_schedule: Sequence[float], iters: int | None = None, *,
                        tol: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton replacement of :func:`lct_fast.ops.sinkhorn_pytorch.sinkhorn_log` (same signature and result).

    ``C`` [P, n, n] fp32 (scaled so the ε values are absolute); returns (f [P, n], g [P, n]) fp32. ``tol``
    (relative to ε) lets the kernel stop early at the final ε once max|Δf| ≤ tol·ε; 0 keeps the fixed budget
    (it can still stop at an exact fixed point, which changes nothing).
    """
    _check_square(C, "sinkhorn_log_triton")
    sched = _pipe.check_schedule("sinkhorn_triton", eps_schedule, iters, tol)
    P, n, _ = C.shape
    C = C.contiguous().float()
    f = torch.zeros(P, n, device=C.device, dtype=torch.float32)
    g = torch.zeros(P, n, device=C.device, dtype=torch.float32)
    if n < 2 or P == 0:  # Triton specialises n == 1 to a constant; trivial problems take the reference
        return sinkhorn_log(C, sched, len(sched)) if n == 1 and P else (f, g)
    bm, bn, warps = _blocks(n)
    _sinkhorn_kernel[(P,)](C, f, g, _pipe.schedule_tensor(sched, C.device), n, len(sched), -math.log(n),
                           float(tol), float(sched[-1]), BLOCK_M=bm, BLOCK_N=bn, num_warps=warps)
    return f, g


def round_to_permutation_triton(C: torch.Tensor, f: torch.Tensor | None = None, g: torch.Tensor | None = None,
                                max_rounds: int | None = None) -> torch.Tensor:
    """Permutations [P, n] (int64) from the reduced cost R = C − f − g by mutual-best greedy rounding.

    Equals :func:`lct_fast.ops.sinkhorn_pytorch.round_to_permutation` applied to ``C - f[:, :, None] - g[:, None, :]`` whenever
    that function finishes within its budget (its budget counts in steps of 4 rounds). ``f``/``g`` default to 0.
    """
    _check_square(C, "round_to_permutation_triton")
    P, n, _ = C.shape
    C = C.contiguous().float()
    dev = C.device
    f = torch.zeros(P, n, device=dev) if f is None else f.contiguous().float()
    g = torch.zeros(P, n, device=dev) if g is None else g.contiguous().float()
    perm = torch.full((P, n), -1, dtype=torch.int32, device=dev)
    if n < 2 or P == 0:
        return perm.long().clamp_min_(0)  # n == 1: the only permutation
    taken = torch.zeros(P, n, dtype=torch.int32, device=dev)
    scratch = torch.empty(4, P, n, dtype=torch.int32, device=dev)
    bm, bn, warps = _blocks(n)
    _round_kernel[(P,)](C, f, g, perm, taken, scratch[0], scratch[1], scratch[2], scratch[3], n,
                        n if max_rounds is None else int(max_rounds), BLOCK_M=bm, BLOCK_N=bn, num_warps=warps)
    return perm.long()


def two_opt_triton(C: torch.Tensor, perm: torch.Tensor, rounds: int = 8) -> torch.Tensor:
    """Triton version of :func:`lct_fast.ops.sinkhorn_pytorch.two_opt` (returns a new int64 [P, n] tensor)."""
    _check_square(C, "two_opt_triton")
    P, n, _ = C.shape
    if perm.shape != (P, n):
        raise ValueError(f"sinkhorn_triton: two_opt perm must have shape {(P, n)}, got {tuple(perm.shape)}")
    out = perm.to(torch.int32).contiguous().clone()
    if n < 2 or rounds <= 0:
        return out.long()
    C = C.contiguous().float()
    dev = C.device
    d = torch.empty(P, n, device=dev, dtype=torch.float32)
    gain = torch.empty(P, n, device=dev, dtype=torch.float32)
    partner = torch.empty(P, n, device=dev, dtype=torch.int32)
    newp = torch.empty(P, n, device=dev, dtype=torch.int32)
    bm, bn, warps = _blocks(n)
    _two_opt_kernel[(P,)](C, out, d, partner, gain, newp, n, int(rounds), BLOCK_M=bm, BLOCK_N=bn,
                          num_warps=warps)
    return out.long()


def sinkhorn_assignment_triton(C: torch.Tensor, *, eps: float = 0.05, iters: int = 100, eps_start: float = 1.0,
                               refine_rounds: int = 8, tol: float = 0.0, max_rounds: int | None = None
                               ) -> torch.Tensor:
    """The whole :func:`lct_fast.ops.sinkhorn_ops.sinkhorn_assignment` pipeline with the three kernels, no host sync.

    ``C`` [P, n, n] or [n, n] (any float dtype; used in fp32). Returns LongTensor [P, n] (or [n]).
    """
    return _pipe.run_assignment(C, "sinkhorn_triton: sinkhorn_assignment_triton",
                              functools.partial(sinkhorn_log_triton, tol=tol),
                              functools.partial(_round_and_two_opt, max_rounds=max_rounds),
                              eps=eps, iters=iters, eps_start=eps_start, refine_rounds=refine_rounds)


def _round_and_two_opt(Cn: torch.Tensor, f: torch.Tensor, g: torch.Tensor, refine_rounds: int, *,
                       max_rounds: int | None) -> torch.Tensor:
    perm = round_to_permutation_triton(Cn, f, g, max_rounds)
    return two_opt_triton(Cn, perm, refine_rounds) if refine_rounds > 0 else perm
