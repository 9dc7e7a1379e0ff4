"""Global OT coupling across ranks: a 2-rank gloo run checked against POT on the global batch."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from lct_fast import ot as O
from lct_fast.distributed import free_port
from lct_fast.ot_global import couple_global, couple_noise_global, gather_batch

ot_pot = pytest.importorskip("ot")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "dist"))
from ot_global import BATCH, METHODS, rank_batch  # noqa: E402

WORLD = 2


def _pair_cost(x: np.ndarray, z: np.ndarray) -> float:
    """Total squared distance of the pairs (x_i, z_i), in float64."""
    return float(((x.astype(np.float64) - z.astype(np.float64)) ** 2).sum())


@pytest.fixture(scope="module")
def two_rank_result(tmp_path_factory):
    out = tmp_path_factory.mktemp("ot_global") / "result.json"
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD), "--master_port",
           str(free_port()), "tests/dist/ot_global.py", "--out", str(out)]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def _global_data():
    xs, zs = zip(*(rank_batch(r) for r in range(WORLD)))
    return torch.cat(xs).flatten(1).numpy(), torch.cat(zs).flatten(1).numpy()


@pytest.mark.distributed
@pytest.mark.parametrize("method", METHODS)
def test_global_coupling_is_a_permutation_no_worse_than_per_rank(two_rank_result, method):
    res = sorted(two_rank_result, key=lambda r: r["rank"])
    x_all, z_all = _global_data()
    n = WORLD * BATCH
    perm = np.concatenate([r[f"{method}/global_root"] for r in res])
    assert sorted(perm.tolist()) == list(range(n))                     # a permutation of the global batch
    assert np.array_equal(perm, np.concatenate([r[f"{method}/global_all"] for r in res]))  # root == all
    # Per-rank solution, as a global pairing: rank r's local indices shifted into the gathered layout.
    local = np.concatenate([np.asarray(r[f"{method}/local"]) + r["rank"] * BATCH for r in res])
    assert sorted(local.tolist()) == list(range(n))
    c_global, c_local = _pair_cost(x_all, z_all[perm]), _pair_cost(x_all, z_all[local])
    assert c_global <= c_local
    assert c_global < 0.99 * c_local  # a 2x larger batch shortens the paths measurably on this data
    # Against POT on the whole global batch (independent optimum).
    M = ot_pot.dist(x_all.astype(np.float64), z_all.astype(np.float64), metric="sqeuclidean")
    w = np.full(n, 1.0 / n)
    best = float(ot_pot.emd2(w, w, M, numItermax=10_000_000)) * n
    assert c_global >= best * (1 - 1e-6)
    assert c_global <= best * (1 + 1e-6 if method == "exact" else 1.01)
    # couple_noise_global hands each rank its paired noise and its own cost ratio.
    for r in res:
        rows = slice(r["rank"] * BATCH, (r["rank"] + 1) * BATCH)
        zp = np.asarray(r[f"{method}/paired_noise"], dtype=np.float32)
        np.testing.assert_array_equal(zp, z_all[perm[rows]])
        ratio = _pair_cost(x_all[rows], zp) / _pair_cost(x_all[rows], z_all[rows])
        assert r[f"{method}/ratio"] == pytest.approx(ratio, rel=1e-5)


@pytest.mark.distributed
def test_unequal_batches_fail_clearly(two_rank_result):
    for r in two_rank_result:
        assert "same batch shape" in r["size_error"] and "(40, 384)" in r["size_error"]


def test_single_process_is_plain_couple():
    x, z = rank_batch(0)
    for method in METHODS:
        assert torch.equal(couple_global(x, z, method=method, backend="reference"),
                           O.couple(x, z, method, backend="reference"))
        zp, ratio = couple_noise_global(x, z, method=method, backend="reference")
        perm = O.couple(x, z, method, backend="reference")
        assert torch.equal(zp, z[perm])
        ident = ((x - z) ** 2).sum()
        torch.testing.assert_close(ratio, ((x - z[perm]) ** 2).sum() / ident)
    same, one = couple_noise_global(x, z, method="none")
    assert same is z and float(one) == 1.0
    xa, za = gather_batch(x, z)
    assert torch.equal(xa, x.flatten(1)) and torch.equal(za, z.flatten(1))
    with pytest.raises(ValueError, match="same shape"):
        gather_batch(x, z[:-1])
    with pytest.raises(ValueError, match="solve_on"):
        couple_global(x, z, method="exact", solve_on="everyone")


@pytest.mark.distributed
@pytest.mark.parametrize("method", METHODS)
def test_global_coupling_within_labels_is_the_per_class_solution(two_rank_result, method):
    """With labels, the global problem pairs only within a label (the null class its own group), anywhere in the
    global batch: for exact OT exactly the per-class solution of the gathered batch, each class at POT's optimum."""
    res = sorted(two_rank_result, key=lambda r: r["rank"])
    parts = [rank_batch(r, with_labels=True) for r in range(WORLD)]
    x_all = torch.cat([p[0] for p in parts]).flatten(1)
    z_all = torch.cat([p[1] for p in parts]).flatten(1)
    lab = torch.cat([p[2] for p in parts])
    perm = torch.as_tensor(np.concatenate([r[f"{method}/global_labels"] for r in res]))
    assert sorted(perm.tolist()) == list(range(WORLD * BATCH))
    assert torch.equal(lab[perm], lab)
    assert (perm // BATCH != torch.arange(WORLD * BATCH) // BATCH).any()   # noise does cross ranks
    if method == "exact":
        assert torch.equal(perm, O.couple(x_all, z_all, "exact", labels=lab))
    for c in lab.unique().tolist():
        idx = (lab == c).nonzero().flatten().numpy()
        xs, zs = x_all.numpy()[idx], z_all.numpy()[idx]
        M = ot_pot.dist(xs.astype(np.float64), zs.astype(np.float64), metric="sqeuclidean")
        w = np.full(len(idx), 1.0 / len(idx))
        best = float(ot_pot.emd2(w, w, M, numItermax=1_000_000)) * len(idx)
        got = _pair_cost(xs, z_all.numpy()[perm.numpy()[idx]])
        assert best * (1 - 1e-6) <= got <= best * (1 + 1e-6 if method == "exact" else 1.01)
    for r in res:
        rows = slice(r["rank"] * BATCH, (r["rank"] + 1) * BATCH)
        np.testing.assert_array_equal(np.asarray(r[f"{method}/paired_noise_labels"], dtype=np.float32),
                                      z_all.numpy()[perm.numpy()[rows]])
