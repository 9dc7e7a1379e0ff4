"""Continuous-time consistency training in TrigFlow (``sct``; sCM 2410.11081, SPEC §3).

x_t = cos t·x0 + sin t·z with z ~ N(0, σ_d²I), t = arctan(e^τ/σ_d), τ ~ N(P_mean, P_std²),
f_θ(x_t, t) = cos t·x_t − sin t·σ_d·F_θ(x_t/σ_d, t).

Training target (no teacher, velocity dx_t/dt = cos t·z − sin t·x0):

    g = −cos²t·(σ_d·F⁻ − dx_t/dt) − r·(cos t·sin t·x_t + J),   J = cos t·sin t·σ_d·dF⁻/dt,
    g ← g / (‖g‖ + c),   L = e^{−w(t)}·λ(t)/D·‖F_θ − F⁻ − g‖² + w(t),   λ = 1 or 1/(σ_d tan t).

Sign check (why this is the sCM gradient). Differentiating f⁻ along the trajectory,
    df⁻/dt = −sin t·x_t + cos t·dx_t/dt − cos t·σ_d·F⁻ − sin t·σ_d·dF⁻/dt,
so cos t·df⁻/dt = −cos²t·(σ_d·F⁻ − dx_t/dt) − (cos t·sin t·x_t + J) = g at r = 1 (before
normalisation). At θ = θ⁻ (F_θ = F⁻) the gradient of ‖F_θ − F⁻ − g‖²/D is −(2/D)·gᵀ∇_θF_θ =
−(2/D)·cos t·(df⁻/dt)ᵀ∇_θF_θ, while the sCM objective's gradient is ∇_θE[w·f_θᵀ·df⁻/dt] =
E[−w·sin t·σ_d·(df⁻/dt)ᵀ∇_θF_θ] (f_θ depends on θ only through −sin t·σ_d·F_θ). Both are a *positive*
multiple of −(df⁻/dt)ᵀ∇_θF_θ (w ∝ 2 cos t/(D sin t σ_d) > 0 on (0, π/2)), so descending L moves f_θ
against its own time derivative, i.e. toward consistency. ``tests/test_methods_sct.py`` checks g
against float64 finite differences of f⁻ and this gradient identity on a tiny model.

The tangent needs no backward pass: one forward-mode JVP of the stop-gradient network under
``torch.no_grad()`` at inputs (x_t/σ_d, t) with tangents (cos t·sin t·dx_t/dt, cos t·sin t·σ_d), which
returns F⁻ and J together (the rearrangement keeps fp16/bf16 in range).

Distillation (sCD, sCM §4): dx_t/dt is the frozen teacher's velocity σ_d·F_T(x_t/σ_d, t), guided
F_u + s·(F_c − F_u), in place of the data velocity; the rest is this code. A guidance-conditioned student draws
s per sample (``guidance_range``) and takes it as an input of both of its passes: like the label, a condition
with no tangent, so one network serves every scale at sampling time.

Options beyond the paper (iLCT ideas on sCT): minibatch OT coupling of x0 and z (``cfg.ot``), and a
Cauchy distance on the per-sample mean m = ‖F_θ − F⁻ − g‖²/D:
    d = 2c²·ln(1 + m/(2c²)),
scaled by 2c² so that d ≈ m for m ≪ c² (same gradients as L2 in the quadratic regime, so the
adaptive weight and learning rate carry over); c = ``sct.cauchy_c`` or, if 0, iCT's c0 = 0.00054·√D
(the config's documented rule). Note that with tangent normalisation ‖g‖ < 1, so at θ ≈ θ⁻ the
residual m is at most ~1/D; the Cauchy option mostly matters when the residual grows (e.g. a large c
in g ← g/(‖g‖+c) or a fast-moving network).
"""
from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
import torch.autograd.forward_ad as fwAD
from torch import nn

from ..profiler.phases import phase
from ..validate import ConfigError, choice, positive
from . import schedules
from .base import Draw, MethodLoss, TrigFlowTimes
from .common import Coupler, adaptive_weighting, config_coupler, draw_seed, null_class, prepare_batch, randn_like_gen, unwrap
from ..registry import MethodSpec, register
from .sampling import Sampler, check_steps, conditioned, eval_no_grad, guided, next_noise

