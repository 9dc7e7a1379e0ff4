"""TF32 for the fp32 products, read and set through one place (a leaf module: torch only).

torch >= 2.9 has two APIs for it (``fp32_precision`` and the legacy ``allow_tf32`` flags) and raises once
they are mixed, so we set it through ``torch.set_float32_matmul_precision``, after which both stay readable.
It covers matrix products only: cuDNN convolutions keep PyTorch's own default (TF32 allowed). TF32 rounds the
product inputs to a 10-bit mantissa (about bf16's 8 bits plus two) and keeps fp32 accumulation; on an
H100/H200 it runs at half the bf16 tensor-core rate against 1/15 of it for plain fp32
(lct_fast.profiler.flops.PEAK_TFLOPS). Where fp32 is a requirement, not a default (the OT cost, SPEC §4), code runs
under :func:`ieee_fp32`.
"""

from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterator, Optional

import torch

from .registry import get_method

__all__ = ["PLAN_PHASES", "precision_plan", "tf32_allowed", "set_tf32", "ieee_fp32"]

#: The step's phases that do model work (lct_fast.profiler.STEP_PHASES less the diagnostics, the recompute
#: of activation checkpointing and untracked time): the keys of a precision plan.
PLAN_PHASES = ("data", "ot", "teacher_forward", "target_forward", "jvp", "online_forward", "loss", "backward",
               "optimizer", "ema")


def tf32_allowed() -> bool:
    """Whether fp32 matmuls may run as TF32 on CUDA (set by :func:`set_tf32` or by the user, either API)."""
    prec = getattr(torch.backends.cuda.matmul, "fp32_precision", None)  # torch >= 2.9
    if prec in ("tf32", "ieee"):
        return prec == "tf32"
    try:
        return bool(torch.backends.cuda.matmul.allow_tf32)
    except RuntimeError:  # torch refuses the legacy flag once the two APIs were mixed
        return False


def set_tf32(enabled: bool) -> None:
    """Allow (or forbid) TF32 for fp32 matrix products, process-wide (PyTorch's "high" / "highest")."""
    torch.set_float32_matmul_precision("high" if enabled else "highest")


@contextlib.contextmanager
def ieee_fp32() -> Iterator[None]:
    """Exact (IEEE) fp32 matrix products inside, whatever TF32 setting is outside (restored on exit)."""
    before = torch.get_float32_matmul_precision()
    if before == "highest":
        yield
        return
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def precision_plan(cfg: Any, tf32: Optional[bool] = None) -> Dict[str, str]:
    """The dtype each phase's matrix products run in on a GPU under the run's config (not what CPU autocast
    did): ``bf16`` under ``train.precision = bf16`` or bf16 weights; the JVP pass and an sCD teacher's forward
    in ``method.sct.jvp_dtype`` (sct.py ``_jvp_precision``; fp32 there is the ambient precision when the
    weights are bf16); the OT cost always in IEEE fp32 (ot.py turns autocast off and runs it under
    :func:`ieee_fp32`). Any other full-precision product is ``tf32`` where TF32 is allowed (``train.tf32``,
    or the ``tf32`` argument), else ``fp32``."""
    tf32 = cfg.train.tf32 if tf32 is None else tf32
    full = "tf32" if tf32 else "fp32"
    bf16_weights = cfg.bf16_weights
    base = "bf16" if cfg.train.precision == "bf16" or bf16_weights else full
    plan = {name: base for name in PLAN_PHASES}
    plan["ot"] = "fp32"
    spec = get_method(cfg.method.name)
    if spec.jvp:
        jvp = "bf16" if spec.jvp_dtype(cfg.method) in ("bf16", "fp16") or bf16_weights else full
        plan["jvp"] = plan["teacher_forward"] = jvp
    return plan
