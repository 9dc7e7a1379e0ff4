"""Progress lines outside a terminal: one per interval and one at the end, with counts, rate and ETA; silent
when off; and the sampler reports every generated sample to it."""
from __future__ import annotations

import io

import torch

from lct_fast import progress as progress_mod
from lct_fast.progress import Progress


def test_lines_at_the_interval_and_at_the_end(monkeypatch):
    clock = iter([0.0, 10.0, 31.0, 40.0, 65.0, 70.0, 70.0, 70.0, 70.0])
    monkeypatch.setattr(progress_mod.time, "perf_counter", lambda: next(clock))
    out = io.StringIO()
    p = Progress(100, "encoding", who="lct_fast.encode", unit="images", interval_s=30, stream=out, tty=False)
    for _ in range(4):          # t = 10, 31, 40, 65: lines at 31 (>= 30 since 0) and 65 (>= 30 since 31)
        p.update(20)
    p.close()                   # t = 70: the closing line
    lines = out.getvalue().splitlines()
    assert len(lines) == 3, lines
    assert lines[0].startswith("lct_fast.encode: encoding 40/100 images (40%) | ")
    # 40 images in 31 s = 1.29/s; 60 left at that rate = 46.5 s (rounded half to even)
    assert "1.3 images/s" in lines[0] and "ETA 0m46s" in lines[0]
    assert lines[-1].startswith("lct_fast.encode: encoding 80/100 images (80%)")


def test_silent_when_off():
    out = io.StringIO()
    with Progress(10, "x", interval_s=0, stream=out, tty=False) as p:
        p.update(10)
    with Progress(10, "x", enabled=False, stream=out, tty=False) as p:
        p.update(10)
    assert out.getvalue() == ""


def test_generate_reports_every_sample():
    from lct_fast.config import load_config
    from lct_fast.methods import build_model
    from lct_fast.sample import generate

    cfg = load_config("tiny")
    torch.manual_seed(0)
    net = build_model(cfg.model, cfg.method)
    p = Progress(37, "generating", interval_s=0, tty=False)
    generate(net, cfg.method, n=50, shape=(4, 8, 8), num_classes=4, steps=1, batch_size=16, start=5, count=37,
             progress=p)
    assert p.done == 37
