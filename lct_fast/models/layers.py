"""Building blocks shared by the DiT and UNet backbones.

Everything here is free of in-place ops so that it is safe under ``torch.func.jvp`` and
``torch.autograd.forward_ad`` (sCT's tangent pass, SPEC §3).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lct_fast import ops
from lct_fast.profiler.phases import phase

# ---------------------------------------------------------------------------------------------
# Linear maps
# ---------------------------------------------------------------------------------------------


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, init and state dict) whose JVP runs two GEMMs, not three: forward-mode
    AD goes through :func:`lct_fast.ops.linear`, which skips the zero weight tangent."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.linear(x, self.weight, self.bias)


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` (numeric padding, zeros mode) whose JVP skips the zero weight tangent (:func:`lct_fast.ops.conv2d`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding_mode != "zeros":
            return super().forward(x)
        return ops.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


# ---------------------------------------------------------------------------------------------
# Normalisation
# ---------------------------------------------------------------------------------------------


class NsLN(nn.Module):
    """Non-scaling LayerNorm over the last dim (paper eq. 12): (x − μ)/√(var + ε) + β.

    The LayerNorm scale is fixed to 1 and is not a parameter at all (the paper sets it to 1 and
    disables its gradient); only the bias β is learned. ``weight=True`` adds the learned scale γ, i.e. an
    affine LayerNorm (Table 2d's LN arm); ``bias=False`` without ``weight`` is a plain non-affine LayerNorm
    (the standard DiT choice) through the same op.

    Under adaLN the affine part comes *before* the modulation, (x̂·γ + β)·(1 + scale) + shift, as in a UNet
    block whose norm has its own affine before the scale-shift. Added after it, β would only repeat the shift
    (a linear map of the condition with its own bias), and the NsLN/LN arms would not differ.
    """

    def __init__(self, dim: int, eps: float = 1e-6, *, bias: bool = True, weight: bool = False,
                 backend: str = "auto") -> None:
        super().__init__()
        self.dim, self.eps, self.backend = dim, eps, backend
        self.weight = nn.Parameter(torch.ones(dim)) if weight else None
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x: torch.Tensor, shift: Optional[torch.Tensor] = None,
                scale: Optional[torch.Tensor] = None) -> torch.Tensor:
        """NsLN(x), or the adaLN form (x̂·γ + β)·(1 + scale) + shift when shift/scale [B, N] are given.

        The affine folds into the per-sample modulation, x̂·γ(1 + scale) + (shift + β(1 + scale)): [B, N] work,
        and the fused kernel is unchanged. Every parameter use goes through a module's ``forward``: ZeRO-3
        gathers a module's partitioned parameters in its forward hooks, so reading ``self.bias`` from a
        parent's forward would see an empty partition."""
        if shift is None and scale is None:
            if self.weight is None:
                return ops.nsln(x, self.bias, eps=self.eps, backend=self.backend)
            y = ops.nsln(x, None, eps=self.eps, backend=self.backend) * self.weight.to(x.dtype)
            return y if self.bias is None else y + self.bias.to(x.dtype)
        shift = torch.zeros_like(scale) if shift is None else shift
        scale = torch.zeros_like(shift) if scale is None else scale
        if self.weight is None and self.bias is None:
            return ops.nsln_modulate(x, shift, scale, None, eps=self.eps, backend=self.backend)
        acc = torch.promote_types(scale.dtype, torch.float32)  # fold in fp32 (or fp64) whatever the autocast
        gain = 1.0 + scale.to(acc)
        new_scale = scale if self.weight is None else (self.weight.to(acc) * gain - 1.0).to(scale.dtype)
        new_shift = shift if self.bias is None else (shift.to(acc) + self.bias.to(acc) * gain).to(shift.dtype)
        return ops.nsln_modulate(x, new_shift, new_scale, None, eps=self.eps, backend=self.backend)

    def modulate(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """adaLN: (x̂·γ + β)·(1 + scale) + shift, shift/scale [B, N]."""
        return self(x, shift, scale)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}, weight={self.weight is not None}, bias={self.bias is not None}"


class NsLN2d(nn.Module):
    """NsLN for [B, C, H, W] maps: each sample's whole C×H×W feature is normalised (as in the
    authors' UNet code, a LayerNorm over all of C, H, W) and a learned per-channel bias β[C] is added.

    It runs through ``lct_fast.ops.nsln`` on the flattened feature (bias broadcast to C·H·W entries),
    so a fused NsLN kernel registered for the DiT also serves the UNet.
    """

    def __init__(self, channels: int, eps: float = 1e-6, *, backend: str = "auto") -> None:
        super().__init__()
        self.channels, self.eps, self.backend = channels, eps, backend
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        bias = self.bias[:, None].expand(c, h * w).reshape(c * h * w)
        return ops.nsln(x.reshape(b, c * h * w), bias, eps=self.eps, backend=self.backend).reshape(b, c, h, w)


class RMSNorm2d(nn.Module):
    """RMSNorm over each sample's C×H×W with a per-channel scale (Table 2d ablation); fp32 stats."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xs = x.to(torch.promote_types(x.dtype, torch.float32))
        y = xs * torch.rsqrt(xs.square().mean(dim=(1, 2, 3), keepdim=True) + self.eps)
        return (y * self.weight.to(y.dtype)[:, None, None]).to(x.dtype)


NORMS_2D = ("groupnorm", "instancenorm", "layernorm", "rmsnorm", "nsln")


def make_norm2d(kind: str, channels: int, *, eps: float = 1e-6, backend: str = "auto") -> nn.Module:
    """Feature-map normalisation for the UNet (paper Table 2d).

    groupnorm: 32 groups (ADM; fewer for tiny widths, ≥4 channels per group), per-channel affine.
    instancenorm: per-channel statistics over H×W, per-channel affine (GroupNorm with C groups; no
    running stats). layernorm: statistics over C×H×W, per-channel affine (GroupNorm with 1 group, as
    the authors' code). rmsnorm: RMS over C×H×W, per-channel scale. nsln: statistics over C×H×W,
    scale fixed to 1, per-channel bias (eq. 12).
    """
    if kind == "groupnorm":
        groups = min(32, max(1, channels // 4))
        if channels % groups:
            raise ValueError(f"groupnorm: {channels} channels are not divisible into {groups} groups")
        return nn.GroupNorm(groups, channels, eps=eps)
    if kind == "instancenorm":
        return nn.GroupNorm(channels, channels, eps=eps)
    if kind == "layernorm":
        return nn.GroupNorm(1, channels, eps=eps)
    if kind == "rmsnorm":
        return RMSNorm2d(channels, eps=eps)
    if kind == "nsln":
        return NsLN2d(channels, eps=eps, backend=backend)
    raise ValueError(f"model.norm={kind!r} is not one of {list(NORMS_2D)}")


def pixel_norm(v: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """v / √(mean(v²) + ε) over the last dim (Karras et al. 2018's pixel norm), computed in ≥fp32."""
    vf = v.to(torch.promote_types(v.dtype, torch.float32))
    return (vf * torch.rsqrt(vf.square().mean(dim=-1, keepdim=True) + eps)).to(v.dtype)


def double_norm_modulation(shift: torch.Tensor, scale: torch.Tensor, enabled: bool
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(shift, scale) of a conditioned norm y = norm(x)·(1 + scale) + shift, with sCM's adaptive double
    normalization (§4.1) applied when ``enabled``: y = norm(x)·pnorm(1 + scale) + pnorm(shift), i.e. the
    returned scale is pnorm(1 + scale) − 1. Both terms then have unit RMS over the features whatever the
    embedding does, which bounds how strongly (and how fast in t) the conditioning can move the features,
    while the fused NsLN kernels keep their (1 + scale, shift) form. At adaLN-zero's init (scale = 0) the
    scale term is exactly 1; the shift projection must not start at 0, where pnorm has no direction (the
    DiT initialises those rows randomly: the zero-initialised gate or output layer after them keeps the
    block the identity at init)."""
    if not enabled:
        return shift, scale
    return pixel_norm(shift), pixel_norm(1.0 + scale) - 1.0


# ---------------------------------------------------------------------------------------------
# Time embedding and adaptive-weight head
# ---------------------------------------------------------------------------------------------


def sinusoidal_embedding(c_noise: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Positional embedding [cos(c·ω_k), sin(c·ω_k)], ω_k = max_period^(−k/half), in ≥fp32.

    Plain positional frequencies (ω ≤ 1), no large-scale random Fourier features: those destabilise
    the JVP of sCT (SPEC §3). Autocast is disabled so the embedding is never computed in bf16.
    """
    if dim % 2:
        raise ValueError(f"sinusoidal embedding dim must be even, got {dim}")
    dt = torch.promote_types(c_noise.dtype, torch.float32)
    with torch.autocast(device_type=c_noise.device.type, enabled=False):
        c = c_noise.to(dt).reshape(-1, 1)
        half = dim // 2
        k = torch.arange(half, device=c_noise.device, dtype=dt)
        freqs = torch.exp(-math.log(max_period) * k / half)
        args = c * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class LogVarHead(nn.Module):
    """Adaptive loss weight w_φ(t) (sCM): a linear map of the positional embedding of c_noise to a
    scalar, kept in fp32 and zero-initialised (w_φ ≡ 0 at the start, i.e. unit weight)."""

    def __init__(self, freq_dim: int = 256) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        # Own parameters (not a child nn.Linear whose forward is bypassed): ZeRO-3 gathers them in this
        # module's forward hook.
        self.weight = nn.Parameter(torch.zeros(1, freq_dim))
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        emb = sinusoidal_embedding(c_noise, self.freq_dim)
        with torch.autocast(device_type=emb.device.type, enabled=False):
            return F.linear(emb, self.weight.to(emb.dtype), self.bias.to(emb.dtype)).reshape(-1)


class ScalarEmbed(nn.Module):
    """Embedding of one extra scalar condition s of a method (a guidance scale of a guidance-conditioned
    student, sCM §4; a second time): an MLP on the positional embedding of s − ``neutral``, added to the
    conditioning vector.

    The output layer starts at zero, so a network initialised from one without the input (an sCD student from
    its teacher) is exactly that network at every s; the gradient still reaches the output layer (its input is
    non-zero). ``value`` None means s = ``neutral``."""

    def __init__(self, freq_dim: int, width: int, neutral: float = 0.0, name: str = "condition") -> None:
        super().__init__()
        self.freq_dim, self.neutral, self.name = freq_dim, float(neutral), name
        self.mlp = nn.Sequential(Linear(freq_dim, width), nn.SiLU(), Linear(width, width))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.mlp[0].weight, std=0.02)
        nn.init.zeros_(self.mlp[0].bias)
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)

    def forward(self, value: Optional[torch.Tensor], batch: int, device: torch.device,
                dtype: torch.dtype) -> torch.Tensor:
        s = torch.full((batch,), self.neutral, device=device) if value is None else broadcast_batch(
            torch.as_tensor(value, device=device), batch, self.name)
        return self.mlp(sinusoidal_embedding(s - self.neutral, self.freq_dim).to(dtype))


def add_condition_embeds(module: nn.Module, conditions: Any, freq_dim: int, width: int) -> Tuple[str, ...]:
    """Give a backbone one :class:`ScalarEmbed` per extra condition (``{name: neutral value}``, declared by the
    method), as the attribute ``<name>_embed``; returns the names. A backbone then takes them as keyword
    arguments of ``forward`` (:func:`embed_conditions`)."""
    names = tuple(conditions or ())
    for name in names:
        attr = f"{name}_embed"
        if not name.isidentifier() or hasattr(module, attr):
            raise ValueError(f"{type(module).__name__}: condition name {name!r} is not usable ({attr} is taken or "
                             f"not an identifier)")
        setattr(module, attr, ScalarEmbed(freq_dim, width, conditions[name], name))
    # Checkpoints written before the conditions were generic call the guidance embedding g_embed.
    module._register_load_state_dict_pre_hook(_legacy_keys)
    return names


def _legacy_keys(state_dict, prefix, *args) -> None:
    from ..legacy_keys import upgrade_key

    for key in [k for k in state_dict if k.startswith(prefix) and upgrade_key(k) != k]:
        state_dict[upgrade_key(key)] = state_dict.pop(key)


def embed_conditions(module: nn.Module, c: torch.Tensor, values: Dict[str, Any], batch: int) -> torch.Tensor:
    """``c`` plus the embedding of every condition of ``module`` (a missing one at its neutral value); a value
    for a condition the backbone was not built with is an error."""
    for name in module.condition_names:
        c = c + getattr(module, f"{name}_embed")(values.get(name), batch, c.device, c.dtype)
    extra = sorted(set(values) - set(module.condition_names))
    if extra:
        raise ValueError(f"{type(module).__name__}: got the condition(s) {extra} but the model embeds "
                         f"{list(module.condition_names) or 'none'} (a guidance scale needs model.guidance_embed=true "
                         "and a guidance-conditioned method)")
    return c


# ---------------------------------------------------------------------------------------------
# Dropout with explicit seeds
# ---------------------------------------------------------------------------------------------


def _site_seed(seed: int, site: int) -> int:
    # A fixed mix of (forward seed, dropout site): every site gets its own reproducible stream.
    return (int(seed) * 1_000_003 + (site + 1) * 0x9E3779B1) % (2**63 - 1)


class SeededDropout(nn.Module):
    """Dropout whose mask comes from an explicit generator seeded by (dropout_seed, site).

    With the same ``dropout_seed`` the online and target passes see identical masks (iCT: both
    passes share the mask; sCT: the JVP pass and the gradient pass). Seeding per site instead of
    drawing one generator in order keeps masks identical when activation checkpointing recomputes
    a block. ``seed=None`` uses the default generator (``F.dropout``).
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1), got {p}")
        self.p = float(p)
        self.site = 0  # set by assign_dropout_sites once the network is built

    def forward(self, x: torch.Tensor, seed: Optional[int] = None) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if seed is None:
            return F.dropout(x, self.p, training=True)
        return x * _keep_scale(self, x, seed)

    def extra_repr(self) -> str:
        return f"p={self.p}, site={self.site}"


@torch.compiler.disable
def _keep_scale(drop: "SeededDropout", x: torch.Tensor, seed: int) -> torch.Tensor:
    """``drop``'s kept-and-rescaled mask 1[u >= p] / (1 - p) from the generator of (seed, site), in x's
    dtype. Eager even inside a compiled block (train.compile): dynamo cannot trace a seeded generator, so
    this is a graph break; the site is read in here, so blocks do not recompile per dropout site."""
    gen = torch.Generator(device=x.device)
    gen.manual_seed(_site_seed(int(seed), drop.site))
    keep = torch.rand(x.shape, generator=gen, device=x.device) >= drop.p
    return keep.to(x.dtype) / (1.0 - drop.p)


def assign_dropout_sites(module: nn.Module) -> None:
    """Number the SeededDropout modules in a fixed (registration) order."""
    for i, m in enumerate(x for x in module.modules() if isinstance(x, SeededDropout)):
        m.site = i


# ---------------------------------------------------------------------------------------------
# Activation checkpointing
# ---------------------------------------------------------------------------------------------


def maybe_checkpoint(enabled: bool, fn: Callable[..., torch.Tensor], *args: Any) -> torch.Tensor:
    """Run the block ``fn(*args)``, checkpointed when enabled, gradients are being recorded and no
    forward-mode AD is active (checkpointing is useless in the no-grad JVP pass, and the
    recompute would not carry tangents). Under forward-mode AD a compiled block (:func:`compile_blocks`)
    runs eagerly, hooks included: inductor has no forward-mode AD."""
    compiled = isinstance(fn, nn.Module) and getattr(fn, "_compiled_call_impl", None) is not None
    if ops.forward_ad_active(*[a for a in args if isinstance(a, torch.Tensor)]):
        return fn._call_impl(*args) if compiled else fn(*args)
    if compiled:
        # The dropout seed changes every step: as a Python int dynamo would specialise on it and recompile
        # once it turns dynamic -- a different graph from the second step on, so a resumed run (whose first
        # step compiles afresh) would not repeat the uninterrupted one bit for bit. A 0-dim CPU tensor is a
        # graph input from the first call; only the (eager) mask generator reads its value.
        args = tuple(torch.tensor(a) if type(a) is int else a for a in args)
    if enabled and torch.is_grad_enabled():
        return checkpoint(_marked_recompute(fn), *args, use_reentrant=False)
    return fn(*args)


def backbone_blocks(module: nn.Module) -> list:
    """The blocks a backbone inside ``module`` runs through :func:`maybe_checkpoint`: the modules in the
    lists its class's ``BLOCK_LISTS`` names."""
    return [blk for m in module.modules() for name in getattr(type(m), "BLOCK_LISTS", ()) for blk in getattr(m, name)]


def compile_blocks(module: nn.Module, **compile_kw: Any) -> int:
    """``torch.compile`` in place every :func:`backbone_blocks` block; the module keeps its identity,
    parameters and hooks. Returns how many blocks were compiled."""
    blocks = backbone_blocks(module)
    # Every compiled block shares one code object (nn.Module._call_impl) and dynamo caches its graphs per
    # code object: each block is an entry, and one recompile each when the dropout seed turns dynamic. Past
    # the default limit (8) dynamo would run the remaining blocks eagerly, silently.
    import torch._dynamo.config as dynamo_config

    need = 2 * len(blocks) + 8
    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, need)
    dynamo_config.accumulated_recompile_limit = max(dynamo_config.accumulated_recompile_limit, 4 * need)
    for blk in blocks:
        blk.compile(**compile_kw)
    return len(blocks)


def _marked_recompute(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``fn`` with its second run -- the recompute, inside the backward pass -- marked as the ``recompute``
    phase, so a profile charges it apart and keeps its FLOPs out of the model FLOPs."""
    def run(*args: Any) -> torch.Tensor:
        if torch._C._current_graph_task_id() != -1:
            with phase("recompute"):
                return fn(*args)
        return fn(*args)
    return run


def label_or_null(labels: Optional[torch.Tensor], batch: int, num_classes: int,
                  device: torch.device) -> torch.Tensor:
    """Labels [B] as int64; ``None`` means the null class (id ``num_classes``) for every sample."""
    if labels is None:
        return torch.full((batch,), num_classes, dtype=torch.long, device=device)
    if labels.shape != (batch,):
        raise ValueError(f"labels must have shape [{batch}], got {tuple(labels.shape)}")
    return labels.to(device=device, dtype=torch.long)


def broadcast_batch(c: torch.Tensor, batch: int, name: str) -> torch.Tensor:
    """Accept a scalar or [B] tensor and return [B]."""
    if c.dim() == 0:
        return c.expand(batch)
    if c.shape != (batch,):
        raise ValueError(f"{name} must be a scalar or have shape [{batch}], got {tuple(c.shape)}")
    return c
