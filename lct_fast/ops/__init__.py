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

# --- fused NsLN kernels: registers the "triton"/"cuda" backends of nsln / nsln_modulate ---
from . import nsln_fused  # noqa: E402,F401  (Triton kernels themselves are imported lazily)

# --- flash attention with a one-pass tangent: registers the "triton" backend of attention ---
# (API in the submodule: lct_fast.ops.attention_fused.flash_attention / flash_attention_jvp / ...)
from .attention_fused import register_flash_attention_backend as _register_flash_attention  # noqa: E402

_register_flash_attention()

# --- Sinkhorn OT: reference (ops.sinkhorn_ops) + Triton and CUDA kernels, imported on first use with CUDA tensors ---
from . import sinkhorn_ops as _sinkhorn  # noqa: E402  (registers the reference backends)
from .sinkhorn_ops import get_sinkhorn_backend, sinkhorn_assignment  # noqa: E402,F401


def _register_sinkhorn_kernels() -> None:
    import importlib.util

    def on_cuda(C, *args):
        return (C.is_cuda, "needs CUDA tensors")

    if importlib.util.find_spec("triton") is not None:
        def triton_iterations(C, sched, iters):
            from .sinkhorn_triton import sinkhorn_log_triton

            return sinkhorn_log_triton(C, sched, iters)

        def triton_assignment(C, **kwargs):
            from .sinkhorn_triton import sinkhorn_assignment_triton

            return sinkhorn_assignment_triton(C, **kwargs)

        register_backend("sinkhorn_log", "triton", triton_iterations, on_cuda)
        register_backend("sinkhorn_assignment", "triton", triton_assignment, on_cuda)
    try:
        built = importlib.util.find_spec("lct_fast._C") is not None
    except (ImportError, ValueError):  # lct_fast not importable as a package (e.g. a vendored copy)
        built = False
    if built:
        import warnings

        def fallback(what: str, why: str) -> str:
            # A build without the Sinkhorn ops (stale _C): the next kernel down, as auto would pick, not the
            # reference, whose rounding synchronises with the host.
            name = "triton" if "triton" in registered_backends("sinkhorn_assignment") else "reference"
            warnings.warn(f"sinkhorn backend 'cuda' {what} unavailable ({why}); using {name!r}", RuntimeWarning,
                          stacklevel=4)
            return name

        def cuda_iterations(C, sched, iters):
            from .dispatch import implementation
            from .sinkhorn_cuda import cuda_ops_loaded, sinkhorn_log_cuda

            ok, why = cuda_ops_loaded()
            if not ok:
                return implementation("sinkhorn_log", fallback("iterations", why))(C, sched, iters)
            return sinkhorn_log_cuda(C, sched, iters)

        def cuda_assignment(C, **kwargs):
            from .dispatch import implementation
            from .sinkhorn_cuda import cuda_ops_loaded, sinkhorn_assignment_cuda

            ok, why = cuda_ops_loaded()
            if not ok:
                return implementation("sinkhorn_assignment", fallback("pipeline", why))(C, **kwargs)
            return sinkhorn_assignment_cuda(C, **kwargs)

        register_backend("sinkhorn_log", "cuda", cuda_iterations, on_cuda)
        register_backend("sinkhorn_assignment", "cuda", cuda_assignment, on_cuda)


_register_sinkhorn_kernels()
