"""CUDA C++ backend of the GPU Sinkhorn OT coupling (SPEC §4): Python side of csrc/sinkhorn*.

The extension ``lct_fast._C`` (built by setup.py only with a CUDA torch) registers two ops:

``torch.ops.lct_fast.sinkhorn_cuda(C, sched, tol, eps_final) -> (f, g)``
    log-domain Sinkhorn on [P, n, n] fp32 costs, one thread block per problem, the ε schedule read from a
    device vector, fixed iteration budget with optional device-side early stop (``tol``; 0 = full budget).
``torch.ops.lct_fast.sinkhorn_round_cuda(C, f, g, max_rounds, refine_rounds) -> perm``
    mutual-best greedy rounding of C − f − g to a permutation plus parallel 2-opt, both with device-side
    termination (same algorithms and tie rules as :func:`lct_fast.ops.sinkhorn_pytorch.round_to_permutation` / ``two_opt``).

This module wraps them with the signatures of :func:`lct_fast.ops.sinkhorn_pytorch.sinkhorn_log` and of
the whole :func:`lct_fast.ops.sinkhorn_ops.sinkhorn_assignment` pipeline; :mod:`lct_fast.ops` registers them as
backend ``cuda`` (importing this module never builds or loads anything until a CUDA tensor needs it). The whole
pipeline issues a fixed number of launches and performs no host synchronisation.
"""
from __future__ import annotations

import functools
from typing import Sequence

import torch

from . import sinkhorn_ops as _pipe
from .dispatch import load_extension_ops

__all__ = ["cuda_ops_loaded", "available", "sinkhorn_log_cuda", "round_and_refine_cuda",
           "sinkhorn_assignment_cuda"]

def _sinkhorn_fake(C: torch.Tensor, sched: torch.Tensor, tol: float, eps_final: float):
    P, n = C.shape[0], C.shape[1]
    return C.new_empty((P, n), dtype=torch.float32), C.new_empty((P, n), dtype=torch.float32)


def _round_fake(C: torch.Tensor, f: torch.Tensor, g: torch.Tensor, max_rounds: int, refine_rounds: int):
    return C.new_empty((C.shape[0], C.shape[1]), dtype=torch.long)


def cuda_ops_loaded() -> tuple[bool, str]:
    """Import ``lct_fast._C`` once; (True, "") when it registered the Sinkhorn ops (fakes are added then)."""
    return load_extension_ops({"sinkhorn_cuda": _sinkhorn_fake, "sinkhorn_round_cuda": _round_fake})


def available(device: torch.device | str | None = None) -> bool:
    """True when ``device`` is CUDA, a CUDA device exists and the extension's Sinkhorn ops are loaded."""
    if device is None or torch.device(device).type != "cuda" or not torch.cuda.is_available():
        return False
    return cuda_ops_loaded()[0]


def _require(C: torch.Tensor, who: str) -> None:
    if C.dim() != 3 or C.shape[1] != C.shape[2]:
        raise ValueError(f"sinkhorn_cuda: {who} expects C of shape [P, n, n], got {tuple(C.shape)}")
    if not C.is_cuda:
        raise ValueError(f"sinkhorn_cuda: {who} needs a CUDA tensor, got device {C.device}")
    ok, why = cuda_ops_loaded()
    if not ok:
        raise RuntimeError(f"sinkhorn_cuda: {who}: CUDA Sinkhorn backend requested but {why}")

def sinkhorn_log_cuda(C: torch.Tensor, eps_schedule: Sequence[float], iters: int | None = None, *,
                      tol: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """CUDA replacement of :func:`lct_fast.ops.sinkhorn_pytorch.sinkhorn_log` (same signature and result up to fp32 rounding).

    ``C`` [P, n, n] (scaled so the ε values are absolute) -> (f [P, n], g [P, n]) fp32. ``tol`` (relative to ε)
    lets the kernel stop at the final ε once max|Δf| ≤ tol·ε; 0 keeps the fixed budget.
    """
    _require(C, "sinkhorn_log_cuda")
    sched = _pipe.check_schedule("sinkhorn_cuda", eps_schedule, iters, tol)
    return torch.ops.lct_fast.sinkhorn_cuda(C.float().contiguous(), _pipe.schedule_tensor(sched, C.device),
                                            float(tol), float(sched[-1]))


def round_and_refine_cuda(C: torch.Tensor, f: torch.Tensor | None = None, g: torch.Tensor | None = None, *,
                          max_rounds: int | None = None, refine_rounds: int = 8) -> torch.Tensor:
    """Permutations [P, n] (int64) from R = C − f − g (mutual-best greedy) polished by ``refine_rounds`` 2-opt."""
    _require(C, "round_and_refine_cuda")
    P, n, _ = C.shape
    f = torch.zeros(P, n, device=C.device) if f is None else f
    g = torch.zeros(P, n, device=C.device) if g is None else g
    return torch.ops.lct_fast.sinkhorn_round_cuda(C.float().contiguous(), f, g,
                                                  n if max_rounds is None else int(max_rounds), int(refine_rounds))


def sinkhorn_assignment_cuda(C: torch.Tensor, *, eps: float = 0.05, iters: int = 100, eps_start: float = 1.0,
                             refine_rounds: int = 8, tol: float = 0.0, max_rounds: int | None = None
                             ) -> torch.Tensor:
    """The whole :func:`lct_fast.ops.sinkhorn_ops.sinkhorn_assignment` pipeline on the CUDA kernels, no host sync.

    ``C`` [P, n, n] or [n, n]. Returns LongTensor [P, n] (or [n]).
    """
    return _pipe.run_assignment(C, "sinkhorn_cuda: sinkhorn_assignment_cuda", functools.partial(sinkhorn_log_cuda, tol=tol),
                              functools.partial(round_and_refine_cuda, max_rounds=max_rounds),
                              eps=eps, iters=iters, eps_start=eps_start, refine_rounds=refine_rounds)
