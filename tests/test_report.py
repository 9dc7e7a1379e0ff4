"""The run report and the figure it is built around: the denoising probe.

The probe is checked against oracles (a network that returns x0 exactly, one that returns zeros) in both
parametrisations; the report is drawn for a run of every registered method from the same kind of files the
trainer writes, and must have the same nine panels, labelled axes and readable ticks for each."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from lct_fast.config import load_config, save_config
from lct_fast.methods.probe import PROBE_SIGMAS, denoising_probe, probe_key
from lct_fast.registry import method_specs
from lct_fast.report import PANELS, draw_report, write_report
from lct_fast.sample import latent_grid_image

TINY = {"ict": "tiny", "sct": "tiny_sct", "trigflow": "tiny_trigflow", "scd": "tiny_scd", "meanflow": "tiny_meanflow"}


class _Oracle(torch.nn.Module):
    """Returns x0 when called exactly as the spec's ``at_sigma`` says a network is called on x0 + σz (checked);
    returns zeros when ``zero``."""

    def __init__(self, spec, x0, z, sd, zero=False):
        super().__init__()
        self.spec, self.x0, self.z, self.sd, self.zero, self.calls = spec, x0, z, sd, zero, []

    def forward(self, x, level, labels=None):
        # recover σ from the level (the probe's σ whose at_sigma gives it), then check the input is scale·(x0 + σz)
        [sigma] = [k * self.sd for k in PROBE_SIGMAS if self.spec.at_sigma(k * self.sd, self.sd)[1] == pytest.approx(level)]
        scale, lv = self.spec.at_sigma(sigma, self.sd)
        torch.testing.assert_close(x, scale * (self.x0 + sigma * self.z))
        self.calls.append(sigma)
        return torch.zeros_like(self.x0) if self.zero else self.x0.clone()


@pytest.mark.parametrize("spec", method_specs(), ids=lambda s: s.name)
def test_probe_oracles(spec):
    """A perfect denoiser scores 0 at every level; predicting 0 scores mean(x0²)/var(x0) (independent formula)."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(16, 4, 8, 8, generator=g) * 0.5 + 0.3
    z = torch.randn(16, 4, 8, 8, generator=g)
    cfg = load_config(TINY[spec.name]).method
    sd = cfg.sigma_data
    net = _Oracle(spec, x0, z, sd)
    out = denoising_probe(net, cfg, x0, z)
    assert set(out) == {probe_key(k) for k in PROBE_SIGMAS}
    assert all(v == 0.0 for v in out.values())
    assert net.calls == pytest.approx([k * sd for k in PROBE_SIGMAS])
    zero = denoising_probe(_Oracle(spec, x0, z, sd, zero=True), cfg, x0, z)
    expect = float(x0.square().mean() / (x0 - x0.mean(0)).square().mean())
    assert all(v == pytest.approx(expect, rel=1e-5) for v in zero.values())


def test_latent_grid_on_the_data_range_shows_collapse():
    """On the data's range a collapsed batch (all near the mean) is flat grey; scaled to its own range it would
    look like full-contrast noise, which is what made collapsed samples unreadable."""
    g = torch.Generator().manual_seed(1)
    collapsed = 0.01 * torch.randn(16, 4, 8, 8, generator=g)
    own = latent_grid_image(collapsed)
    on_data = latent_grid_image(collapsed, lo=torch.full((3,), -1.0), hi=torch.full((3,), 1.0))
    inner = lambda im: im[2:34, 2:34]  # the first tile, inside the grid's padding  # noqa: E731
    assert inner(own).max() - inner(own).min() > 150
    assert inner(on_data).max() - inner(on_data).min() < 10
    assert abs(float(inner(on_data).mean()) - 127.5) < 5


