#!/usr/bin/env python
"""The MFU ceiling of every GPU preset's default precision plan, on every GPU of the peak table, from the closed-form
FLOPs of the step's phases (no training, seconds on a CPU)::

    python benchmarks/ceiling_presets.py [--set KEY=VALUE ...] [--out benchmarks/results/ceiling-presets.md]

Per sample, the phases of the step are counted as ``launch/profile.py`` counts them on a real step: the online
forward (one DiT forward), its backward (two), the JVP pass of sCT/sCD (primal + tangent,
``lct_fast.profiler.flops.dit_jvp_flops``), an sCD teacher's forward (one, two under guidance of a fixed scale
or a conditioned student), iCT's target forward (one). Each phase runs at the peak of the dtype the plan gives it
(:func:`lct_fast.precision.precision_plan`), and the ceiling is :func:`lct_fast.profiler.step.ceiling`: the most
MFU that plan allows with perfect kernels. The printed ceiling of ``launch/profile.py`` uses the counted FLOPs of
a real step instead; both are checked against the same closed form in ``tests/test_profile.py``.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys

PRESETS = ["s", "b", "l", "xl", "xxl", "s_scd", "b_scd", "l_scd", "xl_scd", "xxl_scd", "s_trigflow", "b_trigflow",
           "l_trigflow", "xl_trigflow", "xxl_trigflow"]


def phase_flops(cfg) -> dict:
    """Closed-form FLOPs per sample of each phase of one training step of ``cfg`` (a DiT preset)."""
    from lct_fast.methods import get_method, model_conditions
    from lct_fast.profiler.flops import dit_forward_flops, dit_jvp_flops

    spec = get_method(cfg.method.name)
    conds = model_conditions(cfg.method)
    fwd = dit_forward_flops(cfg.model, conds)
    out = {"online_forward": fwd, "backward": 2 * fwd}
    if spec.jvp:
        out["jvp"] = dit_jvp_flops(cfg.model, conds)
    if spec.teacher:
        teacher = dit_forward_flops(cfg.model, {})
        section = getattr(cfg.method, spec.teacher[0])
        guided = getattr(section, "guidance_conditioned", False) or getattr(section, "guidance", 1.0) != 1.0
        out["teacher_forward"] = teacher * (2 if guided else 1)
    if not spec.jvp and spec.name == "ict":
        out["target_forward"] = fwd
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", default=None, help="write the table as Markdown here too")
    args = ap.parse_args(argv)
    from lct_fast.config import load_config
    from lct_fast.precision import precision_plan
    from lct_fast.profiler.flops import PEAK_TFLOPS
    from lct_fast.profiler.step import ceiling

    gpus = list(PEAK_TFLOPS)
    lines = [f"| preset | JVP dtype | plan (jvp / teacher / rest) | " + " | ".join(gpus) + " |",
             "| --- | --- | --- | " + " | ".join("---" for _ in gpus) + " |"]
    worst = 1.0
    for name in PRESETS:
        cfg = load_config(name, args.overrides)
        plan = precision_plan(cfg, tf32=cfg.train.tf32)
        flops = phase_flops(cfg)
        ceil = ceiling(flops, plan)
        worst = min(worst, *(c["mfu"] for c in ceil.values()))
        lines.append(f"| {name} | {cfg.method.sct.jvp_dtype if 'jvp' in flops else '-'} | "
                     f"{plan['jvp']} / {plan['teacher_forward']} / {plan['online_forward']} | "
                     + " | ".join(f"{100 * ceil[g]['mfu']:.1f} %" for g in gpus) + " |")
    table = "\n".join(lines)
    print(table)
    print(f"\nlowest ceiling: {100 * worst:.1f} % of the bf16 peak")
    if args.out:
        with open(args.out, "w") as f:
            f.write(f"# MFU ceiling of every GPU preset's default precision plan\n\n"
                    f"`python benchmarks/ceiling_presets.py {' '.join('--set ' + s for s in args.overrides)}` "
                    f"({datetime.date.today()}; closed-form FLOPs, no GPU needed; see the script's docstring).\n\n"
                    f"{table}\n\nLowest ceiling: {100 * worst:.1f} % of the bf16 peak.\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