__all__ = ["SCTConfig", "SCTLoss", "sct_tangent", "derivative_split", "sct_times", "sct_sample", "sct_sampler",
           "check_adaptive_weight", "SPEC"]


@dataclass
class SCTConfig:
    p_mean: float = -1.0
    """Time sampling: tau ~ N(p_mean, p_std^2), t = arctan(e^tau / sigma_d)."""
    p_std: float = 1.4
    """Time sampling standard deviation."""
    tangent_warmup: int = 10000
    """Tangent warm-up H in iterations: r = min(1, k / H); 0 disables the warm-up."""
    g_norm_c: float = 0.1
    """Tangent normalisation g <- g / (||g|| + c)."""
    prior_weight: bool = False
    """Prior weight 1 / (sigma_d * tan t) on the squared term only (e^{-w} * lambda * d + w, EDM2/sCM form), so
    that the learned w(t) absorbs it."""
    adaptive_weight: bool = True
    """Learned adaptive weighting w_phi(t) (needs model.adaptive_weight)."""
    jvp_dtype: str = "fp32"
    """Precision of the forward-mode JVP pass: fp32 | bf16 | fp16."""
    distance: str = "l2"
    """Distance between F_theta and F^- + g: l2 | cauchy (the iLCT robust loss on top of sCT)."""
    cauchy_c: float = 0.0
    """Cauchy scale for the sCT robust option; 0 = c0 rule 0.00054 * sqrt(D)."""
    t_mid: float = 1.1
    """Intermediate time for 2-step sampling."""
    time_scale: float = 1.0
    """The backbone sees c_noise = time_scale * t. sCM conditions on c_noise(t) = t (Tables 3-4, Fig. 4): a
    scale s multiplies dF/dt, and with it the tangent J, by s (measured: 1000 diverges on real data)."""

    def __post_init__(self) -> None:
        positive("method.sct.p_std", self.p_std)
        positive("method.sct.tangent_warmup", self.tangent_warmup, allow_zero=True)
        positive("method.sct.g_norm_c", self.g_norm_c)
        choice("method.sct.jvp_dtype", self.jvp_dtype, ["fp32", "bf16", "fp16"])
        choice("method.sct.distance", self.distance, ["l2", "cauchy"])
        positive("method.sct.cauchy_c", self.cauchy_c, allow_zero=True)
        if not 0.0 < self.t_mid < math.pi / 2:
            raise ConfigError(f"method.sct.t_mid: expected in (0, pi/2), got {self.t_mid}")
        positive("method.sct.time_scale", self.time_scale)



_JVP_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


_WARNED_LOW_PRECISION_WEIGHTS = False


def _jvp_precision(net: nn.Module, device: torch.device, jvp_dtype: str):
    """Autocast context of the JVP pass: disabled for fp32 (even inside a bf16 training autocast).

    If the network itself holds fp16/bf16 weights (e.g. DeepSpeed's bf16 mode), an fp32 JVP is not
    possible; the pass then runs in the ambient precision and a one-time warning says so.
    """
    global _WARNED_LOW_PRECISION_WEIGHTS
    if jvp_dtype not in _JVP_DTYPES:
        raise ValueError(f"jvp_dtype must be one of {sorted(_JVP_DTYPES)}, got {jvp_dtype!r}")
    if jvp_dtype == "fp32":
        p = next(net.parameters(), None)
        if p is not None and p.dtype in (torch.float16, torch.bfloat16):
            if not _WARNED_LOW_PRECISION_WEIGHTS:
                warnings.warn(f"sct.jvp_dtype=fp32 but the target network holds {p.dtype} weights; "
                              "the JVP runs in the ambient precision", RuntimeWarning, stacklevel=3)
                _WARNED_LOW_PRECISION_WEIGHTS = True
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, enabled=False)
    return torch.autocast(device_type=device.type, dtype=_JVP_DTYPES[jvp_dtype])


