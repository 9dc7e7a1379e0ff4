"""One-, two- and multi-step sampling for both methods, latent saving and VAE-decoded PNG grids.

iCT (SPEC §2, VE process):   x = f_θ(σ_max·z, σ_max); then for each further level σ_i
                             x = f_θ(x + √(σ_i² − σ_min²)·z_i, σ_i)   (2 steps: σ_1 = σ_mid).
sCT (SPEC §3, TrigFlow):     x = f_θ(σ_d·z, π/2); then for each further time t_i
                             x = f_θ(cos t_i·x + sin t_i·σ_d·z_i, t_i)  (2 steps: t_1 = t_mid).

``net`` is the preconditioned model (``VEPrecond`` / ``TrigFlowPrecond``): ``net(x, σ_or_t, labels)``.
Noise is standard normal and comes from explicit generators. :func:`generate` draws sample i's noise from
a generator of its own fixed chunk of NOISE_CHUNK samples, seeded from ``(seed, chunk)``, so a sample does
not depend on the batch size or on how many samples are drawn in total.
"""
from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn

__all__ = [
    "SampleResult",
    "ict_sigmas",
    "sct_times",
    "ict_sample",
    "sct_sample",
    "sample_noise",
    "sample_labels",
    "generate",
    "save_latents",
    "denormalize_latents",
    "trigflow_ode",
    "trigflow_times",
    "decode_latents",
    "make_grid",
    "save_png",
    "decode_and_save_grid",
    "save_latent_grid",
    "latent_grid_image",
]


@dataclass
class SampleResult:
    """Generated latents [n, C, H, W] (float32, CPU, normalized space) and their labels [n] (or None)."""

    latents: torch.Tensor
    labels: Optional[torch.Tensor]


# -------------------------------------------------------------------------------------- schedules
def ict_sigmas(steps: int, *, sigma_max: float = 80.0, sigma_mid: float = 0.821, sigma_min: float = 0.002,
               rho: float = 7.0) -> tuple[float, ...]:
    """Noise levels of ``steps``-step iCT sampling: (σ_max,), (σ_max, σ_mid), and for k > 2 steps σ_max
    followed by k−1 levels Karras-spaced (ρ) from σ_mid towards σ_min (σ_min itself excluded — f there is
    the identity)."""
    _check_steps(steps)
    if not sigma_min < sigma_mid < sigma_max:
        raise ValueError(f"sample: need sigma_min < sigma_mid < sigma_max, got {sigma_min}, {sigma_mid}, {sigma_max}")
    if steps == 1:
        return (float(sigma_max),)
    a, b = sigma_mid ** (1.0 / rho), sigma_min ** (1.0 / rho)
    k = steps - 1
    rest = tuple(float((a + j / k * (b - a)) ** rho) for j in range(1, k))
    return (float(sigma_max), float(sigma_mid)) + rest


def sct_times(steps: int, *, t_mid: float = 1.1, t_max: float = math.pi / 2) -> tuple[float, ...]:
    """Times of ``steps``-step sCT sampling: (π/2,), (π/2, t_mid), and for k > 2 steps π/2 followed by k−1
    times evenly spaced from t_mid towards 0 (0 excluded — f there is the identity)."""
    _check_steps(steps)
    if not 0.0 < t_mid < t_max:
        raise ValueError(f"sample: need 0 < t_mid < {t_max}, got t_mid={t_mid}")
    k = steps - 1
    return (float(t_max),) + tuple(float(t_mid * (1.0 - j / k)) for j in range(k))


def _check_steps(steps: int) -> None:
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"sample: steps must be an integer >= 1, got {steps!r}")


