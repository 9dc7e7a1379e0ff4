"""train.compile's unit (lct_fast.models.layers.compile_blocks): every block of both backbones is compiled --
none left eager by dynamo's recompile limit --, the compiled network computes what the eager one does, and
the forward-mode (JVP) pass runs the compiled blocks eagerly with identical tangents. dynamo's ``eager``
backend keeps this cheap; inductor itself runs under DeepSpeed in tests/test_trainer_zero.py."""

import copy

import pytest
import torch

from lct_fast.config import load_config
from lct_fast.methods.sct import sct_tangent
from lct_fast.methods import build_model
from lct_fast.models.layers import compile_blocks


@pytest.mark.parametrize("preset, sets, blocks", [("tiny_sct", [], 2), ("tiny_sct", ["model.depth=10"], 10),
                                                  ("tiny_sct", ["model.arch=unet"], 44)])
def test_every_block_compiles_and_matches_eager(preset, sets, blocks):
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    cfg = load_config(preset, ["model.dropout=0.1", *sets])
    torch.manual_seed(0)
    net = build_model(cfg.model, cfg.method).train()
    comp = copy.deepcopy(net)
    assert compile_blocks(comp, backend="eager") == blocks
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(8, 4, 8, 8, generator=g), torch.rand(8, generator=g) + 0.1
    y = torch.randint(0, cfg.model.num_classes or 1, (8,), generator=g)
    for seed in (11, 12, 13):  # a new dropout seed each step: one recompile (dynamic), not one per step
        a, b = net.F(x, t, y, dropout_seed=seed), comp.F(x, t, y, dropout_seed=seed)
        a.square().sum().backward()
        b.square().sum().backward()
        assert torch.equal(a, b)
    for p, q in zip(net.parameters(), comp.parameters()):
        assert (p.grad is None) == (q.grad is None) and (p.grad is None or torch.equal(p.grad, q.grad))
    # dynamo compiled every frame it met and gave up nowhere (a recompile-limit hit would leave blocks eager)
    assert counters["frames"]["total"] == counters["frames"]["ok"] > 0
    assert not counters["unimplemented"], dict(counters["unimplemented"])
    # the JVP pass: same tangent through the compiled blocks (run eagerly) as through the eager network
    kw = dict(sigma_data=0.5, r=1.0, g_norm_c=0.1, dropout_seed=5, jvp_dtype="fp32")
    ta = sct_tangent(net, x, t, 0.3 * x, y, **kw)
    tb = sct_tangent(comp, x, t, 0.3 * x, y, **kw)
    assert all(torch.equal(u, v) for u, v in zip(ta, tb))
