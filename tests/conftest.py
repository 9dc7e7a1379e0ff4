"""Shared test set-up: CPU-only machines run every Triton kernel in the interpreter."""

import os
import sys

import torch

# Must be set before any @triton.jit function is created; harmless where Triton is absent.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # DeepSpeed picks its accelerator at import; without a GPU make it the CPU one (gloo) explicitly.
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

torch.set_num_threads(min(2, torch.get_num_threads()))


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _restore_matmul_precision():
    """A Trainer built in-process sets TF32 process-wide (train.tf32 on CUDA); later tests compare fp32
    kernels against references and must not inherit it."""
    before = torch.get_float32_matmul_precision()
    yield
    torch.set_float32_matmul_precision(before)
