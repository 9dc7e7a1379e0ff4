"""The method registry: one :class:`MethodSpec` per training method, declared and registered by its own module
``lct_fast/methods/<name>.py`` (torchtitan's ``ModelSpec`` pattern).

Everything that depends on the method -- the config section, the preconditioning, the loss, the sampler and its
network evaluations, the JVP pass, a teacher, the network's extra scalar conditions and the cross-section checks
-- is read from the spec; code elsewhere dispatches on it and never compares a method-name string. Adding a
method is its module, one import line in ``lct_fast/methods/__init__.py`` and its presets.

A leaf module (no torch): :mod:`lct_fast.config` reads the sections from here.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Tuple

__all__ = ["MethodSpec", "register", "get_method", "method_names", "method_specs", "sections"]


def _none(_: Any) -> Dict[str, float]:
    return {}


def _no_check(_: Any) -> None:
    return None


def _unguided(_: Any) -> float:
    return 1.0


@dataclass(frozen=True)
class MethodSpec:
    """What the rest of the package needs to know about one training method."""

    name: str
    """``method.name`` in a preset."""
    summary: str
    """One line: what the method trains (shown in ``method.name``'s error and the README's method list)."""
    sections: Tuple[Tuple[str, type], ...]
    """Config sections this method declares under ``method.`` as (key, dataclass); every registered section
    exists in every config (a preset may set another method's section, e.g. sCD's student reads ``sct``)."""
    precond: Callable[[Any, Any], Any]
    """(backbone, method_cfg) -> the preconditioned network the loss and the sampler call."""
    loss: Callable[..., Any]
    """(method_cfg, *, data_dim, total_steps, coupler, teacher) -> the loss object
    (:class:`lct_fast.methods.base.MethodLoss`)."""
    sampler: Callable[..., Any]
    """(method_cfg, steps, *, schedule, cfg_scale, null_label) -> :class:`lct_fast.methods.sampling.Sampler`."""
    nfe: Callable[[Any, int], int]
    """(method_cfg, steps) -> network evaluations per sample of an unguided ``steps``-step draw."""
    probe_level: float
    """A typical noise level / time at which the profile evaluates one forward (FLOP counting)."""
    jvp: bool = False
    """Training runs a forward-mode JVP pass (the precision plan, the memory model, ZeRO-3's linear)."""
    jvp_dtype: Callable[[Any], str] = lambda m: "fp32"
    """(method_cfg) -> the JVP pass's dtype (``fp32`` | ``bf16`` | ``fp16``) when ``jvp``."""
    teacher: Optional[Tuple[str, str]] = None
    """(section, teacher method) when the method distils a frozen teacher: the section holds ``teacher`` /
    ``teacher_config`` / ``init_from_teacher`` (:func:`lct_fast.distill.load_teacher`), the teacher is a run of
    the teacher method; else None."""
    conditions: Callable[[Any], Dict[str, float]] = _none
    """(method_cfg) -> the network's extra scalar conditions beside the time and the label, each with the value
    a sampler uses when asked for none (e.g. a guidance-conditioned student: ``{"guidance": 1.0}``)."""
    default_cfg_scale: Callable[[Any], float] = _unguided
    """(method_cfg) -> the classifier-free guidance scale a sampler applies unless told otherwise."""
    sampler_keys: Tuple[str, ...] = ()
    """Dotted keys under ``method.`` that only the sampler reads (re-chosen without re-training)."""
    check: Callable[[Any], None] = _no_check
    """(Config) -> None: cross-section validation; raises ``ConfigError`` naming the key."""
    extra: Dict[str, Any] = field(default_factory=dict)
    """Anything else a method wants to publish (not read by the package)."""


_REGISTRY: Dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    """Add ``spec`` (its module calls this at import); a second spec under one name is an error."""
    if spec.name in _REGISTRY and _REGISTRY[spec.name] is not spec:
        raise ValueError(f"method {spec.name!r} is registered twice")
    taken = {key: s.name for s in _REGISTRY.values() for key, _ in s.sections if s.name != spec.name}
    for key, _ in spec.sections:
        if key in taken or key in ("name", "sigma_data", "label_dropout", "ot"):
            raise ValueError(f"method {spec.name!r}: config section method.{key} is already taken"
                             f"{' by ' + taken[key] if key in taken else ''}")
    _REGISTRY[spec.name] = spec
    return spec


def get_method(name: str) -> MethodSpec:
    """The spec of ``method.name = name``; an unknown name raises ``ValueError`` listing the registered ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"method.name: expected one of {method_names()}, got {name!r}") from None


def method_names() -> list:
    return list(_REGISTRY)


def method_specs() -> list:
    return list(_REGISTRY.values())


def sections() -> list:
    """Every registered (section key, dataclass), in registration order."""
    return [sec for spec in _REGISTRY.values() for sec in spec.sections]
