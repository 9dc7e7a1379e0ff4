"""Training objectives: discrete-time iLCT (``ict``) and continuous-time TrigFlow sCT (``sct``).

Loss interface (shared contract): ``loss = build_loss(method_cfg, data_dim=D, total_steps=K)``;
``per_sample = loss(net, x0, labels, step=k, generator=g, target_net=raw_module)`` -> [B] float32;
``loss.metrics`` holds detached 0-dim tensors from the last call; ``loss.diagnostics(target_net, x0, labels,
generator=g)`` -> dict of 0-dim tensors is the extra, costlier divergence check the trainer runs at its log
interval only (sCT: the two terms of dF/dt).
"""
from __future__ import annotations

from typing import Any, Union

from . import distances, schedules
from .distances import DISTANCES, robust_distance
from .ict import ICTLoss
from .sct import SCTLoss, sct_tangent

__all__ = ["ICTLoss", "SCTLoss", "build_loss", "sct_tangent", "schedules", "distances", "DISTANCES",
           "robust_distance"]


def build_loss(method_cfg: Any, *, data_dim: int, total_steps: int) -> Union[ICTLoss, SCTLoss]:
    """The loss object for ``method_cfg.name`` (``ict`` | ``sct``)."""
    name = getattr(method_cfg, "name", None)
    if name == "ict":
        return ICTLoss(method_cfg, data_dim=data_dim, total_steps=total_steps)
    if name == "sct":
        return SCTLoss(method_cfg, data_dim=data_dim, total_steps=total_steps)
    raise ValueError(f"method.name: expected 'ict' or 'sct', got {name!r}")
