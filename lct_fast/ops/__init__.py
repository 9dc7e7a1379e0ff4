"""Custom ops with a PyTorch reference and a backend dispatcher (SPEC §4).

Public API::

    nsln(x, bias, *, eps=1e-6, backend="auto")
    sinkhorn_assignment(C, *, eps, iters, backend="auto") -- the OT coupling's solver (ops sinkhorn_assignment
        and sinkhorn_log in the registry; a backend registers both)
    nsln_modulate(x, shift, scale, bias=None, *, eps=1e-6, backend="auto")
    attention(q, k, v, *, backend="auto")
    linear(x, w, b) / conv2d(x, w, b, ...)   # F.linear / F.conv2d without forward-AD's zero-tangent products
    nsln_reference / nsln_modulate_reference / attention_reference / nsln_tangent_reference
    register_backend(op_name, backend_name, fn, available, *, supports_forward_ad=True)
    chosen_backend(op, backend, *tensors) -> str; explain_backend(...) -> (str, reason)
    set_default_backend(name); get_default_backend(); forward_ad_active(*tensors)
"""
from .attention_ops import attention, attention_reference, attention_torch
from .dispatch import (
    BACKENDS,
    backend_choices,
    chosen_backend,
    explain_backend,
    forward_ad_active,
    get_default_backend,
    register_backend,
    registered_backends,
    reset_backend_log,
    set_default_backend,
    unregister_backend,
)
from .forward_ad import conv2d, linear
from .nsln_ops import (
    nsln,
    nsln_modulate,
    nsln_modulate_reference,
    nsln_reference,
    nsln_tangent_reference,
)

__all__ = [
    "BACKENDS",
    "attention",
    "attention_reference",
    "attention_torch",
    "backend_choices",
    "chosen_backend",
    "conv2d",
    "explain_backend",
    "forward_ad_active",
    "get_default_backend",
    "get_sinkhorn_backend",
    "linear",
    "nsln",
    "nsln_modulate",
    "nsln_modulate_reference",
    "nsln_reference",
    "nsln_tangent_reference",
    "register_backend",
    "registered_backends",
    "reset_backend_log",
    "set_default_backend",
    "sinkhorn_assignment",
    "unregister_backend",
]

# Every backend registers itself with register_backend(...) when its family's module is imported: the references
# in <family>_ops.py, the kernels in <family>_fused.py (for NsLN and attention also their autograd layers). Kernel
# modules proper (Triton, CUDA) are imported on first use, so TRITON_INTERPRET can still be set before.
from . import attention_fused, nsln_fused, sinkhorn_fused  # noqa: E402,F401  (registration)
from .sinkhorn_ops import get_sinkhorn_backend, sinkhorn_assignment  # noqa: E402,F401
