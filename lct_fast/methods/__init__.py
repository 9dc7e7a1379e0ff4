"""Training objectives: discrete-time iLCT (``ict``), continuous-time TrigFlow sCT (``sct``) and TrigFlow diffusion
(``trigflow``, the sCD teacher).

Loss interface (shared contract): ``loss = build_loss(method_cfg, data_dim=D, total_steps=K, coupler=None)``
(``coupler``: the noise coupling, default the per-micro-batch one of ``method_cfg.ot``; the trainer passes the
global-batch one for ``method.ot.global_coupling``);
``per_sample = loss(net, x0, labels, step=k, generator=g, target_net=raw_module)`` -> [B] float32;
``loss.metrics`` holds detached 0-dim tensors from the last call; ``loss.diagnostics(target_net, x0, labels,
generator=g)`` -> dict of 0-dim tensors is the extra, costlier divergence check the trainer runs at its log
interval only (sCT: the two terms of dF/dt).
"""
from __future__ import annotations

from typing import Any, Optional, Union

from . import distances, schedules
from .common import Coupler
from .distances import DISTANCES, robust_distance
from .ict import ICTLoss
from .sct import SCTLoss, sct_tangent
from .trigflow import TrigFlowLoss

__all__ = ["ICTLoss", "SCTLoss", "TrigFlowLoss", "build_loss", "sct_tangent", "schedules", "distances", "DISTANCES",
           "robust_distance"]


def build_loss(method_cfg: Any, *, data_dim: int, total_steps: int, coupler: Optional[Coupler] = None,
               teacher: Any = None) -> Union[ICTLoss, SCTLoss, TrigFlowLoss]:
    """The loss object for ``method_cfg.name`` (``ict`` | ``sct``) with ``coupler`` (default: the
    per-micro-batch coupling of ``method_cfg.ot``)."""
    name = getattr(method_cfg, "name", None)
    if name == "ict":
        return ICTLoss.from_config(method_cfg, data_dim=data_dim, total_steps=total_steps, coupler=coupler)
    if name in ("sct", "scd"):  # sCD is the sCT objective with the teacher's velocity
        return SCTLoss.from_config(method_cfg, data_dim=data_dim, total_steps=total_steps, coupler=coupler,
                                   teacher=teacher)
    if name == "trigflow":
        return TrigFlowLoss.from_config(method_cfg, data_dim=data_dim, total_steps=total_steps, coupler=coupler)
    raise ValueError(f"method.name: expected 'ict', 'sct', 'trigflow' or 'scd', got {name!r}")
