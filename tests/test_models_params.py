"""Parameter counts (closed form from the architecture, meta device) and shapes of every preset."""
import pytest
import torch

from lct_fast.models import DIT_PRESETS, build_backbone, count_parameters

try:
    from lct_fast.config import ModelConfig
except ImportError:  # pragma: no cover - config is written separately
    ModelConfig = None


def _cfg(raw=False, **kw):
    base = dict(arch="dit", size="S", width=0, depth=0, heads=0, patch_size=2, mlp_ratio=4.0, in_channels=4,
                resolution=32, num_classes=0, dropout=0.0, norm="nsln", unet_channels=128,
                channel_mult=[1, 2, 3, 4], num_res_blocks=4, attn_resolutions=[16, 8], head_channels=64,
                adaptive_weight=False, checkpointing=False, ops_backend="auto")
    base.update(kw)
    if ModelConfig is not None and not raw:
        return ModelConfig(**base)
    from types import SimpleNamespace
    return SimpleNamespace(**base)


def _linear(i, o):
    return i * o + o


def dit_closed_form(W, D, p, C, nc, mlp_ratio=4.0, adaptive=False, nsln=True, freq=256):
    """Per-block count of the DiT (patchify, t/y embedding, adaLN-zero blocks)."""
    hid = int(W * mlp_ratio)
    norm = W if nsln else 2 * W  # NsLN: bias only; the affine LayerNorm arm: scale and bias
    block = 2 * norm + _linear(W, 6 * W) + _linear(W, 3 * W) + _linear(W, W) + _linear(W, hid) + _linear(hid, W)
    stem = (C * p * p * W + W) + _linear(freq, W) + _linear(W, W) + ((nc + 1) * W if nc else 0)
    final = norm + _linear(W, 2 * W) + _linear(W, p * p * C)
    return stem + D * block + final + (_linear(freq, 1) if adaptive else 0)


@pytest.mark.parametrize("size", list(DIT_PRESETS))
def test_dit_preset_counts_exact(size):
    W, D, H = DIT_PRESETS[size]
    assert count_parameters(_cfg(size=size)) == dit_closed_form(W, D, 2, 4, 0)
    n = count_parameters(_cfg(size=size, num_classes=1000, adaptive_weight=True, patch_size=1))
    assert n == dit_closed_form(W, D, 1, 4, 1000, adaptive=True)
    print(f"DiT-{size}/2: {dit_closed_form(W, D, 2, 4, 0):,}")


def test_dit_layernorm_variant_learns_scale_and_bias():
    W, D, _ = DIT_PRESETS["S"]
    assert count_parameters(_cfg(norm="layernorm")) == dit_closed_form(W, D, 2, 4, 0, nsln=False)


def test_xxl_in_range_and_meta_build():
    n = count_parameters(_cfg(size="XXL"))
    print(f"DiT-XXL/2 parameters: {n:,}")
    assert 1.45e9 <= n <= 1.60e9
    with torch.device("meta"):
        m = build_backbone(_cfg(size="XXL"))
    assert all(p.is_meta for p in m.parameters())


def _norm_params(c, norm):
    return {"groupnorm": 2 * c, "instancenorm": 2 * c, "layernorm": 2 * c, "rmsnorm": c, "nsln": c}[norm]


def unet_closed_form(mc, mult, nrb, attn_res, res, C, norm, nc=0):
    """ADM UNet count walked from the description: conv in, per-level res-blocks (+attention), down/up
    res-blocks, middle block (res+attn, res), decoder with skip concatenation, norm + conv out."""
    E = 4 * mc
    conv3 = lambda i, o: 9 * i * o + o

    def rb(cin, cout, attn):
        n = _norm_params(cin, norm) + conv3(cin, cout) + _linear(E, 2 * cout) + _norm_params(cout, norm)
        n += conv3(cout, cout) + (_linear(cin, cout) if cin != cout else 0)
        if attn:
            n += _norm_params(cout, norm) + _linear(cout, 3 * cout) + _linear(cout, cout)
        return n

    total = _linear(mc, E) + _linear(E, E) + ((nc + 1) * E if nc else 0)
    ch = mc * mult[0]
    total += conv3(C, ch)
    skips = [ch]
    for lvl, m in enumerate(mult):
        r = res >> lvl
        if lvl:
            total += rb(ch, ch, False)
            skips.append(ch)
        for _ in range(nrb):
            total += rb(ch, mc * m, r in attn_res)
            ch = mc * m
            skips.append(ch)
    for lvl in reversed(range(len(mult))):
        r = res >> lvl
        total += rb(ch, ch, True) + rb(ch, ch, False) if lvl == len(mult) - 1 else rb(ch, ch, False)
        for _ in range(nrb + 1):
            total += rb(ch + skips.pop(), mc * mult[lvl], r in attn_res)
            ch = mc * mult[lvl]
    return total + _norm_params(ch, norm) + conv3(ch, C)


@pytest.mark.parametrize("norm", ["nsln", "groupnorm", "rmsnorm"])
def test_unet_paper_config_count_exact(norm):
    n = count_parameters(_cfg(arch="unet", norm=norm))
    assert n == unet_closed_form(128, [1, 2, 3, 4], 4, [16, 8], 32, 4, norm)
    print(f"ADM UNet ({norm}): {n:,}")


@pytest.mark.parametrize("size", list(DIT_PRESETS))
def test_every_preset_runs_at_reduced_width(size):
    _, D, H = DIT_PRESETS[size]
    torch.manual_seed(0)
    m = build_backbone(_cfg(size=size, width=8 * H, resolution=8, num_classes=5))
    assert len(m.blocks) == D
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        y = m(x, torch.tensor([1.0, -3.0]), torch.tensor([0, 5]))
    assert y.shape == x.shape and torch.isfinite(y).all()


def test_unet_shapes_and_patch1():
    m = build_backbone(_cfg(arch="unet", unet_channels=16, channel_mult=[1, 2], num_res_blocks=1,
                            attn_resolutions=[4], head_channels=8, resolution=8))
    x = torch.randn(3, 4, 8, 8)
    assert m(x, torch.zeros(3)).shape == x.shape
    d = build_backbone(_cfg(size="custom", width=16, depth=1, heads=2, patch_size=1, resolution=4))
    assert d(torch.randn(2, 4, 4, 4), torch.zeros(2)).shape == (2, 4, 4, 4)


def test_bad_config_errors():
    # raw namespaces: the backbone builders validate on their own, not only through ModelConfig
    with pytest.raises(ValueError, match="model.arch"):
        build_backbone(_cfg(raw=True, arch="vit"))
    with pytest.raises(ValueError, match="model.size"):
        build_backbone(_cfg(raw=True, size="XXXL"))
    with pytest.raises(ValueError, match="model.norm"):
        build_backbone(_cfg(raw=True, arch="unet", norm="batchnorm", unet_channels=16, channel_mult=[1],
                            num_res_blocks=1))
    with pytest.raises(ValueError, match="model.norm"):
        build_backbone(_cfg(raw=True, norm="groupnorm"))  # DiT supports nsln | layernorm
    with pytest.raises(ValueError, match="divisible"):
        build_backbone(_cfg(raw=True, size="custom", width=30, depth=1, heads=4))
    with pytest.raises(ValueError, match="ops_backend"):
        build_backbone(_cfg(raw=True, ops_backend="fast"))