def sct_tangent(target_net: nn.Module, x_t: torch.Tensor, t: torch.Tensor, dxt_dt: torch.Tensor,
                labels: Optional[torch.Tensor], *, sigma_data: float, r: float, g_norm_c: float,
                dropout_seed: Optional[int] = None, jvp_dtype: str = "fp32",
                guidance: Optional[torch.Tensor] = None
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The sCT target pieces from one JVP of the stop-gradient network.

    Args:
        target_net: module exposing ``F(x_in, t, labels, *, dropout_seed)`` (TrigFlowPrecond), unwrapped.
        x_t, t, dxt_dt: noisy latents [B,...], times [B], velocity dx_t/dt [B,...].
        r: tangent warm-up factor; g_norm_c: c of g/(‖g‖ + c).
        guidance: [B] guidance scales of a guidance-conditioned network (a condition: no tangent), or None.

    Returns:
        (g normalised, F⁻, J = cos t·sin t·σ_d·dF⁻/dt, ‖g‖ before normalisation [B]), all detached,
        in x_t's dtype.
    """
    net = unwrap(target_net)
    if not hasattr(net, "F"):
        raise AttributeError(f"{type(net).__name__}: sCT needs a TrigFlow preconditioner exposing F(x_in, t, labels)")
    sd = float(sigma_data)
    bshape = (x_t.shape[0],) + (1,) * (x_t.ndim - 1)
    ct, st = torch.cos(t), torch.sin(t)
    cs = ct * st

    # Forward-mode AD with dual tensors (torch.autograd.forward_ad) rather than torch.func.jvp: both give
    # the same JVP, but functorch's wrapper levels break inside DeepSpeed ZeRO-3, whose module hooks
    # gather parameters mid-forward ("escaped" functorch tensors); dual tensors are plain tensors there.
    with torch.no_grad(), _jvp_precision(net, x_t.device, jvp_dtype), fwAD.dual_level():
        x_in = fwAD.make_dual(x_t / sd, cs.view(bshape) * dxt_dt)
        t_in = fwAD.make_dual(t, cs * sd)
        kw = {} if guidance is None else {"guidance": guidance}
        f_minus, jac = fwAD.unpack_dual(net.F(x_in, t_in, labels, dropout_seed=dropout_seed, **kw))
        if jac is None:  # output independent of (x, t): a zero tangent
            jac = torch.zeros_like(f_minus)
    f_minus = f_minus.to(x_t.dtype)
    jac = jac.to(x_t.dtype)
    ct2, csb = (ct * ct).view(bshape), cs.view(bshape)
    g = -ct2 * (sd * f_minus - dxt_dt) - r * (csb * x_t + jac)
    g_norm = g.flatten(1).norm(dim=1)
    g = g / (g_norm + g_norm_c).view(bshape)
    return g, f_minus, jac, g_norm


@torch.no_grad()
def derivative_split(target_net: nn.Module, x_t: torch.Tensor, t: torch.Tensor, dxt_dt: torch.Tensor,
                     labels: Optional[torch.Tensor], *, sigma_data: float, dropout_seed: Optional[int] = None,
                     jvp_dtype: str = "fp32") -> Tuple[torch.Tensor, torch.Tensor]:
    """The two terms of dF⁻/dt along the trajectory, dF/dt = ∂F/∂t + ∇ₓF·(dx_t/dt)/σ_d (sCM Fig. 4), each
    from its own forward-mode JVP (time tangent 1 / input tangent (dx_t/dt)/σ_d). Returns their RMS over all
    elements. A time scale s in c_noise = s·t multiplies the first by s; a runaway of either is the sCT
    instability the paper's Fig. 4 shows."""
    net = unwrap(target_net)
    x_in, sd = x_t / sigma_data, float(sigma_data)
    out = []
    with _jvp_precision(net, x_t.device, jvp_dtype):
        for tx, tt in ((torch.zeros_like(x_in), torch.ones_like(t)), (dxt_dt / sd, torch.zeros_like(t))):
            with fwAD.dual_level():
                _, jac = fwAD.unpack_dual(net.F(fwAD.make_dual(x_in, tx), fwAD.make_dual(t, tt), labels,
                                                dropout_seed=dropout_seed))
            out.append(torch.zeros((), device=x_t.device) if jac is None else jac.float().square().mean().sqrt())
    return out[0], out[1]


class SCTLoss(TrigFlowTimes, MethodLoss):
    """sCT loss (TrigFlow, adaptive weighting, tangent warm-up and normalisation) with optional OT / Cauchy.

    Explicit arguments (:meth:`from_config` reads them from ``MethodConfig.sct``).

    Args:
        data_dim: D = C·H·W of one latent.
        total_steps: K (unused by the schedule; kept for the common loss interface).
        coupler: ``(x0, z, labels) -> (z paired with x0, cost ratio)`` with the labels the network sees; None
            keeps the drawn pairing.
    """

    def __init__(self, *, data_dim: int, total_steps: int, sigma_data: float, label_dropout: float, p_mean: float,
                 p_std: float, tangent_warmup: int, g_norm_c: float, prior_weight: bool, adaptive_weight: bool,
                 jvp_dtype: str, distance: str, cauchy_c: float = 0.0, coupler: Optional[Coupler] = None,
                 teacher: Optional[nn.Module] = None, guidance: float = 1.0,
                 guidance_range: Optional[Tuple[float, float]] = None) -> None:
        super().__init__(data_dim=data_dim, sigma_data=sigma_data, label_dropout=label_dropout,
                         noise_std=sigma_data, coupler=coupler)
        self.total_steps = int(total_steps)
        self.p_mean, self.p_std = float(p_mean), float(p_std)
        self.tangent_warmup = int(tangent_warmup)
        self.g_norm_c = float(g_norm_c)
        self.prior_weight = bool(prior_weight)
        self.adaptive_weight = bool(adaptive_weight)
        self.jvp_dtype = str(jvp_dtype)
        self.distance = str(distance)
        if self.distance not in ("l2", "cauchy"):
            raise ValueError(f"SCTLoss: sct.distance must be 'l2' or 'cauchy', got {self.distance!r}")
        if self.jvp_dtype not in _JVP_DTYPES:
            raise ValueError(f"SCTLoss: sct.jvp_dtype must be one of {sorted(_JVP_DTYPES)}, got {self.jvp_dtype!r}")
        self.cauchy_c = float(cauchy_c) if cauchy_c > 0 else schedules.fixed_c(self.data_dim)
        # sCD: the frozen teacher whose (guided) velocity replaces the data velocity in the tangent; with
        # ``guidance_range`` (lo, hi) the scale is drawn per sample and is also the student's input.
        self.teacher, self.guidance = teacher, float(guidance)
        if guidance_range is not None:
            if teacher is None:
                raise ValueError("SCTLoss: guidance_range is for distillation (needs a teacher)")
            lo, hi = float(guidance_range[0]), float(guidance_range[1])
            if not 0 < lo <= hi:
                raise ValueError(f"SCTLoss: guidance_range must satisfy 0 < lo <= hi, got {guidance_range}")
            guidance_range = (lo, hi)
        self.guidance_range = guidance_range

    @classmethod
    def from_config(cls, cfg: Any, *, data_dim: int, total_steps: int, coupler: Optional[Coupler] = None,
                    teacher: Optional[nn.Module] = None, guidance: float = 1.0,
                    guidance_range: Optional[Tuple[float, float]] = None) -> "SCTLoss":
        """From a ``MethodConfig`` (``sigma_data``, ``label_dropout``, ``sct``); ``coupler``: the trainer's
        (default: the per-micro-batch coupling of ``cfg.ot``); ``teacher`` / ``guidance`` / ``guidance_range``:
        distillation (``lct_fast.methods.scd``)."""
        s = cfg.sct
        return cls(data_dim=data_dim, total_steps=total_steps, sigma_data=cfg.sigma_data,
                   label_dropout=cfg.label_dropout, p_mean=s.p_mean, p_std=s.p_std, tangent_warmup=s.tangent_warmup,
                   g_norm_c=s.g_norm_c, prior_weight=s.prior_weight, adaptive_weight=s.adaptive_weight,
                   jvp_dtype=s.jvp_dtype, distance=s.distance, cauchy_c=s.cauchy_c,
                   coupler=coupler if coupler is not None else config_coupler(cfg.ot),
                   teacher=teacher, guidance=guidance, guidance_range=guidance_range)

    def velocity(self, x0: torch.Tensor, z: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                 labels: Optional[torch.Tensor], null_label: Optional[int] = None,
                 guidance: Optional[torch.Tensor] = None) -> torch.Tensor:
        """dx_t/dt of the tangent: the data velocity cos t·z − sin t·x0 (sCT), or the teacher's probability-flow
        velocity σ_d·F_T(x_t/σ_d, t), guided F_u + s·(F_c − F_u) (sCD; no grad, in the JVP dtype) with s the
        fixed scale or the per-sample ``guidance`` [B]."""
        if self.teacher is None:
            bshape = (x0.shape[0],) + (1,) * (x0.ndim - 1)
            return torch.cos(t).view(bshape) * z - torch.sin(t).view(bshape) * x0
        sd, teacher = self.sigma_data, self.teacher
        from ..models.precond import classifier_free_guidance

        scale = self.guidance if guidance is None else guidance
        null = null_label
        if null is None and labels is not None and (guidance is not None or self.guidance != 1.0):
            null = null_class(teacher)
        with torch.no_grad(), _jvp_precision(teacher, x_t.device, self.jvp_dtype):
            f = classifier_free_guidance(teacher.F, x_t / sd, t, labels, scale, null)
        return (sd * f).to(x_t.dtype)

    def diagnostics(self, target_net: nn.Module, x0: torch.Tensor, labels: Optional[torch.Tensor], *,
                    generator: torch.Generator, max_samples: int = 64) -> Dict[str, torch.Tensor]:
        """Divergence diagnostics on (up to ``max_samples`` of) a batch, for the log interval only (two extra
        JVPs): RMS of ∂F⁻/∂t (``dFdt_rms``) and of ∇ₓF⁻·(dx_t/dt)/σ_d (``dxF_v_rms``) at freshly drawn t, z."""
        x0, bshape = prepare_batch("SCTLoss", x0[:max_samples], self.data_dim)
        labels = None if labels is None else labels[:max_samples]
        sd = self.sigma_data
        t = schedules.sample_sct_times(x0.shape[0], self.p_mean, self.p_std, sd, generator,
                                       device=x0.device).to(x0.dtype)
        z = randn_like_gen(x0, generator) * sd
        ct, st = torch.cos(t).view(bshape), torch.sin(t).view(bshape)
        dfdt, dxf = derivative_split(target_net, ct * x0 + st * z, t, ct * z - st * x0, labels, sigma_data=sd,
                                     dropout_seed=draw_seed(generator), jvp_dtype=self.jvp_dtype)
        return {"dFdt_rms": dfdt, "dxF_v_rms": dxf}

    def warmup(self, step: int) -> float:
        """Tangent warm-up r = min(1, k/H)."""
        return schedules.tangent_warmup(step, self.tangent_warmup)

    def _distance(self, m: torch.Tensor) -> torch.Tensor:
        if self.distance == "cauchy":
            two_c2 = 2.0 * self.cauchy_c ** 2
            return two_c2 * torch.log1p(m / two_c2)   # eq. 6, rescaled to match L2 for small m
        return m

    def loss(self, net: nn.Module, target_net: nn.Module, d: Draw, *, step: int,
             generator: torch.Generator) -> torch.Tensor:
        """Per-sample loss [B] (see the module docstring)."""
        x0, bshape, labels, z, t, dropout_seed = d.x0, d.bshape, d.labels, d.z, d.t, d.dropout_seed
        batch, dev, sd = x0.shape[0], x0.device, self.sigma_data
        ct, st = torch.cos(t).view(bshape), torch.sin(t).view(bshape)
        x_t = ct * x0 + st * z
        s_cfg = None                                           # per-sample guidance of a conditioned student
        if self.guidance_range is not None:
            lo, hi = self.guidance_range
            u = torch.rand(batch, generator=generator, device=generator.device).to(dev)
            s_cfg = (lo + (hi - lo) * u).to(x0.dtype)
        with phase("teacher_forward") if self.teacher is not None else contextlib.nullcontext():
            v = self.velocity(x0, z, x_t, t, labels, guidance=s_cfg)  # dx_t/dt: data (sCT) or teacher (sCD)
        r = self.warmup(step)
        with phase("jvp"):
            g, f_minus, jac, g_norm = sct_tangent(target_net, x_t, t, v, labels, sigma_data=sd, r=r,
                                                  g_norm_c=self.g_norm_c, dropout_seed=dropout_seed,
                                                  jvp_dtype=self.jvp_dtype, guidance=s_cfg)

        online = unwrap(net)
        with phase("online_forward"):
            kw = {} if s_cfg is None else {"guidance": s_cfg}
            f_theta = online.F(x_t / sd, t, labels, dropout_seed=dropout_seed, **kw).to(x0.dtype)
        # F⁻ = F_{sg θ} at the same inputs and dropout mask, so its value is the online pass's own value; taking
        # it from f_theta.detach() keeps the residual's value exactly −g even when the JVP pass ran in another
        # precision or kernel (fp32 JVP vs bf16 online, flash-JVP vs SDPA). The gradient is unchanged:
        # ∇θ ‖F_θ − sg(F_θ) − g‖² = −2 gᵀ∇θF_θ. td_abs below reports the size of that mismatch.
        resid = f_theta - f_theta.detach() - g
        m = resid.flatten(1).square().mean(dim=1)             # ‖·‖²/D
        dist = self._distance(m)
        if self.prior_weight:
            # Prior weight λ(t) = 1/(σ_d tan t) on the squared term only (EDM2 / sCM: e^{−w}·λ·d + w): the
            # learned w then absorbs λ instead of having its own +w term rescaled.
            dist = dist / (sd * torch.tan(t))
        loss, w = adaptive_weighting(online, t, dist, self.adaptive_weight, "sct.adaptive_weight")

        with torch.no_grad():
            self.metrics = {
                "loss": loss.detach().mean().float(),
                "td_abs": (f_theta.detach() - f_minus).abs().mean().float(),
                "resid_m": m.detach().mean().float(),
                "g_norm_mean": g_norm.mean().float(),
                "g_norm_max": g_norm.max().float(),
                "g_norm_min": g_norm.min().float(),
                "jvp_abs": jac.abs().mean().float(),
                "r": torch.tensor(r, dtype=torch.float32, device=dev),
                "logvar_mean": w.detach().mean().float(),
                "t_mean": t.mean().float(),
                "ot_cost_ratio": d.ot_ratio.detach().float(),
            }
        return loss


# ------------------------------------------------------------------------------------------ sampling
def sct_times(steps: int, *, t_mid: float = 1.1, t_max: float = math.pi / 2) -> tuple[float, ...]:
    """Times of ``steps``-step sCT sampling: (π/2,), (π/2, t_mid), and for k > 2 steps π/2 followed by k−1
    times evenly spaced from t_mid towards 0 (0 excluded — f there is the identity)."""
    check_steps(steps)
    if not 0.0 < t_mid < t_max:
        raise ValueError(f"sample: need 0 < t_mid < {t_max}, got t_mid={t_mid}")
    k = steps - 1
    return (float(t_max),) + tuple(float(t_mid * (1.0 - j / k)) for j in range(k))



def sct_sample(net: nn.Module, z: torch.Tensor, labels: Optional[torch.Tensor] = None, *,
               ts: Sequence[float] = (math.pi / 2,), sigma_data: float = 0.5,
               noise: Optional[Sequence[torch.Tensor]] = None,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """sCT / TrigFlow sampling (SPEC §3) from standard-normal ``z`` through the times ``ts`` (first = π/2).

    x = f(σ_d·z, t_0) (at t_0 = π/2 this is −σ_d·F(z, π/2)); x = f(cos t_i·x + sin t_i·σ_d·z_i, t_i) for
    i ≥ 1. Runs under no_grad in eval mode; returns float32.
    """
    if len(ts) < 1:
        raise ValueError("sample: ts must hold at least one time")
    if any(not 0.0 < t <= math.pi / 2 + 1e-12 for t in ts):
        raise ValueError(f"sample: every t must be in (0, pi/2], got {tuple(ts)}")
    z = z.float()
    with eval_no_grad(net):
        x = net(sigma_data * z, float(ts[0]), labels).float()
        for i, t in enumerate(ts[1:]):
            zi = next_noise(i, z, noise, generator)
            x = net(math.cos(t) * x + math.sin(t) * sigma_data * zi, float(t), labels).float()
    return x


def sct_sampler(method_cfg: Any, steps: int, *, schedule: Optional[Sequence[float]] = None, cfg_scale: float = 1.0,
                null_label: int = 0, conditions: Optional[dict] = None) -> Sampler:
    """``steps``-step sCT sampling (t_mid from the config; explicit ``schedule`` = the times). An sCD student
    samples the same way."""
    ts = tuple(schedule) if schedule is not None else sct_times(steps, t_mid=method_cfg.sct.t_mid)
    sigma_data = float(getattr(method_cfg, "sigma_data", 0.5))

    def run(net: nn.Module, noise: torch.Tensor, labels: Optional[torch.Tensor]) -> torch.Tensor:
        return sct_sample(guided(conditioned(net, conditions), cfg_scale, null_label), noise[0], labels, ts=ts,
                          sigma_data=sigma_data,
                          noise=noise[1:])

    return Sampler(schedule=ts, draws=len(ts), run=run)


# ------------------------------------------------------------------------------------------ registration
def trigflow_precond(backbone: nn.Module, sigma_data: float, time_scale: float) -> nn.Module:
    from ..models.precond import TrigFlowPrecond

    return TrigFlowPrecond(backbone, sigma_data=sigma_data, time_scale=time_scale)


def trigflow_at_sigma(sigma: float, sigma_data: float) -> Tuple[float, float]:
    """TrigFlow: x_t = cos t·x0 + sin t·σ_d·z = cos t·(x0 + σ·z) with σ = σ_d·tan t, so (cos t, t)."""
    t = math.atan(float(sigma) / float(sigma_data))
    return math.cos(t), t


# Printed under the raw loss in the report: the adaptive weight's -w term is why the figure goes negative.
ADAPTIVE_LOSS_NOTE = ("raw loss = e^-w(t)·d/D + w(t) with the learned log-variance w (sCM eq. 8): it goes negative "
                      "as w learns the loss's scale, so its level is not a quality figure")


def sct_divergence_floors(cfg: Any) -> Dict[str, float]:
    """Healthy scales of sCT's (and sCD's) tangent metrics: F's target is (dx_t/dt)/σ_d, of unit RMS, and t spans
    [0, π/2], so ∂F/∂t and ∇ₓF·v are O(1); J = cos t·sin t·σ_d·dF/dt is then O(σ_d/2) and ‖g‖ O(σ_d·√D)."""
    sd, dim = cfg.method.sigma_data, cfg.model.in_channels * cfg.model.resolution ** 2
    return {"jvp_abs": sd / 2, "g_norm_mean": sd * math.sqrt(dim), "dFdt_rms": 1.0, "dxF_v_rms": 1.0}


def check_adaptive_weight(cfg: Any, enabled: bool, key: str) -> None:
    """A learned adaptive weight (``key`` = true) needs the network's head (``model.adaptive_weight``)."""
    if enabled and not cfg.model.adaptive_weight:
        raise ConfigError(f"model.adaptive_weight: {key}=true needs model.adaptive_weight=true")


def _precond(backbone: nn.Module, method_cfg: Any) -> nn.Module:
    return trigflow_precond(backbone, float(getattr(method_cfg, "sigma_data", 0.5)),
                            float(getattr(getattr(method_cfg, "sct", None), "time_scale", 1.0)))


def _loss(method_cfg: Any, *, data_dim: int, total_steps: int, coupler: Optional[Coupler] = None,
          teacher: Any = None) -> SCTLoss:
    return SCTLoss.from_config(method_cfg, data_dim=data_dim, total_steps=total_steps, coupler=coupler)


SPEC = register(MethodSpec(
    name="sct", summary="continuous-time consistency training in TrigFlow (sCT)",
    sections=(("sct", SCTConfig),), precond=_precond, loss=_loss, sampler=sct_sampler,
    nfe=lambda method_cfg, steps: steps, probe_level=0.7, jvp=True, jvp_dtype=lambda m: m.sct.jvp_dtype,
    sampler_keys=("sct.t_mid",), at_sigma=trigflow_at_sigma, divergence_floors=sct_divergence_floors,
    loss_note=ADAPTIVE_LOSS_NOTE + "; the tangent warm-up (sct.tangent_warmup) grows the target over its first steps",
    check=lambda cfg: check_adaptive_weight(cfg, cfg.method.sct.adaptive_weight, "method.sct.adaptive_weight")))
