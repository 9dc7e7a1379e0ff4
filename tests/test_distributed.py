"""Per-rank CPU thread share (the launchers' environment variables; the 2-rank job checks it end to end in
test_train_deepspeed)."""

import os

import torch

from lct_fast.distributed import cpu_threads_per_rank


def test_cpu_threads_are_the_ranks_share_of_the_cores():
    cores = min(torch.get_num_threads(), len(os.sched_getaffinity(0)))
    assert cpu_threads_per_rank({}) is None  # plain python, one rank: torch's own default stays
    assert cpu_threads_per_rank({"LOCAL_SIZE": "1"}) is None
    assert cpu_threads_per_rank({"LOCAL_SIZE": "2"}) == max(1, cores // 2)  # deepspeed launcher
    assert cpu_threads_per_rank({"LOCAL_WORLD_SIZE": "2"}) == max(1, cores // 2)  # torchrun with threads unset
    assert cpu_threads_per_rank({"LOCAL_SIZE": str(4 * cores)}) == 1  # more ranks than cores: never 0
    # the user's choice (or deepspeed --bind_cores_to_rank, or torchrun with several processes) wins
    assert cpu_threads_per_rank({"OMP_NUM_THREADS": "3", "LOCAL_SIZE": "2"}) is None
    assert cpu_threads_per_rank({"MKL_NUM_THREADS": "3", "LOCAL_SIZE": "2"}) is None
