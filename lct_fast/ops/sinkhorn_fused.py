"""The Sinkhorn kernels as backends of the OT solver: the Triton and CUDA implementations of ``sinkhorn_log`` and
``sinkhorn_assignment`` (:mod:`.sinkhorn_ops` holds the reference and the entry point), registered at import and
imported on first use with CUDA tensors. A build of the extension without the Sinkhorn ops falls back to the
next kernel down with a warning."""
from __future__ import annotations

from . import dispatch

__all__: list = []


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

        dispatch.register_backend("sinkhorn_log", "triton", triton_iterations, on_cuda)
        dispatch.register_backend("sinkhorn_assignment", "triton", triton_assignment, on_cuda)
    try:
        built = importlib.util.find_spec("lct_fast._C") is not None
    except (ImportError, ValueError):  # lct_fast not importable as a package (e.g. a vendored copy)
        built = False
    if built:
        import warnings

        def fallback(what: str, why: str) -> str:
            # A build without the Sinkhorn ops (stale _C): the next kernel down, as auto would pick, not the
            # reference, whose rounding synchronises with the host.
            name = "triton" if "triton" in dispatch.registered_backends("sinkhorn_assignment") else "reference"
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

        dispatch.register_backend("sinkhorn_log", "cuda", cuda_iterations, on_cuda)
        dispatch.register_backend("sinkhorn_assignment", "cuda", cuda_assignment, on_cuda)


_register_sinkhorn_kernels()
