"""Helpers shared by the loss objects: explicit-generator randomness, label dropout, module unwrapping,
minibatch OT coupling and its cost metric.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Tuple

import torch
from torch import nn

__all__ = [
    "randn_like_gen", "draw_seed", "unwrap", "null_class", "drop_labels", "couple_noise", "Coupler",
    "identity_coupler", "config_coupler", "as_float", "adaptive_weighting",
]

_SEED_HIGH = 2 ** 62


def as_float(x: torch.Tensor) -> torch.Tensor:
    """Promote to at least float32 (keeps float64, e.g. in finite-difference tests)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def randn_like_gen(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Standard normal noise shaped like ``x``, drawn on the generator's device, returned on x's device."""
    z = torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype)
    return z.to(x.device)


def draw_seed(generator: torch.Generator) -> int:
    """An integer seed from ``generator`` (used as the shared ``dropout_seed`` of both passes)."""
    return int(torch.randint(0, _SEED_HIGH, (1,), generator=generator, device=generator.device).item())


def unwrap(module: nn.Module) -> nn.Module:
    """The preconditioning module inside DeepSpeed/DDP (``.module``) or torch.compile (``._orig_mod``).

    Stops at the first object that exposes ``backbone`` (VEPrecond / TrigFlowPrecond per the contract).
    """
    m = module
    for _ in range(8):
        if hasattr(m, "backbone"):
            return m
        inner = getattr(m, "module", None)
        if inner is None:
            inner = getattr(m, "_orig_mod", None)
        if inner is None:
            return m
        m = inner
    return m


def null_class(net: nn.Module) -> int:
    """The null label id (= backbone.num_classes); 0 means the model is unconditional."""
    backbone = getattr(unwrap(net), "backbone", None)
    n = getattr(backbone, "num_classes", None)
    if n is None:
        raise AttributeError(
            f"{type(net).__name__}: label dropout needs net.backbone.num_classes (the null class id)")
    return int(n)


def drop_labels(labels: Optional[torch.Tensor], p: float, null_id: int,
                generator: torch.Generator) -> Optional[torch.Tensor]:
    """Replace each label by the null class ``null_id`` with probability p (classifier-free training)."""
    if labels is None or p <= 0.0:
        return labels
    u = torch.rand(labels.shape, generator=generator, device=generator.device).to(labels.device)
    return torch.where(u < p, torch.full_like(labels, null_id), labels)


#: A noise coupler: (x0, z, labels) -> (z paired with x0, cost ratio vs the pairing as drawn, 0-dim fp32).
#: ``labels`` are those the network sees (dropped ones = the null class) or None (unconditional).
Coupler = Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor]], Tuple[torch.Tensor, torch.Tensor]]


def identity_coupler(x0: torch.Tensor, z: torch.Tensor, labels: Optional[torch.Tensor] = None
                     ) -> Tuple[torch.Tensor, torch.Tensor]:
    """No coupling: z as drawn, ratio 1."""
    return z, torch.ones((), device=x0.device)


def config_coupler(ot_cfg: Any) -> Coupler:
    """The per-micro-batch coupler of ``method.ot`` (``OTConfig``): :func:`couple_noise` with its settings."""
    if ot_cfg.method == "none":
        return identity_coupler
    return functools.partial(couple_noise, method=str(ot_cfg.method), backend=str(ot_cfg.backend),
                             eps=float(ot_cfg.sinkhorn_eps), iters=int(ot_cfg.sinkhorn_iters),
                             per_class=bool(getattr(ot_cfg, "per_class", True)))


def couple_noise(x0: torch.Tensor, z: torch.Tensor, labels: Optional[torch.Tensor] = None, *, method: str,
                 backend: str = "auto", eps: float = 0.05, iters: int = 100, per_class: bool = True
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Minibatch OT coupling (paper §4.4): returns (z[perm], cost ratio vs the identity pairing).

    With ``labels`` and ``per_class`` the noise is only permuted among samples of one label (SPEC §2: across
    classes the paired noise would carry the class). ``method == "none"`` returns z unchanged and ratio 1;
    ``eps``/``iters`` are the Sinkhorn settings. The coupling itself is :func:`lct_fast.ot.couple` (imported
    lazily: the OT module is optional for methods without OT).
    """
    one = torch.ones((), device=x0.device)
    if method == "none":
        return z, one
    from lct_fast.ot import couple, pairing_cost_ratio  # lazy: keeps the methods importable without POT

    with torch.no_grad():
        perm = couple(x0.detach(), z.detach(), method=method, backend=backend, eps=eps, iters=iters,
                      labels=labels if per_class else None)
    perm = perm.to(device=z.device, dtype=torch.long)
    if perm.shape != (z.shape[0],):
        raise ValueError(f"lct_fast.ot.couple returned a permutation of shape {tuple(perm.shape)}, "
                         f"expected ({z.shape[0]},)")
    zp = z[perm]
    return zp, pairing_cost_ratio(x0, z, zp)


def adaptive_weighting(online: nn.Module, t: torch.Tensor, d: torch.Tensor, enabled: bool, who: str
                       ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(loss, w): e^{−w(t)}·d + w(t) with the learned w = ``online.logvar(t)`` (EDM2/sCM), or (d, 0) when off.
    ``who`` names the switch in the error when the network has no adaptive-weight head."""
    if not enabled:
        return d, torch.zeros_like(d)
    if not hasattr(online, "logvar"):
        raise AttributeError(f"{type(online).__name__}: {who} needs net.logvar(t) (set model.adaptive_weight=true)")
    w = online.logvar(t).to(d.dtype).reshape(d.shape[0])
    return torch.exp(-w) * d + w, w


def prepare_batch(loss_name: str, x0: torch.Tensor, data_dim: int) -> Tuple[torch.Tensor, Tuple[int, ...]]:
    """Check x0 has ``data_dim`` values per sample and return (x0 as float, per-sample broadcast shape)."""
    if x0.ndim < 2 or x0[0].numel() != data_dim:
        raise ValueError(f"{loss_name}: x0 of shape {tuple(x0.shape)} does not have data_dim={data_dim} per sample")
    x0 = as_float(x0)
    return x0, (x0.shape[0],) + (1,) * (x0.ndim - 1)
