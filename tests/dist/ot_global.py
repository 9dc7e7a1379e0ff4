"""2-rank check of the global OT coupling, launched by ``tests/test_ot_global.py``::

    PYTHONPATH=. python -m torch.distributed.run --nproc_per_node 2 --master_port PORT \
        tests/dist/ot_global.py --out result.json

Each rank builds its own latents and noise from fixed seeds (:func:`rank_batch`), calls
:func:`lct_fast.ot_global.couple_global` / :func:`couple_noise_global` on the gloo group (CPU), and also
couples its batch alone with :func:`lct_fast.ot.couple`. Rank 0 writes what every rank returned to ``--out``
(JSON); the pytest wrapper rebuilds the data from the same seeds and checks it independently. The script
itself never asserts.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

if __name__ == "__main__":
    # a CPU/gloo check, also on a GPU machine; only when run: tests/test_ot_global.py imports this file's
    # constants, and hiding the GPUs there would hide them from every CUDA test in the same pytest process
    os.environ["CUDA_VISIBLE_DEVICES"] = ""

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from lct_fast.ot import couple  # noqa: E402
from lct_fast.ot_global import couple_global, couple_noise_global  # noqa: E402

BATCH, SHAPE = 40, (3, 8, 8)
METHODS = ("exact", "sinkhorn")


def rank_batch(rank: int, with_labels: bool = False):
    """Rank ``rank``'s clustered latents (4 modes shared by all ranks) and standard-normal noise; with
    ``with_labels`` also each sample's mode as its label, the first two dropped (null class 4)."""
    d = SHAPE[0] * SHAPE[1] * SHAPE[2]
    centres = 1.5 * torch.randn(4, d, generator=torch.Generator().manual_seed(1234))
    g = torch.Generator().manual_seed(100 + rank)
    mode = torch.randint(4, (BATCH,), generator=g)
    x = centres[mode] + 0.7 * torch.randn(BATCH, d, generator=g)
    z = torch.randn(BATCH, d, generator=g)
    if not with_labels:
        return x.reshape(BATCH, *SHAPE), z.reshape(BATCH, *SHAPE)
    labels = mode.clone()
    labels[:2] = 4
    return x.reshape(BATCH, *SHAPE), z.reshape(BATCH, *SHAPE), labels


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    x, z, labels = rank_batch(rank, with_labels=True)
    mine: dict = {"rank": rank, "world": world}
    for method in METHODS:
        mine[f"{method}/global_root"] = couple_global(x, z, method=method, backend="reference").tolist()
        mine[f"{method}/global_all"] = couple_global(x, z, method=method, backend="reference", solve_on="all",
                                                     check_sizes=True).tolist()
        zp, ratio = couple_noise_global(x, z, method=method, backend="reference")
        mine[f"{method}/paired_noise"] = zp.reshape(BATCH, -1).tolist()
        mine[f"{method}/ratio"] = float(ratio)
        mine[f"{method}/local"] = couple(x, z, method, backend="reference").tolist()
        mine[f"{method}/global_labels"] = couple_global(x, z, method=method, backend="reference",
                                                        labels=labels).tolist()
        zp, ratio = couple_noise_global(x, z, labels, method=method, backend="reference")
        mine[f"{method}/paired_noise_labels"] = zp.reshape(BATCH, -1).tolist()
    try:  # unequal batch sizes must fail with a clear error, on every rank
        xb, zb = (x, z) if rank == 0 else (x[:-1], z[:-1])
        couple_global(xb, zb, method="exact", check_sizes=True)
        mine["size_error"] = ""
    except ValueError as e:
        mine["size_error"] = str(e)
    everyone = [None] * world
    dist.all_gather_object(everyone, mine)
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump(everyone, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
