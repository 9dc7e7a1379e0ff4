"""Training methods, one module each, registered in :mod:`lct_fast.registry`:

* ``ict``: discrete-time improved latent consistency training (:mod:`.ict`);
* ``sct``: continuous-time consistency training in TrigFlow (:mod:`.sct`);
* ``trigflow``: TrigFlow diffusion, the teacher that sCD distils (:mod:`.trigflow`);
* ``scd``: continuous-time consistency distillation (:mod:`.scd`);
* ``meanflow``: mean flows, average-velocity one-step training (:mod:`.meanflow`).

Importing this package registers them (the import lines below are the registration). The rest of the package
asks the registry: :func:`get_method` for the spec, :func:`build_loss` and :func:`build_model` for the objects.
The losses share :class:`.base.MethodLoss` (its docstring is the loss contract).
"""
from __future__ import annotations

from typing import Any, Optional

from torch import nn

from . import distances, schedules
from . import ict, sct, trigflow, scd, meanflow  # noqa: F401  (registration, in this order)
from .base import MethodLoss
from .common import Coupler
from .distances import DISTANCES, robust_distance
from .ict import ICTLoss
from ..registry import MethodSpec, get_method, method_names, method_specs
from .sct import SCTLoss, sct_tangent
from .trigflow import TrigFlowLoss

__all__ = ["MethodSpec", "MethodLoss", "ICTLoss", "SCTLoss", "TrigFlowLoss", "build_loss", "build_model",
           "get_method", "method_names", "method_specs", "model_conditions", "sct_tangent", "schedules", "distances",
           "DISTANCES", "robust_distance"]


def build_loss(method_cfg: Any, *, data_dim: int, total_steps: int, coupler: Optional[Coupler] = None,
               teacher: Any = None) -> MethodLoss:
    """The loss object of ``method_cfg.name`` with ``coupler`` (default: the per-micro-batch coupling of
    ``method_cfg.ot``) and, for a distilling method, the frozen ``teacher``."""
    spec = get_method(getattr(method_cfg, "name", None))
    return spec.loss(method_cfg, data_dim=data_dim, total_steps=total_steps, coupler=coupler, teacher=teacher)


def build_model(model_cfg: Any, method_cfg: Any) -> nn.Module:
    """The backbone of ``model_cfg`` in the preconditioning of ``method_cfg.name`` (VE for ``ict``, TrigFlow for
    the others)."""
    from ..models import build_backbone

    spec = get_method(getattr(method_cfg, "name", None))
    return spec.precond(build_backbone(model_cfg, model_conditions(method_cfg)), method_cfg)


def model_conditions(method_cfg: Any) -> dict:
    """The extra scalar conditions the method's network embeds, ``{name: neutral value}``."""
    spec = get_method(getattr(method_cfg, "name", None))
    return {name: c.neutral for name, c in spec.conditions(method_cfg).items()}
