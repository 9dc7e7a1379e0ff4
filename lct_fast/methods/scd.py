"""Continuous-time consistency distillation (``scd``; sCM 2410.11081 §4, SPEC §3b): the sCT objective of
:mod:`lct_fast.methods.sct` with a frozen TrigFlow teacher's velocity σ_d·F_T(x_t/σ_d, t), guided
F_u + s·(F_c − F_u), in place of the data velocity. The student reads the ``sct`` settings, samples like an sCT
model, and with ``scd.guidance_conditioned`` takes the guidance scale s as an extra scalar condition.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional

from torch import nn

from ..validate import ConfigError, positive
from .common import Coupler
from ..registry import Condition, MethodSpec, register
from .sct import (ADAPTIVE_LOSS_NOTE, SCTLoss, check_adaptive_weight, sct_divergence_floors, sct_sampler,
                  trigflow_at_sigma, trigflow_precond)

__all__ = ["SCDConfig", "SPEC"]


@dataclass
class SCDConfig:
    """Continuous-time consistency distillation (method scd, sCM §4): the sCT objective of ``method.sct`` with the
    teacher's velocity dx_t/dt = sigma_d * F_teacher(x_t / sigma_d, t) in place of the data velocity."""

    teacher: str = ""
    """Exported teacher weights (launch/export.py: <run>/export/<ema>.safetensors) of a method=trigflow run."""
    teacher_config: str = ""
    """The teacher run's resolved config.json; empty = config.json beside the teacher file."""
    guidance: float = 1.0
    """Classifier-free guidance scale s of the teacher's velocity F = F_u + s * (F_c - F_u), F_u at the null class
    (1 = no guidance). Fixed for the run, or, with ``guidance_conditioned``, the scale the student is sampled at
    (launch/sample.py --guidance overrides it)."""
    guidance_conditioned: bool = False
    """The guidance-conditioned student (sCM §4, Table 4's sCD rows, one network for every scale): s is drawn per
    sample, uniform in [guidance_min, guidance_max], guides the teacher and is the student's input (needs
    model.guidance_embed)."""
    guidance_min: float = 1.0
    """Smallest training guidance scale of the conditioned student."""
    guidance_max: float = 2.0
    """Largest training guidance scale of the conditioned student (the sCM tables sample at up to 2.0)."""
    init_from_teacher: bool = True
    """Start the student from the teacher's weights (the paper does); the adaptive-weight head and the guidance
    embedding, which the teacher lacks, start at zero, so the student starts equal to the teacher."""

    def __post_init__(self) -> None:
        positive("method.scd.guidance", self.guidance)
        positive("method.scd.guidance_min", self.guidance_min)
        if self.guidance_max < self.guidance_min:
            raise ConfigError(f"method.scd.guidance_max: {self.guidance_max} is below method.scd.guidance_min "
                              f"{self.guidance_min}")


def _loss(method_cfg: Any, *, data_dim: int, total_steps: int, coupler: Optional[Coupler] = None,
          teacher: Optional[nn.Module] = None) -> SCTLoss:
    if teacher is None:
        raise ValueError("method scd needs the teacher module (lct_fast.distill.load_teacher)")
    scd = method_cfg.scd
    return SCTLoss.from_config(method_cfg, data_dim=data_dim, total_steps=total_steps, coupler=coupler,
                               teacher=teacher, guidance=scd.guidance,
                               guidance_range=((scd.guidance_min, scd.guidance_max) if scd.guidance_conditioned
                                               else None))


def _conditions(method_cfg: Any) -> Dict[str, Condition]:
    """The guidance-conditioned student takes s as an input (s = 1: no guidance); sampled at ``scd.guidance``
    unless asked."""
    scd = getattr(method_cfg, "scd", None)
    if scd is None or not scd.guidance_conditioned:
        return {}
    return {"guidance": Condition(neutral=1.0, sample_at=float(scd.guidance))}


def _check(cfg: Any) -> None:
    check_adaptive_weight(cfg, cfg.method.sct.adaptive_weight, "method.sct.adaptive_weight")
    if cfg.method.scd.guidance_conditioned and cfg.model.num_classes == 0:
        raise ConfigError("method.scd.guidance_conditioned: guidance needs a class-conditional model "
                          "(model.num_classes > 0)")


SPEC = register(MethodSpec(
    name="scd", summary="continuous-time consistency distillation (sCD) from a trigflow teacher",
    sections=(("scd", SCDConfig),),
    precond=lambda backbone, m: trigflow_precond(backbone, float(getattr(m, "sigma_data", 0.5)),
                                                 float(getattr(getattr(m, "sct", None), "time_scale", 1.0))),
    loss=_loss, sampler=sct_sampler, nfe=lambda method_cfg, steps: steps, probe_level=0.7, jvp=True,
    jvp_dtype=lambda m: m.sct.jvp_dtype, teacher=("scd", "trigflow"), conditions=_conditions, sampler_keys=("sct.t_mid",),
    at_sigma=trigflow_at_sigma, loss_note=ADAPTIVE_LOSS_NOTE, divergence_floors=sct_divergence_floors,
    check=_check))
