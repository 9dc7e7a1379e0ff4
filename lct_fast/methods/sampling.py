"""What every method's sampler shares: the :class:`Sampler` a method's spec returns, step and noise checks,
eval mode without autograd, and the wrappers for classifier-free guidance and for extra scalar conditions.
The batched, seeded driver over them is :func:`lct_fast.sample.generate`."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, Optional, Sequence

import torch
from torch import nn

__all__ = ["Sampler", "check_steps", "eval_no_grad", "next_noise", "Guided", "Conditioned", "guided"]


@dataclass(frozen=True)
class Sampler:
    """One method's sampler at a fixed step count: ``run(net, noise, labels)`` with ``noise`` [draws, B, C, H, W]
    standard normal (the first starts the chain; a multi-step consistency sampler re-noises with the others)."""

    schedule: tuple
    """The levels the sampler visits (noise levels σ or TrigFlow times t), first = the largest."""
    draws: int
    """Standard-normal noise tensors one sample needs."""
    run: Callable[[nn.Module, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]


def check_steps(steps: int) -> None:
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"sample: steps must be an integer >= 1, got {steps!r}")


@contextlib.contextmanager
def eval_no_grad(net: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) and no autograd for the duration; restores the training flag after."""
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        net.train(was_training)


def next_noise(i: int, z: torch.Tensor, noise: Optional[Sequence[torch.Tensor]],
               generator: Optional[torch.Generator]) -> torch.Tensor:
    """Fresh noise for the i-th extra step: from ``noise`` if given, else drawn from ``generator``."""
    if noise is not None:
        if i >= len(noise):
            raise ValueError(f"sample: noise has {len(noise)} tensors, step {i + 2} needs one more")
        zi = noise[i]
        if zi.shape != z.shape:
            raise ValueError(f"sample: noise[{i}] has shape {tuple(zi.shape)}, expected {tuple(z.shape)}")
        return zi.to(z.device, torch.float32)
    if generator is None:
        raise ValueError("sample: a multi-step sampler needs `noise` tensors or an explicit `generator`")
    return torch.randn(z.shape, generator=generator, device=generator.device).to(z.device)


class Conditioned(nn.Module):
    """A network with extra scalar conditions (e.g. a guidance-conditioned student), asked for fixed values at
    every call."""

    def __init__(self, net: nn.Module, values: Dict[str, float]):
        super().__init__()
        self.net, self.values = net, {k: float(v) for k, v in values.items()}

    def forward(self, x, t, labels=None):
        return self.net(x, t, labels, **self.values)


class Guided(nn.Module):
    """Classifier-free guidance around a preconditioned model: f_u + s·(f_c − f_u), f_u at the null class."""

    def __init__(self, net: nn.Module, scale: float, null_label: int):
        super().__init__()
        self.net, self.scale, self.null_label = net, float(scale), int(null_label)

    def forward(self, x, t, labels=None):
        from ..models.precond import classifier_free_guidance

        return classifier_free_guidance(self.net, x, t, labels, self.scale, self.null_label)


def guided(net: nn.Module, cfg_scale: float, null_label: int) -> nn.Module:
    """``net`` under classifier-free guidance at ``cfg_scale`` (itself at 1)."""
    return net if cfg_scale == 1.0 else Guided(net, cfg_scale, null_label)
