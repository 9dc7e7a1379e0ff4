#!/usr/bin/env python
"""Profile the training step: samples/s, step time, phase breakdown, FLOPs, MFU, memory, kernels used.

    python launch/profile.py --config configs/tiny.json --out runs/profile-tiny
    torchrun --nproc_per_node 8 launch/profile.py --config configs/xl.json --steps 20 --out runs/prof-xl
    deepspeed launch/profile.py --config configs/xxl.json --set train.micro_batch=16 --trace --out runs/prof-xxl
    python launch/profile.py --config configs/s.json --synthetic-data \\
        --sweep size=s,b,l,xl,xxl zero=1,2,3 micro_batch=8,16,32 --out runs/sweep
    python launch/profile.py --config configs/tiny.json --sweep kernels=reference,fused --out runs/kernels

The step is the trainer's own (``Trainer.iteration``: same config, model, loss, DeepSpeed engine and data
stream), under phase marks: data wait, OT coupling, target pass (iCT) or JVP pass (sCT), online forward, the
rest of the loss, backward (with ZeRO 1-2's gradient reduction), activation-checkpoint recompute, optimizer
step, EMA, logging. CUDA events on GPU, the wall clock on CPU; the phases sum to the step. FLOPs are counted on one extra step
(``torch.utils.flop_counter``'s formulas at the dispatcher); MFU uses the device's dense peak for the run's
precision (H100/H200/A100 by name) or ``--peak-tflops``. Periodic evaluation, sample grids and checkpoints
are off unless ``--set`` turns them on; the log interval's diagnostics stay (phase ``logging``).

``--sweep KEY=V1,V2 ...`` runs every point of the grid in a fresh process (``--launcher``, default this
Python) and writes ``sweep.md``, ``sweep.csv`` and ``sweep.png``; an out-of-memory point (CUDA OOM, failed
host allocation, or a child killed by the OOM killer) is recorded as ``oom``. Keys: ``size`` (model.size),
``zero`` (deepspeed.zero_optimization.stage), ``micro_batch`` (train.micro_batch), ``kernels``
(reference | fused: model.ops_backend and method.ot.backend together), or any dotted config key.

Writes ``OUT/profile.json`` and the printed table as ``OUT/profile.md`` (rank 0), ``OUT/trace-rank<r>.json``
with ``--trace`` (chrome://tracing, Perfetto, TensorBoard). On OOM each rank that ran out writes
``OUT/profile-oom-rank<r>.json`` and exits with status 3.
"""
import sys

if __name__ == "profile":
    # launch/ is first on sys.path while a launch/ script runs, so the standard library's ``profile`` (which
    # cProfile, and so torch._dynamo, imports) would resolve to this file: be that module instead.
    import importlib.util
    import os
    import sysconfig

    _spec = importlib.util.spec_from_file_location("profile", os.path.join(sysconfig.get_paths()["stdlib"],
                                                                            "profile.py"))
    _std = importlib.util.module_from_spec(_spec)
    sys.modules["profile"] = _std
    _spec.loader.exec_module(_std)
    globals().update({k: v for k, v in vars(_std).items() if not k.startswith("__")})
else:
    from lct_fast.cli.profile import *  # noqa: F401,F403  (this file is the command line of lct_fast.cli.profile)
    from lct_fast.cli.profile import console, main  # noqa: F401

    if __name__ == "__main__":
        console()
