"""Sinkhorn OT assignment: the pipeline every backend shares and its dispatch (SPEC §4).

    C [P, n, n] -> row/column reduction and scaling (:func:`reduce_and_scale`) -> log-domain Sinkhorn over an
    ε-scaling schedule (:func:`eps_schedule`) -> rounding of C − f − g to a permutation -> 2-opt polish

:func:`sinkhorn_assignment` resolves ``backend`` (auto | reference | triton | cuda) through the one kernel
registry (:mod:`lct_fast.ops.dispatch`, op ``sinkhorn_assignment``; the inner loop alone is op
``sinkhorn_log``). The reference is registered here; the Triton and CUDA kernels (``sinkhorn_triton``,
``sinkhorn_cuda``) import this module and are registered by :mod:`lct_fast.ops.sinkhorn_fused`, so imports run
one way.

Cost scale. Subtracting a per-row or per-column constant from C does not change which permutation is
optimal, so the pipeline first row/column-reduces C (Hungarian-style) and measures ε relative to the *mean of
the reduced cost*. For high-dimensional Gaussian batches mean(C) ≈ 2D while the entries only differ by
O(√D); an ε relative to the raw mean(C) would make the plan nearly uniform, whereas relative to the reduced
cost it tracks the spread that actually decides the assignment.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from . import dispatch
from .sinkhorn_pytorch import round_to_permutation, sinkhorn_log, two_opt

__all__ = ["SinkhornFn", "eps_schedule", "reduce_and_scale", "check_schedule", "schedule_tensor",
           "run_assignment", "round_and_two_opt", "sinkhorn_assignment", "get_sinkhorn_backend",
           "FUSED_MAX_N", "auto_for_size"]

# Signature of a Sinkhorn inner loop: (C [P,n,n] fp32, eps_schedule, iters) -> (f [P,n], g [P,n]).
SinkhornFn = Callable[[torch.Tensor, Sequence[float], int], tuple[torch.Tensor, torch.Tensor]]


_SCHED_CACHE: dict = {}


def check_schedule(who: str, eps_schedule, iters, tol: float = 0.0) -> list:
    """Validate a Sinkhorn backend's (ε schedule, iteration budget, tolerance) and return the schedule."""
    sched = list(eps_schedule)
    if iters is not None and iters != len(sched):
        raise ValueError(f"{who}: sinkhorn got iters={iters} but an ε schedule of length {len(sched)}")
    if not sched or min(sched) <= 0:
        raise ValueError(f"{who}: ε schedule must be non-empty and positive, got {sched[:4]}...")
    if tol < 0:
        raise ValueError(f"{who}: tol must be >= 0, got {tol}")
    return sched


def schedule_tensor(sched, device: torch.device) -> torch.Tensor:
    """ε schedule as a device fp32 vector, cached so that a training step does no host→device copy
    (shared by the Triton and CUDA Sinkhorn backends)."""
    key = (str(device), tuple(float(e) for e in sched))
    t = _SCHED_CACHE.get(key)
    if t is None:
        if len(_SCHED_CACHE) > 64:
            _SCHED_CACHE.clear()
        t = _SCHED_CACHE[key] = torch.tensor(key[1], dtype=torch.float32, device=device)
    return t


