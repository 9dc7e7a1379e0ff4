"""NsLN ops: the functional entry points, dispatched to a backend (reference: :mod:`.nsln_pytorch`; Triton and
CUDA: :mod:`.nsln_fused` over :mod:`.nsln_triton` and ``csrc/nsln*``)."""
from __future__ import annotations

from typing import Optional

import torch

from .dispatch import dispatch, register_backend
from .nsln_pytorch import nsln_modulate_reference, nsln_reference, nsln_tangent_reference

__all__ = ["nsln", "nsln_modulate", "nsln_reference", "nsln_modulate_reference", "nsln_tangent_reference"]


def nsln(x: torch.Tensor, bias: Optional[torch.Tensor], *, eps: float = 1e-6,
         backend: str = "auto") -> torch.Tensor:
    """NsLN over the last dim through the backend dispatcher (see :mod:`lct_fast.ops.dispatch`)."""
    fn = dispatch("nsln", backend, (x, bias))
    return fn(x, bias, eps=eps)


def nsln_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                  bias: Optional[torch.Tensor] = None, *, eps: float = 1e-6,
                  backend: str = "auto") -> torch.Tensor:
    """Fused NsLN + adaLN modulation through the backend dispatcher."""
    fn = dispatch("nsln_modulate", backend, (x, shift, scale, bias))
    return fn(x, shift, scale, bias, eps=eps)


register_backend("nsln", "reference", nsln_reference)
register_backend("nsln_modulate", "reference", nsln_modulate_reference)
