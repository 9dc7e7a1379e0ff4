"""Optimizers and learning-rate schedules (progress counted in samples seen)."""

from __future__ import annotations

import math
from typing import Iterable

import torch

from .config import OptimConfig

__all__ = ["build_optimizer", "lr_factor", "build_scheduler"]


def _guarded(base: type[torch.optim.Optimizer]) -> type[torch.optim.Optimizer]:
    """A subclass of ``base`` whose step is skipped, on every rank at once, when a gradient is NaN/Inf.

    DeepSpeed applies ``optimizer.step()`` on the (partitioned, fp32) gradients after its own clipping;
    a NaN there would poison the weights and the Adam moments. The flag is all-reduced (MAX) so every
    rank makes the same choice even when only one partition is bad. ``overflow`` is the attribute
    DeepSpeed's engine reads to count skipped steps; ``skipped`` counts them for our logs.
    """

    class Guarded(base):  # type: ignore[misc, valid-type]
        overflow = False
        skipped = 0

        @torch.no_grad()
        def step(self, closure=None):  # noqa: D401 - torch signature
            grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
            bad = torch.zeros((), dtype=torch.float32, device=grads[0].device if grads else "cpu")
            if grads:
                norms = torch._foreach_norm(grads)
                bad = (~torch.isfinite(torch.stack(norms))).any().float()
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                # NCCL reduces CUDA tensors only; with optimizer offload the gradients live on the CPU.
                if torch.distributed.get_backend() == "nccl" and bad.device.type != "cuda":
                    bad = bad.to(torch.device("cuda", torch.cuda.current_device()))
                torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
            self.overflow = bool(bad.item())
            if self.overflow:
                self.skipped = self.skipped + 1
                for g in grads:
                    g.zero_()
                return None
            return super().step(closure)

    Guarded.__name__ = f"Guarded{base.__name__}"
    return Guarded


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW (torch's fused kernel on CUDA; with weight_decay 0 it is Adam, sCM's optimizer) or RAdam (the latent
    CT paper's), wrapped in the NaN guard."""
    params = [p for p in params if p.requires_grad]
    common = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)
    if cfg.name == "adamw":
        return _guarded(torch.optim.AdamW)(params, fused=device.type == "cuda", **common)
    return _guarded(torch.optim.RAdam)(params, decoupled_weight_decay=True, **common)


def lr_factor(samples: int, cfg: OptimConfig, total_samples: int, global_batch: int = 1) -> float:
    """Multiplier of the peak lr after ``samples`` training samples: linear warm-up, then constant, cosine or
    rsqrt. rsqrt is EDM2's / sCM's inverse-square-root decay 1/√max(k/t_ref, 1), k = samples/global_batch
    the optimizer step (Tables 3–4 count t_ref in iterations); the warm-up ramp multiplies it."""
    if cfg.schedule == "rsqrt":
        warm = min(1.0, (samples + 1) / cfg.warmup_samples) if cfg.warmup_samples else 1.0
        return warm / math.sqrt(max(samples / (global_batch * cfg.t_ref), 1.0))
    if cfg.warmup_samples and samples < cfg.warmup_samples:
        return (samples + 1) / cfg.warmup_samples
    if cfg.schedule == "constant":
        return 1.0
    span = max(1, total_samples - cfg.warmup_samples)
    progress = min(1.0, (samples - cfg.warmup_samples) / span)
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, *, global_batch: int,
                    total_samples: int) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR stepped once per optimizer step; the step index is converted to samples seen."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step * global_batch, cfg, total_samples, global_batch))
