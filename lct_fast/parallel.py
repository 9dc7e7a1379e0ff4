"""DeepSpeed in one place: its config, the engine, the views of the module the losses see, the step's outcome
(applied or skipped, gradient norm, learning rate), checkpoints and the ZeRO-3 surgery. No other module of the
package calls DeepSpeed.

Model and loss code know nothing about parallelism. :func:`deepspeed_config` derives the engine's config from a
run's; :func:`wrap` builds the engine and returns a :class:`Wrapped` with

* ``online``: the view the loss's online pass goes through (its calls go through the engine, whose gradients
  DeepSpeed reduces; ``F`` and ``logvar`` are the module's, whose parameters it reduces just the same);
* ``target_net``: the unwrapped module for the stop-gradient pass and the sCT JVP (which must not go through
  an engine/DDP wrapper). Under ZeRO-3 its parameters are still gathered by DeepSpeed's per-submodule
  forward hooks, so the JVP sees full weights; its no-grad calls bypass ZeRO-3's backward-hook Functions,
  which have no forward-AD rule (:func:`zero3_backward_hooks_off`);
* ``frozen``: a frozen module run beside it (the sCD teacher), in the same :class:`TargetNet` view. Under ZeRO-3
  it is partitioned like the student, by an optimizer-less DeepSpeed engine (ZeRO-3's parameter offload:
  the same per-submodule gather/release hooks, no gradients or optimizer state), so each rank holds 1/N of
  it; below ZeRO-3 every rank holds a copy;
* ``before_micro_step()``: marks a micro-step boundary for ZeRO-3's parameter prefetcher (see :func:`wrap`);
* ``backward(loss)``, ``step()``, then ``step_applied()``, ``grad_norm()`` (before clipping) and ``lr()``;
* ``partitioned``: the weights are sharded across ranks (ZeRO-3), so the live module holds 1/N of them;
* ``gathered_state_dict()``: the full weights (a collective under ZeRO-3);
* ``save_checkpoint()`` / ``load_checkpoint()``: DeepSpeed's sharded state.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from .registry import get_method
from .validate import ConfigError

__all__ = ["deepspeed_config", "wrap", "Wrapped", "OnlineNet", "TargetNet", "zero3_backward_hooks_off"]


def deepspeed_config(cfg: Any, world_size: int) -> dict:
    """The DeepSpeed config of a run (``lct_fast.config.Config``) on ``world_size`` ranks: the preset's ``deepspeed``
    block with the batch and clipping keys filled from ``train`` (which must agree if the preset sets them)."""
    ds = copy.deepcopy(cfg.deepspeed)
    micro, accum = cfg.train.batch_layout(world_size)
    derived = {
        "train_batch_size": cfg.train.global_batch,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        # DeepSpeed >= 0.19.3 clips by default: always state it (0 = off).
        "gradient_clipping": cfg.train.grad_clip,
    }
    for key, value in derived.items():
        if key in ds and ds[key] != value:
            raise ConfigError(f"deepspeed.{key}: {ds[key]!r} disagrees with the value {value!r} derived from train.*")
        ds[key] = value
    ds.setdefault("bf16", {}).setdefault("enabled", False)
    if ds["bf16"]["enabled"] and cfg.train.precision != "bf16":
        raise ConfigError("deepspeed.bf16.enabled: true needs train.precision=bf16")
    # Our optimizers are torch's (RAdam, AdamW) in the NaN guard of lct_fast.optim: ZeRO runs them on its
    # fp32 partitions, which is sound for any element-wise optimizer.
    ds.setdefault("zero_allow_untested_optimizer", True)
    zero = ds.setdefault("zero_optimization", {})
    if zero.get("stage", 0) == 3:
        # ZeRO-3's "memory efficient linear" swaps torch.nn.functional.linear, process-wide, for an
        # autograd.Function without a jvp rule: forward-mode AD (the sCT tangent) then fails. Our
        # parameters are gathered by ZeRO-3's module hooks anyway, so plain F.linear is correct.
        if zero.get("memory_efficient_linear") and get_method(cfg.method.name).jvp:
            raise ConfigError("deepspeed.zero_optimization.memory_efficient_linear: must be false for "
                              f"method {cfg.method.name} (its linear has no forward-mode AD rule)")
        zero.setdefault("memory_efficient_linear", False)
    return ds




class _IdentityFunction:
    """Stands in for ZeRO-3's per-module backward-hook autograd Functions during a no-grad pass."""

    @staticmethod
    def apply(x):
        return x


