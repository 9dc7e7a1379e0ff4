"""Minibatch optimal-transport coupling of latents and noise (paper sec. 4.4, SPEC §2 and §4).

Before noising, each batch of latents ``x0`` is paired with a permutation of the noise batch ``z`` so that
the total squared distance sum_i ||x0_i - z_perm[i]||^2 is (near) minimal (Pooladian et al. 2023). The
one entry point other code calls is :func:`couple`, which returns ``perm`` such that ``z[perm]`` is the
noise paired with ``x0``.

Labels. The paper's OT runs are unconditional. On class-conditional data, pairs that cross a class let the
paired noise carry the class (a linear probe reads the class of x0 from its paired noise far above chance);
the network then learns to take the class from the noise, which sampling with fresh noise contradicts. With
``labels`` (the labels the network sees: a dropped label is the null class, so those samples form their own
group) :func:`couple` only permutes noise among samples of one label. Groups have unequal sizes: the exact
solvers loop over them; Sinkhorn solves all groups of one size as one batched problem (one solve per distinct
size, no padding, so the ε scale of each problem is its own; padding with prohibitive costs would set the
mean reduced cost, hence ε, by the padding instead).

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

The Sinkhorn solver is a kernel family of :mod:`lct_fast.ops` (``ops.sinkhorn_ops``: the shared pipeline and the
dispatch; ``sinkhorn_pytorch`` / ``sinkhorn_triton`` / ``sinkhorn_cuda``), registered in the one backend
registry; ``backend="auto"`` picks a ``triton`` (n ≤ 512) or ``cuda`` (n ≤ 256) kernel for CUDA tensors and
the PyTorch reference otherwise (measured: ``ops.sinkhorn_ops.FUSED_MAX_N``). This module only consumes it;
its names are re-exported here for callers of the coupling API.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from .backends import BACKENDS
from .ops.sinkhorn_ops import (SinkhornFn, check_schedule, eps_schedule, get_sinkhorn_backend, reduce_and_scale,
                           run_assignment, schedule_tensor, sinkhorn_assignment)
from .ops.sinkhorn_pytorch import round_to_permutation, sinkhorn_log, two_opt
from .precision import ieee_fp32

__all__ = [
    "METHODS",
    "BACKENDS",
    "CouplingResult",
    "cost_matrix",
    "transport_cost",
    "pairing_cost_ratio",
    "couple",
    "group_members",
    "exact_assignment",
    "sinkhorn_log",
    "sinkhorn_assignment",
    "eps_schedule",
    "round_to_permutation",
    "two_opt",
    "get_sinkhorn_backend",
    "run_assignment",
    "reduce_and_scale",
    "check_schedule",
    "schedule_tensor",
    "SinkhornFn",
]

METHODS = ("none", "exact", "hungarian", "exact_scipy", "sinkhorn")


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
    with ieee_fp32():  # the expansion cancels: TF32's 10-bit inputs would swamp the differences (SPEC §4)
        xy = torch.bmm(x, y.transpose(1, 2))
    return (xx.unsqueeze(-1) + yy.unsqueeze(-2) - 2.0 * xy).clamp_min_(0.0)


def transport_cost(x0: torch.Tensor, z: torch.Tensor, perm: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over pairs of ||x0_i − z_perm[i]||² (sum over dims), in fp32; ``perm=None`` = identity."""
    if x0.shape != z.shape:
        raise ValueError(f"ot: x0 and z must have the same shape, got {tuple(x0.shape)} and {tuple(z.shape)}")
    zz = z if perm is None else z[perm.to(z.device)]
    d = _flatten(x0, "x0").float() - _flatten(zz, "z").float()
    return (d * d).sum(-1).mean()


def pairing_cost_ratio(x0: torch.Tensor, z: torch.Tensor, z_paired: torch.Tensor) -> torch.Tensor:
    """Σ‖x0 − z_paired‖² / Σ‖x0 − z‖²: what a coupling saved against the pairing as drawn (detached 0-dim
    fp32; < 1 when the coupling shortens the paths). What the per-batch and global couplers report;
    :func:`couple` (``return_cost``) gets the same ratio from the two mean costs it computes anyway."""
    x = _flatten(x0.detach(), "x0").float()
    base = (x - _flatten(z.detach(), "z").float()).square().sum()
    cost = (x - _flatten(z_paired.detach(), "z").float()).square().sum()
    return (cost / base.clamp_min(torch.finfo(torch.float32).tiny)).detach()


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


