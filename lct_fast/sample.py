"""Seeded, batched sampling with any method's sampler, latent saving and VAE-decoded PNG grids.

Each method's sampler lives beside its loss and is found through the registry (``MethodSpec.sampler``):

iCT (SPEC §2, VE process):   x = f_θ(σ_max·z, σ_max); then for each further level σ_i
                             x = f_θ(x + √(σ_i² − σ_min²)·z_i, σ_i)   (2 steps: σ_1 = σ_mid).
sCT / sCD (SPEC §3):         x = f_θ(σ_d·z, π/2); then for each further time t_i
                             x = f_θ(cos t_i·x + sin t_i·σ_d·z_i, t_i)  (2 steps: t_1 = t_mid).
TrigFlow diffusion:          the probability-flow ODE from t = π/2 to 0 (Heun or DDIM).

``net`` is the preconditioned model (``VEPrecond`` / ``TrigFlowPrecond``): ``net(x, σ_or_t, labels)``.
Noise is standard normal and comes from explicit generators. :func:`generate` draws sample i's noise from
a generator of its own fixed chunk of NOISE_CHUNK samples, seeded from ``(seed, chunk)``, so a sample does
not depend on the batch size or on how many samples are drawn in total.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn

from .methods import get_method
from .methods.ict import ict_sample, ict_sigmas
from .methods.sct import sct_sample, sct_times
from .methods.trigflow import trigflow_ode, trigflow_times

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
    "decode_images",
    "save_latent_grid",
    "latent_grid_image",
]


@dataclass
class SampleResult:
    """Generated latents [n, C, H, W] (float32, CPU, normalized space) and their labels [n] (or None)."""

    latents: torch.Tensor
    labels: Optional[torch.Tensor]


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
             cfg_scale: Optional[float] = None, guidance: Optional[float] = None,
             progress: Any = None) -> SampleResult:
    """Generate ``n`` latents of ``shape`` (C, H, W) in batches with the sampler of ``method_cfg.name``.

    ``method_cfg``: a ``MethodConfig``; the method's sampler reads its own settings (iCT: σ levels and σ_mid;
    sCT / sCD: t_mid; TrigFlow: the ODE solver and time spacing). ``steps``: 1, 2 or k sampling steps of a
    consistency model (:func:`ict_sigmas` / :func:`sct_times`), ODE solver steps of a diffusion model
    (:func:`trigflow_times`, :func:`trigflow_ode`); explicit ``sigmas`` / ``ts`` override the schedule.
    Deterministic for a ``seed`` and independent of ``batch_size``. Returns latents on the CPU.

    ``start`` / ``count``: return only samples ``start … start+count−1`` of the ``n``-sample draw (one rank's
    share in distributed evaluation): they equal those rows of the whole draw. ``cfg_scale`` s ≠ 1:
    classifier-free guidance of every step's prediction, f_u + s·(f_c − f_u) with f_u the null-class
    prediction (needs a class-conditional model trained with label dropout); None = the method's default
    (a diffusion model: ``trigflow.guidance``; else 1). ``guidance``: the scale a guidance-conditioned
    sCD student (``scd.guidance_conditioned``) is asked for, one network evaluation per step; None =
    ``scd.guidance``. ``progress``: a :class:`lct_fast.progress.Progress` told of every batch.
    """
    if n < 1 or batch_size < 1:
        raise ValueError(f"sample: n and batch_size must be >= 1, got n={n}, batch_size={batch_size}")
    count = n - start if count is None else count
    if start < 0 or count < 0 or start + count > n:
        raise ValueError(f"sample: need 0 <= start and start + count <= n, got start={start}, count={count}, n={n}")
    spec = get_method(getattr(method_cfg, "name", None))
    if cfg_scale is None:
        cfg_scale = spec.default_cfg_scale(method_cfg)
    conditions = {name: c.sample_at for name, c in spec.conditions(method_cfg).items()}
    if guidance is not None and "guidance" not in conditions:
        raise ValueError(f"sample: guidance={guidance} is for a guidance-conditioned sCD student "
                         "(method.scd.guidance_conditioned=true); use cfg_scale for classifier-free guidance")
    if guidance is not None:
        conditions["guidance"] = float(guidance)
    if cfg_scale != 1.0 and num_classes <= 0:
        raise ValueError(f"sample: cfg_scale={cfg_scale} needs a class-conditional model (num_classes > 0)")
    schedule = {"sigmas": sigmas, "ts": ts}[spec.schedule_arg]
    sampler = spec.sampler(method_cfg, steps, schedule=schedule, cfg_scale=float(cfg_scale), null_label=num_classes,
                           conditions=conditions)
    shape = tuple(int(s) for s in shape)
    dev = torch.device(device) if device is not None else _module_device(net)
    all_labels = sample_labels(n, num_classes, seed, labels)
    out = torch.empty(count, *shape)
    cache: dict = {}
    for b0 in range(start, start + count, batch_size):
        idx = list(range(b0, min(b0 + batch_size, start + count)))
        lab = None if all_labels is None else all_labels[idx[0]:idx[-1] + 1].to(dev)
        noise = sample_noise(seed, idx, sampler.draws, shape, cache=cache).to(dev)
        out[idx[0] - start:idx[-1] + 1 - start] = sampler.run(net, noise, lab).float().cpu()
        if progress is not None:
            progress.update(len(idx))
    return SampleResult(latents=out, labels=None if all_labels is None else all_labels[start:start + count])


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
    # low_cpu_mem_usage=False: the default needs accelerate and, without it, warns on every load
    return AutoencoderKL.from_pretrained(vae_path, local_files_only=True, low_cpu_mem_usage=False).to(device).eval()


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


def decode_images(latents: torch.Tensor, vae_path: str, stats: Any, *, sigma_data: float = 0.5,
                  normalize: str = "channel", batch_size: int = 16,
                  device: Union[str, torch.device] = "cpu") -> np.ndarray:
    """Denormalize generated latents with the dataset ``stats`` (a ``Stats`` or the dataset folder; then
    / ``stats.vae_scale`` + ``stats.vae_shift``) and decode them with the local diffusers ``AutoencoderKL`` at
    ``vae_path``: uint8 images [N, H, W, 3]."""
    from lct_fast.data.stats import load_stats

    if isinstance(stats, (str, os.PathLike)):
        stats = load_stats(str(stats))
    vae_scale = 1.0 if stats.vae_scale is None else float(stats.vae_scale)
    vae_shift = 0.0 if stats.vae_shift is None else float(stats.vae_shift)
    vae = _load_vae(vae_path, device)
    return decode_latents(denormalize_latents(latents, stats, sigma_data=sigma_data, normalize=normalize),
                          vae, vae_scale=vae_scale, vae_shift=vae_shift, batch_size=batch_size)


def decode_and_save_grid(latents: torch.Tensor, vae_path: str, stats: Any, out_png: str, *,
                         sigma_data: float = 0.5, normalize: str = "channel", nrow: Optional[int] = None,
                         padding: int = 2, batch_size: int = 16,
                         device: Union[str, torch.device] = "cpu") -> np.ndarray:
    """:func:`decode_images`, written as a PNG grid to ``out_png``; returns the grid as a uint8 array."""
    images = decode_images(latents, vae_path, stats, sigma_data=sigma_data, normalize=normalize,
                           batch_size=batch_size, device=device)
    grid = make_grid(images, nrow=nrow, padding=padding)
    save_png(out_png, grid)
    return grid


def latent_grid_image(x: torch.Tensor, lo: Optional[torch.Tensor] = None,
                      hi: Optional[torch.Tensor] = None) -> np.ndarray:
    """A uint8 grid of latents: channels 0-2 as RGB, each mapped from [lo, hi] (per channel) to [0, 255]. The
    default range is the batch's own 1st-99th percentile; pass the real data's range to compare grids (a
    collapsed model then looks flat instead of being stretched to full contrast)."""
    rgb = x[:, :3].float()
    if rgb.shape[1] < 3:
        rgb = rgb[:, :1].expand(-1, 3, -1, -1)
    flat = rgb.transpose(0, 1).reshape(3, -1)
    if lo is None or hi is None:
        lo, hi = flat.quantile(0.01, dim=1), flat.quantile(0.99, dim=1)
    lo, hi = (torch.as_tensor(v, dtype=torch.float32).reshape(-1).expand(3) for v in (lo, hi))
    img = ((rgb - lo[:, None, None]) / (hi - lo).clamp_min(1e-6)[:, None, None]).clamp(0, 1)
    img = (img * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    # Latent grids are tiny (8x8): upscale 4x with nearest neighbour so the PNG is readable.
    img = np.repeat(np.repeat(img, 4, axis=1), 4, axis=2)
    return make_grid(img)


def save_latent_grid(x: torch.Tensor, stem: str) -> None:
    """``stem.npy`` (the latents) and ``stem.png`` (:func:`latent_grid_image`)."""
    save_latents(stem + ".npy", x)
    save_png(stem + ".png", latent_grid_image(x))
