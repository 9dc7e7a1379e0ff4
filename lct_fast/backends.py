"""The kernel backend names, in one place: the dispatcher (lct_fast.ops.dispatch), the OT coupling and the
config validation (model.ops_backend, method.ot.backend) all read this tuple. A leaf module (no torch)."""

#: ``auto`` resolves per call: the module default, else the first available of cuda > triton > reference.
BACKENDS = ("auto", "reference", "triton", "cuda")
