"""Backend registry and dispatcher for the custom ops (SPEC §4).

Every op (``nsln``, ``nsln_modulate``, ``attention``) has a PyTorch ``reference`` backend that always
works (CPU/GPU, backward, ``torch.func.jvp`` and ``torch.autograd.forward_ad``). Kernel issues plug in
faster backends with :func:`register_backend` without touching model code::

    register_backend("nsln", "triton", triton_nsln, available=lambda *ts: ts[0].is_cuda)

Resolution rules (``chosen_backend``):

* ``"auto"`` means the module default (:func:`set_default_backend`); when that is also ``"auto"`` the
  first available of ``cuda > triton > reference`` for the inputs' device is taken.
* An explicit backend that is not registered or not available for the inputs falls back to
  ``reference`` with a one-time warning that says so and why.
* Backends registered with ``supports_forward_ad=False`` are skipped while forward-mode AD is active.

Each distinct decision is logged once (logger ``lct_fast.ops``) and kept in :func:`backend_choices`.
"""
from __future__ import annotations

import logging
import os
import threading
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, Tuple

import torch
import torch.autograd.forward_ad as fwAD

from ..backends import BACKENDS  # the one list of backend names

logger = logging.getLogger("lct_fast.ops")
_AUTO_ORDER: Tuple[str, ...] = ("cuda", "triton")


# ---------------------------------------------------------------------------------------------
# How the kernel backends run: Triton interpreter, autotuning, the compiled C++/CUDA extension
# ---------------------------------------------------------------------------------------------
def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def autotune_enabled() -> bool:
    """Whether Triton kernels autotune their launch configuration (env ``LCT_FAST_AUTOTUNE``, default 1).

    With ``LCT_FAST_AUTOTUNE=0`` each kernel takes the first candidate left after pruning (a sensible default
    per shape) and compiles once instead of once per candidate: for correctness runs (the GPU test suite
    would otherwise compile hundreds of candidates), never for benchmarks."""
    return os.environ.get("LCT_FAST_AUTOTUNE", "1").strip().lower() not in ("0", "false", "no", "off")


def with_autotune_switch(prune: Callable[..., list]) -> Callable[..., list]:
    """A Triton ``early_config_prune`` that applies ``prune`` and then the ``LCT_FAST_AUTOTUNE`` switch."""
    def early_config_prune(configs, named_args, **kwargs):
        keep = prune(configs, named_args, **kwargs)
        return keep if autotune_enabled() else keep[:1]
    return early_config_prune


def autotune(kernel, configs: list, key: list, prune: Callable[..., list]):
    """``triton.autotune`` of ``kernel`` over ``configs`` keyed on ``key``, pruned by ``prune`` (and the switch)."""
    import triton  # lazy: the dispatcher itself must import without Triton

    return triton.autotune(configs=configs, key=key,
                           prune_configs_by={"early_config_prune": with_autotune_switch(prune)})(kernel)


_EXTENSION_OPS: Dict[Tuple[str, ...], Tuple[bool, str]] = {}


def load_extension_ops(fakes: Dict[str, Callable[..., Any]]) -> Tuple[bool, str]:
    """Import ``lct_fast._C`` once per op set; (True, "") when it registered every ``torch.ops.lct_fast.<name>``
    in ``fakes``, whose fake (meta) implementations are then registered so ``torch.compile`` can trace
    around the ops. Otherwise (False, why)."""
    names = tuple(sorted(fakes))
    if names not in _EXTENSION_OPS:
        try:
            import lct_fast._C  # noqa: F401  (registers torch.ops.lct_fast.*)

            missing = [n for n in names if not hasattr(torch.ops.lct_fast, n)]
            ok = not missing
            why = "" if ok else f"lct_fast._C has no {', '.join(missing)} op (rebuild it)"
        except ImportError as exc:
            ok, why = False, f"lct_fast._C not built ({exc})"
        if ok:
            for name, fake in fakes.items():
                try:
                    torch.library.register_fake(f"lct_fast::{name}")(fake)
                except RuntimeError:  # already registered (module reloaded)
                    pass
        _EXTENSION_OPS[names] = (ok, why)
    return _EXTENSION_OPS[names]