def _fake_run(tmp_path, method: str, *, samples: bool, evaluated: bool) -> str:
    """A run directory with the files the trainer writes: config.json, metrics.jsonl (log and eval rows) and,
    optionally, a 1-step sample file."""
    run = tmp_path / method
    (run / "samples").mkdir(parents=True)
    cfg = load_config(TINY[method])
    save_config(cfg, str(run / "config.json"))
    rng = np.random.default_rng(0)
    rows = []
    for i in range(1, 11):
        s = i * 32000  # up to 320k: unformatted ticks ("320000") would be too long
        row = {"samples": s, "loss": (-4.0 - 0.1 * i) if method != "ict" else 10.0 * 1.5 ** i,
               "grad_norm": 5.0 * i, "clip_frac": 1.0, "lr": 1e-3, "sample_std": 0.3 + 0.02 * i, "data_std": 0.5}
        row.update({probe_key(k): 0.5 / i * (1 + k) for k in PROBE_SIGMAS})
        if evaluated and i % 5 == 0:
            row.update({"eval/ema": "ema_0.99", "eval/n": 2000, "eval/1step/mw1": 0.3 / i, "eval/2step/mw1": 0.28 / i,
                        "eval/1step/gaussian_mw1": 0.15, "eval/1step/gaussian_class_mw1": 0.12,
                        "eval/1step/real_mw1": 0.04})
        rows.append(row)
    with open(run / "metrics.jsonl", "w") as f:
        f.write("\n".join(json.dumps(r) for r in rows) + "\n")
    if samples:  # at the method's step count (a diffusion model's ODE steps)
        k = min(cfg.train.eval.steps)
        np.save(run / "samples" / f"samples-000000032000-{k}step.npy",
                (0.5 * rng.standard_normal((16, 4, 8, 8))).astype(np.float32))
    return str(run)


@pytest.mark.parametrize("method", sorted(TINY))
def test_report_same_panels_for_every_method(tmp_path, method):
    import matplotlib.pyplot as plt

    assert {s.name for s in method_specs()} == set(TINY), "a new method needs its tiny preset here"
    fig = draw_report(_fake_run(tmp_path, method, samples=True, evaluated=True))
    try:
        axes = fig.axes
        # titles in order; the evaluation and sample panels append what they show
        assert len(axes) == 9
        assert all(p.split(" |")[0] in a.get_title() for a, p in zip(axes, PANELS)), \
            [a.get_title() for a in axes]
        k = min(load_config(TINY[method]).train.eval.steps)  # samples at the method's own step count
        assert axes[6].get_title().startswith(f"{k}-step samples (samples-000000032000-{k}step.npy)")
        for ax in axes[:6]:  # curves: a y label, x in samples seen, at most 6 ticks written in k
            assert ax.get_ylabel(), ax.get_title()
            assert ax.get_xlabel() == "samples seen", ax.get_title()
            fig.canvas.draw()
            lo, hi = sorted(ax.get_xlim())
            labels = [t.get_text() for t, v in zip(ax.get_xticklabels(), ax.get_xticks())
                      if t.get_text() and lo <= v <= hi]
            assert 2 <= len(labels) <= 6 and all(len(t) <= 5 for t in labels), (ax.get_title(), labels)
        for ax in (axes[7], axes[8]):
            assert ax.get_ylabel() and ax.get_xlabel()
        texts = " ".join(t.get_text() for t in axes[0].texts)
        spec = next(s for s in method_specs() if s.name == method)
        assert spec.loss_note and spec.loss_note[:40] in texts.replace("\n", " ")
        # the evaluation panel carries its baselines: two curves and three horizontal lines
        assert len(axes[5].lines) == 5
    finally:
        plt.close(fig)


def test_report_without_samples_or_evaluation_says_what_is_missing(tmp_path):
    import matplotlib.pyplot as plt

    run = _fake_run(tmp_path, "sct", samples=False, evaluated=False)
    fig = draw_report(run)
    try:
        said = {ax.get_title(): " ".join(t.get_text().replace("\n", " ") for t in ax.texts) for ax in fig.axes}
        assert "train.eval_interval" in said["evaluation"]
        assert "train.sample_interval" in said["samples | real data"]
    finally:
        plt.close(fig)
    out = write_report(run)
    assert os.path.getsize(out) > 20_000 and not [p for p in os.listdir(run) if ".tmp" in p]


def test_every_tiny_preset_ends_with_a_quality_line():
    """Each tiny preset evaluates during training (so its run ends with the quality line and a filled
    evaluation panel), and at its last sample."""
    for name in TINY.values():
        t = load_config(name).train
        assert t.eval_interval > 0 and t.total_samples % t.eval_interval == 0, name
