"""Backward pass: gradients reach every trainable parameter; seeded dropout; checkpointing."""
import math
from types import SimpleNamespace

import pytest
import torch

from lct_fast.models import TrigFlowPrecond, VEPrecond, build_backbone

try:
    from lct_fast.config import ModelConfig
except ImportError:  # pragma: no cover
    ModelConfig = None

ARCHS = {
    "dit": dict(arch="dit", size="custom", width=32, depth=2, heads=2, patch_size=2),
    "unet": dict(arch="unet", unet_channels=16, channel_mult=[1, 2], num_res_blocks=1, attn_resolutions=[4],
                 head_channels=8),
}


def _cfg(arch, **kw):
    base = dict(size="S", width=0, depth=0, heads=0, patch_size=2, mlp_ratio=4.0, in_channels=4, resolution=8,
                num_classes=3, dropout=0.2, norm="nsln", unet_channels=128, channel_mult=[1, 2, 3, 4],
                num_res_blocks=4, attn_resolutions=[16, 8], head_channels=64, adaptive_weight=True,
                checkpointing=False, ops_backend="auto")
    base.update(ARCHS[arch])
    base.update(kw)
    return ModelConfig(**base) if ModelConfig is not None else SimpleNamespace(**base)


def _randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            std = 1.0 / math.sqrt(p[0].numel()) if p.dim() >= 2 else 0.3
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
    return model


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
