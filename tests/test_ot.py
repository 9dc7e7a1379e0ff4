"""Tests of lct_fast.ot: couplings are permutations with the right cost, against POT / scipy / brute force."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from lct_fast import ot as O

ot_pot = pytest.importorskip("ot")
scipy_opt = pytest.importorskip("scipy.optimize")


def _data(n: int, d: int, kind: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Latent-like batches: 'random' Gaussian, 'clustered' (8 well separated modes), 'spiky' (a Gaussian
    body plus sparse large spikes, like SD-VAE latents, SPEC §1). Noise is standard normal."""
    g = torch.Generator().manual_seed(seed)
    if kind == "random":
        x = torch.randn(n, d, generator=g)
    elif kind == "clustered":
        centres = 2.0 * torch.randn(8, d, generator=g)
        x = centres[torch.randint(8, (n,), generator=g)] + 0.5 * torch.randn(n, d, generator=g)
    else:
        x = torch.randn(n, d, generator=g)
        spikes = torch.rand(n, d, generator=g) < 0.01
        x = torch.where(spikes, 8.0 * torch.randn(n, d, generator=g), x)
    return x, torch.randn(n, d, generator=g)


def _is_perm(p: torch.Tensor, n: int) -> bool:
    return p.dtype == torch.long and p.shape == (n,) and sorted(p.tolist()) == list(range(n))


def _pot_cost(x: torch.Tensor, z: torch.Tensor) -> float:
    """Optimal mean squared distance from POT's emd2 on POT's own cost matrix (independent reference)."""
    xn, zn = x.reshape(len(x), -1).double().numpy(), z.reshape(len(z), -1).double().numpy()
    M = ot_pot.dist(xn, zn, metric="sqeuclidean")
    w = np.full(len(x), 1.0 / len(x))
    return float(ot_pot.emd2(w, w, M, numItermax=10_000_000))


def test_cost_matrix_matches_cdist():
    x, z = _data(20, 37, "spiky", 0)
    C = O.cost_matrix(x.reshape(20, 1, 37), z.reshape(20, 1, 37))
    ref = torch.cdist(x.double(), z.double()) ** 2
    torch.testing.assert_close(C.double(), ref, rtol=1e-5, atol=1e-3)


def test_none_is_identity():
    x, z = _data(16, 8, "random", 1)
    res = O.couple(x, z, "none", return_cost=True)
    assert torch.equal(res.perm, torch.arange(16))
    assert float(res.ratio) == 1.0


@pytest.mark.parametrize("method", ["exact", "hungarian", "sinkhorn"])
def test_couplings_are_permutations_with_consistent_cost(method):
    x, z = _data(48, 3 * 4 * 4, "random", 2)
    x, z = x.reshape(48, 3, 4, 4), z.reshape(48, 3, 4, 4)
    res = O.couple(x, z, method, return_cost=True)
    assert _is_perm(res.perm, 48)
    # z[perm] is the noise paired with x0: the reported cost is the mean of those pairs' squared distances.
    direct = ((x - z[res.perm]) ** 2).flatten(1).sum(1).mean()
    torch.testing.assert_close(res.cost, direct, rtol=1e-5, atol=0)
    torch.testing.assert_close(res.identity_cost, ((x - z) ** 2).flatten(1).sum(1).mean(), rtol=1e-5, atol=0)
    assert float(res.ratio) < 1.0  # OT shortens the paths on random data
    torch.testing.assert_close(res.ratio, res.cost / res.identity_cost)


def test_exact_matches_brute_force_on_tiny_problem():
    x, z = _data(6, 5, "spiky", 3)
    C = (torch.cdist(x.double(), z.double()) ** 2).numpy()
    best = min(sum(C[i, p[i]] for i in range(6)) for p in itertools.permutations(range(6)))
    for method in ("exact", "hungarian", "sinkhorn"):
        perm = O.couple(x, z, method).numpy()
        assert C[np.arange(6), perm].sum() == pytest.approx(best, rel=1e-9), method


@pytest.mark.parametrize("n,d,kind", [(64, 256, "random"), (100, 64, "clustered"), (128, 512, "spiky")])
def test_pot_and_scipy_agree(n, d, kind):
    x, z = _data(n, d, kind, 4)
    pe = O.couple(x, z, "exact", return_cost=True)
    ph = O.couple(x, z, "hungarian", return_cost=True)
    ref = _pot_cost(x, z)  # emd2 with weights 1/n = mean pair cost
    assert float(pe.cost) == pytest.approx(ref, rel=1e-5)
    assert float(ph.cost) == pytest.approx(ref, rel=1e-5)


