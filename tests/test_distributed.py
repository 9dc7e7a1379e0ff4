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


def test_shutdown_leaves_the_process_group_before_exit():
    """The success path's shutdown: the group is gone (gloo's threads joined) before the interpreter finalises."""
    import subprocess
    import sys

    code = (
        "import torch\n"
        "from lct_fast.distributed import init_distributed, shutdown_distributed\n"
        "env = init_distributed(timeout_s=30)\n"
        "t = torch.ones(3)\n"
        "torch.distributed.all_reduce(t)\n"
        "assert t.tolist() == [1.0, 1.0, 1.0] and torch.distributed.is_initialized()\n"
        "shutdown_distributed()\n"
        "assert not torch.distributed.is_initialized()\n"
        "shutdown_distributed()  # a second call (or one with no group) is a no-op\n"
        "print('left', env.world_size)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("left 1")
