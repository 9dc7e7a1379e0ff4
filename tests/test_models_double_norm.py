"""Adaptive double normalization (sCM §4.1): y = norm(x)·pnorm(1 + scale) + pnorm(shift)."""
import pytest
import torch

from lct_fast.models import TrigFlowPrecond, build_backbone
from lct_fast.models.layers import double_norm_modulation, pixel_norm

from model_helpers import randomize, small_cfg


def test_pixel_norm_unit_rms_and_modulation_form():
    v = torch.randn(5, 16, dtype=torch.float64) * 7
    torch.testing.assert_close(pixel_norm(v).square().mean(-1), torch.ones(5, dtype=torch.float64))
    sh, sc = torch.randn(5, 16) * 3, torch.randn(5, 16) * 0.2
    sh2, sc2 = double_norm_modulation(sh, sc, True)
    torch.testing.assert_close(sh2, sh / sh.square().mean(-1, keepdim=True).sqrt(), rtol=1e-5, atol=1e-6)
    one = 1 + sc
    torch.testing.assert_close(1 + sc2, one / one.square().mean(-1, keepdim=True).sqrt(), rtol=1e-5, atol=1e-6)
    assert double_norm_modulation(sh, sc, False) == (sh, sc)
    # adaLN-zero's init (scale = 0) is left exactly as it is
    assert torch.equal(double_norm_modulation(sh, torch.zeros(5, 16), True)[1], torch.zeros(5, 16))


@pytest.mark.parametrize("arch", ["dit", "unet"])
@torch.no_grad()
def test_conditioning_scale_is_bounded(arch):
    # Blow the conditioning projection up 1000x: with double normalization the conditioned layer's output
    # keeps its scale (pnorm removes it), without it the output grows with the gain. DiT: the final layer
    # (nothing renormalises after it); UNet: one res-block.
    def out(adn, gain):
        torch.manual_seed(0)
        bb = randomize(build_backbone(small_cfg(arch, adaptive_double_norm=adn))).eval()
        layer, lin = (bb.final, bb.final.ada) if arch == "dit" else (bb.enc[0], bb.enc[0].affine)
        lin.weight.mul_(gain)
        lin.bias.mul_(gain)
        g = torch.Generator().manual_seed(1)
        if arch == "dit":
            return layer(torch.randn(2, 16, bb.width, generator=g), torch.randn(2, bb.width, generator=g))
        x = torch.randn(2, layer.norm0.channels if hasattr(layer.norm0, "channels") else 16, 8, 8, generator=g)
        return layer(x, torch.randn(2, lin.in_features, generator=g), None)

    plain = out(False, 1000.0).abs().max() / out(False, 1.0).abs().max()
    adn = out(True, 1000.0).abs().max() / out(True, 1.0).abs().max()
    assert plain > 100 and 0.1 < adn < 10, (float(plain), float(adn))


def test_dit_with_double_norm_starts_at_zero_output_and_keeps_boundary():
    bb = build_backbone(small_cfg("dit", adaptive_double_norm=True))
    # adaLN-zero: gates and the output layer start at zero, the shift rows must not (pnorm needs a direction)
    w = bb.blocks[0].ada.weight
    width = bb.width
    assert w[:width].abs().sum() > 0 and w[3 * width:4 * width].abs().sum() > 0
    assert w[width:3 * width].abs().sum() == 0 and w[4 * width:].abs().sum() == 0
    x = torch.randn(3, 4, 8, 8)
    assert torch.equal(bb(x, torch.rand(3)), torch.zeros_like(x))
    net = TrigFlowPrecond(randomize(bb))
    assert torch.equal(net(x, torch.zeros(3)), x)
