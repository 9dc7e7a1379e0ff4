"""Backward pass: gradients reach every trainable parameter; seeded dropout; checkpointing."""

import pytest
import torch

from lct_fast.models import TrigFlowPrecond, VEPrecond, build_backbone

from model_helpers import ARCHS, randomize as _randomize, small_cfg  # noqa: E402,F401


def _cfg(arch, **kw):
    return small_cfg(arch, **{"dropout": 0.2, "checkpointing": False, **kw})


@pytest.mark.parametrize("arch,norm", [("dit", "nsln"), ("unet", "nsln"), ("unet", "groupnorm")])
def test_gradients_reach_every_parameter(arch, norm):
    bb = _randomize(build_backbone(_cfg(arch, norm=norm))).train()
    for net, s in ((VEPrecond(bb), torch.tensor([0.5, 2.0])), (TrigFlowPrecond(bb), torch.tensor([0.3, 1.2]))):
        bb.zero_grad(set_to_none=True)
        x = torch.randn(2, 4, 8, 8)
        loss = net(x, s, torch.tensor([1, 3]), dropout_seed=3).square().mean() + net.logvar(s).sum()
        loss.backward()
        missing = [n for n, p in bb.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
        assert not missing, f"no gradient for {missing}"


@pytest.mark.parametrize("arch", ["dit", "unet"])
def test_seeded_dropout_masks(arch):
    bb = _randomize(build_backbone(_cfg(arch))).train()
    x, c = torch.randn(2, 4, 8, 8), torch.tensor([10.0, -5.0])
    with torch.no_grad():
        a, b = bb(x, c, dropout_seed=11), bb(x, c, dropout_seed=11)
        d = bb(x, c, dropout_seed=12)
        n1, n2 = bb(x, c), bb(x, c)
        bb.eval()
        e1, e2 = bb(x, c, dropout_seed=11), bb(x, c)
    assert torch.equal(a, b)  # online and target passes see the same masks
    assert not torch.allclose(a, d)
    assert not torch.allclose(n1, n2)  # dropout_seed=None: default generator
    assert torch.equal(e1, e2) and not torch.allclose(e1, a)  # eval: no dropout


@pytest.mark.parametrize("arch", ["dit", "unet"])
def test_checkpointing_gives_same_gradients(arch):
    grads = []
    for ckpt in (False, True):
        bb = _randomize(build_backbone(_cfg(arch, checkpointing=ckpt))).train()
        x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        out = bb(x, torch.tensor([1.0, 2.0]), torch.tensor([0, 2]), dropout_seed=5)
        out.square().sum().backward()
        grads.append([torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in bb.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_checkpointing_skipped_without_grad(monkeypatch):
    import lct_fast.models.layers as layers
    calls = []
    real = layers.checkpoint
    monkeypatch.setattr(layers, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    bb = build_backbone(_cfg("dit", checkpointing=True))
    x, c = torch.randn(2, 4, 8, 8), torch.zeros(2)
    bb(x, c)
    assert len(calls) == 2  # one per block with grad enabled
    with torch.no_grad():
        bb(x, c)
    torch.func.jvp(lambda a: bb(a, c), (x,), (x,))
    assert len(calls) == 2