def eps_schedule(eps: float, iters: int, *, eps_start: float = 1.0, stages: int | None = None) -> list[float]:
    """ε-scaling schedule: ``iters`` values decreasing geometrically from ``eps_start`` to ``eps``.

    Values are relative to the cost scale (see module docstring). The first ~75% of the budget anneals ε,
    the rest iterates at the final ε. ``stages`` caps how many distinct ε values are used (default: one
    per annealing iteration), each held for an equal share of the annealing iterations.
    """
    if eps <= 0 or eps_start <= 0:
        raise ValueError(f"ot: sinkhorn eps must be > 0, got eps={eps}, eps_start={eps_start}")
    if iters < 1:
        raise ValueError(f"ot: sinkhorn iters must be >= 1, got {iters}")
    eps_start = max(eps_start, eps)
    anneal = max(1, int(round(0.75 * iters))) if iters > 1 else 1
    k = anneal if stages is None else max(1, min(stages, anneal))
    ratio = eps / eps_start
    levels = [eps_start * ratio ** (s / max(k - 1, 1)) for s in range(k)] if k > 1 else [eps]
    out = [levels[min(i * k // anneal, k - 1)] for i in range(anneal)]
    return out + [eps] * (iters - anneal)


def reduce_and_scale(C: torch.Tensor) -> torch.Tensor:
    """Row- then column-reduce C (optimal permutation unchanged) and divide by the mean reduced cost."""
    R = C - C.amin(dim=2, keepdim=True)
    R = R - R.amin(dim=1, keepdim=True)
    scale = R.mean(dim=(1, 2), keepdim=True).clamp_min(torch.finfo(R.dtype).tiny)
    return R / scale


def round_and_two_opt(Cn: torch.Tensor, f: torch.Tensor, g: torch.Tensor, refine_rounds: int) -> torch.Tensor:
    """The reference finish: round the reduced costs C − f − g to a permutation, then 2-opt on C."""
    perm = round_to_permutation(Cn - f.unsqueeze(2) - g.unsqueeze(1))
    return two_opt(Cn, perm, refine_rounds) if refine_rounds > 0 else perm


def run_assignment(C: torch.Tensor, who: str, sinkhorn: SinkhornFn,
                   finish: Callable[..., torch.Tensor], *,
                   eps: float, iters: int, eps_start: float, refine_rounds: int) -> torch.Tensor:
    """The assignment pipeline every backend shares: C [P, n, n] or [n, n] → row/column-min reduction and
    scaling → ``sinkhorn(Cn, ε schedule, iters)`` → ``finish(Cn, f, g, refine_rounds=…)`` (rounding to a
    permutation + 2-opt) → LongTensor [P, n] (or [n])."""
    squeeze = C.dim() == 2
    if squeeze:
        C = C.unsqueeze(0)
    if C.dim() != 3 or C.shape[1] != C.shape[2]:
        raise ValueError(f"{who} expects C of shape [P, n, n] or [n, n], got {tuple(C.shape)}")
    Cn = reduce_and_scale(C.float()).contiguous()
    f, g = sinkhorn(Cn, eps_schedule(eps, iters, eps_start=eps_start), iters)
    perm = finish(Cn, f, g, refine_rounds=refine_rounds)
    return perm[0] if squeeze else perm


def _reference_assignment(C: torch.Tensor, *, eps: float, iters: int, eps_start: float = 1.0,
                          refine_rounds: int = 8) -> torch.Tensor:
    return run_assignment(C, "ot: sinkhorn_assignment", sinkhorn_log, round_and_two_opt, eps=eps, iters=iters,
                          eps_start=eps_start, refine_rounds=refine_rounds)


# ``auto`` for the Sinkhorn ops follows measured speed, not the ops' shared cuda > triton order. Each fused
# kernel runs a problem in one program (one SM, the whole loop on the device). On an H200 (bench_ot.py,
# D 4096, ms at n = 128 / 256 / 512 / 1024 / 2048; benchmarks/results/gpu-h200-20261204.md):
#   reference  21.6 / 21.2 / 21.0 / 21.5 / 22.5   (launch- and sync-bound)
#   triton      1.6 /  4.4 / 15.8 / 66.5 /  245
#   cuda        1.8 /  7.3 / 28.4 /  112 /  422
# so auto takes triton up to n = 512, cuda (when triton cannot run) up to 256, and the reference above: the
# global coupling's W·B is the large case. An explicit backend is used as asked.
FUSED_MAX_N = {"triton": 512, "cuda": 256}


def auto_for_size(op: str, backend: str, n: int | None, *tensors) -> str:
    """What ``backend`` means for ``op`` on a problem of size ``n`` (unknown: as small as can be): ``auto``, when
    the module default is auto too, becomes the fastest backend that can run ``tensors`` (see FUSED_MAX_N)."""
    if backend != "auto" or dispatch.get_default_backend() != "auto":
        return backend
    for name in ("triton", "cuda"):
        if (n is None or n <= FUSED_MAX_N[name]) and dispatch.explain_backend(op, name, *tensors)[0] == name:
            return name
    return "reference"


def sinkhorn_assignment(C: torch.Tensor, *, eps: float = 0.05, iters: int = 100, backend: str = "auto",
                        eps_start: float = 1.0, refine_rounds: int = 8) -> torch.Tensor:
    """Near-optimal permutations for a batch of square costs C [P, n, n] (or [n, n]) via Sinkhorn.

    Reduce and scale C, run the ε-scaled log-domain Sinkhorn (``iters`` iterations ending at ``eps``), round
    the reduced costs C − f − g to a permutation with the mutual-best greedy and polish with
    ``refine_rounds`` of 2-opt on the true cost, on the backend the dispatcher picks for C. Returns
    LongTensor [P, n] (or [n]). ``auto`` picks by size (FUSED_MAX_N)."""
    fn = dispatch.dispatch("sinkhorn_assignment", auto_for_size("sinkhorn_assignment", backend, C.shape[-1], C),
                           (C,))
    return fn(C, eps=eps, iters=iters, eps_start=eps_start, refine_rounds=refine_rounds)


class _DeviceProbe:
    """Stands in for a cost tensor on ``device`` when only the device is known (the availability checks read
    ``is_cuda``; nothing is allocated, so a CUDA device can be asked about on a machine without one)."""

    def __init__(self, device: torch.device | str | None) -> None:
        self.device = torch.device(device if device is not None else "cpu")
        self.is_cuda = self.device.type == "cuda"


def get_sinkhorn_backend(backend: str = "auto", device: torch.device | str | None = None, n: int | None = None
                         ) -> tuple[str, SinkhornFn]:
    """(name, inner loop) that ``backend`` resolves to for tensors on ``device`` (same rules as every op:
    auto = the fastest kernel that can run at size ``n`` (FUSED_MAX_N), else the reference; an unavailable
    explicit choice falls back to the reference with a warning)."""
    probe = _DeviceProbe(device)
    name = dispatch.chosen_backend("sinkhorn_log", auto_for_size("sinkhorn_log", backend, n, probe), probe)
    return name, dispatch.implementation("sinkhorn_log", name)


dispatch.register_backend("sinkhorn_log", "reference", sinkhorn_log)
dispatch.register_backend("sinkhorn_assignment", "reference", _reference_assignment)