@dataclass(frozen=True)
class _Entry:
    fn: Callable[..., Any]
    available: Callable[..., Any]
    supports_forward_ad: bool


_REGISTRY: Dict[str, Dict[str, _Entry]] = {}
_DEFAULT_BACKEND = "auto"
_LOCK = threading.Lock()
_SEEN: Dict[Tuple[str, str, str, str], str] = {}


def _check_backend_name(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"ops backend {backend!r} is not one of {list(BACKENDS)}")
    return backend


def register_backend(
    op_name: str,
    backend_name: str,
    fn: Callable[..., Any],
    available: Callable[..., Any] = lambda *tensors: True,
    *,
    supports_forward_ad: bool = True,
) -> None:
    """Register ``fn`` as implementation ``backend_name`` of op ``op_name``.

    ``available(*tensors)`` is called with the op's tensor arguments and returns ``bool`` or
    ``(bool, reason)``; the reason appears in the fallback message (e.g. "no CUDA device").
    ``fn`` must take the same arguments as the reference op (minus ``backend``).
    """
    if backend_name == "auto" or backend_name not in BACKENDS:
        raise ValueError(f"cannot register backend {backend_name!r}; expected one of reference|triton|cuda")
    with _LOCK:
        _REGISTRY.setdefault(op_name, {})[backend_name] = _Entry(fn, available, supports_forward_ad)
        _SEEN.clear()


def unregister_backend(op_name: str, backend_name: str) -> None:
    """Remove a registered backend (the reference backends cannot be removed)."""
    if backend_name == "reference":
        raise ValueError("the reference backend cannot be unregistered")
    with _LOCK:
        _REGISTRY.get(op_name, {}).pop(backend_name, None)
        _SEEN.clear()


def registered_backends(op_name: str) -> Tuple[str, ...]:
    """Names of the backends registered for ``op_name``."""
    return tuple(_REGISTRY.get(op_name, {}))


def set_default_backend(backend: str) -> None:
    """Set what ``backend="auto"`` resolves to (e.g. from ``ModelConfig.ops_backend``)."""
    global _DEFAULT_BACKEND
    _DEFAULT_BACKEND = _check_backend_name(backend)
    _SEEN.clear()


def get_default_backend() -> str:
    """The module default backend (``"auto"`` unless :func:`set_default_backend` changed it)."""
    return _DEFAULT_BACKEND


def forward_ad_active(*tensors: Any) -> bool:
    """True when forward-mode AD may be tracing this call.

    Covers ``torch.autograd.forward_ad`` (dual tensors or an open ``dual_level``) and
    ``torch.func.jvp`` (a Jvp transform on the functorch interpreter stack; it also opens a dual
    level in torch 2.13). Used to avoid SDPA (no forward-AD rule for the flash/efficient kernels) and
    activation checkpointing (useless in the no-grad JVP pass).
    """
    if torch.compiler.is_compiling():
        # A compiled region never runs the forward-mode pass (lct_fast.models.layers.maybe_checkpoint sends
        # it to the eager block), and dynamo cannot trace the functorch stack query below (a graph break per op).
        return False
    for t in tensors:
        if isinstance(t, torch.Tensor) and fwAD.unpack_dual(t).tangent is not None:
            return True
    if getattr(fwAD, "_current_level", -1) >= 0:
        return True
    try:
        stack = torch._C._functorch.get_interpreter_stack()
    except (AttributeError, RuntimeError):  # pragma: no cover - older/newer torch internals
        return False
    if stack:
        jvp_key = torch._C._functorch.TransformType.Jvp
        return any(i.key() == jvp_key for i in stack)
    return False


