"""FLOPs: counted at the dispatcher, with closed forms to check the count, and device peaks for MFU.

Conventions (SPEC §5; the same numbers in ``launch/profile.py`` and ``benchmarks/bench_attention.py``):

* FLOPs are those of matrix products and convolutions, 2 per multiply-add (what
  ``torch.utils.flop_counter`` counts); norms, activations and softmax are not counted.
* **Forward** = 1 pass. **Backward** = what the backward executes: 2 forwards for a linear layer (input and
  weight gradients); for attention, torch's formula, which includes recomputing the scores (2.5 forwards).
* **JVP pass** (the sCT tangent) = primal + tangent products. A linear layer's tangent is one more product
  with the weight (ẏ = ẋ·Wᵀ: JVP = 2 forwards); attention's tangent is Q̇Kᵀ + QK̇ᵀ, Ṗ·V and P·V̇ (four
  more products: JVP = 3 forwards). :func:`attention_flops` states it once for everyone.

Forward-mode AD in PyTorch computes a linear layer's tangent as ẋ·Wᵀ + x·Ẇᵀ with Ẇ a *materialised*
zero tensor (a stride-0 expansion of one zero) when the weight has no tangent, and cuBLAS/oneDNN multiply
it for real: a third GEMM per linear that adds nothing (measured on this CPU, Linear(1024, 1024) on 2048
rows: forward 13.6 ms, two GEMMs 26 ms, JVP 42.6 ms). :class:`FlopCounter` leaves products with an
all-zero broadcast operand out of the model FLOPs (``wasted`` counts them separately), so the JVP figure
is the useful work and MFU is not inflated by it.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

__all__ = ["FlopCounter", "attention_flops", "count_flops", "dit_forward_flops", "dit_jvp_flops", "peak_tflops", "tflops",
           "ATTENTION_PASS_FACTOR", "PEAK_TFLOPS"]

#: Attention FLOPs per pass relative to the forward's 4·B·H·Lq·Lk·Dh: the JVP pass (primal + tangent) = 3;
#: forward + backward = 3.5 (FlashAttention's convention: the backward recomputes the scores, 2.5).
ATTENTION_PASS_FACTOR: Dict[str, float] = {"forward": 1.0, "jvp": 3.0, "backward": 2.5, "fwd+bwd": 3.5}

#: Dense peak TFLOP/s by device name, most specific name first: (bf16/fp16 tensor core, tf32 tensor core, fp32
#: CUDA core), NVIDIA data sheets without sparsity. SXM: H100/H200 989 / 495 / 67, A100 312 / 156 / 19.5;
#: H100 PCIe 756 / 378 / 51; H100 NVL and H200 NVL 835 / 418 / 60.
PEAK_TFLOPS: Dict[str, Dict[str, float]] = {
    "H100 PCIE": {"bf16": 756.0, "tf32": 378.0, "fp32": 51.0},
    "H100 NVL": {"bf16": 835.0, "tf32": 417.5, "fp32": 60.0},
    "H200 NVL": {"bf16": 835.0, "tf32": 417.5, "fp32": 60.0},
    "H200": {"bf16": 989.0, "tf32": 494.7, "fp32": 66.9},
    "H100": {"bf16": 989.0, "tf32": 494.7, "fp32": 66.9},
    "A100": {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5},
}


def peak_tflops(device_name: str, precision: str) -> Optional[float]:
    """Dense peak of the named device for ``precision`` (bf16 | tf32 | fp32), or None when not in the table."""
    name = device_name.upper()
    for key, peaks in PEAK_TFLOPS.items():  # insertion order: the most specific names first
        if key in name:
            return peaks[precision]
    return None


def attention_flops(batch: int, heads: int, lq: int, lk: int, head_dim: int, mode: str = "forward") -> float:
    """FLOPs of softmax(QKᵀ)V for one pass: forward 4·B·H·Lq·Lk·Dh times :data:`ATTENTION_PASS_FACTOR`."""
    if mode not in ATTENTION_PASS_FACTOR:
        raise ValueError(f"attention_flops: mode must be one of {sorted(ATTENTION_PASS_FACTOR)}, got {mode!r}")
    return ATTENTION_PASS_FACTOR[mode] * 4.0 * batch * heads * lq * lk * head_dim


def _dit_parts(model_cfg: Any, conditions: Any = None) -> tuple[float, float]:
    """(linear + conv FLOPs, attention FLOPs) of one DiT forward of one sample, closed form; ``conditions``: the
    method's extra scalar conditions (default: ``model.guidance_embed``'s)."""
    from ..models import condition_count
    from ..models.dit import FREQ_DIM, resolve_dit_dims

    dims = resolve_dit_dims(model_cfg.size, model_cfg.width, model_cfg.depth, model_cfg.heads)
    w, depth, heads = dims.width, dims.depth, dims.heads
    p, c, res = model_cfg.patch_size, model_cfg.in_channels, model_cfg.resolution
    tokens = (res // p) ** 2
    hidden = int(w * model_cfg.mlp_ratio)
    per_token = depth * 2 * (3 * w * w + w * w + 2 * w * hidden)          # qkv, proj, fc1, fc2
    per_token += 2 * c * p * p * w + 2 * w * p * p * c                    # patch embedding, output layer
    per_sample = depth * 2 * w * 6 * w + 2 * w * 2 * w                    # adaLN of each block, final adaLN
    per_sample += 2 * (FREQ_DIM * w + w * w)                              # time embedding MLP
    per_sample += condition_count(model_cfg, conditions) * 2 * (FREQ_DIM * w + w * w)  # each condition's MLP
    if getattr(model_cfg, "adaptive_weight", False):
        per_sample += 2 * FREQ_DIM                                        # w_φ head
    linear = tokens * per_token + per_sample
    attn = depth * attention_flops(1, heads, tokens, tokens, w // heads)
    return float(linear), float(attn)


def dit_forward_flops(model_cfg: Any, conditions: Any = None) -> float:
    """Closed-form FLOPs of one DiT forward of one sample (matmuls and the patch convolution)."""
    linear, attn = _dit_parts(model_cfg, conditions)
    return linear + attn


def dit_jvp_flops(model_cfg: Any, conditions: Any = None) -> float:
    """Closed-form FLOPs of one DiT JVP pass of one sample (primal + tangent; see the module docstring)."""
    linear, attn = _dit_parts(model_cfg, conditions)
    return 2 * linear + ATTENTION_PASS_FACTOR["jvp"] * attn


# ------------------------------------------------------------------------------------------ counting
def _shape(x: Any) -> Any:
    return x.shape if isinstance(x, torch.Tensor) else x


def _ours() -> Dict[Any, Callable[..., float]]:
    """Formulas for ops torch's counter does not know: CPU flash SDPA and our flash-attention custom ops."""
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten
    out: Dict[Any, Callable[..., float]] = {}

    def fwd(q, k, v, *args, **kwargs):
        return fc.sdpa_flop_count(q, k, v)

    def bwd_cpu(grad_out, q, k, v, *args, **kwargs):
        return fc.sdpa_backward_flop_count(grad_out, q, k, v)

    def jvp(q, k, v, tq, tk, tv, *args, **kwargs):
        b, h, lq, d = q
        one = 2.0 * b * h * lq * k[2] * d                                   # one product of the L×L stage
        scores_dot = (tq is not None) + (tk is not None)
        return 2 * one + one * scores_dot + one * (scores_dot > 0) + one * (tv is not None)

    def bwd_ours(do, q, k, v, *args, **kwargs):
        return fc.sdpa_backward_flop_count(do, q, k, v)

    for name, fn in (("_scaled_dot_product_flash_attention_for_cpu", fwd),
                     ("_scaled_dot_product_flash_attention_for_cpu_backward", bwd_cpu)):
        op = getattr(aten, name, None)
        if op is not None and op not in fc.flop_registry:
            out[op] = fn
    ns = getattr(torch.ops, "lct_fast", None)
    if ns is not None:
        for name, fn in (("flash_attn_fwd", fwd), ("flash_attn_jvp", jvp), ("flash_attn_bwd", bwd_ours)):
            try:
                out[getattr(ns, name)] = fn
            except (AttributeError, RuntimeError):
                pass
    return out


