"""The sCD teacher: loaded from an exported TrigFlow run, checked against the student, frozen; and the student's
initialisation from it (sCM §4: the student starts as the teacher).

``load_teacher(scd_cfg, student_cfg)`` reads the teacher run's resolved ``config.json`` (``method.scd.teacher_config``,
default the one ``launch/export.py`` copies beside the weights), requires ``method.name == "trigflow"`` and the
student's architecture (arch, size/width/depth/heads or UNet channels, patch, channels, resolution, classes),
builds the teacher and loads its safetensors weights strictly. Every mismatch is an error naming the file and the
key, before any training step. The teacher is frozen (``requires_grad=False``, ``eval()``) and has no optimizer
state; it runs in the student's JVP dtype inside the loss. The trainer hands it to :func:`lct_fast.parallel.wrap`
as the frozen module, which partitions it like the student under ZeRO-3.

``init_student_from_teacher`` copies every weight the two share; what the student has and the teacher lacks (the
adaptive-weight head w(t), the guidance-scale embedding of a guidance-conditioned student) keeps its zero output
layer, so the student starts equal to the teacher at every guidance scale.
"""
from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from .config import Config, ConfigError, load_config

__all__ = ["load_teacher", "init_student_from_teacher", "MATCH_KEYS"]

#: Model fields that must agree between teacher and student for the student to start from the teacher's weights.
MATCH_KEYS = ("arch", "size", "width", "depth", "heads", "patch_size", "mlp_ratio", "in_channels", "resolution",
              "num_classes", "norm", "unet_channels", "channel_mult", "num_res_blocks", "attn_resolutions",
              "head_channels", "adaptive_double_norm")


def teacher_config(scd: Any, key: str, method: str, teacher_method: str) -> tuple[Config, str]:
    """The teacher's resolved config and its path, from the section ``scd`` (``key`` names it in errors)."""
    if not scd.teacher:
        raise ConfigError(f"{key}.teacher: method {method} needs the exported teacher weights "
                          f"(a method={teacher_method} run's <run>/export/<ema>.safetensors)")
    if not os.path.isfile(scd.teacher):
        raise ConfigError(f"{key}.teacher: teacher weights not found: {scd.teacher}; set {key}.teacher to a "
                          f"method={teacher_method} run's <run>/export/<ema>.safetensors")
    path = scd.teacher_config or os.path.join(os.path.dirname(os.path.abspath(scd.teacher)), "config.json")
    if not os.path.isfile(path):
        raise ConfigError(f"{key}.teacher_config: the teacher's config.json not found: {path}; set "
                          f"{key}.teacher_config or copy it beside the weights (launch/export.py does)")
    return load_config(path), path


def load_teacher(scd: Any, student: Config, device: torch.device | str = "cpu") -> nn.Module:
    """The frozen teacher for ``student`` (a ``Config`` of a distilling method, ``scd`` its teacher section);
    see the module docstring."""
    from .methods import build_model, get_method
    from .weights import load_weights

    spec = get_method(student.method.name)
    if spec.teacher is None:
        raise ConfigError(f"method.name: method {spec.name} does not distil a teacher")
    section, teacher_method = spec.teacher
    tcfg, path = teacher_config(scd, f"method.{section}", spec.name, teacher_method)
    if tcfg.method.name != teacher_method:
        raise ConfigError(f"{path}: method.name is {tcfg.method.name!r}; the teacher of method {spec.name} is a "
                          f"method={teacher_method} run")
    for key in MATCH_KEYS:
        a, b = getattr(tcfg.model, key, None), getattr(student.model, key, None)
        if a != b:
            raise ConfigError(f"{path}: model.{key} = {a!r} but the student's model.{key} = {b!r}: the teacher "
                              f"must have the student's architecture")
    if tcfg.method.sigma_data != student.method.sigma_data:
        raise ConfigError(f"{path}: method.sigma_data = {tcfg.method.sigma_data} but the student's is "
                          f"{student.method.sigma_data}")
    teacher = load_weights(build_model(tcfg.model, tcfg.method), scd.teacher, against=f"the teacher config {path}",
                           error=ConfigError)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.to(device).eval()


def init_student_from_teacher(student: nn.Module, teacher: nn.Module) -> list[str]:
    """Copy the teacher's weights into the student, except the adaptive-weight head (the sCD loss's own w(t),
    zero at the start like the guidance embedding and every other parameter the teacher lacks). Returns the
    student keys left as initialised."""
    t_state = teacher.state_dict()
    kept = []
    with torch.no_grad():
        for name, value in student.state_dict().items():
            if name in t_state and "logvar_head" not in name and t_state[name].shape == value.shape:
                value.copy_(t_state[name].to(value.dtype))
            else:
                kept.append(name)
    return kept
