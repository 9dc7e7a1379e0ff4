"""``report.png`` of a run directory: the same nine panels for every method, one figure per axis.

Row 1, training: the raw loss (with the method's note on why it moves: ``MethodSpec.loss_note``); the denoising
probe, the figure that is comparable over training (:mod:`lct_fast.methods.probe`); the gradient norm before
clipping against the clipping threshold. Row 2: the learning rate; the spread of 1-step samples against the
data's (a collapse or a blow-up shows here first); the evaluation figure per step count with the real-data and
Gaussian-fit baselines. Row 3: samples at the method's step count (the fewest of ``train.eval.steps``: 1 for a
consistency model, the ODE's steps for a diffusion model) beside real data -- decoded to images when the VAE
that ``stats.json`` names (or ``vae=``) is a local folder, else latent channels 0-2 on the real data's own
range (so a collapsed model looks grey, not like saturated noise); histograms of the values of both on a log
scale (the tails are the latent CT paper's point, Fig. 1); both projected on the data's first two principal
axes.

A panel without its data says what would fill it. Reads only what the run wrote (``config.json``,
``metrics.jsonl``, ``eval/``, ``samples/``) and the run's data set; matplotlib, Agg backend.
"""
from __future__ import annotations

import glob
import json
import os
import textwrap
from typing import Any, Optional

import numpy as np

from .run_dir import RunDir

__all__ = ["read_metrics", "write_report", "draw_report", "PANELS"]

PANELS = ("training loss (raw)", "denoising probe (comparable over training)", "gradient norm",
          "learning rate", "1-step sample spread", "evaluation",
          "samples | real data", "value histogram", "principal-axis projection")
"""Titles of the report's panels, in reading order (every report has all nine)."""


