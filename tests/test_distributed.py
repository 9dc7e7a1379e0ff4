"""Per-rank CPU thread share (the launchers' environment variables; the 2-rank job checks it end to end in
test_train_deepspeed)."""

import os

from lct_fast.distributed import cpu_threads_per_rank


def test_cpu_threads_are_the_ranks_share_of_the_cores():
    cores = len(os.sched_getaffinity(0))
    assert cpu_threads_per_rank({}) == cores  # plain python: one rank owns the cores
    assert cpu_threads_per_rank({"LOCAL_WORLD_SIZE": "2"}) == max(1, cores // 2)  # torchrun
    assert cpu_threads_per_rank({"LOCAL_SIZE": "2"}) == max(1, cores // 2)  # deepspeed launcher
    assert cpu_threads_per_rank({"LOCAL_SIZE": str(4 * cores)}) == 1  # more ranks than cores: never 0
    # The user's choice (or deepspeed --bind_cores_to_rank, which sets it) wins.
    assert cpu_threads_per_rank({"OMP_NUM_THREADS": "3", "LOCAL_SIZE": "2"}) is None