@contextlib.contextmanager
def zero3_backward_hooks_off(module: torch.nn.Module):
    """Bypass ZeRO-3's backward-hook Functions (``pre_bwd_fn``/``post_bwd_fn``) on every submodule.

    ZeRO-3 threads each submodule's inputs and outputs through custom autograd Functions that schedule
    gradient reduction. They have no ``jvp`` rule, so forward-mode AD (the sCT tangent) fails through
    them; in a no-grad pass they have nothing to schedule anyway. The forward hooks that gather and
    release the partitioned parameters stay active, so the JVP sees the full weights.
    """
    saved = []
    for m in module.modules():
        for attr in ("pre_bwd_fn", "post_bwd_fn"):
            if attr in m.__dict__:
                saved.append((m, attr, m.__dict__[attr]))
                setattr(m, attr, _IdentityFunction)
    try:
        yield
    finally:
        for m, attr, fn in saved:
            setattr(m, attr, fn)


class TargetNet:
    """The unwrapped module as the loss's ``target_net`` (stop-gradient pass and sCT JVP).

    Attribute access goes to the module; calls made with gradients disabled run with ZeRO-3's backward
    hooks bypassed (see :func:`zero3_backward_hooks_off`). Calls with gradients enabled run untouched.
    """

    _CALLS = ("forward", "F", "logvar")

    def __init__(self, module: torch.nn.Module, zero3: bool):
        self._module = module
        self._zero3 = zero3

    def _wrap(self, fn):
        def call(*args, **kwargs):
            if self._zero3 and not torch.is_grad_enabled():
                with zero3_backward_hooks_off(self._module):
                    return fn(*args, **kwargs)
            return fn(*args, **kwargs)

        return call

    def __call__(self, *args, **kwargs):
        return self._wrap(self._module)(*args, **kwargs)

    def __getattr__(self, name):
        attr = getattr(self._module, name)
        return self._wrap(attr) if name in self._CALLS else attr


class OnlineNet:
    """The module as the loss's online network: a call goes through the engine (DeepSpeed's forward), the
    preconditioner's ``F`` and ``logvar`` and every other attribute are the module's. Its gradients are reduced
    by DeepSpeed's parameter hooks whichever way it was called."""

    def __init__(self, engine: Any):
        self._engine = engine

    def __call__(self, *args, **kwargs):
        return self._engine(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._engine.module, name)


@dataclass
class Wrapped:
    engine: Any
    """The DeepSpeed engine (for inspection; the trainer goes through the methods below)."""
    target_net: TargetNet
    zero_stage: int
    optimizer: Any = None
    frozen: Optional[TargetNet] = None
    compiled_blocks: int = 0
    """Backbone blocks compiled in place (``compile``); 0 when eager."""
    _coordinators: tuple = ()
    _frozen_engine: Optional[Any] = None
    _pre_clip: Optional[float] = None

    @property
    def online(self) -> OnlineNet:
        return OnlineNet(self.engine)

    @property
    def module(self) -> torch.nn.Module:
        """The live module (under ZeRO-3 its parameters are this rank's partitions)."""
        return self.engine.module

    @property
    def partitioned(self) -> bool:
        """The weights are sharded across ranks (ZeRO-3): the live module holds 1/N of each parameter."""
        return self.zero_stage == 3

    def before_micro_step(self) -> None:
        """Call before each micro-step's forward passes (ZeRO-3: restarts the prefetchers' recorded order)."""
        for coordinator in self._coordinators:
            coordinator.reset_step()

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> None:
        """DeepSpeed's step (an optimizer step at the accumulation boundary). At the boundary of a ZeRO-0 run the
        module holds the full reduced gradients, whose norm is taken first (the norm clipping sees)."""
        if self.engine.is_gradient_accumulation_boundary():
            self._pre_clip = self._local_grad_norm()
        self.engine.step()

    def _local_grad_norm(self) -> Optional[float]:
        if self.zero_stage != 0:
            return None  # ZeRO 1-3: the optimizer reports its own norm
        grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
        if not grads:
            return None
        return float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))))

    def step_applied(self) -> bool:
        """The last optimizer step changed the weights. DeepSpeed skips a step itself when its own overflow /
        invalid-norm check fires (ZeRO 1-3, bf16, clipping on) without calling our optimizer; the NaN guard of
        :mod:`lct_fast.optim` (``overflow``) covers the cases it does not check."""
        return self.engine.was_step_applied() and not getattr(self.optimizer, "overflow", False)

    def grad_norm(self) -> Optional[float]:
        """The global gradient norm of the last step before clipping (None if none was measured)."""
        norm = self.engine.get_global_grad_norm()
        return self._pre_clip if norm is None else float(norm)

    def lr(self) -> float:
        return self.engine.get_lr()[0]

    def save_checkpoint(self, ckpt_dir: str, tag: str, **kwargs: Any) -> None:
        self.engine.save_checkpoint(ckpt_dir, tag=tag, **kwargs)

    def load_checkpoint(self, ckpt_dir: str, tag: str) -> None:
        self.engine.load_checkpoint(ckpt_dir, tag=tag)

    def gathered_state_dict(self, *, everywhere: bool, is_main: bool) -> dict:
        """Full fp32 weights on CPU: on every rank with ``everywhere``, else on the main rank ({} elsewhere).
        A collective under ZeRO-3 (every rank must call it)."""
        import deepspeed

        module = self.engine.module
        ctx = (deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)
               if self.zero_stage == 3 else contextlib.nullcontext())
        with ctx:
            if everywhere or is_main:
                return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}
        return {}