def _is_broadcast_zero(x: Any) -> bool:
    """A stride-0 expansion of a single zero: what forward-mode AD materialises for a missing tangent."""
    return (isinstance(x, torch.Tensor) and x.numel() > 1 and x.dim() > 0 and all(s == 0 for s in x.stride())
            and not x.is_meta and bool(x.as_strided((), ()) == 0))


class FlopCounter(TorchDispatchMode):
    """Counts matmul/conv FLOPs at the dispatcher, per bucket.

    ``bucket`` names where a FLOP goes (default: :func:`lct_fast.profiler.phases.current_phase`, so one counted
    training step gives FLOPs per phase). Products with a broadcast all-zero operand go to ``wasted``
    instead (see the module docstring). Uses torch's formula table plus :func:`_ours`.
    """

    def __init__(self, bucket: Optional[Callable[[], Optional[str]]] = None) -> None:
        super().__init__()
        from torch.utils import flop_counter as fc

        from .phases import current_phase

        self.bucket = bucket or current_phase
        self.torch_formulas = dict(fc.flop_registry)  # take the op's arguments (shape_wrapper inside)
        self.our_formulas = _ours()                      # take shapes
        self.flops: Dict[str, float] = {}
        self.wasted: Dict[str, float] = {}

    @property
    def total(self) -> float:
        return float(sum(self.flops.values()))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func._overloadpacket
        n = None
        if packet in self.our_formulas:
            a, k = tree_map(_shape, (args, kwargs))
            n = float(self.our_formulas[packet](*a, **k))
        elif packet in self.torch_formulas:
            n = float(self.torch_formulas[packet](*args, **kwargs, out_val=out))
        if n is not None:
            key = self.bucket() or "untracked"
            flat, _ = tree_flatten((args, kwargs))
            target = self.wasted if any(_is_broadcast_zero(x) for x in flat) else self.flops
            target[key] = target.get(key, 0.0) + n
        return out


def count_flops(fn: Callable[[], Any]) -> float:
    """FLOPs of ``fn()`` (useful work only; see :class:`FlopCounter`)."""
    with FlopCounter(bucket=lambda: "all") as fc:
        fn()
    return fc.total


def tflops(flops: float, seconds: float) -> float:
    return flops / seconds / 1e12 if seconds > 0 and math.isfinite(seconds) else float("nan")
