"""Figures of the quality benchmark: sample sheets beside real patches, and training curves.

matplotlib is imported lazily (the ``[dev]`` extra has it); every function writes one PNG and returns its path.
"""
from __future__ import annotations

import math
import os
from typing import Mapping, Sequence

import numpy as np

__all__ = ["sample_sheet", "training_curves"]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def sample_sheet(panels: Mapping[str, np.ndarray], path: str, *, per_panel: int = 64, cols: int = 4) -> str:
    """One labelled grid of uint8 images [N, H, W, 3] per entry of ``panels`` (e.g. real test patches first,
    then each model's samples), ``cols`` panels per figure row."""
    from lct_fast.sample import make_grid

    plt = _plt()
    names = list(panels)
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.5 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, name in zip(axes.flat, names):
        imgs = np.asarray(panels[name])[:per_panel]
        ax.imshow(make_grid(imgs, nrow=int(math.ceil(math.sqrt(len(imgs)))), padding=1))
        ax.set_title(name, fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def training_curves(runs: Mapping[str, Sequence[dict]], keys: Sequence[str], path: str, *,
                    log_keys: Sequence[str] = ()) -> str:
    """One panel per metric in ``keys``: its value against samples seen for every run (``metrics.jsonl`` rows)
    that logged it; keys in ``log_keys`` on a log scale."""
    plt = _plt()
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.flat[len(keys):]:
        ax.axis("off")
    for ax, key in zip(axes.flat, keys):
        for name, rows_ in runs.items():
            pts = [(r["samples"], r[key]) for r in rows_ if isinstance(r.get(key), (int, float))
                   and math.isfinite(r[key])]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, label=name, lw=1.2)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("samples seen", fontsize=8)
        if key in log_keys:
            ax.set_yscale("symlog", linthresh=1e-3)
        ax.tick_params(labelsize=7)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