@pytest.mark.parametrize("kind", ["random", "clustered", "spiky"])
@pytest.mark.parametrize("n,d", [(64, 256), (64, 4096), (128, 1024), (256, 256), (256, 4096)])
def test_sinkhorn_within_one_percent_of_exact(n, d, kind):
    x, z = _data(n, d, kind, 5 + n + d)
    res = O.couple(x, z, "sinkhorn", return_cost=True)  # config defaults: eps 0.05, 100 iterations
    assert _is_perm(res.perm, n)
    ref = _pot_cost(x, z)
    assert float(res.cost) <= 1.01 * ref
    assert float(res.cost) >= ref * (1 - 1e-5)  # cannot beat the optimum


def test_sinkhorn_batched_groups_match_individual_problems():
    x, z = _data(96, 32, "clustered", 6)
    perm = O.couple(x, z, "sinkhorn", groups=3)
    assert _is_perm(perm, 96)
    for k in range(3):
        sl = slice(32 * k, 32 * (k + 1))
        part = perm[sl]
        assert ((part >= 32 * k) & (part < 32 * (k + 1))).all()  # pairs stay inside their group
        solo = O.couple(x[sl], z[sl], "sinkhorn") + 32 * k
        assert torch.equal(part, solo)
    exact = O.couple(x, z, "exact", groups=3)
    for k in range(3):
        sl = slice(32 * k, 32 * (k + 1))
        assert torch.equal(exact[sl], O.couple(x[sl], z[sl], "exact") + 32 * k)


@pytest.mark.parametrize("method", ["exact", "sinkhorn"])
def test_deterministic_for_a_seed(method):
    a = O.couple(*_data(64, 128, "random", 7), method)
    b = O.couple(*_data(64, 128, "random", 7), method)
    assert torch.equal(a, b)


def test_sinkhorn_log_matches_pot_entropic_plan():
    """Fixed-ε reference Sinkhorn against POT's log-domain Sinkhorn plan on the same scaled cost."""
    x, z = _data(24, 16, "random", 8)
    C = O.cost_matrix(x, z).double()
    C = C / C.mean()
    eps = 0.1
    f, g = O.sinkhorn_log(C.unsqueeze(0), [eps] * 2000, 2000)
    plan = torch.exp((f[0, :, None] + g[0, None, :] - C) / eps).numpy()
    w = np.full(24, 1 / 24)
    ref = ot_pot.sinkhorn(w, w, C.numpy(), eps, method="sinkhorn_log", numItermax=20000, stopThr=1e-13)
    np.testing.assert_allclose(plan, ref, rtol=1e-6, atol=1e-10)
    np.testing.assert_allclose(plan.sum(1), w, rtol=1e-8)
    np.testing.assert_allclose(plan.sum(0), w, rtol=1e-8)


def test_eps_schedule_shape():
    s = O.eps_schedule(0.05, 100)
    assert len(s) == 100 and s[0] == 1.0 and s[-1] == 0.05
    assert all(a >= b for a, b in zip(s, s[1:]))
    assert O.eps_schedule(0.05, 1) == [0.05]


def test_round_to_permutation_recovers_planted_permutation_and_handles_ties():
    g = torch.Generator().manual_seed(9)
    planted = torch.stack([torch.randperm(40, generator=g) for _ in range(3)])
    R = torch.rand(3, 40, 40, generator=g) + 1.0
    R.scatter_(2, planted.unsqueeze(2), 0.0)
    assert torch.equal(O.round_to_permutation(R), planted)
    ties = O.round_to_permutation(torch.zeros(2, 17, 17))
    for p in ties:
        assert _is_perm(p, 17)
    # Forced completion after a single round still yields a valid permutation.
    short = O.round_to_permutation(torch.rand(2, 30, 30, generator=g), max_rounds=1)
    for p in short:
        assert _is_perm(p, 30)


def test_two_opt_never_increases_cost_and_reaches_local_optimum():
    g = torch.Generator().manual_seed(10)
    C = torch.rand(2, 30, 30, generator=g, dtype=torch.float64)
    start = torch.stack([torch.randperm(30, generator=g) for _ in range(2)])
    out = O.two_opt(C, start, rounds=200)
    cost = lambda p: C.gather(2, p.unsqueeze(2)).sum((1, 2))  # noqa: E731
    assert (cost(out) <= cost(start) + 1e-12).all()
    for b in range(2):
        assert _is_perm(out[b], 30)
        p = out[b]
        for i in range(30):
            for j in range(i + 1, 30):  # brute-force check: no improving swap is left
                gain = C[b, i, p[i]] + C[b, j, p[j]] - C[b, i, p[j]] - C[b, j, p[i]]
                assert gain <= 1e-12


def _fake_backend(monkeypatch, op, name, fn, available=lambda C, *a: (C.is_cuda, "needs CUDA tensors")):
    """Register ``fn`` as backend ``name`` of ``op`` in the one kernel registry for this test only."""
    from lct_fast.ops import dispatch

    monkeypatch.setitem(dispatch._REGISTRY[op], name, dispatch._Entry(fn, available, True))
    monkeypatch.setattr(dispatch, "_SEEN", {})


