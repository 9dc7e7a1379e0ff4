"""Normalisation layers: NsLN (eq. 12) has no trainable scale; UNet norm choices match formulas."""
import pytest
import torch

from lct_fast.models import NsLN, NsLN2d, build_backbone, make_norm2d

try:
    from lct_fast.config import ModelConfig
except ImportError:  # pragma: no cover
    ModelConfig = None


def _cfg(**kw):
    base = dict(arch="unet", size="S", width=0, depth=0, heads=0, patch_size=2, mlp_ratio=4.0, in_channels=4,
                resolution=8, num_classes=0, dropout=0.0, norm="nsln", unet_channels=16, channel_mult=[1, 2],
                num_res_blocks=1, attn_resolutions=[4], head_channels=8, adaptive_weight=False,
                checkpointing=False, ops_backend="auto")
    base.update(kw)
    if ModelConfig is not None:
        return ModelConfig(**base)
    from types import SimpleNamespace
    return SimpleNamespace(**base)


def _standardize(x, dims, eps):
    mu = x.mean(dim=dims, keepdim=True)
    var = ((x - mu) ** 2).mean(dim=dims, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps)


def test_nsln_module_only_has_bias_and_matches_eq12():
    m = NsLN(12, eps=1e-6).double()
    assert [n for n, _ in m.named_parameters()] == ["bias"]
    with torch.no_grad():
        m.bias.copy_(torch.linspace(-1, 1, 12, dtype=torch.float64))
    x = torch.randn(3, 5, 12, dtype=torch.float64) * 4
    torch.testing.assert_close(m(x), _standardize(x, (-1,), 1e-6) + m.bias, rtol=1e-12, atol=1e-12)


def test_nsln2d_whole_feature_with_channel_bias():
    m = NsLN2d(6, eps=1e-6).double()
    assert [n for n, _ in m.named_parameters()] == ["bias"]
    with torch.no_grad():
        m.bias.copy_(torch.arange(6, dtype=torch.float64))
    x = torch.randn(2, 6, 3, 5, dtype=torch.float64) + torch.arange(2.0, dtype=torch.float64).view(2, 1, 1, 1)
    want = _standardize(x, (1, 2, 3), 1e-6) + m.bias.view(1, 6, 1, 1)
    torch.testing.assert_close(m(x), want, rtol=1e-12, atol=1e-12)


def test_dit_and_unet_nsln_have_no_norm_scale():
    dit = build_backbone(_cfg(arch="dit", size="custom", width=16, depth=2, heads=2))
    unet = build_backbone(_cfg())
    for model in (dit, unet):
        norms = [m for m in model.modules() if isinstance(m, (NsLN, NsLN2d))]
        assert norms, "model has no NsLN layers"
        for m in norms:
            assert [n for n, _ in m.named_parameters()] == ["bias"]
        assert not any(isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)) for m in model.modules())


@pytest.mark.parametrize("kind", ["groupnorm", "instancenorm", "layernorm", "rmsnorm", "nsln"])
def test_unet_norm_choices_match_formulas(kind):
    c, eps = 8, 1e-6
    m = make_norm2d(kind, c, eps=eps).double()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    params = dict(m.named_parameters())
    w = params.get("weight", torch.ones(c, dtype=torch.float64)).view(1, c, 1, 1)
    b = params.get("bias", torch.zeros(c, dtype=torch.float64)).view(1, c, 1, 1)
    x = torch.randn(2, c, 4, 4, generator=g, dtype=torch.float64) * 3 + 1
    if kind == "groupnorm":  # min(32, C//4) = 2 groups of 4 channels
        want = _standardize(x.view(2, 2, 4, 4, 4), (2, 3, 4), eps).view_as(x) * w + b
    elif kind == "instancenorm":
        want = _standardize(x, (2, 3), eps) * w + b
    elif kind == "layernorm":
        want = _standardize(x, (1, 2, 3), eps) * w + b
    elif kind == "rmsnorm":
        want = x / torch.sqrt((x**2).mean(dim=(1, 2, 3), keepdim=True) + eps) * w
        assert "bias" not in params
    else:
        want = _standardize(x, (1, 2, 3), eps) + b
        assert "weight" not in params
    torch.testing.assert_close(m(x), want, rtol=1e-10, atol=1e-10)
    unet = build_backbone(_cfg(norm=kind))
    assert unet(torch.randn(2, 4, 8, 8), torch.zeros(2)).shape == (2, 4, 8, 8)
