"""``report.png`` of a run directory: training curves, evaluation figures, samples beside real data.

Panels (each drawn when the run has what it needs):

1. loss over samples seen; 2. key method metrics (‖g‖, c, mean |TD|, the sCT tangent scales, clipping);
3. evaluation figures over samples seen (the headline metric per step count) with the real-data and
Gaussian-fit baselines as horizontal lines; 4. the latest sample grid (``eval/latest-1step.png``, else the
newest ``samples/*-1step.png``) beside a grid of real data; and, for latent-only runs, 5. histograms of the
standardised values of data and 1-step samples on a log scale (the tails are the latent CT paper's point,
Fig. 1) and 6. a 2-D projection of both onto the data's first two principal axes.

Reads only what the trainer wrote (``metrics.jsonl``, ``eval/``, ``samples/``); matplotlib, Agg backend.
"""
from __future__ import annotations

import glob
import json
import math
import os
from typing import Optional

import numpy as np

from .run_dir import RunDir

__all__ = ["read_metrics", "write_report"]

METHOD_KEYS = ("grad_norm", "c", "td_abs", "jvp_abs", "g_norm_mean", "dFdt_rms", "clip_frac", "ot_cost_ratio")


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


def _image(path: Optional[str]):
    if not path or not os.path.isfile(path):
        return None
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _real_grid(run_dir: str, n: int = 64) -> Optional[np.ndarray]:
    ref = os.path.join(RunDir(run_dir).eval, "reference-standardised.npy")
    if not os.path.isfile(ref):
        return None
    import torch

    from .sample import latent_grid_image

    return latent_grid_image(torch.as_tensor(np.load(ref, allow_pickle=False)[:n]))


def write_report(run_dir: str, out: Optional[str] = None) -> str:
    """Draw the report of ``run_dir`` into ``out`` (default ``<run_dir>/report.png``); returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = RunDir(run_dir)
    rows = read_metrics(run.metrics)
    if not rows:
        raise FileNotFoundError(f"{run.metrics}: no metrics to report")
    cfg = {}
    if os.path.isfile(run.config):
        with open(run.config) as f:
            cfg = json.load(f)
    eval_dir = run.eval
    ref = os.path.join(eval_dir, "reference-standardised.npy")
    sample = os.path.join(eval_dir, "latest-1step-standardised.npy")
    latent = os.path.isfile(ref) and os.path.isfile(sample)
    grid = os.path.join(eval_dir, "latest-1step.png")
    if not os.path.isfile(grid):
        grids = sorted(glob.glob(os.path.join(run.samples, "*-1step.png")))
        grid = grids[-1] if grids else None

    panels = ["loss", "method", "eval", "samples"] + (["hist", "proj"] if latent else [])
    cols = 3
    fig, axes = plt.subplots(math.ceil(len(panels) / cols), cols, figsize=(15, 4.6 * math.ceil(len(panels) / cols)))
    axes = np.atleast_1d(axes).reshape(-1)
    for ax in axes[len(panels):]:
        ax.axis("off")
    name = cfg.get("name", os.path.basename(os.path.abspath(run_dir)))
    method = cfg.get("method", {}).get("name", "?")
    fig.suptitle(f"{name} ({method}) — {run_dir}", fontsize=12)

    ax = axes[panels.index("loss")]
    x, y = _series(rows, "loss")
    ax.plot(x, y, color="C0")
    ax.set(title="loss", xlabel="samples seen", yscale="log" if len(y) and (y > 0).all() else "linear")

    ax = axes[panels.index("method")]
    for i, key in enumerate(METHOD_KEYS):
        x, y = _series(rows, key)
        if len(x):
            ax.plot(x, y, label=key, color=f"C{i}")
    ax.set(title="method metrics", xlabel="samples seen", yscale="log")
    if ax.lines:
        ax.legend(fontsize=8)

    ax = axes[panels.index("eval")]
    heads = sorted({k.split("/")[1] for r in rows for k in r if k.startswith("eval/") and k.count("/") == 2})
    metric = "mw1" if any(f"eval/{h}/mw1" in r for r in rows for h in heads) else "fid"
    for i, h in enumerate(heads):
        x, y = _series(rows, f"eval/{h}/{metric}")
        if len(x):
            ax.plot(x, y, "o-", label=f"{h}", color=f"C{i}")
    last = next((r for r in reversed(rows) if any(k.startswith("eval/") for k in r)), {})
    for base, style in (("gaussian", "--"), ("gaussian_class", "-."), ("real", ":")):
        v = next((last[k] for k in last if k.endswith(f"/{base}_{metric}")), None)
        if v is not None:
            ax.axhline(v, ls=style, color="k", label=f"{base} ({v:.3g})")
    ema = last.get("eval/ema", "")
    ax.set(title=f"eval: {metric} ({ema})" if heads else "eval: none (train.eval_interval = 0)",
           xlabel="samples seen")
    if ax.lines:
        ax.legend(fontsize=8)

    ax = axes[panels.index("samples")]
    img, real = _image(grid), _real_grid(run_dir)
    if img is not None and real is not None and real.shape[0] == img.shape[0]:
        gap = np.full((img.shape[0], 8, 3), 255, np.uint8)
        img = np.concatenate([img, gap, real], axis=1)
        ax.set_title("1-step samples | real data (latent channels 0-2)")
    else:
        ax.set_title("1-step samples" if img is not None else "no samples yet")
    if img is not None:
        ax.imshow(img, interpolation="nearest")
    ax.axis("off")

    if latent:
        ref_x = np.load(ref, allow_pickle=False)
        smp_x = np.load(sample, allow_pickle=False)
        r, s = ref_x.reshape(-1), smp_x.reshape(-1)
        ax = axes[panels.index("hist")]
        lim = max(np.abs(r).max(), np.abs(s[np.isfinite(s)]).max() if np.isfinite(s).any() else 1.0)
        bins = np.linspace(-lim, lim, 121)
        ax.hist(r, bins=bins, histtype="step", color="k", label="data", density=True)
        ax.hist(s[np.isfinite(s)], bins=bins, histtype="step", color="C3", label="1-step samples", density=True)
        ax.set(title="standardised latent values", yscale="log", xlabel="value (data std units)")
        ax.legend(fontsize=8)

        ax = axes[panels.index("proj")]
        rr, ss = ref_x.reshape(len(ref_x), -1), smp_x.reshape(len(smp_x), -1)
        mu = rr.mean(0)
        _, _, vt = np.linalg.svd(rr - mu, full_matrices=False)
        pr, ps = (rr - mu) @ vt[:2].T, (ss - mu) @ vt[:2].T
        ax.scatter(pr[:, 0], pr[:, 1], s=3, alpha=0.4, color="k", label="data")
        ax.scatter(ps[:, 0], ps[:, 1], s=3, alpha=0.4, color="C3", label="1-step samples")
        ax.set(title="projection on the data's first two principal axes", xlabel="PC 1", ylabel="PC 2")
        ax.legend(fontsize=8, markerscale=4)

    out = out or run.report
    fig.tight_layout()
    tmp = f"{out}.tmp{os.getpid()}.png"
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    os.replace(tmp, out)
    return out
