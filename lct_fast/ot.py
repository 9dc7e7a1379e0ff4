"""Minibatch optimal-transport coupling of latents and noise (paper sec. 4.4, SPEC §2 and §4).

Before noising, each batch of latents ``x0`` is paired with a permutation of the noise batch ``z`` so that
the total squared distance sum_i ||x0_i - z_perm[i]||^2 is (near) minimal (Pooladian et al. 2023). The
one entry point other code calls is :func:`couple`, which returns ``perm`` such that ``z[perm]`` is the
noise paired with ``x0``.

Methods
-------
``none``       identity permutation (no coupling).
``exact``      POT's network simplex ``ot.emd`` on CPU in float64 (the reference the paper used).
``hungarian``  scipy's ``linear_sum_assignment`` on CPU in float64 (second, independent reference);
               ``exact_scipy`` is an alias.
``sinkhorn``   batched log-domain Sinkhorn in PyTorch on the tensors' device with an ε-scaling schedule and
               a fixed iteration budget (no host synchronisation inside the iterations), rounded to a valid
               permutation on-device (mutual-best greedy on the reduced costs) and polished by a few
               parallel 2-opt swap rounds.

Cost scale. Subtracting a per-row or per-column constant from C does not change which permutation is
optimal, so the Sinkhorn path first row/column-reduces C (Hungarian-style) and measures ε relative to the
*mean of the reduced cost*. For high-dimensional Gaussian batches mean(C) ≈ 2D while the entries only
differ by O(√D); an ε relative to the raw mean(C) would make the plan nearly uniform, whereas relative to
the reduced cost it tracks the spread that actually decides the assignment.

The inner loop :func:`sinkhorn_log` is looked up in a backend registry (:func:`register_sinkhorn_backend`)
so that a fused GPU kernel can replace it; ``backend="auto"`` picks a registered ``cuda``/``triton`` kernel
for CUDA tensors and the PyTorch reference otherwise.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

__all__ = [
    "METHODS",
    "BACKENDS",
    "CouplingResult",
    "cost_matrix",
    "transport_cost",
    "couple",
    "exact_assignment",
    "sinkhorn_log",
    "sinkhorn_assignment",
    "eps_schedule",
    "round_to_permutation",
    "two_opt",
    "register_sinkhorn_backend",
    "get_sinkhorn_backend",
    "run_assignment",
]

METHODS = ("none", "exact", "hungarian", "exact_scipy", "sinkhorn")
BACKENDS = ("auto", "reference", "triton", "cuda")

# Signature of a Sinkhorn inner loop: (C [P,n,n] fp32, eps_schedule, iters) -> (f [P,n], g [P,n]).
SinkhornFn = Callable[[torch.Tensor, Sequence[float], int], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class CouplingResult:
    """What :func:`couple` achieved. Costs are detached 0-dim float32 tensors on the input device.

    ``cost`` and ``identity_cost`` are mean squared distances per pair (see :func:`transport_cost`);
    ``ratio = cost / identity_cost`` (< 1 when the coupling shortens the paths).
    """

    perm: torch.Tensor
    cost: torch.Tensor
    identity_cost: torch.Tensor
    ratio: torch.Tensor
    method: str
    backend: str


# ------------------------------------------------------------------------------------------ costs
def _flatten(x: torch.Tensor, name: str) -> torch.Tensor:
    if x.dim() < 1:
        raise ValueError(f"ot: {name} must have a batch dimension, got a 0-dim tensor")
    return x.reshape(x.shape[0], -1)


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


def cost_matrix(x0: torch.Tensor, z: torch.Tensor, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Squared-distance cost C_jk = ||x_j||² + ||z_k||² − 2·x_j·z_k over flattened samples (SPEC §4).

    ``x0``, ``z``: [B, ...] -> C [B, B]. One matmul, computed in ``dtype`` (fp32 by default; the exact path
    uses float64); clamped at 0 because the expansion can go slightly negative by cancellation.
    """
    if x0.shape != z.shape:
        raise ValueError(f"ot: x0 and z must have the same shape, got {tuple(x0.shape)} and {tuple(z.shape)}")
    x = _flatten(x0, "x0").to(dtype)
    y = _flatten(z, "z").to(dtype)
    return _batched_cost(x.unsqueeze(0), y.unsqueeze(0))[0]


