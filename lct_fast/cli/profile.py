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
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="preset name or path, e.g. configs/xxl.json")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (dotted; VALUE parsed as JSON when possible); repeatable")
    p.add_argument("--out", required=True, help="output folder (profile.json, traces, sweep tables)")
    p.add_argument("--steps", type=int, default=20, help="timed steps (default 20)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (default 5)")
    p.add_argument("--trace", action="store_true", help="also write a torch.profiler Chrome trace per rank")
    p.add_argument("--trace-steps", type=int, default=3, help="steps in the trace (default 3)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="peak TFLOP/s per device for MFU (default: the table for H100/H200/A100; CPUs need it)")
    p.add_argument("--no-flops", dest="count_flops", action="store_false", help="skip the FLOP-counted step")
    p.add_argument("--synthetic-data", action="store_true",
                   help="train on the embedded synthetic dataset shaped like the model (no shards needed)")
    p.add_argument("--sweep", nargs="+", default=None, metavar="KEY=V1,V2",
                   help="profile every point of this grid in a fresh process (see the module help)")
    p.add_argument("--launcher", default=None,
                   help="sweep: command that starts each point, e.g. 'torchrun --nproc_per_node 8' "
                        "(default: this Python)")
    p.add_argument("--memory-cap-gb", type=float, default=None,
                   help="sweep on CPU: cap each point's address space (RLIMIT_AS) to emulate a smaller machine")
    p.add_argument("--skip-above-gb", type=float, default=None,
                   help="sweep: skip (do not launch) points whose predicted bytes per rank -- ZeRO state plus the "
                        "activation model's peak -- exceed this (default: the GPU's memory on a CUDA host, no "
                        "skipping on CPU; 0 disables)")
    p.add_argument("--point-timeout", type=float, default=None, help="sweep: seconds per point before it is "
                                                                        "recorded as timeout")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def _check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}")
    if args.warmup < 0:
        p.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.trace_steps < 1:
        p.error(f"--trace-steps must be >= 1, got {args.trace_steps}")
    if args.peak_tflops is not None and not args.peak_tflops > 0:
        p.error(f"--peak-tflops must be > 0, got {args.peak_tflops}")
    if args.memory_cap_gb is not None and not args.sweep:
        p.error("--memory-cap-gb applies to --sweep points")
    if args.memory_cap_gb is not None:
        import torch

        if torch.cuda.is_available():
            p.error("--memory-cap-gb is for CPU sweeps: an address-space cap breaks CUDA context creation")


def launcher_world_size(launcher: list, gpus: int = 0) -> int | None:
    """Ranks a sweep launcher starts: torchrun's --nproc_per_node x --nnodes (the upper bound of MIN:MAX),
    the deepspeed launcher's --num_gpus / --num_accelerators x --num_nodes; a count left to the launcher
    (deepspeed without one, torchrun's ``gpu`` / ``auto``) is this host's ``gpus``; 1 for plain Python.
    None when it cannot be told (the sweep then skips nothing)."""
    def value(*names: str) -> str | None:
        for i, a in enumerate(launcher):
            for n in names:
                if a.startswith(n + "="):
                    return a.split("=", 1)[1]
                if a == n and i + 1 < len(launcher):
                    return launcher[i + 1]
        return None

    def count(v: str | None) -> int | None:
        if v is None:
            return None
        v = v.split(":")[-1]
        return int(v) if v.isdigit() else (gpus or None) if v in ("gpu", "auto") else None

    tool = " ".join(os.path.basename(a) for a in launcher[:3])
    if not any(k in tool for k in ("torchrun", "torch.distributed.run", "deepspeed")):
        return 1
    per_node = value("--nproc_per_node", "--nproc-per-node", "--num_gpus", "--num_accelerators")
    per_node_n = count(per_node) if per_node is not None else (gpus or None) if "deepspeed" in tool else 1
    nodes = value("--nnodes", "--num_nodes")
    nodes_n = count(nodes) if nodes is not None else 1
    return per_node_n * nodes_n if per_node_n and nodes_n else None


def _write_json(path: str, obj: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=str)
    os.replace(tmp, path)