def _device_of(tensors: Tuple[Any, ...]) -> str:
    for t in tensors:
        dev = getattr(t, "device", None)
        if isinstance(dev, torch.device):
            return dev.type
    return "cpu"


def _probe(entry: _Entry, tensors: Tuple[Any, ...]) -> Tuple[bool, str]:
    try:
        res = entry.available(*tensors)
    except Exception as exc:  # an availability probe must never break the forward pass
        return False, f"availability check raised {type(exc).__name__}: {exc}"
    if isinstance(res, tuple):
        ok, reason = bool(res[0]), str(res[1])
    else:
        ok, reason = bool(res), "" if res else "not available for these inputs"
    return ok, reason


def explain_backend(op: str, backend: str = "auto", *tensors: Any) -> Tuple[str, str]:
    """Resolve ``backend`` for ``op`` on ``tensors``; return ``(chosen, reason)``."""
    if op not in _REGISTRY or "reference" not in _REGISTRY[op]:
        raise KeyError(f"unknown op {op!r}; registered ops: {sorted(_REGISTRY)}")
    requested = _check_backend_name(backend)
    if requested == "auto":
        requested = _DEFAULT_BACKEND
    fad = forward_ad_active(*tensors)
    device = _device_of(tensors)
    entries = _REGISTRY[op]

    def usable(name: str) -> Tuple[bool, str]:
        entry = entries.get(name)
        if entry is None:
            return False, "no kernel registered"
        if fad and not entry.supports_forward_ad:
            return False, "no forward-AD rule and forward-mode AD is active"
        return _probe(entry, tensors)

    if requested == "auto":
        skipped = []
        for name in _AUTO_ORDER:
            ok, why = usable(name)
            if ok:
                return name, f"{op}: auto picked {name} on {device}"
            skipped.append(f"{name} unavailable ({why})")
        return "reference", f"{op}: auto on {device}: {'; '.join(skipped)}; using reference"
    if requested == "reference":
        return "reference", f"{op}: reference requested"
    ok, why = usable(requested)
    if ok:
        return requested, f"{op}: {requested} requested and available on {device}"
    return "reference", f"{op}: {requested} unavailable ({why}) on {device}, using reference"


def _record(op: str, backend: str, tensors: Tuple[Any, ...], chosen: str, reason: str) -> None:
    if torch.compiler.is_compiling():
        # dynamo cannot trace the lock (a graph break at every op); the eager calls record the decision
        return
    key = (op, backend, _device_of(tensors), chosen)
    if key in _SEEN:
        return
    with _LOCK:
        if key in _SEEN:
            return
        _SEEN[key] = reason
    logger.info(reason)
    resolved = _DEFAULT_BACKEND if backend == "auto" else backend
    if resolved not in ("auto", "reference") and chosen != resolved:
        warnings.warn(reason, RuntimeWarning, stacklevel=4)


def chosen_backend(op: str, backend: str = "auto", *tensors: Any) -> str:
    """Name of the backend that ``op`` will run with for ``tensors`` (logged once per decision)."""
    chosen, reason = explain_backend(op, backend, *tensors)
    _record(op, backend, tensors, chosen, reason)
    return chosen


def backend_choices() -> Dict[Tuple[str, str, str, str], str]:
    """Decisions made so far: ``(op, requested, device, chosen) -> reason``."""
    return dict(_SEEN)


def implementation(op: str, backend_name: str) -> Callable[..., Any]:
    """The function registered as ``backend_name`` of ``op`` (KeyError when there is none)."""
    return _REGISTRY[op][backend_name].fn


def dispatch(op: str, backend: str, tensors: Tuple[Any, ...]) -> Callable[..., Any]:
    """Return the implementation of ``op`` chosen for ``tensors``."""
    name = chosen_backend(op, backend, *tensors)
    return _REGISTRY[op][name].fn


def reset_backend_log() -> None:
    """Forget logged decisions (tests use it to see the one-time messages again)."""
    with _LOCK:
        _SEEN.clear()
