"""Mean flows (``meanflow``; Geng, Deng, Bai, Kolter, He, arXiv 2505.13447): one-step generation by learning
the *average* velocity of the flow, on the JVP engine of sCT.

Flow (paper §3): z_t = (1 − t)·x + t·ε, ε ~ N(0, I), t ∈ [0, 1] (t = 1 is noise), conditional velocity
v = ε − x. The average velocity over [r, t] is u(z_t, r, t) = (1/(t − r))·∫_r^t v(z_τ, τ) dτ (eq. 3);
differentiating (t − r)·u = ∫_r^t v dτ in t gives the MeanFlow identity (eq. 6)

    u(z_t, r, t) = v(z_t, t) − (t − r)·(d/dt)u(z_t, r, t),   (d/dt)u = v·∂_z u + ∂_t u   (eq. 8),

the JVP of u along the tangent (v, 0, 1) over its inputs (z, r, t). The loss (eqs. 9-11) regresses the network
on the identity's right-hand side with the conditional velocity in it, the whole target under stop-gradient:

    u_tgt = ṽ − (t − r)·JVP,   Δ = u_θ(z_t, r, t) − sg(u_tgt),   L = sg(w)·‖Δ‖²,   w = 1/(‖Δ‖² + c)^p

(adaptive weighting §4.3, eq. 22; ‖Δ‖² summed over the latent, as the official code does). At r = t the target
is ṽ: flow matching.

Constants and their sources (the paper unless said otherwise):

* (r, t): two draws of lognorm(P_mean, P_std) = sigmoid(N(P_mean, P_std²)), t the larger, r the smaller, then
  r = t for all but a fraction ``ratio`` of the samples (§4.3); P_mean = −0.4, P_std = 1.0 and ratio = 25 %
  (Table 4, every ImageNet model; ablations Table 1a: 0 % 328.9, 25 % 61.1, 50 % 63.1, 100 % 67.3 FID;
  Table 1d for the sampler). The ratio is a per-sample Bernoulli draw as in the official PyTorch code (the JAX
  code sets r = t on a fixed 75 % of the batch).
* p = 1 (Table 4; Table 1e: p = 0 79.8, 0.5 64.0, 1.0 61.1, 1.5 66.6, 2.0 69.2); c = 10⁻³ (§4.3 "e.g. 10⁻³",
  and the official PyTorch code; the official JAX ImageNet code uses 0.01).
* Network conditioning on (t, t − r) (Table 1c: (t, r) 61.8, (t, t − r) 61.1, (t, r, t − r) 64.0, t − r alone
  63.1; Table 4): the backbone's time input is t itself (c_noise = t, no ×1000, as the official JAX DiT) and
  h = t − r is a second scalar condition with its own sinusoidal embedding and 2-layer MLP, summed into the
  conditioning vector (App. A). The JVP is still taken along (z, r, t): with h = t − r its tangents are
  (v, ∂t = 1, ∂h = 1).
* Classifier-free guidance in training (§4.2, eq. 13-19; App. B.1 eq. 20-21): ṽ = ω·v + κ·u_θ(z_t, t, t | c)
  + (1 − ω − κ)·u_θ(z_t, t, t | ∅) for labelled samples with t in [t_min, t_max] (elsewhere, and for the
  dropped labels, ṽ = v); the effective scale is ω' = ω/(1 − κ). ṽ is the JVP tangent as well (official
  code). The two guidance passes run without gradient in eval mode. Class dropout 10 % (Table 4). Table 4:
  B/2 and M/2 ω = 1, κ = 0.5, [0, 1] (ω' = 2); L/2 ω = 0.2, κ = 0.92, [0, 0.8]; XL/2 ω = 0.2, κ = 0.92,
  [0, 0.75] (ω' = 2.5). A model trained with guidance samples at 1 NFE per step, without sampling-time CFG.
* Sampling (eq. 12): z_r = z_t − (t − r)·u(z_t, r, t); one step x = ε − u(ε, 0, 1) (Alg. 2). The paper does
  not state its 2-step intermediate time; ``t_mid`` = 0.5 is the uniform 1 → 0.5 → 0 of the follow-up's code
  (Improved MeanFlow, 2512.02012) and is chosen on the validation split like sCT's.

Improved MeanFlow (Geng, Lu, Wu, Shechtman, Kolter, He, arXiv 2512.02012: ImageNet 256 1-NFE FID 1.72, 2-NFE
1.54 with XL/2) changes the objective (a v-loss with the network's own velocity as tangent), makes the guidance
scale and interval network inputs, and swaps adaLN for in-context tokens; none of that is built here.

The data: lct_fast normalises latents to a per-channel std σ_d (``method.sigma_data``); the MeanFlow presets
set σ_d = 1, the unit scale of the paper's SD-VAE latents.
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
import torch.autograd.forward_ad as fwAD
from torch import nn

from ..models.precond import _as_batch
from ..profiler.phases import phase
from ..registry import Condition, MethodSpec, register
from ..validate import ConfigError, choice, positive
from .base import Draw, MethodLoss
from .common import Coupler, config_coupler, draw_seed, null_class, prepare_batch, randn_like_gen, unwrap
from .sampling import Sampler, check_steps, conditioned, eval_no_grad
from .sct import _jvp_precision

__all__ = ["MeanFlowConfig", "MeanFlowPrecond", "MeanFlowLoss", "meanflow_jvp", "meanflow_times",
           "meanflow_sample", "meanflow_sampler", "SPEC"]


@dataclass
class MeanFlowConfig:
    """MeanFlow (method meanflow, arXiv 2505.13447); every default is the paper's ImageNet setting (Table 4)."""

    p_mean: float = -0.4
    """(r, t) sampler: lognorm(p_mean, p_std), i.e. sigmoid of N(p_mean, p_std^2) (Table 4; Table 1d)."""
    p_std: float = 1.0
    """(r, t) sampler standard deviation (Table 4)."""
    ratio: float = 0.25
    """Fraction of samples with r != t; the rest train r = t, plain flow matching (Table 4; Table 1a)."""
    norm_p: float = 1.0
    """Adaptive weight power p of w = 1 / (||Delta||^2 + c)^p (Table 4; Table 1e); 0 = plain squared L2."""
    norm_eps: float = 1e-3
    """Adaptive weight constant c (section 4.3: "e.g. 1e-3"; the official JAX ImageNet code uses 0.01)."""
    guidance: float = 1.0
    """omega of the guided training velocity (eq. 13 / eq. 21); 1 with guidance_mix 0 = no guidance."""
    guidance_mix: float = 0.0
    """kappa of eq. 21 (App. B.1): weight of the network's own class-conditional u(z_t, t, t | c); the effective
    scale is omega / (1 - kappa)."""
    guidance_t_min: float = 0.0
    """Guidance applies to samples with t in [guidance_t_min, guidance_t_max] (Table 4, "CFG triggered if t is
    in"); elsewhere the target velocity is unguided."""
    guidance_t_max: float = 1.0
    """Upper end of the guidance interval."""
    t_mid: float = 0.5
    """Intermediate time of 2-step sampling (1 -> t_mid -> 0); read by the sampler only."""
    jvp_dtype: str = "fp32"
    """Precision of the forward-mode JVP pass: fp32 | bf16 | fp16."""

    def __post_init__(self) -> None:
        positive("method.meanflow.p_std", self.p_std)
        if not 0.0 <= self.ratio <= 1.0:
            raise ConfigError(f"method.meanflow.ratio: expected a fraction in [0, 1], got {self.ratio}")
        positive("method.meanflow.norm_p", self.norm_p, allow_zero=True)
        positive("method.meanflow.norm_eps", self.norm_eps)
        positive("method.meanflow.guidance", self.guidance)
        if not 0.0 <= self.guidance_mix < 1.0:
            raise ConfigError(f"method.meanflow.guidance_mix: expected kappa in [0, 1), got {self.guidance_mix}")
        if not 0.0 <= self.guidance_t_min <= self.guidance_t_max <= 1.0:
            raise ConfigError(f"method.meanflow.guidance_t_min/guidance_t_max: expected 0 <= t_min <= t_max <= 1, "
                              f"got [{self.guidance_t_min}, {self.guidance_t_max}]")
        if not 0.0 < self.t_mid < 1.0:
            raise ConfigError(f"method.meanflow.t_mid: expected in (0, 1), got {self.t_mid}")
        choice("method.meanflow.jvp_dtype", self.jvp_dtype, ["fp32", "bf16", "fp16"])

    @property
    def guided(self) -> bool:
        """Trained with guidance in its target (then sampled without sampling-time CFG)."""
        return self.guidance != 1.0 or self.guidance_mix != 0.0


