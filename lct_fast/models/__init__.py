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

from .config import ModelConfig
from .dit import DIT_PRESETS, DiT, resolve_dit_dims
from .layers import NsLN, NsLN2d, SeededDropout, make_norm2d, sinusoidal_embedding
from .precond import TrigFlowPrecond, VEPrecond, classifier_free_guidance
from .unet import UNet

__all__ = [
    "DIT_PRESETS",
    "ModelConfig",
    "DiT",
    "NsLN",
    "NsLN2d",
    "SeededDropout",
    "TrigFlowPrecond",
    "UNet",
    "VEPrecond",
    "build_backbone",
    "classifier_free_guidance",
    "condition_count",
    "count_parameters",
    "make_norm2d",
    "resolve_dit_dims",
    "sinusoidal_embedding",
]

_DEFAULTS = ModelConfig()


def _get(cfg: Any, name: str) -> Any:
    """``cfg.name``, or :class:`ModelConfig`'s default for a field the object lacks (the one place defaults live)."""
    return getattr(cfg, name, getattr(_DEFAULTS, name))


def build_backbone(model_cfg: Any, conditions: Optional[Dict[str, float]] = None) -> nn.Module:
    """Build the backbone named by ``model_cfg.arch`` ("dit" | "unet") with an embedding for each extra scalar
    condition ``{name: neutral value}`` (the method's; None: a guidance scale where ``model.guidance_embed``)."""
    arch = getattr(model_cfg, "arch", None)
    if arch is None:
        raise ValueError("model config is missing the field 'arch'")
    if conditions is None:
        conditions = {"guidance": 1.0} if bool(_get(model_cfg, "guidance_embed")) else {}
    common = dict(
        in_channels=int(_get(model_cfg, "in_channels")),
        resolution=int(_get(model_cfg, "resolution")),
        num_classes=int(_get(model_cfg, "num_classes")),
        dropout=float(_get(model_cfg, "dropout")),
        norm=str(_get(model_cfg, "norm")),
        adaptive_weight=bool(_get(model_cfg, "adaptive_weight")),
        adaptive_double_norm=bool(_get(model_cfg, "adaptive_double_norm")),
        checkpointing=bool(_get(model_cfg, "checkpointing")),
        ops_backend=str(_get(model_cfg, "ops_backend")),
        conditions=dict(conditions),
    )
    if arch == "dit":
        dims = resolve_dit_dims(str(_get(model_cfg, "size")), int(_get(model_cfg, "width")),
                                int(_get(model_cfg, "depth")), int(_get(model_cfg, "heads")))
        return DiT(patch_size=int(_get(model_cfg, "patch_size")), width=dims.width, depth=dims.depth,
                   heads=dims.heads, mlp_ratio=float(_get(model_cfg, "mlp_ratio")), **common)
    if arch == "unet":
        return UNet(model_channels=int(_get(model_cfg, "unet_channels")),
                    channel_mult=tuple(_get(model_cfg, "channel_mult")),
                    num_res_blocks=int(_get(model_cfg, "num_res_blocks")),
                    attn_resolutions=tuple(_get(model_cfg, "attn_resolutions")),
                    head_channels=int(_get(model_cfg, "head_channels")), **common)
    raise ValueError(f"model.arch={arch!r} is not one of ['dit', 'unet']")


def condition_count(model_cfg: Any, conditions: Optional[Any] = None) -> int:
    """How many extra scalar conditions a backbone embeds: those given (a method's), else the guidance scale of
    ``model.guidance_embed``."""
    if conditions is not None:
        return len(conditions)
    return int(bool(getattr(model_cfg, "guidance_embed", False)))


def count_parameters(model_cfg: Any, conditions: Optional[Dict[str, float]] = None) -> int:
    """Number of parameters of ``build_backbone(model_cfg, conditions)``, built on the meta device."""
    with torch.device("meta"):
        model = build_backbone(model_cfg, conditions)
    return sum(p.numel() for p in model.parameters())