def _batched_cost(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """[P, n, D] x [P, n, D] -> [P, n, n] squared distances from one batched matmul."""
    xx = (x * x).sum(-1)
    yy = (y * y).sum(-1)
    c = xx.unsqueeze(-1) + yy.unsqueeze(-2) - 2.0 * torch.bmm(x, y.transpose(1, 2))
    return c.clamp_min_(0.0)


def transport_cost(x0: torch.Tensor, z: torch.Tensor, perm: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over pairs of ||x0_i − z_perm[i]||² (sum over dims), in fp32; ``perm=None`` = identity."""
    if x0.shape != z.shape:
        raise ValueError(f"ot: x0 and z must have the same shape, got {tuple(x0.shape)} and {tuple(z.shape)}")
    zz = z if perm is None else z[perm.to(z.device)]
    d = _flatten(x0, "x0").float() - _flatten(zz, "z").float()
    return (d * d).sum(-1).mean()


# ------------------------------------------------------------------------------------------ exact
def _import_pot():
    try:
        import ot as pot  # POT: Python Optimal Transport
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("ot: method='exact' needs POT (pip install pot); "
                          "use method='hungarian' (scipy) or 'sinkhorn' instead") from e
    return pot


def _import_lsa():
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("ot: method='hungarian' needs scipy (pip install scipy)") from e
    return linear_sum_assignment


def exact_assignment(cost, solver: str = "pot"):
    """Exact minimum-cost assignment of a square cost matrix (numpy float64 [n, n]) -> numpy int64 perm.

    ``solver="pot"``: network simplex (``ot.emd``) with uniform weights 1/n. Vertices of the Birkhoff
    polytope are permutation matrices, so the plan is a permutation matrix · 1/n; we read it with a row
    argmax and, should the solver return a split (degenerate, non-vertex) plan, extract the heaviest
    permutation inside it with a max-weight matching. ``solver="scipy"``: ``linear_sum_assignment``.
    """
    import numpy as np

    cost = np.ascontiguousarray(cost, dtype=np.float64)
    n = cost.shape[0]
    if cost.shape != (n, n):
        raise ValueError(f"ot: exact assignment needs a square cost matrix, got shape {cost.shape}")
    if solver == "scipy":
        rows, cols = _import_lsa()(cost)
        perm = np.empty(n, dtype=np.int64)
        perm[rows] = cols
        return perm
    if solver != "pot":
        raise ValueError(f"ot: unknown exact solver {solver!r}, expected 'pot' or 'scipy'")
    pot = _import_pot()
    w = np.full(n, 1.0 / n)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # POT warns (not raises) when it stops early
        try:
            plan = pot.emd(w, w, cost, numItermax=max(100_000, 50 * n * n))
        except UserWarning as e:
            raise RuntimeError(f"ot: POT emd did not converge on a {n}x{n} problem: {e}") from None
    perm = plan.argmax(axis=1).astype(np.int64)
    if len(np.unique(perm)) != n or not np.allclose(plan[np.arange(n), perm], 1.0 / n, rtol=1e-6, atol=1e-12):
        # Degenerate plan: the optimal set is a face, take the permutation carrying the most mass.
        rows, cols = _import_lsa()(-plan)
        perm = np.empty(n, dtype=np.int64)
        perm[rows] = cols
    return perm


# --------------------------------------------------------------------------------------- sinkhorn
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


def sinkhorn_log(C: torch.Tensor, eps_schedule: Sequence[float], iters: int | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference log-domain Sinkhorn for uniform marginals on a batch of problems.

    ``C``: [P, n, n] cost (fp32, already scaled so that ``eps_schedule`` values are absolute);
    ``eps_schedule``: one ε per iteration (``len == iters``); returns the dual potentials (f [P,n], g [P,n])
    with the entropic plan P_ij = exp((f_i + g_j − C_ij)/ε_last). Each iteration is the pair of
    soft-min updates f = ε·log a − ε·LSE_j((g_j − C_ij)/ε), g = ε·log b − ε·LSE_i((f_i − C_ij)/ε) with
    a = b = 1/n; potentials are carried across ε values (warm start). No host synchronisation.
    """
    if C.dim() != 3 or C.shape[1] != C.shape[2]:
        raise ValueError(f"ot: sinkhorn_log expects C of shape [P, n, n], got {tuple(C.shape)}")
    sched = list(eps_schedule)
    if iters is not None and iters != len(sched):
        raise ValueError(f"ot: sinkhorn_log got iters={iters} but an ε schedule of length {len(sched)}")
    P, n, _ = C.shape
    log_w = -math.log(n)
    f = torch.zeros(P, n, device=C.device, dtype=C.dtype)
    g = torch.zeros(P, n, device=C.device, dtype=C.dtype)
    for eps in sched:
        f = eps * log_w - eps * torch.logsumexp((g.unsqueeze(1) - C) / eps, dim=2)
        g = eps * log_w - eps * torch.logsumexp((f.unsqueeze(2) - C) / eps, dim=1)
    return f, g


_SINKHORN_BACKENDS: dict[str, SinkhornFn] = {"reference": sinkhorn_log}
# Optional whole-pipeline replacements of sinkhorn_assignment (issue #8): a GPU backend that also rounds and
# polishes on the device registers one, so that the host-checked torch rounding is not used with it.
_ASSIGNMENT_BACKENDS: dict[str, Callable[..., torch.Tensor]] = {}


def register_sinkhorn_backend(name: str, fn: SinkhornFn, *,
                              assignment: Callable[..., torch.Tensor] | None = None) -> None:
    """Register a replacement for :func:`sinkhorn_log` (same signature), e.g. a Triton or CUDA kernel.

    ``assignment`` (optional): a replacement for the whole :func:`sinkhorn_assignment` pipeline on
    [P, n, n] costs, called as ``assignment(C, eps=, iters=, eps_start=, refine_rounds=)``.
    """
    if name not in BACKENDS or name == "auto":
        raise ValueError(f"ot: backend name must be one of {BACKENDS[1:]}, got {name!r}")
    _SINKHORN_BACKENDS[name] = fn
    if assignment is not None:
        _ASSIGNMENT_BACKENDS[name] = assignment
    else:
        _ASSIGNMENT_BACKENDS.pop(name, None)


def get_sinkhorn_backend(backend: str = "auto", device: torch.device | str | None = None
                         ) -> tuple[str, SinkhornFn]:
    """Resolve ``backend`` to (name, inner-loop function).

    ``auto``: a registered ``cuda`` then ``triton`` kernel for CUDA devices, else ``reference``. An explicit
    backend that is not registered (or needs CUDA on a CPU tensor) falls back to ``reference`` with a warning.
    """
    if backend not in BACKENDS:
        raise ValueError(f"ot: unknown sinkhorn backend {backend!r}, expected one of {BACKENDS}")
    on_cuda = device is not None and torch.device(device).type == "cuda"
    if backend == "auto":
        for name in ("cuda", "triton"):
            if on_cuda and name in _SINKHORN_BACKENDS:
                return name, _SINKHORN_BACKENDS[name]
        return "reference", _SINKHORN_BACKENDS["reference"]
    if backend != "reference" and (backend not in _SINKHORN_BACKENDS or not on_cuda):
        why = "is not available" if backend not in _SINKHORN_BACKENDS else "needs CUDA tensors"
        warnings.warn(f"ot: sinkhorn backend {backend!r} {why}; falling back to 'reference'", stacklevel=3)
        return "reference", _SINKHORN_BACKENDS["reference"]
    return backend, _SINKHORN_BACKENDS[backend]


def _reduce_and_scale(C: torch.Tensor) -> torch.Tensor:
    """Row- then column-reduce C (optimal permutation unchanged) and divide by the mean reduced cost."""
    R = C - C.amin(dim=2, keepdim=True)
    R = R - R.amin(dim=1, keepdim=True)
    scale = R.mean(dim=(1, 2), keepdim=True).clamp_min(torch.finfo(R.dtype).tiny)
    return R / scale


def round_to_permutation(R: torch.Tensor, max_rounds: int | None = None) -> torch.Tensor:
    """Round a [P, n, n] score of "badness" (lower = preferred pair) to permutations [P, n] on-device.

    Parallel greedy: each round, every free row proposes its cheapest free column and every free column its
    cheapest free row; mutually-best pairs are fixed. The cheapest free entry of each problem is always
    mutual, so each round fixes at least one pair; with converged Sinkhorn potentials almost all rows are
    fixed in the first round. The host checks completion only every few rounds; after ``max_rounds`` the
    remaining free rows are paired with the free columns in index order (a valid, if arbitrary, completion).
    """
    P, n, _ = R.shape
    dev = R.device
    inf = torch.tensor(float("inf"), device=dev, dtype=R.dtype)
    perm = torch.full((P, n), -1, dtype=torch.long, device=dev)
    col_taken = torch.zeros(P, n, dtype=torch.bool, device=dev)
    ar = torch.arange(n, device=dev).expand(P, n)
    max_rounds = n if max_rounds is None else max_rounds
    r = 0
    while r < max_rounds:
        for _ in range(4):  # check for completion on the host every 4 rounds only
            row_free = perm < 0
            M = R.masked_fill(~row_free.unsqueeze(2) | col_taken.unsqueeze(1), inf)
            best_col = M.argmin(dim=2)                     # [P, n] for each row
            best_row = M.argmin(dim=1)                     # [P, n] for each column
            mutual = row_free & (best_row.gather(1, best_col) == ar)
            # The same pairs seen from the column side (avoids a scatter with duplicate indices).
            col_mutual = ~col_taken & row_free.gather(1, best_row) & (best_col.gather(1, best_row) == ar)
            perm = torch.where(mutual, best_col, perm)
            col_taken = col_taken | col_mutual
            r += 1
        if not bool((perm < 0).any()):
            break
    # Completion: pair the k-th free row with the k-th free column (sorting keys put free ones first).
    row_free = perm < 0
    free_rows = torch.sort(torch.where(row_free, ar, ar + n), dim=1).indices
    free_cols = torch.sort(torch.where(col_taken, ar + n, ar), dim=1).indices
    fill = torch.full_like(perm, -1).scatter(1, free_rows, free_cols)
    return torch.where(row_free, fill, perm)


def two_opt(C: torch.Tensor, perm: torch.Tensor, rounds: int = 8) -> torch.Tensor:
    """Improve permutations [P, n] for costs [P, n, n] by parallel pairwise swaps (2-opt), on-device.

    With A_ij = C_i,perm[j], swapping the partners of rows i and j gains A_ii + A_jj − A_ij − A_ji. Each
    round every row picks its best swap partner; mutually-chosen pairs with positive gain are disjoint and
    are all applied at once. The cost never increases. Fixed number of rounds, no host synchronisation.
    """
    P, n, _ = C.shape
    ar = torch.arange(n, device=C.device).expand(P, n)
    for _ in range(rounds):
        A = torch.gather(C, 2, perm.unsqueeze(1).expand(P, n, n))   # A[p, i, j] = C[p, i, perm[p, j]]
        d = torch.diagonal(A, dim1=1, dim2=2)
        gain = d.unsqueeze(2) + d.unsqueeze(1) - A - A.transpose(1, 2)
        best_gain, partner = gain.max(dim=2)
        swap = (best_gain > 0) & (partner.gather(1, partner) == ar) & (partner != ar)
        perm = torch.where(swap, perm.gather(1, partner), perm)
    return perm


def sinkhorn_assignment(C: torch.Tensor, *, eps: float = 0.05, iters: int = 100, backend: str = "auto",
                        eps_start: float = 1.0, refine_rounds: int = 8) -> torch.Tensor:
    """Near-optimal permutations for a batch of square costs C [P, n, n] (or [n, n]) via Sinkhorn.

    Reduce and scale C, run the ε-scaled log-domain Sinkhorn (``iters`` iterations ending at ``eps``), round
    the reduced costs C − f − g to a permutation with the mutual-best greedy and polish with
    ``refine_rounds`` of 2-opt on the true cost. Returns LongTensor [P, n] (or [n]).
    """
    name, fn = get_sinkhorn_backend(backend, C.device)
    full = _ASSIGNMENT_BACKENDS.get(name)
    if full is not None:  # device-side rounding + 2-opt as well (e.g. lct_fast.ot_triton)
        return full(C, eps=eps, iters=iters, eps_start=eps_start, refine_rounds=refine_rounds)
    return run_assignment(C, "ot: sinkhorn_assignment", fn, _round_and_two_opt, eps=eps, iters=iters,
                          eps_start=eps_start, refine_rounds=refine_rounds)


def _round_and_two_opt(Cn: torch.Tensor, f: torch.Tensor, g: torch.Tensor, refine_rounds: int) -> torch.Tensor:
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
    Cn = _reduce_and_scale(C.float()).contiguous()
    f, g = sinkhorn(Cn, eps_schedule(eps, iters, eps_start=eps_start), iters)
    perm = finish(Cn, f, g, refine_rounds=refine_rounds)
    return perm[0] if squeeze else perm


# ------------------------------------------------------------------------------------------ couple
def couple(x0: torch.Tensor, z: torch.Tensor, method: str = "exact", *, backend: str = "auto",
           eps: float = 0.05, iters: int = 100, groups: int = 1, refine_rounds: int = 8,
           return_cost: bool = False) -> torch.Tensor | CouplingResult:
    """Pair noise with latents: returns ``perm`` (LongTensor [B], on x0's device) so that ``z[perm]`` is the
    noise paired with ``x0`` (minibatch OT, paper sec. 4.4).

    ``method``: none | exact (POT emd) | hungarian or exact_scipy (scipy) | sinkhorn. ``backend``: Sinkhorn inner loop
    (auto | reference | triton | cuda). ``eps``: final Sinkhorn ε relative to the mean reduced cost;
    ``iters``: Sinkhorn iteration budget (incl. ε-scaling). ``groups``: split the batch into that many equal
    consecutive chunks and couple within each (the Sinkhorn path solves them as one batched problem).
    ``return_cost``: return a :class:`CouplingResult` with the achieved cost and the ratio to identity.
    """
    if method not in METHODS:
        raise ValueError(f"ot: unknown coupling method {method!r}, expected one of {METHODS}")
    if x0.shape != z.shape:
        raise ValueError(f"ot: x0 and z must have the same shape, got {tuple(x0.shape)} and {tuple(z.shape)}")
    B = x0.shape[0]
    if groups < 1 or B % groups:
        raise ValueError(f"ot: groups={groups} must be >= 1 and divide the batch size {B}")
    n = B // groups
    dev = x0.device
    used_backend = "none"
    # The cost needs fp32 (SPEC §4): keep a caller's bf16 autocast region from lowering the matmul.
    with torch.no_grad(), torch.autocast(dev.type, enabled=False):
        if method == "none" or n <= 1:
            perm = torch.arange(B, device=dev)
        elif method in ("exact", "hungarian", "exact_scipy"):
            x = x0.reshape(groups, n, -1).detach().to("cpu", torch.float64)
            y = z.reshape(groups, n, -1).detach().to("cpu", torch.float64)
            C = _batched_cost(x, y).numpy()
            solver = "pot" if method == "exact" else "scipy"
            parts = [torch.from_numpy(exact_assignment(C[p], solver)) + p * n for p in range(groups)]
            perm = torch.cat(parts).to(dev)
            used_backend = solver
        else:
            x = x0.reshape(groups, n, -1).detach().float()
            y = z.reshape(groups, n, -1).detach().float()
            used_backend, _ = get_sinkhorn_backend(backend, dev)  # warns once if it must fall back
            local = sinkhorn_assignment(_batched_cost(x, y), eps=eps, iters=iters, backend=used_backend,
                                        refine_rounds=refine_rounds)
            perm = (local + torch.arange(groups, device=dev).unsqueeze(1) * n).reshape(B)
        if not return_cost:
            return perm
        cost = transport_cost(x0.detach(), z.detach(), perm)
        ident = transport_cost(x0.detach(), z.detach())
        ratio = cost / ident.clamp_min(torch.finfo(torch.float32).tiny)
    return CouplingResult(perm=perm, cost=cost, identity_cost=ident, ratio=ratio, method=method,
                          backend=used_backend)


# ------------------------------------------------------------------- optional Triton backend (issue #8)
# Registered lazily: importing lct_fast.ot never imports Triton or creates kernels (on a CPU-only machine the
# kernels need TRITON_INTERPRET=1 set before they are created). get_sinkhorn_backend only hands the Triton
# backend out for CUDA tensors.
def _triton_sinkhorn(C: torch.Tensor, sched: Sequence[float], iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    from .ot_triton import sinkhorn_log_triton

    return sinkhorn_log_triton(C, sched, iters)


def _triton_assignment(C: torch.Tensor, **kwargs) -> torch.Tensor:
    from .ot_triton import sinkhorn_assignment_triton

    return sinkhorn_assignment_triton(C, **kwargs)


def _register_triton() -> None:
    import importlib.util

    if importlib.util.find_spec("triton") is not None:
        register_sinkhorn_backend("triton", _triton_sinkhorn, assignment=_triton_assignment)


_register_triton()


# --------------------------------------------------------------------- optional CUDA C++ backend (issue #8)
# Registered only when the compiled extension lct_fast._C exists (setup.py builds it with a CUDA torch); it is
# imported lazily, on first use with CUDA tensors (lct_fast.ot_cuda). get_sinkhorn_backend's "auto" prefers it
# over Triton on CUDA. Should the extension lack the Sinkhorn ops (a stale build), the calls fall back to the
# Triton pipeline when registered, else to the PyTorch reference, with a warning.
def _cuda_fallback(what: str, why: str) -> str:
    name = "triton" if "triton" in _SINKHORN_BACKENDS else "reference"
    warnings.warn(f"ot: sinkhorn backend 'cuda' {what} unavailable ({why}); using {name!r}", stacklevel=4)
    return name


def _cuda_sinkhorn(C: torch.Tensor, sched: Sequence[float], iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    from .ot_cuda import cuda_ops_loaded, sinkhorn_log_cuda

    ok, why = cuda_ops_loaded()
    if not ok:
        return _SINKHORN_BACKENDS[_cuda_fallback("iterations", why)](C, sched, iters)
    return sinkhorn_log_cuda(C, sched, iters)


def _cuda_assignment(C: torch.Tensor, **kwargs) -> torch.Tensor:
    from .ot_cuda import cuda_ops_loaded, sinkhorn_assignment_cuda

    ok, why = cuda_ops_loaded()
    if not ok:
        name = _cuda_fallback("pipeline", why)
        return sinkhorn_assignment(C, backend=name, **kwargs)
    return sinkhorn_assignment_cuda(C, **kwargs)


def _register_cuda() -> None:
    import importlib.util

    try:
        present = importlib.util.find_spec("lct_fast._C") is not None
    except (ImportError, ValueError):  # lct_fast not importable as a package (e.g. a vendored copy)
        present = False
    if present:
        register_sinkhorn_backend("cuda", _cuda_sinkhorn, assignment=_cuda_assignment)


_register_cuda()
