"""The deepspeed launcher with 2 CPU ranks (gloo): the tiny preset end to end (ZeRO-2, OT coupling over the
global batch), torchrun + bf16, and a dying rank."""

import glob
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from lct_fast.distributed import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.distributed


def launch(script_and_args, timeout=600, threads="1"):
    """``threads`` None leaves OMP_NUM_THREADS unset, so each rank picks its own share of the cores."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=ROOT, OMP_NUM_THREADS=threads or "")
    if threads is None:
        del env["OMP_NUM_THREADS"]
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
           *script_and_args]
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_tiny_preset_two_ranks_end_to_end(tmp_path):
    run = str(tmp_path / "run")
    sets = ["model.width=32", "train.global_batch=8", "train.total_samples=32", "train.log_interval=16",
            "train.sample_interval=32", "train.ckpt_interval=0", "optim.warmup_samples=0",
            "deepspeed.zero_optimization.stage=2", "method.ot.method=sinkhorn", "method.ot.global_coupling=true"]
    proc = launch(["launch/train.py", "--config", "configs/tiny.json", "--out", run,
                   *[a for s in sets for a in ("--set", s)]], threads=None)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # Without OMP_NUM_THREADS each of the 2 ranks takes half of the cores it may run on (not all of them).
    import torch

    share = max(1, min(torch.get_num_threads(), len(os.sched_getaffinity(0))) // 2)
    assert f"({share} CPU threads per rank)" in proc.stdout + proc.stderr
    rows = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    assert [r["samples"] for r in rows] == [16, 32]  # rank 0 alone writes
    assert all(np.isfinite(r["loss"]) for r in rows)
    # Global Sinkhorn coupling over both ranks' latents beats the identity pairing.
    assert all(0.0 < r["ot_cost_ratio"] < 1.0 for r in rows)
    tag = open(os.path.join(run, "checkpoints", "latest")).read().strip()
    clients = sorted(glob.glob(os.path.join(run, "checkpoints", tag, "client-rank*.pt")))
    assert [os.path.basename(c) for c in clients] == ["client-rank00000.pt", "client-rank00001.pt"]
    x = np.load(os.path.join(run, "samples", f"{tag}-1step.npy"), allow_pickle=False)
    assert x.shape == (16, 4, 8, 8) and np.isfinite(x).all()
    assert os.path.exists(os.path.join(run, "samples", f"{tag}-2step.png"))


def test_dead_rank_makes_the_job_fail_not_hang():
    t0 = time.monotonic()
    proc = launch(["tests/dist/rank_dies.py"], timeout=300)
    assert proc.returncode != 0
    assert "completed a collective with a dead peer" not in proc.stdout
    assert time.monotonic() - t0 < 240


def test_torchrun_launch_and_bf16(tmp_path):
    """torchrun is a supported launcher too; bf16 (DeepSpeed's bf16 engine + autocast) runs and stays finite."""
    run = str(tmp_path / "run")
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    sets = ["model.width=32", "train.global_batch=8", "train.total_samples=16", "train.log_interval=8",
            "train.sample_interval=0", "train.ckpt_interval=0", "optim.warmup_samples=0", "train.precision=bf16"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "launch/train.py", "--config", "configs/tiny_sct.json", "--out", run, *[a for s in sets for a in ("--set", s)]]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    assert [r["samples"] for r in rows] == [8, 16]
    assert all(np.isfinite(r["loss"]) and r["step_applied"] == 1.0 for r in rows)
    resolved = json.load(open(os.path.join(run, "config.json")))
    assert resolved["train"]["precision"] == "bf16"
    # the GPU precision plan this config asks for: bf16 products, the JVP in method.sct.jvp_dtype
    jvp = {"fp32": "tf32" if resolved["train"]["tf32"] else "fp32"}.get(resolved["method"]["sct"]["jvp_dtype"], "bf16")
    assert resolved["derived"]["precision_plan"]["online_forward"] == "bf16"
    assert resolved["derived"]["precision_plan"]["jvp"] == jvp
    clients = glob.glob(os.path.join(run, "checkpoints", "samples-000000000016", "client-rank*.pt"))
    assert len(clients) == 2
