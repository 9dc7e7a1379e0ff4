"""Process-group set-up shared by every launcher (deepspeed, torchrun, plain python).

The only distributed code we own: environment detection and a timeout on collectives. Gradient
reduction, partitioning and checkpoint sharding belong to DeepSpeed (see lct_fast.trainer).
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import torch

__all__ = ["DistEnv", "init_distributed", "shutdown_distributed", "free_port", "cpu_threads_per_rank"]


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    threads: int = 0
    """Intra-op CPU threads of this rank (``torch.get_num_threads()`` after set-up)."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    """A TCP port that is free on the loopback interface right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_threads_per_rank(env: dict | None = None) -> int | None:
    """This rank's share of the cores when several ranks share a host, or None to leave torch's default:
    one rank alone, or the user chose (``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` set).

    torch starts one intra-op thread per physical core in every process, so k ranks on one host run k times
    as many threads as it has cores. The local rank count comes from the launcher: the deepspeed launcher
    exports LOCAL_SIZE and no thread count (its --bind_cores_to_rank sets OMP_NUM_THREADS itself); torchrun
    exports LOCAL_WORLD_SIZE and already sets OMP_NUM_THREADS=1 for more than one process per node.
    """
    env = os.environ if env is None else env
    if env.get("OMP_NUM_THREADS") or env.get("MKL_NUM_THREADS"):
        return None
    local = int(env.get("LOCAL_WORLD_SIZE") or env.get("LOCAL_SIZE") or 1)
    if local <= 1:
        return None
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(torch.get_num_threads(), cores) // local)


def init_distributed(timeout_s: float = 600.0) -> DistEnv:
    """Join (or create) the default process group.

    Works under the ``deepspeed`` launcher and ``torchrun`` (they set RANK/WORLD_SIZE/MASTER_*) and under
    plain ``python`` (a one-rank group on a free loopback port, so DeepSpeed's engine runs unchanged).
    ``timeout_s`` bounds every collective: a rank that dies makes the others fail instead of hanging.
    """
    import deepspeed

    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(free_port())
    local_rank = int(os.environ["LOCAL_RANK"])
    # DS_ACCELERATOR=cpu forces the CPU path (gloo) even on a GPU machine, matching DeepSpeed's own choice.
    if torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") != "cpu":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
        # DeepSpeed's CPU accelerator JIT-compiles a shared-memory all-reduce op at first use (minutes on a
        # small machine, per fresh cache). gloo is all we need for CPU runs and tests, so mark it unavailable.
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        threads = cpu_threads_per_rank()
        if threads is not None and threads != torch.get_num_threads():
            torch.set_num_threads(threads)
    if not torch.distributed.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        # Every process group, not just the world group: ZeRO builds its own data-parallel groups with
        # torch.distributed.new_group(), whose timeout defaults to torch's module default (30 min for gloo, 10
        # for NCCL), not to the world group's. Measured on two network namespaces with the link cut: ZeRO-1's
        # gradient all-reduce waited past 5 minutes on its own group while the world group's timeout was 20 s.
        import torch.distributed.distributed_c10d as c10d

        c10d.default_pg_timeout = timeout
        if hasattr(c10d, "default_pg_nccl_timeout"):
            c10d.default_pg_nccl_timeout = timeout
        deepspeed.init_distributed(dist_backend=backend, timeout=timeout, verbose=False)
    return DistEnv(rank=torch.distributed.get_rank(), world_size=torch.distributed.get_world_size(),
                   local_rank=local_rank, device=device, threads=torch.get_num_threads())


def shutdown_distributed() -> None:
    """Leave the process group at a successful end: a barrier, then ``destroy_process_group``.

    Without it gloo's worker threads still hold finished work (tensors with Python references) when the
    interpreter finalises, and the process can die with "terminate called without an active exception"
    (SIGABRT) after it has written its results: seen on one rank of a 2-rank ZeRO-3 CPU profile run and of a
    2-rank training run, once in each of two CI runs of dozens of launches. Only for the success path: a
    rank that failed must not wait in the barrier for ranks still inside a collective (it exits, and they
    time out).
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
