"""Minibatch OT coupling across the global batch (paper §4.4, SPEC §2).

Per-rank coupling pairs each rank's latents only with that rank's noise. Here every rank all-gathers the
flattened latents and noise of the whole (per-micro-step) global batch in one collective, one coupling of the
W·B × W·B problem is solved, and each rank takes its slice: the noise paired with its own latents, drawn from
anywhere in the global noise batch. A larger batch gives a cheaper coupling (closer to the population OT map);
whether that pays for the extra collective and the bigger solve is measured by ``benchmarks/bench_ot.py``.

Layout: the gathered batch is rank-major (rank r's samples are rows r·B … r·B+B−1 of the gathered tensors), so
``couple_global`` returns indices into that gathered noise, and ``z_all[perm_local]`` is this rank's paired
noise. :func:`couple_noise_global` does that last step too and mirrors
:func:`lct_fast.methods.common.couple_noise` (it returns the paired noise and the cost ratio to the identity).

With labels (the labels each rank's network sees) they are gathered too and the global problem pairs only
within a label (:func:`lct_fast.ot.couple`'s ``labels``), so a class may take its noise from any rank.

Every rank must call these functions the same number of times with the same batch size (they are
collectives). The solve is deterministic; by default rank 0 of the group solves and broadcasts the
permutation (``solve_on="root"``) so that the ranks cannot disagree even if a kernel were not bit-reproducible
across devices; ``solve_on="all"`` lets every rank solve the identical problem and skips the broadcast.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from .ot import couple, pairing_cost_ratio

__all__ = ["couple_global", "couple_noise_global", "gather_batch", "gather_labels", "world_of"]


def world_of(group: Optional[dist.ProcessGroup] = None) -> tuple[int, int]:
    """(rank, world size) in ``group``; (0, 1) when torch.distributed is not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def gather_batch(x0: torch.Tensor, z: torch.Tensor, group: Optional[dist.ProcessGroup] = None, *,
                 check_sizes: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """All-gather the flattened latents and noise of every rank, rank-major: ([W·B, D], [W·B, D]).

    One collective for both (they are concatenated along the feature axis, in their common dtype).
    ``check_sizes`` first all-gathers the batch sizes and raises a clear error if they differ (one extra,
    tiny collective and a host sync; off by default because the trainer's micro-batches are equal).
    """
    if x0.shape != z.shape:
        raise ValueError(f"ot_global: x0 and z must have the same shape, got {tuple(x0.shape)} and {tuple(z.shape)}")
    rank, world = world_of(group)
    B = x0.shape[0]
    dtype = torch.promote_types(x0.dtype, z.dtype)
    both = torch.cat([x0.detach().reshape(B, -1).to(dtype), z.detach().reshape(B, -1).to(dtype)], dim=1)
    if world == 1:
        x, y = both.chunk(2, dim=1)
        return x, y
    if check_sizes:
        sizes = [torch.zeros(2, dtype=torch.long, device=x0.device) for _ in range(world)]
        dist.all_gather(sizes, torch.tensor([B, both.shape[1]], dtype=torch.long, device=x0.device), group=group)
        got = [tuple(int(v) for v in s.tolist()) for s in sizes]
        if len(set(got)) != 1:
            raise ValueError(f"ot_global: every rank must couple the same batch shape, got (batch, 2·D) per rank "
                             f"{got}")
    parts = [torch.empty_like(both) for _ in range(world)]
    dist.all_gather(parts, both.contiguous(), group=group)
    gathered = torch.cat(parts, dim=0)
    x, y = gathered.chunk(2, dim=1)
    return x, y


def gather_labels(labels: Optional[torch.Tensor], group: Optional[dist.ProcessGroup] = None
                  ) -> Optional[torch.Tensor]:
    """All-gather every rank's labels [B] rank-major -> [W·B] (None stays None: then no rank may pass labels)."""
    if labels is None:
        return None
    _, world = world_of(group)
    labels = labels.detach().reshape(-1).to(torch.long)
    if world == 1:
        return labels
    parts = [torch.empty_like(labels) for _ in range(world)]
    dist.all_gather(parts, labels.contiguous(), group=group)
    return torch.cat(parts)


def _solve_and_share(x_all: torch.Tensor, z_all: torch.Tensor, *, method: str, backend: str, eps: float,
                     iters: int, refine_rounds: int, solve_on: str, group: Optional[dist.ProcessGroup],
                     labels_all: Optional[torch.Tensor] = None) -> torch.Tensor:
    rank, world = world_of(group)
    if solve_on not in ("root", "all"):
        raise ValueError(f"ot_global: solve_on must be 'root' or 'all', got {solve_on!r}")
    if world == 1 or solve_on == "all" or rank == 0:
        perm = couple(x_all, z_all, method, backend=backend, eps=eps, iters=iters, refine_rounds=refine_rounds,
                      labels=labels_all)
    else:
        perm = torch.empty(x_all.shape[0], dtype=torch.long, device=x_all.device)
    if world > 1 and solve_on == "root":
        src = 0 if group is None else dist.get_global_rank(group, 0)
        dist.broadcast(perm, src=src, group=group)
    return perm


def couple_global(x0: torch.Tensor, z: torch.Tensor, *, method: str = "sinkhorn", backend: str = "auto",
                  group: Optional[dist.ProcessGroup] = None, eps: float = 0.05, iters: int = 100,
                  refine_rounds: int = 8, solve_on: str = "root", check_sizes: bool = False,
                  labels: Optional[torch.Tensor] = None) -> torch.Tensor:
    """OT-couple this rank's latents with noise from the whole global batch.

    ``x0``, ``z``: this rank's [B, ...] latents and noise (the same B on every rank). Returns ``perm_local``
    (LongTensor [B] on x0's device): indices into the rank-major gathered noise ``z_all`` ([W·B, ...], see
    :func:`gather_batch`), i.e. this rank's slice ``perm[rank·B:(rank+1)·B]`` of the global permutation, so
    ``z_all[perm_local]`` is the noise paired with ``x0``. The slices of all ranks together form a permutation
    of range(W·B). Without an initialised process group (or W = 1) this is ``couple(x0, z, method)``.
    ``method``/``backend``/``eps``/``iters``/``refine_rounds``/``labels`` are those of :func:`lct_fast.ot.couple`
    (``labels``: this rank's [B]; every rank passes labels or none does).
    """
    rank, _ = world_of(group)
    B = x0.shape[0]
    x_all, z_all = gather_batch(x0, z, group, check_sizes=check_sizes)
    perm = _solve_and_share(x_all, z_all, method=method, backend=backend, eps=eps, iters=iters,
                            refine_rounds=refine_rounds, solve_on=solve_on, group=group,
                            labels_all=gather_labels(labels, group))
    return perm[rank * B:(rank + 1) * B]


def couple_noise_global(x0: torch.Tensor, z: torch.Tensor, labels: Optional[torch.Tensor] = None, *,
                        method: str = "sinkhorn", backend: str = "auto", group: Optional[dist.ProcessGroup] = None,
                        eps: float = 0.05, iters: int = 100, refine_rounds: int = 8, solve_on: str = "root",
                        per_class: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Global-batch version of :func:`lct_fast.methods.common.couple_noise`: returns (paired noise [B, ...]
    in z's dtype and shape, this rank's cost ratio Σ‖x0 − z_paired‖² / Σ‖x0 − z‖² as a detached 0-dim fp32).

    ``labels`` (with ``per_class``): pair within each label across the global batch. ``method == "none"``
    returns z unchanged and ratio 1 without any collective.
    """
    one = torch.ones((), device=x0.device)
    if method == "none":
        return z, one
    rank, _ = world_of(group)
    B = x0.shape[0]
    with torch.no_grad():
        x_all, z_all = gather_batch(x0, z, group)
        labels_all = gather_labels(labels if per_class else None, group)
        perm = _solve_and_share(x_all, z_all, method=method, backend=backend, eps=eps, iters=iters,
                                refine_rounds=refine_rounds, solve_on=solve_on, group=group, labels_all=labels_all)
        zp = z_all[perm[rank * B:(rank + 1) * B].to(z_all.device)].to(z.dtype).reshape(z.shape)
    return zp, pairing_cost_ratio(x0, z, zp)
