"""Guards that catch divergence, measured on the real training path (each test can fail).

* sCT with the default ``tiny_sct`` preset on the embedded data: the tangent J (``jvp_abs``) and the raw ‖g‖
  (before normalisation) must stay within SCT_GROWTH x max(their first logged value, their healthy scale —
  the trainer's ``divergence_floors``: σ_d/2 and σ_d·√D) over 400 steps, and 1-step samples within the data's
  range. With c_noise = 1000·t (the old default) J reached 8.4 within these 400 steps, and 68 after 1 200
  with ‖g‖ at 1 254 (measured): this test failed on that code. Measured now: J <= 0.1, ‖g‖ <= 6.
* iLCT's diffusion term (eq. 9) must carry a gradient within DIFF_GRAD_RATIO of the consistency term's on
  the pairs it is applied to, at every curriculum stage (N = 11 ... 641). Unweighted and batch-averaged (the
  old default) it was 2.4e3x (N = 11) to 3.5e6x (N = 641) weaker, i.e. inert (this test failed from N = 41
  on). With the authors' EDM weighting,
  selected-sample mean and x5 it is about 7x (N = 11) to 2e3x (N = 641) weaker on this perturbed
  initialisation (on a trained tiny DiT: 0.7x to 1.3e3x): the consistency gradient grows with λ/(2c²) along
  the curriculum while the diffusion term's stays put, so the term matters early and fades at large N.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from lct_fast.config import MethodConfig, load_config
from lct_fast.methods.ict import ICTConfig
from lct_fast.methods import ICTLoss, schedules
from lct_fast.methods import build_model
from lct_fast.sample import generate
from lct_fast.trainer import Trainer, divergence_floors

# Bounds, stated once: a healthy tiny_sct run stays well inside them (see the measured values in each test).
SCT_GROWTH = 4.0          # max over the run / max(first logged value, healthy scale), for jvp_abs and raw ‖g‖
SAMPLE_RANGE = 1.5        # 1-step sample |x| max / data |x0| max
DIFF_GRAD_RATIO = 3000.0  # consistency vs diffusion gradient norm on the selected pairs, either way


def _run_and_check(tmp_path, preset: str, overrides: list, keys) -> None:
    """Train ``preset`` for 400 steps (a log line every 50) and check the watched ``keys`` stay within SCT_GROWTH of
    max(first logged value, the spec's healthy scale) and 1-step samples within SAMPLE_RANGE of the data's range."""
    cfg = load_config(preset, ["train.total_samples=12800", "train.log_interval=1600", "train.ckpt_interval=0",
                               "train.sample_interval=0", "train.eval_interval=0"] + overrides)
    tr = Trainer(cfg, str(tmp_path / "run"))
    it = iter(tr.loader)
    data_absmax = max(float(next(it)[0].abs().max()) for _ in range(32))
    tr.run()
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    floors = divergence_floors(cfg)
    for key in keys:
        series = [r[key] for r in rows if key in r]
        assert len(series) >= 6 and all(math.isfinite(v) for v in series), (key, series)
        assert max(series) <= SCT_GROWTH * max(series[0], floors[key]), (key, series)
    x = generate(tr.engine.module, cfg.method, n=256, shape=(4, 8, 8), num_classes=cfg.model.num_classes, steps=1,
                 seed=7).latents
    assert torch.isfinite(x).all()
    assert float(x.abs().max()) <= SAMPLE_RANGE * data_absmax, (float(x.abs().max()), data_absmax)


# The GPU presets' half-precision plan on the same guards: the whole step under bf16 autocast with the JVP pass in
# bf16 (the tangent itself: tests/test_jvp_bf16.py).
@pytest.mark.parametrize("plan", [[], ["train.precision=bf16", "method.sct.jvp_dtype=bf16"]], ids=["fp32", "bf16"])
def test_sct_default_tiny_preset_stays_stable(tmp_path, plan):
    _run_and_check(tmp_path, "tiny_sct", plan, ("jvp_abs", "g_norm_mean"))


def test_meanflow_tiny_preset_stays_within_its_divergence_floors(tmp_path):
    """tiny_meanflow with the paper's training guidance: every metric its spec watches (du/dt and its two terms,
    the target's RMS) stays bounded."""
    cfg = load_config("tiny_meanflow")
    keys = tuple(divergence_floors(cfg))
    assert set(keys) == {"jvp_abs", "target_rms", "dudt_t_rms", "dudt_z_rms"}
    _run_and_check(tmp_path, "tiny_meanflow", ["method.meanflow.guidance_mix=0.5"], keys)


def _grad_norm(loss: torch.Tensor, params) -> float:
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return float(torch.sqrt(sum(g.double().square().sum() for g in grads if g is not None)))


@pytest.mark.parametrize("n_levels", [11, 21, 41, 81, 161, 321, 641])
def test_diffusion_term_gradient_comparable_to_consistency_on_selected_pairs(n_levels):
    # The default ICT settings (ICTConfig's defaults) on the tiny DiT.
    method = MethodConfig(name="ict", ict=ICTConfig())
    cfg = load_config("tiny", ["model.width=32"])
    torch.manual_seed(0)
    net = build_model(cfg.model, method)
    with torch.no_grad():  # leave adaLN-zero's exact zero so every parameter gets a gradient
        for p in net.parameters():
            p.add_(0.02 * torch.randn_like(p))
    # The curriculum step at which N(k) = n_levels.
    total = 6400
    step = next(k for k in range(total) if schedules.curriculum_N(k, total) == n_levels)
    full = ICTLoss.from_config(method, data_dim=256, total_steps=total)
    cons = ICTLoss.from_config(MethodConfig(name="ict", ict=ICTConfig(diffusion_weight=0.0)), data_dim=256, total_steps=total)
    x0 = torch.randn(256, 4, 8, 8, generator=torch.Generator().manual_seed(1)) * 0.5
    seed = 3
    per_full = full(net, x0, None, step=step, generator=torch.Generator().manual_seed(seed))
    per_cons = cons(net, x0, None, step=step, generator=torch.Generator().manual_seed(seed))
    # The same generator draws the same pair indices first: recover the selection.
    _, probs = full._grid(n_levels)
    j = schedules.sample_pair_indices(probs, 256, torch.Generator().manual_seed(seed))
    sel = (j + 1) <= schedules.diffusion_cutoff(n_levels, full.diffusion_r)
    assert int(sel.sum()) >= 8, "too few selected pairs for a meaningful ratio"
    params = [p for p in net.parameters() if p.requires_grad]
    g_diff = _grad_norm((per_full - per_cons)[sel].mean(), params)
    g_cons = _grad_norm(per_cons[sel].mean(), params)
    ratio = g_cons / g_diff
    assert 1 / DIFF_GRAD_RATIO <= ratio <= DIFF_GRAD_RATIO, (n_levels, g_diff, g_cons, ratio)
