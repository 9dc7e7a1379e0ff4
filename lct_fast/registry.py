"""The method registry: one :class:`MethodSpec` per training method, declared and registered by its own module
``lct_fast/methods/<name>.py`` (torchtitan's ``ModelSpec`` pattern).

Everything that depends on the method -- the config section, the preconditioning, the loss, the sampler and its
network evaluations, the JVP pass, a teacher, the network's extra scalar conditions and the cross-section checks
-- is read from the spec; code elsewhere dispatches on it and never compares a method-name string. Adding a
method is its module, one import line in ``lct_fast/methods/__init__.py`` and its presets.

A leaf module (it imports nothing of the package): anything may ask it for a spec without an import cycle. The
built-in methods register when :mod:`lct_fast.methods` is imported, which a lookup of an unknown name does first.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Tuple

__all__ = ["Condition", "MethodSpec", "ve_at_sigma", "register", "get_method", "method_names", "method_specs",
           "sections"]


@dataclass(frozen=True)
class Condition:
    """An extra scalar input of a method's network (beside the time and the label)."""

    neutral: float
    """The value the embedding is centred on (it sees s − neutral) and the value of a call that gives none."""
    sample_at: float
    """The value a sampler uses unless asked for another."""


def _none(_: Any) -> Dict[str, Condition]:
    return {}


def _no_check(_: Any) -> None:
    return None


def _unguided(_: Any) -> float:
    return 1.0


def _no_floors(_: Any) -> Dict[str, float]:
    return {}


def ve_at_sigma(sigma: float, sigma_data: float) -> Tuple[float, float]:
    """VE (EDM) parametrisation: the network sees x0 + σ·z itself, at level σ."""
    return 1.0, float(sigma)


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
    """(method_cfg, steps, *, schedule, cfg_scale, null_label, conditions) ->
    :class:`lct_fast.methods.sampling.Sampler`; ``conditions``: the extra conditions' values asked for (the
    sampler passes them to the network, or its own per step)."""
    nfe: Callable[[Any, int], int]
    """(method_cfg, steps) -> network evaluations per sample of an unguided ``steps``-step draw."""
    probe_level: float
    """A typical noise level / time at which the profile evaluates one forward (FLOP counting)."""
    schedule_arg: str = "ts"
    """Which explicit schedule of :func:`lct_fast.sample.generate` the sampler takes: ``ts`` (times) or ``sigmas``
    (noise levels)."""
    jvp: bool = False
    """Training runs a forward-mode JVP pass (the precision plan, the memory model, ZeRO-3's linear)."""
    jvp_dtype: Callable[[Any], str] = lambda m: "fp32"
    """(method_cfg) -> the JVP pass's dtype (``fp32`` | ``bf16`` | ``fp16``) when ``jvp``."""
    teacher: Optional[Tuple[str, str]] = None
    """(section, teacher method) when the method distils a frozen teacher: the section holds ``teacher`` /
    ``teacher_config`` / ``init_from_teacher`` (:func:`lct_fast.distill.load_teacher`), the teacher is a run of
    the teacher method; else None."""
    conditions: Callable[[Any], Dict[str, Condition]] = _none
    """(method_cfg) -> the network's extra scalar conditions beside the time and the label, by name (e.g. a
    guidance-conditioned student: ``{"guidance": Condition(neutral=1, sample_at=scd.guidance)}``). The backbone
    embeds each one (``lct_fast.models.layers.ScalarEmbed``); no model code names them."""
    default_cfg_scale: Callable[[Any], float] = _unguided
    """(method_cfg) -> the classifier-free guidance scale a sampler applies unless told otherwise."""
    sampler_keys: Tuple[str, ...] = ()
    """Dotted keys under ``method.`` that only the sampler reads (re-chosen without re-training)."""
    check: Callable[[Any], None] = _no_check
    """(Config) -> None: cross-section validation; raises ``ConfigError`` naming the key."""
    at_sigma: Callable[[float, float], Tuple[float, float]] = ve_at_sigma
    """(σ, σ_d) -> (scale, level): the network's clean estimate of x0 from x0 + σ·z is
    ``net(scale·(x0 + σ·z), level, labels)`` (VE: (1, σ); TrigFlow: t = arctan(σ/σ_d), (cos t, t)). The
    trainer's denoising probe, a figure comparable across training and methods, is computed through it."""
    loss_note: str = ""
    """Why the raw training loss moves for reasons other than quality (printed under the loss in the report)."""
    divergence_floors: Callable[[Any], Dict[str, float]] = _no_floors
    """(Config) -> {metric: healthy scale}: the loss metrics (or diagnostics) the trainer's divergence watch
    follows, each warned about once when it exceeds 10 x max(its first logged value, this scale)
    (:class:`lct_fast.train_hooks.DivergenceWatch`)."""
    extra: Dict[str, Any] = field(default_factory=dict)
    """Anything else a method wants to publish (not read by the package)."""


_REGISTRY: Dict[str, MethodSpec] = {}
_SEALED: list = []  # set once lct_fast.config has built MethodConfig from the sections


def register(spec: MethodSpec) -> MethodSpec:
    """Add ``spec`` (its module calls this at import, before :mod:`lct_fast.config` is imported: the config's
    ``MethodConfig`` is built from the registered sections then); a second spec under one name is an error."""
    if spec.name in _REGISTRY and _REGISTRY[spec.name] is not spec:
        raise ValueError(f"method {spec.name!r} is registered twice")
    if _SEALED and spec.name not in _REGISTRY:
        raise ValueError(f"method {spec.name!r}: register it before importing lct_fast.config (imported by "
                         f"{_SEALED[0]}), whose MethodConfig holds one section per method")
    taken = {key: s.name for s in _REGISTRY.values() for key, _ in s.sections if s.name != spec.name}
    for key, _ in spec.sections:
        if key in taken or key in ("name", "sigma_data", "label_dropout", "ot"):
            raise ValueError(f"method {spec.name!r}: config section method.{key} is already taken"
                             f"{' by ' + taken[key] if key in taken else ''}")
    _REGISTRY[spec.name] = spec
    return spec


def _builtin() -> None:
    """Register the package's own methods (importing lct_fast.methods runs their registrations)."""
    import importlib

    importlib.import_module("lct_fast.methods")


def get_method(name: str) -> MethodSpec:
    """The spec of ``method.name = name``; an unknown name raises ``ValueError`` listing the registered ones."""
    if name not in _REGISTRY:
        _builtin()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"method.name: expected one of {method_names()}, got {name!r}") from None


def method_names() -> list:
    _builtin()
    return list(_REGISTRY)


def method_specs() -> list:
    _builtin()
    return list(_REGISTRY.values())


def sections(sealed_by: str = "") -> list:
    """Every registered (section key, dataclass), in registration order; ``sealed_by`` (the config module)
    closes the registry to new methods."""
    _builtin()
    if sealed_by:
        _SEALED.append(sealed_by)
    return [sec for spec in _REGISTRY.values() for sec in spec.sections]