# ---------------------------------------------------------------------------------------- samplers
@contextlib.contextmanager
def _eval_no_grad(net: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) and no autograd for the duration; restores the training flag after."""
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        net.train(was_training)


def _next_noise(i: int, z: torch.Tensor, noise: Optional[Sequence[torch.Tensor]],
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


def ict_sample(net: nn.Module, z: torch.Tensor, labels: Optional[torch.Tensor] = None, *,
               sigmas: Sequence[float] = (80.0,), sigma_min: float = 0.002,
               noise: Optional[Sequence[torch.Tensor]] = None,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """iCT sampling (SPEC §2) from standard-normal ``z`` through the levels ``sigmas`` (first = σ_max).

    x = f(σ_0·z, σ_0); x = f(x + √(σ_i² − σ_min²)·z_i, σ_i) for i ≥ 1, with z_i = ``noise[i-1]`` or drawn
    from ``generator``. Runs under no_grad in eval mode; returns float32.
    """
    if len(sigmas) < 1:
        raise ValueError("sample: sigmas must hold at least one noise level")
    if any(s <= sigma_min for s in sigmas):
        raise ValueError(f"sample: every sigma must be > sigma_min={sigma_min}, got {tuple(sigmas)}")
    z = z.float()
    with _eval_no_grad(net):
        x = net(sigmas[0] * z, float(sigmas[0]), labels).float()
        for i, s in enumerate(sigmas[1:]):
            zi = _next_noise(i, z, noise, generator)
            x = net(x + math.sqrt(s * s - sigma_min * sigma_min) * zi, float(s), labels).float()
    return x


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
    with _eval_no_grad(net):
        x = net(sigma_data * z, float(ts[0]), labels).float()
        for i, t in enumerate(ts[1:]):
            zi = _next_noise(i, z, noise, generator)
            x = net(math.cos(t) * x + math.sin(t) * sigma_data * zi, float(t), labels).float()
    return x


# ----------------------------------------------------------------------------------- batched driver
def _check_seed(seed: int) -> None:
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
        raise ValueError(f"sample: seed must be an integer in [0, 2^63), got {seed!r}")


NOISE_CHUNK = 256
"""Samples per noise stream: sample i's noise comes from stream i // NOISE_CHUNK (fixed, not the batch size)."""


def _stream_seed(*key: int) -> int:
    """A well-mixed 32-bit generator seed for ``key``. torch's CPU generator (mt19937) keeps only the low
    32 bits of a seed, so (seed, stream) pairs are hashed (numpy SeedSequence) instead of bit-packed."""
    return int(np.random.SeedSequence([int(k) for k in key]).generate_state(1, dtype=np.uint32)[0])


def _noise_chunk(seed: int, chunk: int, steps: int, shape: tuple[int, ...]) -> torch.Tensor:
    g = torch.Generator().manual_seed(_stream_seed(seed, 0, chunk))
    return torch.randn((steps, NOISE_CHUNK, *shape), generator=g)