def _frozen_ds_config(ds_config: dict) -> dict:
    """The student's DeepSpeed config for an optimizer-less frozen module: the same ZeRO stage and partitioning
    settings and batch keys; no optimizer, scheduler or mixed-precision cast (the module keeps its dtype)."""
    keep = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
            "zero_optimization", "steps_per_print", "wall_clock_breakdown")
    out = {k: copy.deepcopy(v) for k, v in ds_config.items() if k in keep}
    out["bf16"], out["fp16"] = {"enabled": False}, {"enabled": False}
    return out


def _zero3_hooks(offload: Any) -> Any:
    """Remove ZeRO-3's root-module step marker (see :func:`wrap`); return the parameter coordinator."""
    offload.fwd_pre_hook.remove()
    return offload.get_param_coordinator()


def wrap(module: torch.nn.Module, optimizer: torch.optim.Optimizer, ds_config: dict, *,
         lr_scheduler: Optional[Callable[..., Any]] = None, frozen: Optional[torch.nn.Module] = None,
         compile: bool = False) -> Wrapped:
    """``deepspeed.initialize`` of ``module``/``optimizer`` with ``ds_config`` (from :func:`deepspeed_config`),
    plus the stop-gradient view and, under ZeRO-3, our own step boundary for the prefetcher. ``frozen``: a
    module without trainable parameters to run beside it (see the module docstring).

    ZeRO-3 prefetches parameters by replaying the module order it recorded over one fwd+bwd; it marks a new
    fwd+bwd on every forward of the root module. Our micro-step runs the root module 0 (sCT: JVP + online pass
    through ``.F``) or 2 (iCT: online + target) times, so that marker never matches a step and the trace stays
    invalid (no prefetch). :meth:`Wrapped.before_micro_step` marks the boundary instead.

    ``compile``: torch.compile each backbone block in place first (``train.compile``; see
    :func:`lct_fast.models.layers.compile_blocks`). The engine then wraps compiled blocks; under ZeRO-3 each
    block is made a DeepSpeed leaf module first, so one gather/release hook sits at the block and none
    inside it (DeepSpeed keeps its hooks out of compilation: each would be a graph break)."""
    import deepspeed

    compiled = 0
    if compile:
        from .models.layers import backbone_blocks, compile_blocks

        if int(ds_config.get("zero_optimization", {}).get("stage", 0)) == 3:
            # ZeRO-3 leaves: DeepSpeed gathers a block's parameters at the block's own hooks and puts none on
            # its submodules, so the compiled block is not cut at every Linear by a hook
            from deepspeed.utils import set_z3_leaf_modules

            set_z3_leaf_modules(module, sorted({type(b) for b in backbone_blocks(module)}, key=lambda t: t.__name__))
        compiled = compile_blocks(module)

    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=lr_scheduler,
                                           config=ds_config)
    stage = engine.zero_optimization_stage()
    coordinators = []
    if stage == 3:
        coordinators.append(_zero3_hooks(engine.optimizer.parameter_offload))
    frozen_view, frozen_engine = None, None
    if frozen is not None:
        if any(p.requires_grad for p in frozen.parameters()):
            raise ValueError("parallel.wrap: the frozen module has parameters with requires_grad=True")
        if stage == 3:
            # No optimizer: DeepSpeed gives the module ZeRO-3's parameter offload alone (partitioned parameters
            # and the gather/release hooks), the same machinery as the student's.
            frozen_engine, _, _, _ = deepspeed.initialize(model=frozen, config=_frozen_ds_config(ds_config))
            coordinators.append(_zero3_hooks(frozen_engine.optimizer))
            frozen = frozen_engine.module
        frozen_view = TargetNet(frozen, zero3=stage == 3)
    return Wrapped(engine=engine, target_net=TargetNet(engine.module, zero3=stage == 3), zero_stage=stage,
                   optimizer=optimizer, frozen=frozen_view, compiled_blocks=compiled, _coordinators=tuple(coordinators), _frozen_engine=frozen_engine)