def _sweep(args: argparse.Namespace) -> int:
    import signal

    from lct_fast.profiler import run_sweep

    # SIGTERM (a job's time limit, `timeout`) unwinds like Ctrl-C, so the running point's process group is
    # killed on the way out (run_point) instead of outliving the sweep.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))

    argv = ["--steps", str(args.steps), "--warmup", str(args.warmup)]
    if args.peak_tflops:
        argv += ["--peak-tflops", str(args.peak_tflops)]
    if not args.count_flops:
        argv += ["--no-flops"]
    if args.synthetic_data:
        argv += ["--synthetic-data"]
    launcher = shlex.split(args.launcher) if args.launcher else [sys.executable]
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    skip = args.skip_above_gb
    if skip is None and gpus:
        skip = torch.cuda.get_device_properties(0).total_memory / 2 ** 30
    world = launcher_world_size(launcher, gpus)
    if skip and world is None:
        print(f"profile: cannot tell how many ranks {shlex.join(launcher)!r} starts: no point is skipped for its "
              "predicted memory", file=sys.stderr)
        skip = None
    rows = run_sweep(args.config, args.sweep, args.overrides, args.out, profile_argv=argv, launcher=launcher,
                     memory_cap_gb=args.memory_cap_gb, timeout_s=args.point_timeout, skip_above_gb=skip or None,
                     world_size=world or 1,
                     log=lambda m: print(m, file=sys.stderr, flush=True))
    with open(os.path.join(args.out, "sweep.md")) as f:
        print(f.read())
    return 0 if any(r["status"] == "ok" for r in rows) else 1


def _profile(args: argparse.Namespace, cfg, overrides: list) -> int:
    import torch

    from lct_fast.distributed import init_distributed, shutdown_distributed
    from lct_fast.profiler import (
        ProfileOptions,
        device_name,
        expected_state_bytes,
        format_table,
        is_oom_error,
        kernel_backends,
        profile_trainer,
        summarise,
    )
    from lct_fast.trainer import Trainer

    opts = ProfileOptions(steps=args.steps, warmup=args.warmup, trace=args.trace, trace_steps=args.trace_steps,
                          peak_tflops=args.peak_tflops, count_flops=args.count_flops)
    dist = init_distributed(timeout_s=cfg.train.collective_timeout_s)
    os.makedirs(args.out, exist_ok=True)
    try:
        trainer = Trainer(cfg, args.out, dist=dist)
        mine = profile_trainer(trainer, opts, trace_dir=args.out)
    except Exception as e:  # noqa: BLE001
        if not is_oom_error(e):
            raise
        # An OOM is a result of the sweep, not a crash: say so in a record of this rank's own and exit 3.
        _write_json(os.path.join(args.out, f"profile-oom-rank{dist.rank}.json"),
                    {"status": "oom", "name": cfg.name, "rank": dist.rank, "error": f"{type(e).__name__}: {e}"[:2000]})
        print(f"profile: out of memory on rank {dist.rank}: {type(e).__name__}: {str(e)[:300]}", file=sys.stderr)
        return 3
    ranks = [None] * dist.world_size
    torch.distributed.all_gather_object(ranks, mine)
    if dist.is_main:
        stage = cfg.zero_stage
        bf16_w = cfg.bf16_weights
        info = {"params": trainer.num_params, "micro_batch": trainer.micro_batch, "grad_accum": trainer.grad_accum,
                "expected_state_bytes": expected_state_bytes(
                    trainer.num_params, stage=stage, world=dist.world_size, bf16_weights=bf16_w,
                    num_emas=len(trainer.ema.names),
                    teacher_params=0 if trainer.teacher is None else sum(
                        int(getattr(p, "ds_numel", p.numel())) for p in trainer.teacher.parameters())),
                "backends": kernel_backends(cfg, dist.device, trainer.micro_batch * (
                    dist.world_size if cfg.method.ot.global_coupling else 1)), "overrides": overrides,
                "log_interval": cfg.train.log_interval}
        argv = [a for a in sys.argv if not a.startswith("--local_rank") and not a.startswith("--local-rank")]
        command = shlex.join(["python"] + argv) + (f"  # {dist.world_size} ranks" if dist.world_size > 1 else "")
        rec = summarise(cfg, info, ranks, opts, device=device_name(dist.device), command=command)
        if "trace" in mine:
            rec["traces"] = [r.get("trace") for r in ranks]
        _write_json(os.path.join(args.out, "profile.json"), rec)
        table = format_table(rec)
        with open(os.path.join(args.out, "profile.md"), "w") as f:
            f.write(f"# Profile: {rec['name']}\n\n```\n{table}\n```\n")
        print(table)
        print(f"profile: {os.path.join(args.out, 'profile.json')}", file=sys.stderr)
    shutdown_distributed()
    return 0


def main(argv=None) -> int:
    from lct_fast.config import ConfigError, load_config

    p = build_parser()
    args = p.parse_args(argv)
    _check_args(p, args)
    try:
        if args.sweep:
            return _sweep(args)
        from lct_fast.profiler import profile_overrides

        overrides = profile_overrides(args.config, args.overrides, synthetic_data=args.synthetic_data)
        cfg = load_config(args.config, overrides)  # a bad key fails here, before any process group starts
        return _profile(args, cfg, overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
