"""Custom ops with a PyTorch reference and a backend dispatcher (SPEC §4).

Public API::

    nsln(x, bias, *, eps=1e-6, backend="auto")
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
    "unregister_backend",
]

# --- fused NsLN kernels (issue #6): registers the "triton"/"cuda" backends of nsln / nsln_modulate ---
from . import nsln_fused  # noqa: E402,F401  (Triton kernels themselves are imported lazily)

# --- flash attention with a one-pass tangent (issue #7): registers the "triton" backend of attention ---
# (API in the submodule: lct_fast.ops.flash_attention.flash_attention / flash_attention_jvp / ...)
from .flash_attention import register_flash_attention_backend as _register_flash_attention  # noqa: E402

_register_flash_attention()
