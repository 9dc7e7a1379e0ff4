"""Attention op: the functional entry point, dispatched to a backend (reference: :mod:`.attention_pytorch`;
Triton flash attention with a one-pass tangent: :mod:`.attention_fused` over :mod:`.attention_triton`)."""
from __future__ import annotations

import torch

from .attention_pytorch import attention_reference, attention_torch
from .dispatch import dispatch, register_backend

__all__ = ["attention", "attention_reference", "attention_torch"]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """softmax(Q·Kᵀ/√Dh)·V on [B, H, L, Dh] through the backend dispatcher."""
    fn = dispatch("attention", backend, (q, k, v))
    return fn(q, k, v)


register_backend("attention", "reference", attention_torch)
