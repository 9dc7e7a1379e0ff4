"""Backbones (DiT, ADM UNet) and preconditioning wrappers (VE / TrigFlow).

Public API::

    build_backbone(model_cfg) -> DiT | UNet
    count_parameters(model_cfg) -> int      # built on the meta device, nothing allocated
    DiT, UNet, VEPrecond, TrigFlowPrecond, NsLN, NsLN2d, DIT_PRESETS

``model_cfg`` is read by attribute (``lct_fast.config.ModelConfig`` or any object with the same fields). Which
preconditioning wraps a backbone is the method's choice: ``lct_fast.methods.build_model``.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch
import torch.nn as nn

from .dit import DIT_PRESETS, DiT, resolve_dit_dims
from .layers import NsLN, NsLN2d, SeededDropout, make_norm2d, sinusoidal_embedding
from .precond import TrigFlowPrecond, VEPrecond, classifier_free_guidance
from .unet import UNet

__all__ = [
    "DIT_PRESETS",
    "DiT",
    "NsLN",
    "NsLN2d",
    "SeededDropout",
    "TrigFlowPrecond",
    "UNet",
    "VEPrecond",
    "build_backbone",
    "classifier_free_guidance",
    "count_parameters",
    "make_norm2d",
    "resolve_dit_dims",
    "sinusoidal_embedding",
]

_MISSING = object()


def _get(cfg: Any, name: str, default: Any = _MISSING) -> Any:
    value = getattr(cfg, name, default)
    if value is _MISSING:
        raise ValueError(f"model config is missing the field {name!r}")
    return value


def build_backbone(model_cfg: Any, conditions: Optional[Dict[str, float]] = None) -> nn.Module:
    """Build the backbone named by ``model_cfg.arch`` ("dit" | "unet") with an embedding for each extra scalar
    condition ``{name: neutral value}`` (the method's; None: a guidance scale where ``model.guidance_embed``)."""
    arch = _get(model_cfg, "arch")
    if conditions is None:
        conditions = {"guidance": 1.0} if bool(_get(model_cfg, "guidance_embed", False)) else {}
    common = dict(
        in_channels=int(_get(model_cfg, "in_channels", 4)),
        resolution=int(_get(model_cfg, "resolution", 32)),
        num_classes=int(_get(model_cfg, "num_classes", 0)),
        dropout=float(_get(model_cfg, "dropout", 0.0)),
        norm=str(_get(model_cfg, "norm", "nsln")),
        adaptive_weight=bool(_get(model_cfg, "adaptive_weight", False)),
        adaptive_double_norm=bool(_get(model_cfg, "adaptive_double_norm", False)),
        checkpointing=bool(_get(model_cfg, "checkpointing", False)),
        ops_backend=str(_get(model_cfg, "ops_backend", "auto")),
        conditions=dict(conditions),
    )
    if arch == "dit":
        dims = resolve_dit_dims(str(_get(model_cfg, "size", "S")), int(_get(model_cfg, "width", 0)),
                                int(_get(model_cfg, "depth", 0)), int(_get(model_cfg, "heads", 0)))
        return DiT(patch_size=int(_get(model_cfg, "patch_size", 2)), width=dims.width, depth=dims.depth,
                   heads=dims.heads, mlp_ratio=float(_get(model_cfg, "mlp_ratio", 4.0)), **common)
    if arch == "unet":
        return UNet(model_channels=int(_get(model_cfg, "unet_channels", 128)),
                    channel_mult=tuple(_get(model_cfg, "channel_mult", (1, 2, 3, 4))),
                    num_res_blocks=int(_get(model_cfg, "num_res_blocks", 4)),
                    attn_resolutions=tuple(_get(model_cfg, "attn_resolutions", (16, 8))),
                    head_channels=int(_get(model_cfg, "head_channels", 64)), **common)
    raise ValueError(f"model.arch={arch!r} is not one of ['dit', 'unet']")


def count_parameters(model_cfg: Any) -> int:
    """Number of parameters of ``build_backbone(model_cfg)``, built on the meta device."""
    with torch.device("meta"):
        model = build_backbone(model_cfg)
    return sum(p.numel() for p in model.parameters())