def read_metrics(path: str) -> list[dict]:
    """Rows of a metrics.jsonl (a truncated last line, from a crash mid-write, is ignored)."""
    rows = []
    if not os.path.isfile(path):
        return rows
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def _series(rows: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    pts = [(r["samples"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and "samples" in r]
    if not pts:
        return np.zeros(0), np.zeros(0)
    a = np.asarray(pts, dtype=np.float64)
    return a[:, 0], a[:, 1]


def _samples_axis(ax) -> None:
    """x = samples seen, at most five ticks in k / M so long labels never collide."""
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    def fmt(v, _):
        a = abs(v)
        return f"{v / 1e6:g}M" if a >= 1e6 else f"{v / 1e3:g}k" if a >= 1e3 else f"{v:g}"

    ax.xaxis.set_major_locator(MaxNLocator(5))
    ax.xaxis.set_major_formatter(FuncFormatter(fmt))
    ax.set_xlabel("samples seen")


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, "\n".join(textwrap.wrap(text, 42)), ha="center", va="center", transform=ax.transAxes,
            fontsize=9, color="0.35")
    ax.set_xticks([])
    ax.set_yticks([])


def _note(ax, text: str) -> None:
    """A wrapped line of explanation under an axis."""
    ax.text(0.0, -0.3, "\n".join(textwrap.wrap(text, 70)), transform=ax.transAxes, fontsize=7, va="top",
            color="0.3")


class _RunData:
    """What the sample panels need: the run's config, stats and real latents, its newest samples (model
    space: normalised, scaled to σ_d), and the VAE when one is available locally."""

    def __init__(self, run: RunDir, vae: Optional[str]):
        from .config import load_config
        from .data import load_stats
        from .data.loader import resolve_dataset

        self.cfg = load_config(run.config) if os.path.isfile(run.config) else None
        self.samples = self.real = self.stats = None
        self.steps = 1
        self.vae, self.why_not_decoded = None, "no config.json"
        if self.cfg is None:
            return
        self.sd = float(self.cfg.method.sigma_data)
        # The method's own step count: the fewest the run evaluates at (1 for a consistency model, the ODE's
        # steps for a diffusion model); sample files are samples-<12-digit samples seen>-<k>step.npy.
        self.steps = min(int(k) for k in self.cfg.train.eval.steps)
        files = sorted(glob.glob(os.path.join(run.samples, f"*-{self.steps}step.npy")))
        files = files or sorted(glob.glob(os.path.join(run.eval, f"latest-{self.steps}step.npy")))
        if files:
            self.samples = np.load(files[-1], allow_pickle=False).astype(np.float32)
            self.samples_file = files[-1]
        try:
            path = resolve_dataset(self.cfg.data)
            self.stats = load_stats(path)
            self.real = self._real(path, 256)
        except (OSError, ValueError) as e:
            self.why_not_decoded = f"data set not readable ({e})"
            return
        vae = vae or self.cfg.train.eval.vae or self.stats.vae or ""
        if vae and os.path.isdir(vae):
            self.vae = vae
        elif vae.startswith("synthetic"):
            self.why_not_decoded = "the embedded synthetic data set has no VAE"
        else:
            self.why_not_decoded = (f"VAE {vae!r} not found locally (pass --vae)" if vae
                                    else "the data set names no VAE")

    def _real(self, path: str, n: int) -> np.ndarray:
        """n real latents of a seeded subset, normalised as training normalises them."""
        from .data.reader import LatentNormalizer, read_all_latents

        lat, _, _ = read_all_latents(path, subset=n, seed=0, stats=self.stats)
        norm = LatentNormalizer(self.stats, self.cfg.data.normalize, self.sd)
        return norm.normalize_np(lat).astype(np.float32)

    def grid(self, x: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        import torch

        from .sample import decode_images, latent_grid_image, make_grid

        if self.vae:
            return make_grid(decode_images(torch.as_tensor(x), self.vae, self.stats, sigma_data=self.sd,
                                           normalize=self.cfg.data.normalize))
        return latent_grid_image(torch.as_tensor(x), lo=torch.as_tensor(lo), hi=torch.as_tensor(hi))


def write_report(run_dir: str, out: Optional[str] = None, *, vae: Optional[str] = None) -> str:
    """Draw the report of ``run_dir`` into ``out`` (default ``<run_dir>/report.png``); returns the path.
    ``vae``: a local diffusers AutoencoderKL folder to decode samples with (default: the one ``stats.json``
    names, when it exists here). Written whole or not at all (a temporary file, then renamed)."""
    import matplotlib.pyplot as plt

    fig = draw_report(run_dir, vae=vae)
    out = out or RunDir(run_dir).report
    tmp = f"{out}.tmp{os.getpid()}.png"
    try:
        fig.savefig(tmp, dpi=72)
    finally:
        plt.close(fig)
    os.replace(tmp, out)
    return out


def draw_report(run_dir: str, *, vae: Optional[str] = None):
    """The report's matplotlib figure (nine axes, titled :data:`PANELS`); :func:`write_report` saves it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .methods.probe import PROBE_SIGMAS, probe_key
    from .registry import get_method

    run = RunDir(run_dir)
    rows = read_metrics(run.metrics)
    if not rows:
        raise FileNotFoundError(f"{run.metrics}: no metrics to report")
    data = _RunData(run, vae)
    cfg: Any = data.cfg
    method = cfg.method.name if cfg is not None else "?"
    train_rows = [r for r in rows if "loss" in r]

    fig, axes = plt.subplots(3, 3, figsize=(16, 14.5))
    ax_of = dict(zip(PANELS, axes.reshape(-1)))
    name = cfg.name if cfg is not None else os.path.basename(os.path.abspath(run_dir))
    fig.suptitle(f"{name} ({method}) -- {run_dir}", fontsize=12)
    for title, ax in ax_of.items():
        ax.set_title(title, fontsize=10)

    # Row 1: training.
    ax = ax_of["training loss (raw)"]
    x, y = _series(train_rows, "loss")
    if len(x):
        ax.plot(x, y, color="C0")
        if (y > 0).all():
            ax.set_yscale("log")
        else:
            ax.axhline(0.0, color="0.6", lw=0.8)
        ax.set_ylabel("loss (window mean)")
        _samples_axis(ax)
        try:
            note = get_method(method).loss_note
        except ValueError:
            note = ""
        if note:
            _note(ax, "Not comparable over training: " + note + ". Compare the probe (next panel) instead.")
    else:
        _empty(ax, "no training rows in metrics.jsonl")

    ax = ax_of["denoising probe (comparable over training)"]
    for i, k in enumerate(PROBE_SIGMAS):
        x, y = _series(train_rows, probe_key(k))
        if len(x):
            ax.plot(x, y, "o-", ms=2, color=f"C{i}", label=f"σ = {k:g}·σ_d")
    if ax.lines:
        ax.axhline(1.0, ls=":", color="k", label="predicting the mean")
        ax.set(yscale="log", ylabel="error of x̂0 / data variance")
        ax.legend(fontsize=8)
        _samples_axis(ax)
        _note(ax, "Error of the network's clean estimate on a fixed batch with fixed noise (lct_fast.methods."
                  "probe): the same figure at every step and for every method. At 10·σ_d a one-step model draws a "
                  "sample, not the mean, so there it settles near 2.")
    else:
        _empty(ax, "no probe figures (a run from before the probe existed, or train.log_interval = 0)")

    ax = ax_of["gradient norm"]
    x, y = _series(train_rows, "grad_norm")
    if len(x):
        ax.plot(x, y, color="C0", label="before clipping")
        clip = cfg.train.grad_clip if cfg is not None else 0
        if clip:
            ax.axhline(clip, ls="--", color="C3", label=f"train.grad_clip = {clip:g}")
        ax.set(yscale="log", ylabel="‖∇θ loss‖")
        _samples_axis(ax)
        _, cf = _series(train_rows, "clip_frac")
        if len(cf):
            clipped = f"steps clipped: {100 * cf.mean():.0f} % overall, {100 * cf[-1]:.0f} % in the last window"
            ax.legend(fontsize=8, loc="best", title=clipped, title_fontsize=8)
    else:
        _empty(ax, "no gradient norms logged")

    # Row 2: schedule, sample spread, evaluation.
    ax = ax_of["learning rate"]
    x, y = _series(train_rows, "lr")
    if len(x):
        ax.plot(x, y, color="C2")
        ax.set_ylabel("learning rate")
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        _samples_axis(ax)
    else:
        _empty(ax, "no learning rate logged")

    ax = ax_of["1-step sample spread"]
    x, y = _series(train_rows, "sample_std")
    xd, yd = _series(train_rows, "data_std")
    if len(x):
        ax.plot(x, y, color="C3", label="1-step samples (live network)")
        if len(xd):
            ax.plot(xd, yd, color="k", ls="--", label="data (same batch)")
        ax.set(yscale="log", ylabel="standard deviation (normalised latents)")
        ax.legend(fontsize=8)
        _samples_axis(ax)
    else:
        _empty(ax, "no sample diagnostics logged")

    ax = ax_of["evaluation"]
    heads = sorted({k.split("/")[1] for r in rows for k in r if k.startswith("eval/") and k.count("/") == 2},
                   key=lambda h: int("".join(c for c in h if c.isdigit()) or 0))
    metric = "mw1" if any(f"eval/{h}/mw1" in r for r in rows for h in heads) else "fid"
    for i, h in enumerate(heads):
        x, y = _series(rows, f"eval/{h}/{metric}")
        if len(x):
            ax.plot(x, y, "o-", label=f"{h.replace('step', ' step')}", color=f"C{i}")
    last = next((r for r in reversed(rows) if any(k.startswith("eval/") for k in r)), {})
    for base, style, what in (("gaussian", "--", "Gaussian fit"), ("gaussian_class", "-.", "per-class Gaussian"),
                              ("real", ":", "second real set")):
        v = next((last[k] for k in last if k.endswith(f"/{base}_{metric}")), None)
        if v is not None:
            ax.axhline(v, ls=style, color="k", label=f"{what} ({v:.3g})")
    if ax.lines:
        label = {"mw1": "marginal W1 (lower is better)", "fid": "FID (lower is better)"}[metric]
        ax.set(ylabel=label)
        ax.set_title(f"evaluation: {last.get('eval/ema', '')}, n = {last.get('eval/n', '?')}", fontsize=10)
        ax.legend(fontsize=8)
        _samples_axis(ax)
    else:
        _empty(ax, "not evaluated: set train.eval_interval (samples) to evaluate during training")

    # Row 3: samples against data.
    ax = ax_of["samples | real data"]
    k_label = f"{data.steps}-step samples"
    smp, real = data.samples, data.real
    if smp is not None and real is not None:
        n = min(len(smp), 16)
        channels = real[:, :3].transpose(1, 0, 2, 3).reshape(min(3, real.shape[1]), -1)
        lo, hi = np.quantile(channels, 0.01, axis=1), np.quantile(channels, 0.99, axis=1)
        a, b = data.grid(smp[:n], lo, hi), data.grid(real[:n], lo, hi)
        h = max(a.shape[0], b.shape[0])
        pad = [np.pad(g, ((0, h - g.shape[0]), (0, 0), (0, 0)), constant_values=255) for g in (a, b)]
        img = np.concatenate([pad[0], np.full((h, 12, 3), 255, np.uint8), pad[1]], axis=1)
        ax.imshow(img, interpolation="nearest")
        what = "decoded with " + os.path.basename(os.path.normpath(data.vae)) if data.vae else \
            f"latent channels 0-2 on the data's 1-99 % range; not decoded: {data.why_not_decoded}"
        ax.set_title(f"{k_label} ({os.path.basename(data.samples_file)}) | real data", fontsize=10)
        _note(ax, what)
        ax.set_xticks([])
        ax.set_yticks([])
    else:
        _empty(ax, f"no {k_label} yet (train.sample_interval)" if smp is None else
               f"real data not readable: {data.why_not_decoded}")

    std_ref = os.path.join(run.eval, "reference-standardised.npy")
    std_smp = os.path.join(run.eval, f"latest-{data.steps}step-standardised.npy")
    if os.path.isfile(std_ref) and os.path.isfile(std_smp):
        ref_x, smp_x, src = (np.load(std_ref, allow_pickle=False), np.load(std_smp, allow_pickle=False),
                             f"the last evaluation's {last.get('eval/n', '')} samples")
    elif smp is not None and real is not None:
        ref_x, smp_x, src = real / data.sd, smp / data.sd, f"{len(smp)} samples of the newest grid"
    else:
        ref_x = smp_x = None
    for title in ("value histogram", "principal-axis projection"):
        if ref_x is None:
            _empty(ax_of[title], "needs samples and readable real data")
    if ref_x is not None:
        r, s = ref_x.reshape(-1), smp_x.reshape(-1)
        fin = s[np.isfinite(s)]
        ax = ax_of["value histogram"]
        lim = max(np.abs(r).max(), np.abs(fin).max() if len(fin) else 1.0)
        bins = np.linspace(-lim, lim, 121)
        ax.hist(r, bins=bins, histtype="step", color="k", label="data", density=True)
        ax.hist(fin, bins=bins, histtype="step", color="C3", label=k_label, density=True)
        ax.set(yscale="log", xlabel="latent value (data std units)", ylabel="density")
        ax.legend(fontsize=8, title=src, title_fontsize=7)

        ax = ax_of["principal-axis projection"]
        rr, ss = ref_x.reshape(len(ref_x), -1), smp_x.reshape(len(smp_x), -1)
        mu = rr.mean(0)
        _, _, vt = np.linalg.svd(rr - mu, full_matrices=False)
        pr, ps = (rr - mu) @ vt[:2].T, (ss - mu) @ vt[:2].T
        ax.scatter(pr[:, 0], pr[:, 1], s=3, alpha=0.4, color="k", label="data")
        ax.scatter(ps[:, 0], ps[:, 1], s=3, alpha=0.6, color="C3", label=k_label)
        ax.set(xlabel="PC 1 of the data", ylabel="PC 2 of the data")
        ax.legend(fontsize=8, markerscale=4)

    fig.tight_layout(rect=(0, 0, 1, 0.97), h_pad=4.0)
    return fig
