"""What every method's sampler shares: the :class:`Sampler` a method's spec returns, step and noise checks,
eval mode without autograd, and the wrappers for classifier-free guidance and for extra scalar conditions.
The batched, seeded driver over them is :func:`lct_fast.sample.generate`."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, Optional, Sequence

import torch
from torch import nn

__all__ = ["Sampler", "check_steps", "eval_no_grad", "next_noise", "Guided", "Conditioned", "guided", "conditioned"]


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


class _View:
    """A thin view of a network: every attribute (``F``, ``logvar``, ``parameters``, ``eval``, ``training`` …) is
    the wrapped one's, so eval mode, the device and the raw network reach through any stack of views."""

    def __init__(self, net):
        self.net = net

    def __getattr__(self, name):
        return getattr(self.net, name)


class Conditioned(_View):
    """A network with extra scalar conditions (e.g. a guidance-conditioned student) given fixed values at every
    call of ``net(x, t, labels)`` and ``net.F`` unless the call names them (a sampler varying a second time per
    step passes its own)."""

    def __init__(self, net, values: Dict[str, float]):
        super().__init__(net)
        self.values = {k: float(v) for k, v in values.items()}

    def __call__(self, x, t, labels=None, **conditions):
        return self.net(x, t, labels, **{**self.values, **conditions})

    def F(self, x, t, labels=None, **conditions):
        return self.net.F(x, t, labels, **{**self.values, **conditions})


class Guided(_View):
    """Classifier-free guidance around a preconditioned model: f_u + s·(f_c − f_u), f_u at the null class."""

    def __init__(self, net, scale: float, null_label: int):
        super().__init__(net)
        self.scale, self.null_label = float(scale), int(null_label)

    def __call__(self, x, t, labels=None):
        from ..models.precond import classifier_free_guidance

        return classifier_free_guidance(self.net, x, t, labels, self.scale, self.null_label)


def guided(net, cfg_scale: float, null_label: int):
    """``net`` under classifier-free guidance at ``cfg_scale`` (itself at 1)."""
    return net if cfg_scale == 1.0 else Guided(net, cfg_scale, null_label)


def conditioned(net, conditions: Optional[Dict[str, float]]):
    """``net`` asked for ``conditions`` at every call (itself without any)."""
    return Conditioned(net, conditions) if conditions else net