def sample_noise(seed: int, indices: Sequence[int], steps: int, shape: Sequence[int], *,
                 cache: Optional[dict] = None) -> torch.Tensor:
    """Standard-normal noise [steps, len(indices), *shape] (CPU, float32) for the given sample indices.

    Sample i's noise is row i % NOISE_CHUNK of ``randn(steps, NOISE_CHUNK, *shape)`` drawn from a
    ``torch.Generator`` seeded with a hash of (seed, 0, i // NOISE_CHUNK): it does not depend on the batch
    size, and its first-step noise is the same for any number of steps. ``cache``: a dict kept across calls
    (by :func:`generate`) that holds the last chunk drawn, so consecutive batches do not redraw it."""
    _check_seed(seed)
    shape = tuple(int(s) for s in shape)
    idx = torch.as_tensor(list(indices), dtype=torch.long)
    out = torch.empty(steps, len(idx), *shape)
    if len(idx) and int(idx.min()) < 0:
        raise ValueError(f"sample: sample indices must be >= 0, got {int(idx.min())}")
    for chunk in torch.unique(idx // NOISE_CHUNK).tolist():
        sel = (idx // NOISE_CHUNK) == chunk
        key = (seed, chunk, steps, shape)
        if cache is not None and cache.get("key") == key:
            block = cache["noise"]
        else:
            block = _noise_chunk(seed, chunk, steps, shape)
            if cache is not None:
                cache.update(key=key, noise=block)
        out[:, sel] = block[:, idx[sel] % NOISE_CHUNK]
    return out


def sample_labels(n: int, num_classes: int, seed: int,
                  labels: Union[None, int, Sequence[int], torch.Tensor] = None) -> Optional[torch.Tensor]:
    """Class labels [n] for generation: ``None`` -> uniform over ``num_classes`` (own seeded stream) or None
    when unconditional (num_classes = 0); an int -> that class for all; a sequence/tensor -> as given.
    Label ``num_classes`` (the null class) is allowed and means unconditional for that sample."""
    _check_seed(seed)
    if labels is None:
        if num_classes <= 0:
            return None
        g = torch.Generator().manual_seed(_stream_seed(seed, 1))
        return torch.randint(num_classes, (n,), generator=g)
    if num_classes <= 0:
        raise ValueError(f"sample: labels were given but the model is unconditional (num_classes={num_classes})")
    out = torch.full((n,), labels, dtype=torch.long) if isinstance(labels, int) else \
        torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    if out.shape != (n,):
        raise ValueError(f"sample: expected {n} labels, got {tuple(out.shape)}")
    if out.numel() and (int(out.min()) < 0 or int(out.max()) > num_classes):
        raise ValueError(f"sample: labels must lie in [0, {num_classes}] ({num_classes} = null class), "
                         f"got range [{int(out.min())}, {int(out.max())}]")
    return out


def _module_device(net: nn.Module) -> torch.device:
    p = next(net.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def generate(net: nn.Module, method_cfg: Any, *, n: int, shape: Sequence[int], num_classes: int = 0,
             steps: int = 1, seed: int = 0, batch_size: int = 64,
             labels: Union[None, int, Sequence[int], torch.Tensor] = None,
             sigmas: Optional[Sequence[float]] = None, ts: Optional[Sequence[float]] = None,
             device: Optional[Union[str, torch.device]] = None, start: int = 0, count: Optional[int] = None,
             cfg_scale: Optional[float] = None, guidance: Optional[float] = None) -> SampleResult:
    """Generate ``n`` latents of ``shape`` (C, H, W) in batches with the sampler of ``method_cfg.name``.

    ``method_cfg``: a ``MethodConfig`` (reads name, sigma_data, ict.sigma_min/sigma_max/sigma_mid/rho,
    sct.t_mid, trigflow.solver/spacing). ``steps``: 1, 2 (σ_mid / t_mid from the config) or k (see
    :func:`ict_sigmas` / :func:`sct_times`); for ``trigflow`` the number of ODE solver steps
    (:func:`trigflow_times`, :func:`trigflow_ode`); explicit ``sigmas`` / ``ts`` override the schedule. Deterministic for a ``seed``
    and independent of ``batch_size``. Returns latents on the CPU.

    ``start`` / ``count``: return only samples ``start … start+count−1`` of the ``n``-sample draw (one rank's
    share in distributed evaluation): they equal those rows of the whole draw. ``cfg_scale`` s ≠ 1:
    classifier-free guidance of every step's prediction, f_u + s·(f_c − f_u) with f_u the null-class
    prediction (needs a class-conditional model trained with label dropout); None = the config's
    ``trigflow.guidance`` for a diffusion model, 1 otherwise. ``guidance``: the scale a guidance-conditioned
    sCD student (``scd.guidance_conditioned``) is asked for, one network evaluation per step; None =
    ``scd.guidance``.
    """
    if n < 1 or batch_size < 1:
        raise ValueError(f"sample: n and batch_size must be >= 1, got n={n}, batch_size={batch_size}")
    count = n - start if count is None else count
    if start < 0 or count < 0 or start + count > n:
        raise ValueError(f"sample: need 0 <= start and start + count <= n, got start={start}, count={count}, n={n}")
    name = getattr(method_cfg, "name", None)
    if cfg_scale is None:
        cfg_scale = float(method_cfg.trigflow.guidance) if name == "trigflow" else 1.0
    scd = getattr(method_cfg, "scd", None)
    conditioned = name == "scd" and bool(getattr(scd, "guidance_conditioned", False))
    if guidance is not None and not conditioned:
        raise ValueError(f"sample: guidance={guidance} is for a guidance-conditioned sCD student "
                         "(method.scd.guidance_conditioned=true); use cfg_scale for classifier-free guidance")
    if conditioned:
        net = _Conditioned(net, float(scd.guidance if guidance is None else guidance))
    if cfg_scale != 1.0:
        if num_classes <= 0:
            raise ValueError(f"sample: cfg_scale={cfg_scale} needs a class-conditional model (num_classes > 0)")
        net = _Guided(net, cfg_scale, num_classes)
    sigma_data = float(getattr(method_cfg, "sigma_data", 0.5))
    if name == "ict":
        icfg = method_cfg.ict
        sched = tuple(sigmas) if sigmas is not None else ict_sigmas(
            steps, sigma_max=icfg.sigma_max, sigma_mid=icfg.sigma_mid, sigma_min=icfg.sigma_min,
            rho=getattr(icfg, "rho", 7.0))
    elif name in ("sct", "scd"):  # a distilled student samples like an sCT model
        sched = tuple(ts) if ts is not None else sct_times(steps, t_mid=method_cfg.sct.t_mid)
    elif name == "trigflow":
        # a diffusion model: ``steps`` solver steps of its probability-flow ODE (Heun: about 2 NFE each)
        tf = method_cfg.trigflow
        sched = tuple(ts) if ts is not None else trigflow_times(steps, spacing=tf.spacing, sigma_data=sigma_data)
    else:
        raise ValueError(f"sample: method_cfg.name must be 'ict', 'sct', 'trigflow' or 'scd', got {name!r}")
    shape = tuple(int(s) for s in shape)
    dev = torch.device(device) if device is not None else _module_device(net)
    all_labels = sample_labels(n, num_classes, seed, labels)
    out = torch.empty(count, *shape)
    cache: dict = {}
    for b0 in range(start, start + count, batch_size):
        idx = list(range(b0, min(b0 + batch_size, start + count)))
        lab = None if all_labels is None else all_labels[idx[0]:idx[-1] + 1].to(dev)
        if name == "trigflow":  # one noise draw; the ODE is deterministic
            noise = sample_noise(seed, idx, 1, shape, cache=cache).to(dev)
            x = trigflow_ode(_inner(net), noise[0], lab, sigma_data=sigma_data, ts=sched,
                             solver=method_cfg.trigflow.solver, cfg_scale=cfg_scale,
                             null_label=num_classes if cfg_scale != 1.0 else None)
            out[idx[0] - start:idx[-1] + 1 - start] = x.float().cpu()
            continue
        noise = sample_noise(seed, idx, len(sched), shape, cache=cache).to(dev)
        if name == "ict":
            x = ict_sample(net, noise[0], lab, sigmas=sched, sigma_min=method_cfg.ict.sigma_min, noise=noise[1:])
        else:
            x = sct_sample(net, noise[0], lab, ts=sched, sigma_data=sigma_data, noise=noise[1:])
        out[idx[0] - start:idx[-1] + 1 - start] = x.float().cpu()
    return SampleResult(latents=out, labels=None if all_labels is None else all_labels[start:start + count])


def trigflow_times(steps: int, *, spacing: str = "uniform", sigma_data: float = 0.5, sigma_max: float = 80.0,
                   sigma_min: float = 0.002, rho: float = 7.0) -> tuple:
    """``steps + 1`` TrigFlow times from π/2 (pure noise) down to 0.

    ``uniform``: equal steps in t. ``edm``: π/2, then t = arctan(σ_i/σ_d) over EDM's ρ-spaced σ grid from
    σ_max to σ_min (steps − 1 values), then 0. Measured on the Gaussian toy of tests/test_methods_trigflow.py
    (Heun, 20k samples, sample std / data std): 8 steps uniform 0.93–1.01, edm 1.50–1.68; 24 steps uniform
    1.00–1.01, edm 1.035–1.046; 64 steps both within 1 %. Uniform is the default."""
    if steps < 1:
        raise ValueError(f"sample: trigflow ODE needs steps >= 1, got {steps}")
    if spacing == "uniform":
        return tuple(math.pi / 2 * (1 - i / steps) for i in range(steps)) + (0.0,)
    if spacing != "edm":
        raise ValueError(f"sample: trigflow time spacing must be uniform | edm, got {spacing!r}")
    inner = []
    if steps > 1:
        k = steps - 1
        ramp = [i / max(k - 1, 1) for i in range(k)] if k > 1 else [0.0]
        inner = [math.atan(((sigma_max ** (1 / rho) + r * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho)
                           / sigma_data) for r in ramp]
    return (math.pi / 2, *inner, 0.0)


def trigflow_ode(net: nn.Module, z: torch.Tensor, labels: Optional[torch.Tensor], *, sigma_data: float,
                 ts: Sequence[float], solver: str = "heun", cfg_scale: float = 1.0,
                 null_label: Optional[int] = None) -> torch.Tensor:
    """Integrate the probability-flow ODE dx_t/dt = σ_d·F(x_t/σ_d, t) from x_{π/2} = σ_d·z down the times ``ts``
    (descending, ending at 0).

    ``ddim`` (= ``euler``): x_s = cos(t−s)·x_t − sin(t−s)·σ_d·F, which keeps the predicted (x̂0, ẑ) pair fixed: it is
    Euler's method on the equivalent VE ODE dx̃/dσ = (x̃ − x̂0)/σ with x̃ = x/cos t, σ = σ_d·tan t. ``heun``: EDM's
    second-order correction on that VE ODE (slopes (x̃ − x̂0)/σ averaged; the first step from t = π/2, where
    σ = ∞, and the last one to t = 0 stay first order, as in EDM). Averaging the TrigFlow velocities themselves
    would not be second order: the velocity of a fixed (x̂0, ẑ) pair changes along the step. ``cfg_scale``
    s ≠ 1: F = F_u + s·(F_c − F_u), F_u at ``null_label``."""
    if solver not in ("heun", "ddim", "euler"):
        raise ValueError(f"sample: trigflow solver must be heun | ddim | euler, got {solver!r}")
    ts = [float(t) for t in ts]
    if len(ts) < 2 or any(b >= a for a, b in zip(ts, ts[1:])) or ts[-1] < 0 or ts[0] > math.pi / 2 + 1e-9:
        raise ValueError(f"sample: trigflow times must descend within [0, π/2] and be >= 2, got {ts}")
    sd = float(sigma_data)
    guided = cfg_scale != 1.0 and labels is not None
    if guided and null_label is None:
        raise ValueError("sample: cfg_scale != 1 needs null_label (the model's null class id)")

    from lct_fast.models.precond import classifier_free_guidance

    def F(x_in: torch.Tensor, tt: torch.Tensor, lab: Optional[torch.Tensor]) -> torch.Tensor:
        return net.F(x_in, tt, lab).to(x_in.dtype)

    def velocity(x: torch.Tensor, t: float) -> torch.Tensor:
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.float32)
        return sd * classifier_free_guidance(F, x / sd, tt, labels, cfg_scale if guided else 1.0,
                                             null_label if guided else 0)

    def denoised(x: torch.Tensor, t: float) -> torch.Tensor:  # x̂0 = cos t·x − sin t·σ_d·F
        return math.cos(t) * x - math.sin(t) * velocity(x, t)

    x = sd * z
    with torch.no_grad():
        for t, s in zip(ts, ts[1:]):
            d1 = denoised(x, t)
            z_hat = (x - math.cos(t) * d1) / math.sin(t)
            x_next = math.cos(s) * d1 + math.sin(s) * z_hat          # the DDIM step (exact for fixed x̂0, ẑ)
            if solver == "heun" and s > 0 and t < math.pi / 2 - 1e-9:
                sig_t, sig_s = sd * math.tan(t), sd * math.tan(s)
                xt_ve, xs_ve = x / math.cos(t), x_next / math.cos(s)
                slope1 = (xt_ve - d1) / sig_t
                slope2 = (xs_ve - denoised(x_next, s)) / sig_s
                x_next = math.cos(s) * (xt_ve + (sig_s - sig_t) * 0.5 * (slope1 + slope2))
            x = x_next
    return x


def _inner(net: nn.Module) -> nn.Module:
    """The network under the CFG wrapper (the ODE sampler guides F itself)."""
    return net.net if isinstance(net, _Guided) else net


class _Conditioned(nn.Module):
    """A guidance-conditioned student asked for one guidance scale at every call."""

    def __init__(self, net: nn.Module, scale: float):
        super().__init__()
        self.net, self.scale = net, float(scale)

    def forward(self, x, t, labels=None):
        return self.net(x, t, labels, guidance=self.scale)


class _Guided(nn.Module):
    """Classifier-free guidance around a preconditioned model: f_u + s·(f_c − f_u), f_u at the null class."""

    def __init__(self, net: nn.Module, scale: float, null_label: int):
        super().__init__()
        self.net, self.scale, self.null_label = net, float(scale), int(null_label)

    def forward(self, x, t, labels=None):
        from lct_fast.models.precond import classifier_free_guidance

        return classifier_free_guidance(self.net, x, t, labels, self.scale, self.null_label)


# ------------------------------------------------------------------------------------------ writing
def save_latents(path: str, x: Union[torch.Tensor, np.ndarray]) -> str:
    """Write latents as a plain float32 ``.npy`` (no pickles; loads with ``allow_pickle=False``)."""
    if not str(path).endswith(".npy"):
        raise ValueError(f"sample: latents path must end in .npy, got {path!r}")
    arr = x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float32)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}.npy"
    np.save(tmp, np.ascontiguousarray(arr), allow_pickle=False)
    os.replace(tmp, path)
    return path


def denormalize_latents(x: torch.Tensor, stats: Any, *, sigma_data: float = 0.5,
                        normalize: str = "channel") -> torch.Tensor:
    """Undo the data normalisation (SPEC §1: x0 = (latent − mean)/std·σ_d): latent = x0·std/σ_d + mean.

    The reader's own inverse (:meth:`lct_fast.data.LatentNormalizer.denormalize`), so both follow one rule
    (a zero std is treated as 1). ``stats``: a ``lct_fast.data.stats.Stats`` or the dataset folder / its
    ``stats.json``; ``normalize``: channel | element | none, as ``data.normalize``.
    """
    from lct_fast.data.reader import LatentNormalizer
    from lct_fast.data.stats import load_stats

    if isinstance(stats, (str, os.PathLike)):
        stats = load_stats(str(stats))
    need = tuple(stats.shape) if normalize == "element" else tuple(stats.shape[:1])
    if x.dim() != 4 or tuple(x.shape[1:1 + len(need)]) != need:
        raise ValueError(f"sample: latents of shape {tuple(x.shape)} do not match the stats' shape "
                         f"{tuple(stats.shape)} ({stats.path or 'stats'}) for normalize={normalize!r}")
    return LatentNormalizer(stats, normalize, sigma_data).denormalize(x)


def _load_vae(vae_path: str, device: Union[str, torch.device]):
    if not vae_path or not os.path.isdir(vae_path):
        raise FileNotFoundError(f"sample: VAE folder not found: {vae_path!r} (expected a local diffusers "
                                f"AutoencoderKL directory with config.json and weights)")
    try:
        from diffusers import AutoencoderKL
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("sample: decoding latents needs diffusers (pip install diffusers)") from e
    return AutoencoderKL.from_pretrained(vae_path, local_files_only=True).to(device).eval()


def decode_latents(latents: torch.Tensor, vae: Any, *, vae_scale: float = 1.0, vae_shift: float = 0.0,
                   batch_size: int = 16) -> np.ndarray:
    """Decode VAE-space latents (already denormalized) to uint8 images [N, H, W, 3]: the encoder stored
    (z − vae_shift)·vae_scale, so z = latent / vae_scale + vae_shift is decoded; the decoder's output in
    [−1, 1] is mapped to [0, 255] and rounded."""
    dev = next(vae.parameters()).device
    out = []
    with torch.no_grad():
        for s in range(0, latents.shape[0], batch_size):
            lat = latents[s:s + batch_size].to(dev, torch.float32) / vae_scale + vae_shift
            img = vae.decode(lat).sample.float()
            img = ((img.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
            out.append(img.permute(0, 2, 3, 1).cpu().numpy())
    return np.concatenate(out, axis=0)


def make_grid(images: np.ndarray, *, nrow: Optional[int] = None, padding: int = 2, pad_value: int = 0
              ) -> np.ndarray:
    """Tile uint8 images [N, H, W, 3] into one [R·(H+p)+p, K·(W+p)+p, 3] grid, ``nrow`` = K images per row
    (default ⌈√N⌉), row-major, with ``padding`` p pixels of ``pad_value`` around every image."""
    n, h, w, c = images.shape
    k = nrow or int(math.ceil(math.sqrt(n)))
    r = int(math.ceil(n / k))
    grid = np.full((r * (h + padding) + padding, k * (w + padding) + padding, c), pad_value, dtype=np.uint8)
    for i in range(n):
        y, x = padding + (i // k) * (h + padding), padding + (i % k) * (w + padding)
        grid[y:y + h, x:x + w] = images[i]
    return grid


def save_png(path: str, image: np.ndarray) -> str:
    """Write a uint8 [H, W, 3] array as PNG (Pillow)."""
    from PIL import Image

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(np.ascontiguousarray(image)).save(path, format="PNG")
    return path


def decode_and_save_grid(latents: torch.Tensor, vae_path: str, stats: Any, out_png: str, *,
                         sigma_data: float = 0.5, normalize: str = "channel", nrow: Optional[int] = None,
                         padding: int = 2, batch_size: int = 16,
                         device: Union[str, torch.device] = "cpu") -> np.ndarray:
    """Denormalize generated latents with the dataset ``stats`` (a ``Stats`` or the dataset folder; then
    / ``stats.vae_scale`` + ``stats.vae_shift``),
    decode with the local diffusers ``AutoencoderKL`` at ``vae_path`` and write a PNG grid to ``out_png``.
    Returns the grid as a uint8 array."""
    from lct_fast.data.stats import load_stats

    if isinstance(stats, (str, os.PathLike)):
        stats = load_stats(str(stats))
    vae_scale = 1.0 if stats.vae_scale is None else float(stats.vae_scale)
    vae_shift = 0.0 if stats.vae_shift is None else float(stats.vae_shift)
    vae = _load_vae(vae_path, device)
    images = decode_latents(denormalize_latents(latents, stats, sigma_data=sigma_data, normalize=normalize),
                            vae, vae_scale=vae_scale, vae_shift=vae_shift, batch_size=batch_size)
    grid = make_grid(images, nrow=nrow, padding=padding)
    save_png(out_png, grid)
    return grid


def latent_grid_image(x: torch.Tensor) -> np.ndarray:
    """A uint8 grid of latents: channels 0-2 as RGB, each scaled by the batch's own 1st-99th percentile, so a
    run without a VAE still shows structure and mode collapse at a glance."""
    rgb = x[:, :3].float()
    if rgb.shape[1] < 3:
        rgb = rgb[:, :1].expand(-1, 3, -1, -1)
    flat = rgb.transpose(0, 1).reshape(3, -1)
    lo, hi = flat.quantile(0.01, dim=1), flat.quantile(0.99, dim=1)
    img = ((rgb - lo[:, None, None]) / (hi - lo).clamp_min(1e-6)[:, None, None]).clamp(0, 1)
    img = (img * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    # Latent grids are tiny (8x8): upscale 4x with nearest neighbour so the PNG is readable.
    img = np.repeat(np.repeat(img, 4, axis=1), 4, axis=2)
    return make_grid(img)


def save_latent_grid(x: torch.Tensor, stem: str) -> None:
    """``stem.npy`` (the latents) and ``stem.png`` (:func:`latent_grid_image`)."""
    save_latents(stem + ".npy", x)
    save_png(stem + ".png", latent_grid_image(x))
