"""Resume on another world size: a run at ZeRO 0, 1, 2 and 3 goes 2 -> 4 -> 2 CPU ranks (gloo), a checkpoint at each
change (tests/dist/reshard.py). After each load, before any step, the new world size's engine holds exactly
what the old one held when it saved: every fp32 weight, both Adam moments of every parameter, every EMA (ZeRO-3
partitions re-cut), the optimizer's step count and the learning rate; samples seen carry over and each rank's
stream starts at samples/world with a batch no other rank draws. At ZeRO 1 and 3 the steps after each change are
then checked against an independent reference: a plain data-parallel run on the new world size started by hand
from the old engine's whole state. What holds across the change is documented in the README (multi-node
section)."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch

from lct_fast.distributed import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.distributed


def phase(tmp, ranks: int, stage: int, total: int, name: str, expect: str | None, reference: str | None = None,
          run: str = "run", sets: tuple[str, ...] = ()) -> dict:
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks), "--master_port",
           str(free_port()), "tests/dist/reshard.py", "--run", str(tmp / run), "--stage", str(stage),
           "--total", str(total), "--save-state", str(tmp / f"{name}.pt"), "--report", str(tmp / f"{name}.json")]
    if expect:
        cmd += ["--expect", str(tmp / f"{expect}.pt")]
    if reference:
        cmd += ["--reference", str(tmp / f"{reference}.pt")]
    for s in sets:
        cmd += ["--set", s]
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
        if stage in (1, 3):
            # The resumed run's steps equal those of a run started on `ranks` ranks from the same whole state
            # without any checkpoint: plain data parallelism, state set by hand. Only the order of the gradient
            # reduction differs (ZeRO's reduce-scatter against an all-reduce), so fp32 rounding, not exactness.
            ref = phase(tmp_path, ranks, 0, total, f"{name}-ref", None, reference=prev, run=f"ref-{name}")
            assert ref["samples_after_load"] == at and ref["samples_at_end"] == total
            assert ref["stream_starts"] == r["stream_starts"] and ref["first_batch_digests"] == r["first_batch_digests"]
            resumed, reference = (torch.load(tmp_path / f"{n}.pt", weights_only=True) for n in (name, f"{name}-ref"))
            assert resumed["meta"]["opt_steps"] == reference["meta"]["opt_steps"] == [total // 8]
            assert resumed["meta"]["lr"] == pytest.approx(reference["meta"]["lr"], rel=1e-12)
            for part in ("weights", "moments", "ema"):
                for k, want in reference[part].items():
                    torch.testing.assert_close(resumed[part][k], want, rtol=1e-5, atol=1e-6, msg=f"{part} {k}")


def test_one_epoch_mode_moves_between_world_sizes(tmp_path):
    """data.resample=false: an epoch of 96 samples trained 2 -> 4 -> 2 ranks (ZeRO-1, a checkpoint at each change)
    hands out every sample of the data set exactly once: what the trainers consumed, by content, equals the data set.
    (The reader's re-split itself is tested with sample ids in tests/test_data_loader.py.)"""
    from lct_fast.config import load_config
    from lct_fast.data import LatentLoader, resolve_dataset

    sets = ("data.resample=false", "data.synthetic.num_samples=96", "data.synthetic.samples_per_shard=8")
    consumed = []
    for ranks, total, name, layout in ((2, 32, "a", []), (4, 64, "b", [[2, 16]]), (2, 96, "c", [[2, 16], [4, 8]])):
        r = phase(tmp_path, ranks, 1, total, name, None, sets=sets)
        assert r["samples_at_end"] == total and [list(p) for p in r["epoch_layout"]] == layout
        assert [len(c) for c in r["consumed"]] == [32 // ranks] * ranks
        consumed += [h for c in r["consumed"] for h in c]
    cfg = load_config("tiny", list(sets))
    everything = LatentLoader(resolve_dataset(cfg.data), batch_size=96, resample=False, shuffle_buffer=0,
                              sigma_data=cfg.method.sigma_data, normalize=cfg.data.normalize)
    want = [hashlib.sha256(row.numpy().tobytes()).hexdigest()[:16] for x0, _ in everything for row in x0]
    assert len(set(want)) == 96
    assert len(consumed) == 96 and sorted(consumed) == sorted(want)
