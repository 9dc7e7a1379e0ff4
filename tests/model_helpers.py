"""Small model configs and a non-zero initialisation shared by the model tests."""

import math

import torch

from lct_fast.config import ModelConfig

# Reduced widths of both backbones: fast on CPU, every code path still exercised.
ARCHS = {
    "dit": dict(arch="dit", size="custom", width=32, depth=2, heads=2, patch_size=2),
    "unet": dict(arch="unet", unet_channels=16, channel_mult=[1, 2], num_res_blocks=1, attn_resolutions=[4],
                 head_channels=8),
}


def small_cfg(arch="dit", **kw):
    """A ModelConfig of ``arch`` at test size on 4×8×8 latents with 3 classes and the w_φ head."""
    base = dict(in_channels=4, resolution=8, num_classes=3, norm="nsln", adaptive_weight=True)
    base.update(ARCHS[arch])
    base.update(kw)
    return ModelConfig(**base)


def randomize(model, seed=0):
    """Non-zero init everywhere (the zero-initialised output layers would make F ≡ 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            std = 1.0 / math.sqrt(p[0].numel()) if p.dim() >= 2 else 0.3
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
    return model
