"""Resume on another world size: a run at ZeRO 0, 1, 2 and 3 goes 2 -> 4 -> 2 CPU ranks (gloo), a checkpoint at each
change (tests/dist/reshard.py). After each load, before any step, the new world size's engine holds exactly
what the old one held when it saved: every fp32 weight, both Adam moments of every parameter, every EMA (ZeRO-3
partitions re-cut), the optimizer's step count and the learning rate; samples seen carry over and each rank's
stream starts at samples/world with a batch no other rank draws. What holds across the change is documented in
the README (multi-node section)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from lct_fast.distributed import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.distributed


def phase(tmp, ranks: int, stage: int, total: int, name: str, expect: str | None) -> dict:
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks), "--master_port",
           str(free_port()), "tests/dist/reshard.py", "--run", str(tmp / "run"), "--stage", str(stage),
           "--total", str(total), "--save-state", str(tmp / f"{name}.pt"), "--report", str(tmp / f"{name}.json")]
    if expect:
        cmd += ["--expect", str(tmp / f"{expect}.pt")]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(tmp / f"{name}.json") as f:
        return json.load(f)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_checkpoint_moves_between_world_sizes(tmp_path, stage):
    first = phase(tmp_path, 2, stage, 32, "a", None)
    assert first["samples_at_end"] == 32 and not first["resharded"]
    for ranks, total, name, prev, at in ((4, 48, "b", "a", 32), (2, 64, "c", "b", 48)):
        r = phase(tmp_path, ranks, stage, total, name, prev)
        assert r["resharded"] and r["world"] == ranks
        assert r["samples_after_load"] == at and r["meta_loaded"] == r["meta_expected"]
        assert r["meta_loaded"]["opt_steps"] == [at // 8]
        for part in ("weights", "moments", "ema"):
            assert r[part]["missing"] == [] and r[part]["count"] > 0 and r[part]["max"] == 0.0, (part, r[part])
        assert r["stream_starts"] == [at // ranks] * ranks
        assert len(set(r["first_batch_digests"])) == ranks
        assert r["samples_at_end"] == total
        if stage == 3:
            assert r["partitioned"]