# ------------------------------------------------------------------------------------------ couple
def group_members(labels: torch.Tensor, groups: int = 1) -> list[torch.Tensor]:
    """Indices (LongTensor on CPU) of each group of samples that may be paired with each other: one group per
    (consecutive chunk of ``groups``, label). Only groups of 2 or more samples are returned (a singleton keeps
    its own noise)."""
    lab = labels.detach().reshape(-1).to("cpu", torch.long)
    n = lab.numel() // groups
    key = torch.arange(lab.numel()).div(n, rounding_mode="floor") * (int(lab.max()) - int(lab.min()) + 1) + (
        lab - lab.min())
    order = torch.argsort(key, stable=True)
    _, counts = torch.unique_consecutive(key[order], return_counts=True)
    return [m for m in torch.split(order, counts.tolist()) if m.numel() > 1]


def _check_labels(labels: torch.Tensor, B: int) -> None:
    if labels.shape != (B,):
        raise ValueError(f"ot: labels must have shape ({B},) (one per sample), got {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"ot: labels must be integer class ids, got dtype {labels.dtype}")


def couple(x0: torch.Tensor, z: torch.Tensor, method: str = "exact", *, labels: torch.Tensor | None = None,
           backend: str = "auto", eps: float = 0.05, iters: int = 100, groups: int = 1, refine_rounds: int = 8,
           return_cost: bool = False) -> torch.Tensor | CouplingResult:
    """Pair noise with latents: returns ``perm`` (LongTensor [B], on x0's device) so that ``z[perm]`` is the
    noise paired with ``x0`` (minibatch OT, paper sec. 4.4).

    ``method``: none | exact (POT emd) | hungarian or exact_scipy (scipy) | sinkhorn. ``labels``: [B] integer
    labels as the network sees them (the null class included); given, noise is only permuted within each label
    (see the module docstring), and ``perm[i]`` has the label of ``i``. ``backend``: Sinkhorn inner loop
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
    if labels is not None:
        _check_labels(labels, B)
    n = B // groups
    dev = x0.device
    used_backend = "none"
    # The cost needs fp32 (SPEC §4): keep a caller's bf16 autocast region from lowering the matmul.
    with torch.no_grad(), torch.autocast(dev.type, enabled=False):
        if method == "none" or n <= 1:
            perm = torch.arange(B, device=dev)
        elif labels is not None:
            perm, used_backend = _couple_within(x0, z, group_members(labels, groups), method, backend=backend,
                                                eps=eps, iters=iters, refine_rounds=refine_rounds)
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
            used_backend, _ = get_sinkhorn_backend(backend, dev, n)  # warns once if it must fall back
            local = sinkhorn_assignment(_batched_cost(x, y), eps=eps, iters=iters, backend=used_backend,
                                        refine_rounds=refine_rounds)
            perm = (local + torch.arange(groups, device=dev).unsqueeze(1) * n).reshape(B)
        if not return_cost:
            return perm
        cost = transport_cost(x0.detach(), z.detach(), perm)
        ident = transport_cost(x0.detach(), z.detach())
        ratio = cost / ident.clamp_min(torch.finfo(torch.float32).tiny)  # = pairing_cost_ratio, from the means
    return CouplingResult(perm=perm, cost=cost, identity_cost=ident, ratio=ratio, method=method,
                          backend=used_backend)


def _couple_within(x0: torch.Tensor, z: torch.Tensor, members: list[torch.Tensor], method: str, *, backend: str,
                   eps: float, iters: int, refine_rounds: int) -> tuple[torch.Tensor, str]:
    """The optimal pairing inside each group of ``members`` (global indices); samples in no group keep their
    noise. Exact solvers: one solve per group; Sinkhorn: one batched solve per distinct group size."""
    B, dev = x0.shape[0], x0.device
    perm = torch.arange(B)
    x_flat, z_flat = x0.detach().reshape(B, -1), z.detach().reshape(B, -1)
    if method in ("exact", "hungarian", "exact_scipy"):
        solver = "pot" if method == "exact" else "scipy"
        x64, z64 = x_flat.to("cpu", torch.float64), z_flat.to("cpu", torch.float64)
        for m in members:
            C = _batched_cost(x64[m].unsqueeze(0), z64[m].unsqueeze(0))[0].numpy()
            perm[m] = m[torch.from_numpy(exact_assignment(C, solver))]
        return perm.to(dev), solver
    sizes = sorted({int(m.numel()) for m in members})
    used = []
    for size in sizes:
        idx = torch.stack([m for m in members if m.numel() == size])          # [P, size], CPU
        idx_dev = idx.to(dev)
        name, _ = get_sinkhorn_backend(backend, dev, size)  # per size: auto depends on n
        used.append(name)
        local = sinkhorn_assignment(_batched_cost(x_flat[idx_dev].float(), z_flat[idx_dev].float()), eps=eps,
                                    iters=iters, backend=name, refine_rounds=refine_rounds).cpu()
        perm[idx.reshape(-1)] = torch.gather(idx, 1, local).reshape(-1)
    return perm.to(dev), "+".join(dict.fromkeys(used)) or get_sinkhorn_backend(backend, dev)[0]