# ------------------------------------------------------------------------------------------ network
class MeanFlowPrecond(nn.Module):
    """The average-velocity network u_θ(z, r, t) = backbone(z, t, labels, h = t − r): no preconditioning
    (the paper's networks take z_t as it is). ``forward(z_t, t)`` is the clean estimate z_t − t·u(z_t, t, t),
    the posterior mean E[x | z_t] for an exact u (at r = t, u is the instantaneous velocity E[ε − x | z_t])."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def F(self, z: torch.Tensor, t, labels: Optional[torch.Tensor] = None, *, dropout_seed: Optional[int] = None,
          **conditions) -> torch.Tensor:
        """u_θ at (z, t) and the conditions (``h`` = t − r; none = 0, r = t), in (≥)fp32; dual tensors pass."""
        dt = torch.promote_types(z.dtype, torch.float32)
        t = _as_batch(t, z, "t")
        kw = {k: _as_batch(v, z, k) for k, v in conditions.items() if v is not None}
        return self.backbone(z.to(dt), t, labels, dropout_seed=dropout_seed, **kw).to(dt)

    def forward(self, z: torch.Tensor, t, labels: Optional[torch.Tensor] = None, *,
                dropout_seed: Optional[int] = None, **conditions) -> torch.Tensor:
        dt = torch.promote_types(z.dtype, torch.float32)
        z = z.to(dt)
        tb = _as_batch(t, z, "t")
        u = self.F(z, tb, labels, dropout_seed=dropout_seed, **conditions)
        return z - tb.reshape(-1, *([1] * (z.dim() - 1))) * u


def meanflow_at_sigma(sigma: float, sigma_data: float) -> Tuple[float, float]:
    """z_t = (1 − t)·x + t·ε = (1 − t)·(x + σ·ε) with σ = t/(1 − t): (scale, t) = (1/(1 + σ), σ/(1 + σ))."""
    s = float(sigma)
    return 1.0 / (1.0 + s), s / (1.0 + s)


# ------------------------------------------------------------------------------------------ training
def meanflow_jvp(net: nn.Module, z_t: torch.Tensor, r: torch.Tensor, t: torch.Tensor, v: torch.Tensor,
                 labels: Optional[torch.Tensor], *, dropout_seed: Optional[int] = None, jvp_dtype: str = "fp32",
                 time_tangent: float = 1.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """(u⁻, du⁻/dt): the stop-gradient network and its total derivative along the flow, one forward-mode JVP
    with tangent (v, 0, 1) over (z, r, t) — (v, 1, 1) over the network's (z, t, h = t − r). Dual tensors (not
    ``torch.func``) so that it runs inside DeepSpeed ZeRO-3, through the package's forward-AD kernels.
    ``time_tangent`` replaces the 1 of t (and h): 0 with v gives v·∂_z u alone, 1 with v = 0 gives ∂_t u alone
    (the diagnostics' split)."""
    net = unwrap(net)
    with torch.no_grad(), _jvp_precision(net, z_t.device, jvp_dtype), fwAD.dual_level():
        tan = torch.full_like(t, time_tangent)
        out = net.F(fwAD.make_dual(z_t, v), fwAD.make_dual(t, tan), labels, dropout_seed=dropout_seed,
                    h=fwAD.make_dual(t - r, tan))
        u, dudt = fwAD.unpack_dual(out)
        if dudt is None:  # a network that ignores its inputs
            dudt = torch.zeros_like(u)
    return u.to(z_t.dtype), dudt.to(z_t.dtype)


class MeanFlowLoss(MethodLoss):
    """The MeanFlow loss (module docstring). Explicit arguments; :meth:`from_config` reads ``method.meanflow``."""

    def __init__(self, *, data_dim: int, sigma_data: float, label_dropout: float, p_mean: float, p_std: float,
                 ratio: float, norm_p: float, norm_eps: float, guidance: float = 1.0, guidance_mix: float = 0.0,
                 guidance_interval: Tuple[float, float] = (0.0, 1.0), jvp_dtype: str = "fp32",
                 coupler: Optional[Coupler] = None) -> None:
        super().__init__(data_dim=data_dim, sigma_data=sigma_data, label_dropout=label_dropout, noise_std=1.0,
                         coupler=coupler)
        self.p_mean, self.p_std, self.ratio = float(p_mean), float(p_std), float(ratio)
        self.norm_p, self.norm_eps = float(norm_p), float(norm_eps)
        self.guidance, self.guidance_mix = float(guidance), float(guidance_mix)
        self.guidance_interval = (float(guidance_interval[0]), float(guidance_interval[1]))
        self.jvp_dtype = str(jvp_dtype)

    @classmethod
    def from_config(cls, cfg: Any, *, data_dim: int, coupler: Optional[Coupler] = None) -> "MeanFlowLoss":
        m = cfg.meanflow
        return cls(data_dim=data_dim, sigma_data=cfg.sigma_data, label_dropout=cfg.label_dropout, p_mean=m.p_mean,
                   p_std=m.p_std, ratio=m.ratio, norm_p=m.norm_p, norm_eps=m.norm_eps, guidance=m.guidance,
                   guidance_mix=m.guidance_mix, guidance_interval=(m.guidance_t_min, m.guidance_t_max),
                   jvp_dtype=m.jvp_dtype, coupler=coupler if coupler is not None else config_coupler(cfg.ot))

    def draw_times(self, batch: int, generator: torch.Generator, x0: torch.Tensor, step: int):
        """(r, t), each [B]: two logit-normal draws sorted, then r = t outside a fraction ``ratio`` (§4.3)."""
        dev = generator.device
        a, b = torch.sigmoid(torch.randn(2, batch, generator=generator, device=dev) * self.p_std + self.p_mean)
        keep = torch.rand(batch, generator=generator, device=dev) < self.ratio
        t = torch.maximum(a, b)
        r = torch.where(keep, torch.minimum(a, b), t)
        return r.to(x0), t.to(x0)

    @property
    def guided(self) -> bool:
        return self.guidance != 1.0 or self.guidance_mix != 0.0

    def guided_velocity(self, net: nn.Module, z_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor,
                        labels: Optional[torch.Tensor]) -> torch.Tensor:
        """ṽ = ω·v + κ·u(z_t, t, t | c) + (1 − ω − κ)·u(z_t, t, t | ∅) where guidance applies (labelled samples
        with t in the interval), else v (eq. 21). Every rank runs the same passes (collectives under ZeRO-3)."""
        if not self.guided or labels is None:
            return v
        null = null_class(net)
        lo, hi = self.guidance_interval
        on = (t >= lo) & (t <= hi) & (labels != null)
        shape = (-1,) + (1,) * (v.dim() - 1)
        omega = torch.where(on, torch.full_like(t, self.guidance), torch.ones_like(t)).view(shape)
        kappa = torch.where(on, torch.full_like(t, self.guidance_mix), torch.zeros_like(t)).view(shape)
        inner = unwrap(net)
        with eval_no_grad(inner), _jvp_precision(inner, z_t.device, self.jvp_dtype):
            u_unc = inner.F(z_t, t, torch.full_like(labels, null)).to(v.dtype)
            u_cond = inner.F(z_t, t, labels).to(v.dtype) if self.guidance_mix else torch.zeros_like(v)
        return omega * v + kappa * u_cond + (1.0 - omega - kappa) * u_unc

    def loss(self, net: nn.Module, target_net: nn.Module, d: Draw, *, step: int,
             generator: torch.Generator) -> torch.Tensor:
        r, t = d.t
        x, eps, labels, shape = d.x0, d.z, d.labels, d.bshape
        z_t = (1.0 - t).view(shape) * x + t.view(shape) * eps
        with phase("target_forward") if self.guided else contextlib.nullcontext():
            v = self.guided_velocity(target_net, z_t, t, eps - x, labels)
        with phase("jvp"):
            u_minus, dudt = meanflow_jvp(target_net, z_t, r, t, v, labels, dropout_seed=d.dropout_seed,
                                         jvp_dtype=self.jvp_dtype)
        u_tgt = v - (t - r).clamp(0.0, 1.0).view(shape) * dudt
        with phase("online_forward"):
            u = unwrap(net).F(z_t, t, labels, dropout_seed=d.dropout_seed, h=t - r).to(x.dtype)
        sq = (u - u_tgt).flatten(1).square().sum(dim=1)                    # ‖Δ‖², summed over the latent
        w = (sq.detach() + self.norm_eps).pow(-self.norm_p)               # eq. 22, under stop-gradient
        loss = w * sq
        with torch.no_grad():
            self.metrics = {
                "loss": loss.detach().mean().float(),
                "mse": (sq.detach() / self.data_dim).mean().float(),       # ‖Δ‖²/D: the unweighted residual
                "td_abs": (u.detach() - u_minus).abs().mean().float(),     # online vs JVP pass (precision, kernels)
                "jvp_abs": dudt.abs().mean().float(),
                "target_rms": u_tgt.square().mean().sqrt().float(),
                "frac_r_neq_t": (r != t).float().mean(),
                "t_mean": t.mean().float(),
                "ot_cost_ratio": d.ot_ratio.detach().float(),
            }
        return loss

    def diagnostics(self, target_net: nn.Module, x0: torch.Tensor, labels: Optional[torch.Tensor], *,
                    generator: torch.Generator, max_samples: int = 64) -> Dict[str, torch.Tensor]:
        """RMS of the two terms of du⁻/dt at fresh (r, t, ε): ∂_t u (with ∂_h u, time tangent 1) and v·∂_z u
        (``dudt_t_rms``, ``dudt_z_rms``), the MeanFlow analogue of sCT's split of dF/dt."""
        x0, shape = prepare_batch("MeanFlowLoss", x0[:max_samples], self.data_dim)
        labels = None if labels is None else labels[:max_samples]
        r, t = self.draw_times(x0.shape[0], generator, x0, 0)
        eps = randn_like_gen(x0, generator)
        seed = draw_seed(generator)  # one dropout mask for both JVPs
        z_t = (1.0 - t).view(shape) * x0 + t.view(shape) * eps
        out = {}
        for key, (vz, tt) in {"dudt_t_rms": (torch.zeros_like(x0), 1.0), "dudt_z_rms": (eps - x0, 0.0)}.items():
            _, jac = meanflow_jvp(target_net, z_t, r, t, vz, labels, dropout_seed=seed, jvp_dtype=self.jvp_dtype,
                                  time_tangent=tt)
            out[key] = jac.float().square().mean().sqrt()
        return out


# ------------------------------------------------------------------------------------------ sampling
def meanflow_times(steps: int, *, t_mid: float = 0.5) -> Tuple[float, ...]:
    """Times of ``steps``-step sampling, from 1 to 0: (1, 0); (1, t_mid, 0); k > 2: evenly spaced."""
    check_steps(steps)
    if steps == 2:
        if not 0.0 < t_mid < 1.0:
            raise ValueError(f"sample: need 0 < t_mid < 1, got t_mid={t_mid}")
        return (1.0, float(t_mid), 0.0)
    return tuple(1.0 - i / steps for i in range(steps)) + (0.0,)


def meanflow_sample(net: nn.Module, z: torch.Tensor, labels: Optional[torch.Tensor] = None, *,
                    ts: Sequence[float] = (1.0, 0.0), cfg_scale: float = 1.0, null_label: int = 0) -> torch.Tensor:
    """z_r = z_t − (t − r)·u(z_t, r, t) over consecutive times of ``ts`` (eq. 12), from standard-normal ``z`` at
    ts[0] = 1 to ts[-1] = 0. ``cfg_scale`` ≠ 1: u_∅ + s·(u_c − u_∅) per step (a model trained without
    guidance). Eval mode, no autograd; float32."""
    from ..models.precond import classifier_free_guidance

    ts = tuple(float(v) for v in ts)
    if len(ts) < 2 or ts[0] != 1.0 or ts[-1] != 0.0 or any(a <= b for a, b in zip(ts, ts[1:])):
        raise ValueError(f"sample: MeanFlow times must fall strictly from 1 to 0, got {ts}")
    x = z.float()
    with eval_no_grad(net):
        for t, r in zip(ts, ts[1:]):
            def u(xx, tt, ll, h=t - r):
                return net.F(xx, tt, ll, h=h)
            x = x - (t - r) * classifier_free_guidance(u, x, t, labels, cfg_scale, null_label).float()
    return x


_WARNED_RATIO0: list = []


def meanflow_sampler(method_cfg: Any, steps: int, *, schedule: Optional[Sequence[float]] = None,
                     cfg_scale: float = 1.0, null_label: int = 0, conditions: Optional[dict] = None) -> Sampler:
    """``steps``-step MeanFlow sampling (t_mid from the config; explicit ``schedule`` = the times, 1 … 0).
    Sampling-time CFG on a model trained with guidance in its target is an error (it was never trained for it);
    a model trained at ratio 0 (plain flow matching, the paper's Table 1a ablation) never saw a jump r < t and
    samples with a warning."""
    mf = method_cfg.meanflow
    if cfg_scale != 1.0 and mf.guided:
        raise ValueError(
            f"sample: cfg_scale={cfg_scale}: this MeanFlow model was trained with guidance in its target "
            f"(method.meanflow.guidance={mf.guidance}, guidance_mix={mf.guidance_mix}, effective scale "
            f"{mf.guidance / (1 - mf.guidance_mix):g}); it samples guided at 1 NFE per step with cfg_scale 1")
    if mf.ratio == 0.0 and not _WARNED_RATIO0:
        _WARNED_RATIO0.append(True)
        warnings.warn("sample: method.meanflow.ratio=0 trained only r = t (flow matching): the network never saw "
                      "a jump t - r > 0, which every MeanFlow step takes (the paper's Table 1a: 1-NFE FID 328.9)",
                      RuntimeWarning, stacklevel=2)
    ts = tuple(schedule) if schedule is not None else meanflow_times(steps, t_mid=mf.t_mid)
    fixed = {k: v for k, v in (conditions or {}).items() if k != "h"}  # h is each step's own

    def run(net: nn.Module, noise: torch.Tensor, labels: Optional[torch.Tensor]) -> torch.Tensor:
        return meanflow_sample(conditioned(net, fixed), noise[0], labels, ts=ts, cfg_scale=cfg_scale,
                               null_label=null_label)

    return Sampler(schedule=ts, draws=1, run=run)


# ------------------------------------------------------------------------------------------ registration
def _loss(method_cfg: Any, *, data_dim: int, total_steps: int, coupler: Optional[Coupler] = None,
          teacher: Any = None) -> MeanFlowLoss:
    return MeanFlowLoss.from_config(method_cfg, data_dim=data_dim, coupler=coupler)


def _check(cfg: Any) -> None:
    mf = cfg.method.meanflow
    if cfg.model.adaptive_weight:
        raise ConfigError("model.adaptive_weight: MeanFlow weights its loss in closed form "
                          "(method.meanflow.norm_p); set model.adaptive_weight=false")
    if mf.guided and (cfg.model.num_classes == 0 or cfg.method.label_dropout <= 0):
        raise ConfigError(f"method.meanflow.guidance={mf.guidance}, guidance_mix={mf.guidance_mix}: guidance "
                          f"needs a class-conditional model (model.num_classes > 0) trained with label dropout "
                          f"(method.label_dropout > 0), got {cfg.model.num_classes} and {cfg.method.label_dropout}")


def _floors(cfg: Any) -> Dict[str, float]:
    """Healthy scales: u and its target are velocities of a unit-variance flow, O(√(1 + σ_d²)); du/dt and its two
    terms are O(1) for a smooth field. Measured over tiny_meanflow's 200k samples on the quality benchmark's
    patches (logged every 10k): jvp_abs 1.17-1.27, target_rms 1.46, dudt_t_rms 1.8-2.7, dudt_z_rms 2.4-3.8; the
    watch warns at 10x max(first value, floor)."""
    return {"jvp_abs": 1.0, "target_rms": 2.0, "dudt_t_rms": 2.0, "dudt_z_rms": 2.0}


SPEC = register(MethodSpec(
    name="meanflow", summary="mean flows (MeanFlow): average-velocity one-step training on the JVP engine",
    sections=(("meanflow", MeanFlowConfig),), precond=lambda backbone, m: MeanFlowPrecond(backbone), loss=_loss,
    sampler=meanflow_sampler, nfe=lambda method_cfg, steps: steps, probe_level=0.5, jvp=True,
    jvp_dtype=lambda m: m.meanflow.jvp_dtype, conditions=lambda m: {"h": Condition(neutral=0.0, sample_at=1.0)},
    sampler_keys=("meanflow.t_mid",), check=_check, at_sigma=meanflow_at_sigma, divergence_floors=_floors,
    loss_note=("raw loss = ||Delta||^2 / sg(||Delta||^2 + c)^p (MeanFlow's adaptive weight): near 1 at p = 1 whatever "
               "the quality; follow mse and the probe")))