def test_backend_registry_and_fallback(monkeypatch):
    assert O.get_sinkhorn_backend("auto", "cpu")[0] == "reference"
    monkeypatch.setattr("lct_fast.ops.dispatch._SEEN", {})
    with pytest.warns(RuntimeWarning, match="triton unavailable"):
        assert O.get_sinkhorn_backend("triton", "cpu")[0] == "reference"
    calls = []

    def fake(C, **kwargs):
        calls.append(kwargs)
        return O.sinkhorn_assignment(C, backend="reference", **kwargs)

    _fake_backend(monkeypatch, "sinkhorn_log", "cuda", lambda C, s, i: O.sinkhorn_log(C, s, i))
    _fake_backend(monkeypatch, "sinkhorn_assignment", "cuda", fake)
    assert O.get_sinkhorn_backend("auto", "cpu")[0] == "reference"  # a CUDA kernel is not used for CPU data
    # on CUDA data auto prefers triton (faster at every measured size) and takes cuda when triton is absent
    from lct_fast.ops import dispatch
    monkeypatch.delitem(dispatch._REGISTRY["sinkhorn_log"], "triton", raising=False)
    assert O.get_sinkhorn_backend("auto", "cuda")[0] == "cuda"
    with pytest.warns(RuntimeWarning, match="needs CUDA"):
        O.couple(*_data(16, 8, "random", 11), "sinkhorn", backend="cuda")
    assert calls == []
    with pytest.raises(ValueError, match="backend"):
        O.get_sinkhorn_backend("opencl")


def test_auto_follows_the_measured_speed_by_size(monkeypatch):
    """auto = triton up to FUSED_MAX_N["triton"], cuda (when triton cannot run) up to FUSED_MAX_N["cuda"], else
    the reference (H200: the one-SM kernels lose to the reference above those sizes, and cuda to triton
    everywhere); an explicit backend, or a module default other than auto, is kept."""
    from lct_fast.ops import dispatch, sinkhorn_ops

    calls = []

    def fake(name):
        def run(C, **kwargs):
            calls.append((name, C.shape[-1]))
            return sinkhorn_ops._reference_assignment(C, **kwargs)
        return run

    anywhere = lambda C, *a: (True, "")  # noqa: E731  (CPU tensors stand in for CUDA ones here)
    for name in ("triton", "cuda"):
        _fake_backend(monkeypatch, "sinkhorn_assignment", name, fake(name), anywhere)
        _fake_backend(monkeypatch, "sinkhorn_log", name, lambda C, s, i: O.sinkhorn_log(C, s, i), anywhere)
    lim = sinkhorn_ops.FUSED_MAX_N
    small, mid, big = 8, lim["cuda"] + 1, lim["triton"] + 1
    g = torch.Generator().manual_seed(0)
    C = {n: torch.rand(n, n, generator=g) for n in (small, mid, big)}

    def run(n, **kw):
        O.sinkhorn_assignment(C[n], iters=3, refine_rounds=0, **kw)
        return calls.pop()[0] if calls else "reference"

    assert [run(n) for n in (small, mid, big)] == ["triton", "triton", "reference"]
    assert [O.get_sinkhorn_backend("auto", "cuda", n)[0] for n in (None, lim["triton"], big)] == \
        ["triton", "triton", "reference"]
    assert run(big, backend="cuda") == "cuda"  # an explicit choice is not second-guessed
    monkeypatch.delitem(dispatch._REGISTRY["sinkhorn_assignment"], "triton")
    monkeypatch.delitem(dispatch._REGISTRY["sinkhorn_log"], "triton")
    assert [run(n) for n in (small, mid, big)] == ["cuda", "reference", "reference"]
    assert [O.get_sinkhorn_backend("auto", "cuda", n)[0] for n in (lim["cuda"], mid)] == ["cuda", "reference"]
    monkeypatch.setattr(dispatch, "_DEFAULT_BACKEND", "cuda")
    assert run(big) == "cuda"


def test_errors_name_the_problem():
    x, z = _data(8, 4, "random", 12)
    with pytest.raises(ValueError, match="same shape"):
        O.couple(x, z[:7])
    with pytest.raises(ValueError, match="unknown coupling method 'greedy'"):
        O.couple(x, z, "greedy")
    with pytest.raises(ValueError, match="groups=3"):
        O.couple(x, z, "exact", groups=3)
    with pytest.raises(ValueError, match="iters"):
        O.eps_schedule(0.05, 0)


def test_low_precision_and_trivial_batches():
    x, z = _data(32, 64, "random", 13)
    p16 = O.couple(x.half(), z.half(), "sinkhorn")
    assert _is_perm(p16, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the cost matmul must stay fp32 inside autocast
        auto = O.couple(x, z, "sinkhorn")
    assert torch.equal(auto, O.couple(x, z, "sinkhorn"))
    assert torch.equal(O.couple(x[:1], z[:1], "exact"), torch.zeros(1, dtype=torch.long))
    assert torch.equal(O.couple(x, z, "exact_scipy"), O.couple(x, z, "hungarian"))
