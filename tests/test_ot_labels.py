"""Minibatch OT within the label the network sees (SPEC §2): optimal per class, never across classes, and the
paired noise no longer tells the class."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lct_fast import ot as O
from lct_fast.methods.common import config_coupler

pot = pytest.importorskip("ot")

K, D = 4, 32


def _class_batch(gen: torch.Generator, batch: int = 32, spread: float = 1.5):
    """Latents from K well-separated class means (unit noise around them), standard-normal noise, labels."""
    means = spread * torch.randn(K, D, generator=torch.Generator().manual_seed(7))
    labels = torch.randint(0, K, (batch,), generator=gen)
    x = means[labels] + torch.randn(batch, D, generator=gen)
    z = torch.randn(batch, D, generator=gen)
    return x, z, labels


def _pot_cost(x: np.ndarray, z: np.ndarray) -> float:
    M = pot.dist(x.astype(np.float64), z.astype(np.float64), metric="sqeuclidean")
    w = np.full(len(x), 1.0 / len(x))
    return float(pot.emd2(w, w, M, numItermax=1_000_000)) * len(x)


@pytest.mark.parametrize("method", ["exact", "hungarian", "sinkhorn"])
def test_within_class_plan_is_optimal_per_class(method):
    gen = torch.Generator().manual_seed(0)
    x, z, labels = _class_batch(gen, batch=48)
    labels[:3] = K  # three dropped labels: the null class is a group of its own
    perm = O.couple(x, z, method, labels=labels, backend="reference")
    assert sorted(perm.tolist()) == list(range(48))
    assert torch.equal(labels[perm], labels)                      # no pair crosses a label
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero().flatten()
        got = float((x[idx] - z[perm[idx]]).double().square().sum())
        best = _pot_cost(x[idx].numpy(), z[idx].numpy())         # POT on that class alone
        assert got >= best * (1 - 1e-6)                            # POT's own rounding is ~1e-8
        assert got <= best * (1 + (1e-6 if method != "sinkhorn" else 0.01))


def test_labels_combine_with_chunks_and_keep_unconditional_runs_unchanged():
    gen = torch.Generator().manual_seed(1)
    x, z, labels = _class_batch(gen, batch=32)
    perm = O.couple(x, z, "exact", labels=labels, groups=2)
    chunk = torch.arange(32) // 16
    assert torch.equal(labels[perm], labels) and torch.equal(chunk[perm], chunk)
    # One label for everybody is the unconditional problem: the same plan as no labels.
    assert torch.equal(O.couple(x, z, "exact", labels=torch.zeros(32, dtype=torch.long)), O.couple(x, z, "exact"))
    with pytest.raises(ValueError, match="labels must have shape"):
        O.couple(x, z, "exact", labels=labels[:5])
    with pytest.raises(ValueError, match="integer class ids"):
        O.couple(x, z, "exact", labels=labels.float())


def _probe_accuracy(per_class: bool, batches: int = 160) -> float:
    """Train a linear (nearest class mean) probe to read the class of x0 from the noise it was paired with, on
    half the pairs; its accuracy on the other half."""
    from types import SimpleNamespace

    coupler = config_coupler(SimpleNamespace(method="exact", backend="reference", sinkhorn_eps=0.05,
                                             sinkhorn_iters=100, per_class=per_class))
    gen = torch.Generator().manual_seed(2)
    zs, ys = [], []
    for _ in range(batches):
        x, z, labels = _class_batch(gen)
        zp, _ = coupler(x, z, labels)
        zs.append(zp)
        ys.append(labels)
    z, y = torch.cat(zs).double(), torch.cat(ys)
    half = len(y) // 2
    mu = torch.stack([z[:half][y[:half] == c].mean(0) for c in range(K)])
    scores = z[half:] @ mu.T - 0.5 * (mu * mu).sum(1)
    return float((scores.argmax(1) == y[half:]).double().mean())


def test_paired_noise_does_not_carry_the_class():
    """Across classes, exact OT hands each class the noise nearest its mean: a linear probe reads the class from
    the noise alone. Within the class it is at chance (1/K; ±0.03 is > 3 std at 2 560 held-out pairs)."""
    across, within = _probe_accuracy(per_class=False), _probe_accuracy(per_class=True)
    assert across > 0.5, across
    assert abs(within - 1.0 / K) < 0.03, within


def test_within_class_coupling_still_shortens_paths():
    gen = torch.Generator().manual_seed(3)
    x, z, labels = _class_batch(gen, batch=64)
    across = O.couple(x, z, "exact", return_cost=True)
    within = O.couple(x, z, "exact", labels=labels, return_cost=True)
    assert float(across.ratio) <= float(within.ratio) < 0.99


def test_losses_hand_the_labels_they_condition_on_to_the_coupler():
    """iLCT, sCT and TrigFlow couple after label dropout: the coupler sees exactly the labels the network sees."""
    from lct_fast.config import MethodConfig
    from lct_fast.methods import build_loss

    class Net(torch.nn.Module):
        class _B:
            num_classes = 3
        backbone = _B()

        def forward(self, x, sigma, labels, dropout_seed=None, **kw):
            self.seen = labels
            return x * 0

        def F(self, x, t, labels, dropout_seed=None, **kw):
            self.seen = labels
            return x * 0

        def logvar(self, t):
            return torch.zeros_like(t)

    for name in ("ict", "trigflow"):
        cfg = MethodConfig(name=name, label_dropout=0.5)
        loss = build_loss(cfg, data_dim=16, total_steps=10)
        got = []
        loss.coupler = lambda x0, z, labels: (got.append(labels), (z, torch.ones(())))[1]
        net = Net()
        loss(net, torch.randn(8, 1, 4, 4), torch.arange(8) % 3, step=0, generator=torch.Generator().manual_seed(0))
        assert torch.equal(got[0], net.seen) and (got[0] == 3).any(), name
