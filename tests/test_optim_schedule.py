"""Learning-rate schedules: warm-up, constant, cosine and sCM's inverse-square-root decay (Tables 3-4)."""
import math

import pytest
import torch

from lct_fast.config import ConfigError, OptimConfig
from lct_fast.optim import build_scheduler, lr_factor


def test_rsqrt_decay_formula_in_optimizer_steps():
    cfg = OptimConfig(schedule="rsqrt", t_ref=100, warmup_samples=0)
    b = 32
    for k in (0, 50, 100, 400, 2500):
        assert lr_factor(k * b, cfg, 10 ** 9, b) == pytest.approx(1 / math.sqrt(max(k / 100, 1.0)))
    warm = OptimConfig(schedule="rsqrt", t_ref=100, warmup_samples=64 * b)
    assert lr_factor(31 * b, warm, 10 ** 9, b) == pytest.approx((31 * b + 1) / (64 * b))
    assert lr_factor(400 * b, warm, 10 ** 9, b) == pytest.approx(0.5)


def test_scheduler_steps_the_rsqrt_lr():
    cfg = OptimConfig(lr=1e-3, schedule="rsqrt", t_ref=4, warmup_samples=0)
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=cfg.lr)
    sched = build_scheduler(opt, cfg, global_batch=8, total_samples=10 ** 6)
    lrs = []
    for _ in range(17):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[4] == pytest.approx(1e-3) and lrs[16] == pytest.approx(0.5e-3)


def test_schedule_validation():
    with pytest.raises(ConfigError, match="optim.schedule"):
        OptimConfig(schedule="linear")
    with pytest.raises(ConfigError, match="optim.t_ref"):
        OptimConfig(t_ref=0)
