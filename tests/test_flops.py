"""FLOP counting (lct_fast.profiler.flops): the dispatcher count against closed forms -- the DiT forward and JVP pass,
attention's JVP factor (the one definition bench_attention.py and launch/profile.py share) -- and the
materialised zero weight tangents of forward-mode AD kept out of the model FLOPs."""

import pytest
import torch
import torch.autograd.forward_ad as fwAD

from lct_fast.config import load_config
from lct_fast.profiler.flops import (ATTENTION_PASS_FACTOR, FlopCounter, attention_flops, count_flops, dit_forward_flops,
                            dit_jvp_flops, peak_tflops)
from lct_fast.methods import build_model
from lct_fast.ops import attention_reference

# The tiny preset and a DiT with every dimension different (width, depth, heads, patch, MLP ratio,
# resolution, channels), so a closed-form term with the wrong dimension cannot pass by coincidence.
SHAPES = {
    "tiny": ("tiny_sct", []),
    "odd": ("tiny_sct", ["model.width=96", "model.depth=3", "model.heads=3", "model.resolution=12",
                         "model.patch_size=2", "model.mlp_ratio=3.0", "model.in_channels=3",
                         "data.synthetic.channels=3", "data.synthetic.resolution=12"]),
    "patch1": ("tiny", ["model.patch_size=1", "model.width=48", "model.heads=4"]),
    "guided": ("tiny_scd", ["model.width=48", "model.heads=4"]),   # + the guidance-scale MLP
}


def _net(name):
    preset, sets = SHAPES[name]
    cfg = load_config(preset, sets)
    torch.manual_seed(0)
    return cfg, build_model(cfg.model, cfg.method)


def _inputs(cfg, b=3):
    m = cfg.model
    g = torch.Generator().manual_seed(1)
    x = torch.randn(b, m.in_channels, m.resolution, m.resolution, generator=g)
    return x, torch.rand(b, generator=g) + 0.1, torch.randint(0, m.num_classes, (b,), generator=g)


@pytest.mark.parametrize("name", list(SHAPES))
def test_dit_forward_count_matches_closed_form(name):
    cfg, net = _net(name)
    x, t, y = _inputs(cfg)
    with torch.no_grad():
        counted = count_flops(lambda: net.backbone(x, t, y)) / x.shape[0]
    closed = dit_forward_flops(cfg.model)
    if cfg.model.adaptive_weight:
        closed -= 2 * 256  # the w_φ head is not part of the backbone's forward
    assert counted == pytest.approx(closed, rel=0.05)
    assert counted == pytest.approx(closed, rel=1e-6)  # in fact exact: every matmul is in the closed form


@pytest.mark.parametrize("name", ["tiny", "odd"])
def test_dit_jvp_pass_count_matches_definition(name):
    """The sCT JVP pass (TrigFlow F with tangents in x and t) = primal + tangent = 2 x linear + 3 x attention,
    and our layers execute no zero weight-tangent product (lct_fast.ops.linear / conv2d)."""
    cfg, net = _net(name)
    x, t, y = _inputs(cfg)
    with FlopCounter(bucket=lambda: "jvp") as fc, torch.no_grad(), fwAD.dual_level():
        out, tan = fwAD.unpack_dual(net.F(fwAD.make_dual(x, torch.randn_like(x)),
                                          fwAD.make_dual(t, torch.ones_like(t)), y))
    assert tan is not None
    b = x.shape[0]
    closed = dit_jvp_flops(cfg.model) - 2 * 256 * (cfg.model.adaptive_weight)
    assert fc.total / b == pytest.approx(closed, rel=1e-3)  # exact but for fp rounding of the counts
    fwd = dit_forward_flops(cfg.model)
    assert 2.0 < fc.total / b / fwd < 3.0
    assert not fc.wasted


def test_attention_jvp_is_three_forwards():
    """The reference attention under forward AD executes exactly the products of attention_flops('jvp')."""
    b, h, lq, dh = 2, 3, 17, 8
    g = torch.Generator().manual_seed(0)
    q, k, v, tq, tk, tv = (torch.randn(b, h, lq, dh, generator=g) for _ in range(6))
    with torch.no_grad():
        fwd = count_flops(lambda: attention_reference(q, k, v))
    with FlopCounter(bucket=lambda: "a") as fc, torch.no_grad(), fwAD.dual_level():
        attention_reference(fwAD.make_dual(q, tq), fwAD.make_dual(k, tk), fwAD.make_dual(v, tv))
    assert fwd == attention_flops(b, h, lq, lq, dh, "forward") == 4 * b * h * lq * lq * dh
    assert fc.total == attention_flops(b, h, lq, lq, dh, "jvp") == ATTENTION_PASS_FACTOR["jvp"] * fwd
    with pytest.raises(ValueError, match="mode"):
        attention_flops(1, 1, 1, 1, 1, "sideways")


def test_sdpa_cpu_flash_is_counted_forward_and_backward():
    """torch's table lacks the CPU flash SDPA ops; ours adds them (forward 4BHL²D, backward 2.5x)."""
    b, h, lq, dh = 2, 2, 16, 8
    q, k, v = (torch.randn(b, h, lq, dh, requires_grad=True) for _ in range(3))
    with FlopCounter(bucket=lambda: "x") as fc:
        torch.nn.functional.scaled_dot_product_attention(q, k, v).sum().backward()
    assert fc.total == pytest.approx(attention_flops(b, h, lq, lq, dh, "fwd+bwd"))


def test_linear_jvp_waste_is_separate_and_backward_is_two_forwards():
    lin = torch.nn.Linear(16, 24)
    x = torch.randn(5, 16, requires_grad=True)
    with FlopCounter(bucket=lambda: "j") as fc, torch.no_grad(), fwAD.dual_level():
        fwAD.unpack_dual(lin(fwAD.make_dual(x.detach(), torch.randn(5, 16))))
    assert fc.flops["j"] == 2 * (2 * 5 * 16 * 24)
    assert fc.wasted["j"] == 2 * 5 * 16 * 24
    with FlopCounter(bucket=lambda: "b") as fc2:
        lin(x).sum().backward()
    assert fc2.total == 3 * (2 * 5 * 16 * 24)


def test_peak_table():
    assert peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.0
    assert peak_tflops("NVIDIA H200", "fp32") == pytest.approx(66.9)
    assert peak_tflops("NVIDIA A100-SXM4-80GB", "tf32") == 156.0
    assert peak_tflops("NVIDIA H100 PCIe", "bf16") == 756.0
    assert peak_tflops("NVIDIA H100 NVL", "bf16") == 835.0
    assert peak_tflops("CPU Intel Xeon", "fp32") is None
