"""Sinkhorn OT, PyTorch reference pieces (SPEC §4): the log-domain iterations, rounding to a permutation and the
2-opt polish. The pipeline that strings them together, and the backend dispatch, are in
:mod:`lct_fast.ops.sinkhorn_ops`; the Triton and CUDA kernels replace these pieces one for one
(``sinkhorn_triton``, ``sinkhorn_cuda``)."""
from __future__ import annotations

import math
from typing import Sequence

import torch

__all__ = ["sinkhorn_log", "round_to_permutation", "two_opt"]


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
