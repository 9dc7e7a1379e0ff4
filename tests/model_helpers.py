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


def make_random_inception(path, seed=0):
    """Write a random-init state dict with exactly the keys and shapes of torch-fidelity's Inception-v3 file
    (the real weights are not available offline); BatchNorm running stats are randomised too, so the layers
    are not the identity."""
    from torch_fidelity import feature_extractor_inceptionv3 as fe

    saved = (fe.load_state_dict_from_url, fe.FeatureExtractorInceptionV3.load_state_dict)
    fe.load_state_dict_from_url = lambda *a, **k: {}
    fe.FeatureExtractorInceptionV3.load_state_dict = lambda self, state, *a, **k: None
    try:
        torch.manual_seed(seed)
        net = fe.FeatureExtractorInceptionV3("random-inception", ["2048"])
    finally:
        fe.load_state_dict_from_url, fe.FeatureExtractorInceptionV3.load_state_dict = saved
    state = net.state_dict()
    g = torch.Generator().manual_seed(seed)
    for k, v in state.items():
        if k.endswith("running_mean"):
            v.copy_(0.1 * torch.randn(v.shape, generator=g))
        elif k.endswith("running_var"):
            v.copy_(0.5 + torch.rand(v.shape, generator=g))
    torch.save(state, str(path))
    return str(path)
