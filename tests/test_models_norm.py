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


def _dit(norm):
    torch.manual_seed(0)
    return build_backbone(_cfg(arch="dit", size="custom", width=16, depth=2, heads=2, norm=norm))


def test_dit_norm_arms_are_table_2d():
    """Table 2d in a DiT: the affine of each norm sits before adaLN's modulation, (x̂·γ + β)(1 + s) + sh; the LN arm
    learns γ and β, the NsLN arm only β (γ = 1). After the modulation β would merely repeat the shift."""
    for norm, params in (("nsln", ["bias"]), ("layernorm", ["weight", "bias"])):
        norms = [m for m in _dit(norm).modules() if isinstance(m, NsLN)]
        assert len(norms) == 5                                       # 2 per block + the final layer
        for m in norms:
            assert [n for n, _ in m.named_parameters()] == params
    x = torch.randn(3, 7, 16, dtype=torch.float64) * 3
    sh, sc = torch.randn(3, 16, dtype=torch.float64), torch.randn(3, 16, dtype=torch.float64)
    xhat = _standardize(x, (-1,), 1e-6)
    for weight in (False, True):
        m = NsLN(16, eps=1e-6, weight=weight).double()
        with torch.no_grad():
            m.bias.copy_(torch.linspace(-1, 1, 16))
            if weight:
                m.weight.copy_(torch.linspace(0.5, 2, 16))
        gamma = m.weight if weight else 1.0
        want = (xhat * gamma + m.bias) * (1 + sc[:, None]) + sh[:, None]
        torch.testing.assert_close(m(x, sh, sc), want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(m(x), xhat * gamma + m.bias, rtol=1e-12, atol=1e-12)
        # β is not a second shift: with a per-sample scale it cannot be moved past the modulation
        assert (m(x, sh, sc) - (xhat * gamma * (1 + sc[:, None]) + sh[:, None] + m.bias)).abs().max() > 0.1
        # gradients reach γ and β through the folded modulation
        m.zero_grad()
        m(x, sh, sc).square().sum().backward()
        torch.testing.assert_close(m.bias.grad, (2 * want * (1 + sc[:, None])).sum((0, 1)), rtol=1e-10, atol=1e-10)
        if weight:
            torch.testing.assert_close(m.weight.grad, (2 * want * (1 + sc[:, None]) * xhat).sum((0, 1)),
                                       rtol=1e-10, atol=1e-10)


def test_dit_norm_arms_differ_once_trained():
    """Same init, same input: the arms agree at init (γ = 1, β = 0) and part as soon as γ moves."""
    a, b = _dit("nsln"), _dit("layernorm")
    b.load_state_dict(a.state_dict(), strict=False)
    with torch.no_grad():
        for mod in (a, b):
            for p in mod.parameters():  # leave adaLN-zero: make the blocks do something
                p.add_(0.1 * torch.randn_like(p, generator=torch.Generator().manual_seed(p.numel())))
        for m in b.modules():
            if isinstance(m, NsLN):
                m.weight.fill_(1.0)
    b.load_state_dict({k: v for k, v in a.state_dict().items()}, strict=False)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([0.3, 1.2])
    torch.testing.assert_close(a(x, t), b(x, t), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        for m in b.modules():
            if isinstance(m, NsLN):
                m.weight.mul_(1.5)
    assert (a(x, t) - b(x, t)).abs().max() > 1e-3
