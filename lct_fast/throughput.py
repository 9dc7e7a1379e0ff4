"""Throughput profiling of the real training step: phases, FLOPs, MFU, memory; and the scaling sweep.

``launch/profile.py`` is the command line. The step profiled is :meth:`lct_fast.trainer.Trainer.iteration`
itself (same config, model, loss, DeepSpeed engine, data stream), run under a
:class:`lct_fast.profiling.PhaseTimer`:

1. ``warmup`` iterations (allocator, autotuning, DeepSpeed's first-step work) -- not recorded;
2. one iteration under :class:`lct_fast.flops.FlopCounter` -- the FLOPs of every phase, counted;
3. ``steps`` timed iterations -- step time and the exclusive time of each phase;
4. with ``trace``, a few more under ``torch.profiler`` (Chrome trace per rank).

Every rank times its own steps; rank 0 gathers them (``all_gather_object``) and writes ``profile.json``. The
aggregated step time is the slowest rank's at each step (ranks meet in the gradient collectives anyway).

The sweep runs one such profile per point in a fresh process and records a CUDA OOM, a CPU allocation
failure or a child killed by the kernel's OOM killer as a result (``status: oom``) instead of failing.
"""
from __future__ import annotations

import csv
import datetime as _dt
import itertools
import json
import os
import platform
import re
import resource
import shlex
import signal
import statistics
import subprocess
import sys
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .config import Config, ConfigError, load_config
from .flops import PEAK_TFLOPS, FlopCounter, dit_forward_flops, dit_jvp_flops, peak_tflops
from .methods.registry import get_method
from .memory import SavedTensorMeter, activation_model, expected_state_bytes, predicted_bytes  # noqa: F401
from .precision import precision_plan, tf32_allowed  # noqa: F401 (precision_plan: part of this API)
from .profiling import UNTRACKED, PhaseTimer, current_phase, phase

__all__ = ["ProfileOptions", "profile_trainer", "summarise", "format_table", "expected_state_bytes",
           "SWEEP_ALIASES", "parse_sweep", "sweep_points", "run_sweep", "classify_exit", "profile_overrides",
           "versions", "is_oom_error"]

#: Phases of one training step in the order they run (the table's order). ``loss`` is the loss's own time
#: outside its sub-phases (noising, distances, weights); ``untracked`` is the step's time outside any phase.
STEP_PHASES = ("data", "ot", "teacher_forward", "target_forward", "jvp", "online_forward", "loss", "backward", "recompute",
               "optimizer", "ema", "logging", "eval", "checkpoint", "samples", UNTRACKED)
#: Phases that are not model work: their FLOPs stay out of the model FLOPs and MFU -- the log interval's
#: diagnostics, and the forward that activation checkpointing re-runs inside the backward (``recompute``;
#: counting it would make MFU a hardware utilisation, ~20 % higher on the checkpointed XL/XXL presets).
NON_MODEL_PHASES = ("recompute", "logging", "eval", "checkpoint", "samples")

#: Sweep keys that are short names of config keys; any dotted config key works as well.
SWEEP_ALIASES: Dict[str, Tuple[str, ...]] = {
    "size": ("model.size",),
    "zero": ("deepspeed.zero_optimization.stage",),
    "micro_batch": ("train.micro_batch",),
    # The kernel comparison: every custom op on its PyTorch reference, or on the fused kernels where the
    # device has them (auto).
    "kernels": ("model.ops_backend", "method.ot.backend"),
}
_KERNELS = {"reference": "reference", "fused": "auto", "auto": "auto"}

#: What a profile turns off unless the command line sets it: periodic evaluation, sample grids and
#: checkpoints are not part of the step (the log interval's diagnostics are: they stay, as ``logging``).
PROFILE_DEFAULTS: Tuple[Tuple[str, Any], ...] = (("train.eval_interval", 0), ("train.sample_interval", 0),
                                                 ("train.ckpt_interval", 0))


@dataclass
class ProfileOptions:
    steps: int = 20
    """Timed iterations."""
    warmup: int = 5
    """Untimed iterations before the counted and timed ones."""
    trace: bool = False
    """Also write a torch.profiler Chrome trace of ``trace_steps`` iterations per rank."""
    trace_steps: int = 3
    """Iterations in the trace (after one profiler warm-up iteration)."""
    peak_tflops: Optional[float] = None
    """Peak TFLOP/s per device for MFU; default from :data:`lct_fast.flops.PEAK_TFLOPS` by device name."""
    count_flops: bool = True
    """Count FLOPs on one extra iteration."""

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"--steps must be >= 1, got {self.steps}")
        if self.warmup < 0:
            raise ValueError(f"--warmup must be >= 0, got {self.warmup}")
        if self.trace_steps < 1:
            raise ValueError(f"--trace-steps must be >= 1, got {self.trace_steps}")
        if self.peak_tflops is not None and not self.peak_tflops > 0:
            raise ValueError(f"--peak-tflops must be > 0, got {self.peak_tflops}")


def profile_overrides(cfg_path: str, user: Sequence[str], synthetic_data: bool = False) -> List[str]:
    """The ``--set`` list of a profile: :data:`PROFILE_DEFAULTS`, the embedded data shaped like the model
    (``synthetic_data``: no dataset needed to size a model), then the user's own (which win)."""
    out = [f"{k}={json.dumps(v)}" for k, v in PROFILE_DEFAULTS]
    if synthetic_data:
        cfg = load_config(cfg_path, list(user))
        m = cfg.model
        out += ["data.path=", f"data.synthetic.channels={m.in_channels}", f"data.synthetic.resolution={m.resolution}",
                f"data.synthetic.num_classes={min(m.num_classes, 1000)}",
                # enough for warm-up + timed steps without a wrap-around at the sizes a profile uses
                f"data.synthetic.num_samples={max(1024, 4 * cfg.train.global_batch)}"]
    return out + list(user)


# ------------------------------------------------------------------------------------------- memory
def _memory(device: torch.device) -> Dict[str, float]:
    if device.type == "cuda":
        return {"peak_allocated_bytes": float(torch.cuda.max_memory_allocated(device)),
                "peak_reserved_bytes": float(torch.cuda.max_memory_reserved(device))}
    return {"peak_rss_bytes": float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024.0}


# ----------------------------------------------------------------------------------------- backends
def kernel_backends(cfg: Config, device: torch.device) -> Dict[str, str]:
    """What computed each custom op in this process (the dispatcher's decisions) and the OT coupling."""
    from . import ops

    out: Dict[str, str] = {}
    for (op, requested, dev, chosen), _reason in sorted(ops.backend_choices().items()):
        key = f"{op}"
        val = f"{chosen} (requested {requested}, {dev})"
        out[key] = val if key not in out else out[key] + "; " + val
    ot = cfg.method.ot
    if ot.method == "sinkhorn":
        out["ot"] = f"sinkhorn/{ops.get_sinkhorn_backend(ot.backend, device)[0]}"
    else:
        out["ot"] = {"none": "none", "exact": "exact/pot (CPU)", "hungarian": "exact/scipy (CPU)",
                     "exact_scipy": "exact/scipy (CPU)"}.get(ot.method, ot.method)
    return out


def versions() -> Dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": str(torch.version.cuda)}
    for name in ("triton", "deepspeed"):
        try:
            out[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 -- optional
            out[name] = "none"
    return out


def device_name(device: Optional[torch.device] = None) -> str:
    """The device the step runs on: the GPU's name, or the CPU model (also on a GPU host run on CPU)."""
    device = torch.device(device) if device is not None else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"CPU {line.split(':', 1)[1].strip()} ({len(os.sched_getaffinity(0))} cores)"
    except OSError:
        pass
    return f"CPU {platform.processor() or platform.machine()}"


def matmul_precision(cfg: Config, device: str = "") -> str:
    """The precision the peak is taken for: bf16 under bf16 autocast, else tf32 if torch allows it on the GPU,
    else fp32. (An fp32 JVP pass inside a bf16 run is measured against the bf16 peak: the table says so.)"""
    if cfg.train.precision == "bf16":
        return "bf16"
    return "tf32" if device_is_gpu(device) and tf32_allowed() else "fp32"


def ceiling(flops_by_phase: Dict[str, float], plan: Dict[str, str]) -> Dict[str, Dict[str, float]]:
    """Per GPU of :data:`lct_fast.flops.PEAK_TFLOPS`: the step's model FLOPs (one device's, by phase) run with each
    phase at the peak of its dtype under ``plan`` -- ``step_ms_at_peak`` -- and the MFU that time allows against
    the bf16 peak (the MFU denominator): the most this plan can reach on that GPU, kernels perfect."""
    model = {k: v for k, v in flops_by_phase.items() if k not in NON_MODEL_PHASES and v}
    total = sum(model.values())
    out = {}
    for gpu, peaks in PEAK_TFLOPS.items():
        seconds = sum(f / (peaks[plan.get(k, "fp32")] * 1e12) for k, f in model.items())
        out[gpu] = {"mfu": total / (seconds * peaks["bf16"] * 1e12) if seconds else None,
                    "step_ms_at_peak": seconds * 1e3}
    return out


# ------------------------------------------------------------------------------------------ profile
def _forward_flops_per_sample(trainer: Any) -> float:
    """Counted FLOPs of one forward of the network (the unwrapped module, no grad), per sample."""
    cfg, dev = trainer.cfg, trainer.dist.device
    m = cfg.model
    b = trainer.micro_batch
    gen = torch.Generator(dev).manual_seed(0)
    x = torch.randn(b, m.in_channels, m.resolution, m.resolution, device=dev, generator=gen)
    labels = torch.zeros(b, dtype=torch.long, device=dev) if m.num_classes else None
    net = trainer.target_net
    with torch.no_grad(), trainer.autocast, FlopCounter(bucket=lambda: "forward") as fc:
        net(x, torch.full((b,), get_method(cfg.method.name).probe_level, device=dev), labels)
    return fc.total / b


def profile_trainer(trainer: Any, opts: ProfileOptions, *, clock: Optional[Callable[[], float]] = None,
                    trace_dir: Optional[str] = None) -> Dict[str, Any]:
    """Profile ``trainer`` on this rank: ``{"steps": [{phase: s, ..., "step": s}], "flops": {phase: n},
    "wasted_flops": {...}, "forward_flops_per_sample", "memory"}``. Every rank must call it (collectives)."""
    dev = trainer.dist.device
    st = trainer.begin(endless=True)
    timer = PhaseTimer(dev.type, clock=clock)
    out: Dict[str, Any] = {"rank": trainer.dist.rank}
    try:
        with timer.active():
            for _ in range(opts.warmup):
                with timer.step():
                    trainer.iteration(st)
            if opts.count_flops:
                # The counted step also meters what autograd saves for backward, by phase (the activation
                # memory the model in lct_fast.memory predicts; parameters left out, they are state).
                meter = SavedTensorMeter(trainer.target_net.parameters(), phase_of=current_phase)
                with timer.step(), FlopCounter() as fc, meter.active():
                    trainer.iteration(st)
                out["flops"], out["wasted_flops"] = dict(fc.flops), dict(fc.wasted)
                out["saved_bytes_by_phase"] = {str(k): v for k, v in meter.by_phase.items()}
                out["saved_forward_passes"] = meter.forward_passes
            timer.steps.clear()
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)  # steady state: weights, optimizer state, activations
            for _ in range(opts.steps):
                with timer.step():
                    trainer.iteration(st)
            out["steps"] = list(timer.steps)
            # A log line rarely falls in a few timed steps: time its costly part (the divergence diagnostics,
            # a collective under ZeRO-3) once on every rank; the summary amortises it over the log interval.
            with timer.step() as one:
                with phase("logging"):
                    trainer.diagnostics()
            out["log_line_s"] = one["step"]
            timer.steps.pop()
            if opts.trace and trace_dir:
                out["trace"] = _trace(trainer, st, timer, opts.trace_steps, trace_dir)
        out["memory"] = _memory(dev)
        out["compile"] = compile_report(trainer.cfg)
        if opts.count_flops:
            out["forward_flops_per_sample"] = _forward_flops_per_sample(trainer)
    finally:
        st.log.close()
    return out


def compile_report(cfg: Config) -> Dict[str, Any]:
    """``train.compile`` as it went in this process (dynamo's counters): compiled graphs, frames traced and
    compiled, every graph break by reason (first line; counted per trace, not per call), whatever dynamo
    gave up on (``unsupported``: a recompile limit hit means blocks ran eagerly), and how the JVP pass ran."""
    if not cfg.train.compile:
        return {"enabled": False}
    from torch._dynamo.utils import counters

    def by_reason(group: str) -> Dict[str, int]:
        out: Dict[str, int] = {}
        for reason, n in counters[group].items():
            key = str(reason).strip().splitlines()[0][:160]
            out[key] = out.get(key, 0) + n
        return out

    breaks = by_reason("graph_break")
    return {"enabled": True, "graphs": int(counters["stats"].get("unique_graphs", 0)),
            "frames": int(counters["frames"].get("total", 0)), "frames_ok": int(counters["frames"].get("ok", 0)),
            "graph_breaks": breaks, "graph_break_count": sum(breaks.values()),
            "unsupported": by_reason("unimplemented"),
            "jvp_pass": "eager (inductor has no forward-mode AD)" if get_method(cfg.method.name).jvp else None}


def measure_step_ms(config: str, overrides: Sequence[str] = (), *, steps: int = 10, warmup: int = 3,
                    synthetic_data: bool = True) -> Tuple[float, int, int, Dict[str, float]]:
    """Median ms of the trainer's own step for ``config`` in this process at one micro-batch per step (one
    rank, the preset's micro-batch, no accumulation; DeepSpeed engine, data, EMA and all), with the mean ms of
    each phase: ``(step_ms, micro_batch, data_dim, phases_ms)``. The embedded data shaped like the model unless
    ``synthetic_data`` is false. What ``benchmarks/bench_ot.py`` sets its coupling time against (the coupling
    runs once per micro-step)."""
    import tempfile

    from .distributed import init_distributed
    from .trainer import Trainer

    micro, _ = load_config(config, list(overrides)).train.batch_layout(1)
    one = [f"train.global_batch={micro}", f"train.micro_batch={micro}", "train.grad_accum=1"]
    cfg = load_config(config, profile_overrides(config, list(overrides) + one, synthetic_data=synthetic_data))
    with tempfile.TemporaryDirectory(prefix="lct_fast-step-") as run_dir:
        trainer = Trainer(cfg, run_dir, dist=init_distributed())
        rec = profile_trainer(trainer, ProfileOptions(steps=steps, warmup=warmup, count_flops=False))
    m = cfg.model
    times = [s["step"] for s in rec["steps"]]
    phases = {k: 1e3 * statistics.fmean(s.get(k, 0.0) for s in rec["steps"]) for k in STEP_PHASES}
    phases["step"] = 1e3 * statistics.fmean(times)  # the phases sum to this mean; the first value is the median
    return 1e3 * statistics.median(times), trainer.micro_batch, m.in_channels * m.resolution ** 2, phases


def _trace(trainer: Any, st: Any, timer: PhaseTimer, steps: int, trace_dir: str) -> str:
    from torch.profiler import ProfilerActivity, profile, schedule

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if trainer.dist.device.type == "cuda" else [])
    path = os.path.join(trace_dir, f"trace-rank{trainer.dist.rank}.json")
    with profile(activities=acts, schedule=schedule(wait=0, warmup=1, active=steps),
                 on_trace_ready=lambda p: p.export_chrome_trace(path), record_shapes=False) as prof:
        for _ in range(steps + 1):
            with timer.step():
                trainer.iteration(st)
            prof.step()
    timer.steps.clear()
    return path


def _stats(values: Sequence[float]) -> Dict[str, float]:
    v = sorted(values)
    q = statistics.quantiles(v, n=10, method="inclusive") if len(v) > 1 else [v[0]] * 9
    return {"median": statistics.median(v), "p10": q[0], "p90": q[-1], "mean": statistics.fmean(v)}


def _rank_row(rank: Dict[str, Any], steps: List[Dict[str, float]], samples: float) -> Dict[str, Any]:
    st = _stats([x["step"] for x in steps])
    return {"rank": rank["rank"], **{f"step_ms_{k}": v * 1e3 for k, v in st.items()},
            "samples_per_s": samples / st["median"], "memory": rank.get("memory", {}),
            "compile": rank.get("compile", {"enabled": False})}


def summarise(cfg: Config, trainer_info: Dict[str, Any], ranks: List[Dict[str, Any]], opts: ProfileOptions,
              *, device: str, command: str = "") -> Dict[str, Any]:
    """The profile record (``profile.json``) from every rank's :func:`profile_trainer` output."""
    world = len(ranks)
    spec = get_method(cfg.method.name)
    gb = cfg.train.global_batch
    per_rank_samples = gb / world
    steps = [r["steps"] for r in ranks]
    n = min(len(s) for s in steps)
    step_max = [max(s[i]["step"] for s in steps) for i in range(n)]
    agg = _stats(step_max)
    phases = {}
    for name in STEP_PHASES:
        vals = [statistics.fmean(st.get(name, 0.0) for st in s) for s in steps]  # mean per step, per rank
        if any(v > 0 for v in vals):
            phases[name] = {"rank0_ms": vals[0] * 1e3, "mean_ms": statistics.fmean(vals) * 1e3}
    rank0_mean = statistics.fmean(st["step"] for st in steps[0])
    for p in phases.values():
        p["rank0_pct"] = 100.0 * p["rank0_ms"] / 1e3 / rank0_mean
    out: Dict[str, Any] = {
        "status": "ok", "name": cfg.name, "command": command, "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "device": device, "versions": versions(), "world_size": world, **trainer_info,
        "method": cfg.method.name, "arch": cfg.model.arch, "size": cfg.model.size,
        "precision": cfg.train.precision, "bf16_weights": cfg.bf16_weights,
        "jvp_dtype": spec.jvp_dtype(cfg.method) if spec.jvp else None,
        "zero_stage": cfg.zero_stage,
        "global_batch": gb, "steps": n, "warmup": opts.warmup,
        "step_ms": {k: v * 1e3 for k, v in agg.items()},
        "samples_per_s": gb / agg["median"],
        "per_rank": [_rank_row(r, s, per_rank_samples) for r, s in zip(ranks, steps)],
        "phases_ms": phases,
        "phase_sum_ms": sum(p["rank0_ms"] for p in phases.values()),
        "log_line_ms": 1e3 * max(r.get("log_line_s", 0.0) for r in ranks),
        "rank0_step_mean_ms": rank0_mean * 1e3,
    }
    if "flops" in ranks[0]:
        model_phases = lambda fl: {k: v for k, v in fl.items() if k not in NON_MODEL_PHASES}  # noqa: E731
        per_rank_flops = [sum(model_phases(r["flops"]).values()) for r in ranks]
        step_flops = sum(per_rank_flops)
        fwd = ranks[0]["forward_flops_per_sample"]
        fl0 = ranks[0]["flops"]
        per_sample = {k: v / per_rank_samples for k, v in model_phases(fl0).items()}
        closed = dit_forward_flops(cfg.model) if cfg.model.arch == "dit" else None
        model_tf = step_flops / agg["median"] / 1e12  # the same statistic as samples/s
        peak = opts.peak_tflops or (peak_tflops(device, matmul_precision(cfg, device)) if device_is_gpu(device)
                                    else None)
        out["flops"] = {
            "forward_per_sample": fwd,
            "forward_per_sample_closed_form": closed,
            "jvp_per_sample_closed_form": dit_jvp_flops(cfg.model) if closed and spec.jvp else None,
            "per_sample_by_phase": per_sample,
            "per_step_all_ranks": step_flops,
            "per_step_ratio_to_forward": step_flops / gb / fwd if fwd else None,
            "wasted_per_sample_by_phase": {k: v / per_rank_samples for k, v in ranks[0].get("wasted_flops", {}).items()},
            "non_model_per_step": {k: v for k, v in fl0.items() if k in NON_MODEL_PHASES},
        }
        out["model_tflops_per_s"] = model_tf
        out["per_rank_tflops_per_s"] = [f / statistics.median(x["step"] for x in s) / 1e12
                                        for f, s in zip(per_rank_flops, steps)]
        out["peak_tflops_per_device"] = peak
        out["peak_precision"] = matmul_precision(cfg, device)
        out["mfu"] = model_tf / (peak * world) if peak else None
        out["precision_plan"] = precision_plan(cfg)
        out["ceiling"] = ceiling(fl0, out["precision_plan"])
    chosen = {part.split()[0] for part in trainer_info.get("backends", {}).get("attention", "").split("; ") if part}
    fused = bool(chosen & {"triton", "cuda"})  # the JVP pass's attention without the L x L reference arrays
    model = activation_model(cfg, int(trainer_info.get("micro_batch", 0)) or gb // world, attention_fused=fused)
    saved = ranks[0].get("saved_bytes_by_phase")
    out["activations"] = {
        "model": model,
        # what the counted step's largest forward pass (one micro-batch) kept for backward on rank 0; the
        # recompute of activation checkpointing happens inside the backward and is not in it
        "measured_saved_bytes": None if saved is None else sum(saved.values()),
        "measured_saved_bytes_by_phase": saved,
        "measured_forward_passes": ranks[0].get("saved_forward_passes"),
    }
    return out


def device_is_gpu(device: str) -> bool:
    return not device.startswith("CPU")


def _fmt_bytes(b: Optional[float]) -> str:
    if b is None:
        return "n/a"
    for unit, s in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if b >= s:
            return f"{b / s:.2f} {unit}"
    return f"{b:.0f} B"


def _fmt_flops(f: Optional[float]) -> str:
    if f is None:
        return "n/a"
    for unit, s in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(f) >= s:
            return f"{f / s:.3g} {unit}"
    return f"{f:.3g}"


def format_table(rec: Dict[str, Any]) -> str:
    """The human-readable profile (what ``launch/profile.py`` prints)."""
    L = []
    L.append(f"profile: {rec['name']} ({rec['method']}, {rec['arch']} {rec['size']}, {rec['params']:,} parameters) "
             f"on {rec['device']}; world {rec['world_size']}, micro-batch {rec['micro_batch']} x {rec['grad_accum']}, "
             f"global batch {rec['global_batch']}, ZeRO-{rec['zero_stage']}")
    prec = rec["precision"] + (" (bf16 weights)" if rec["bf16_weights"] else "")
    if rec.get("jvp_dtype"):
        prec += f", JVP {rec['jvp_dtype']}"
    v = rec["versions"]
    L.append(f"precision {prec}; torch {v['torch']}, triton {v['triton']}, deepspeed {v['deepspeed']}, "
             f"python {v['python']}; {rec['date']}")
    if rec.get("command"):
        L.append(f"command: {rec['command']}")
    s = rec["step_ms"]
    L.append(f"{rec['steps']} timed steps after {rec['warmup']} warm-up: step {s['median']:.2f} ms "
             f"(p10 {s['p10']:.2f}, p90 {s['p90']:.2f}), {rec['samples_per_s']:.1f} samples/s")
    if rec["world_size"] > 1:
        L.append("per rank: " + "; ".join(f"rank {r['rank']} {r['step_ms_median']:.2f} ms, {r['samples_per_s']:.1f} "
                                          f"samples/s" for r in rec["per_rank"]))
    fl = rec.get("flops", {})
    per_sample = fl.get("per_sample_by_phase", {})
    L.append("")
    L.append("phases: mean ms per step on rank 0 (and over all ranks), exclusive of the phases nested in them")
    L.append(f"{'phase':<16}{'rank 0 ms':>12}{'%':>7}{'all ms':>11}{'FLOP/sample':>13}")
    hidden = []
    for name, p in rec["phases_ms"].items():
        f = per_sample.get(name)
        if p["rank0_pct"] < 0.1 and not f:
            hidden.append(name)  # phases that did not run in these steps (e.g. no log line fell in them)
            continue
        L.append(f"{name:<16}{p['rank0_ms']:>12.2f}{p['rank0_pct']:>7.1f}{p['mean_ms']:>11.2f}"
                 f"{(_fmt_flops(f) if f else ''):>13}")
    L.append(f"{'sum':<16}{rec['phase_sum_ms']:>12.2f}{100 * rec['phase_sum_ms'] / rec['rank0_step_mean_ms']:>7.1f}"
             f"{'':>11}{_fmt_flops(sum(per_sample.values())) if per_sample else '':>13}")
    if hidden:
        L.append(f"(under 0.1 %, in the sum: {', '.join(hidden)})")
    li = rec.get("log_interval") or 0
    if rec.get("log_line_ms") and li:
        amort = rec["log_line_ms"] * rec["global_batch"] / li
        L.append(f"a log line's divergence diagnostics take {rec['log_line_ms']:.2f} ms, every "
                 f"{li:,} samples: {amort:.3f} ms per step amortised "
                 f"({100 * amort / rec['rank0_step_mean_ms']:.2f} % of the step)")
    L.append("")
    if fl:
        fwd, closed = fl["forward_per_sample"], fl["forward_per_sample_closed_form"]
        line = f"FLOPs/sample: forward {_fmt_flops(fwd)}"
        if closed:
            line += f" (closed form {_fmt_flops(closed)}, {100 * (fwd / closed - 1):+.1f} %)"
        if "jvp" in per_sample:
            line += f"; JVP pass {_fmt_flops(per_sample['jvp'])} = {per_sample['jvp'] / fwd:.2f} forwards"
        if "backward" in per_sample:
            line += f"; backward {per_sample['backward'] / fwd:.2f} forwards"
        line += f"; step {fl['per_step_ratio_to_forward']:.2f} forwards"
        L.append(line)
        rec_fl = fl["non_model_per_step"].get("recompute")
        if rec_fl:
            L.append(f"  + {_fmt_flops(rec_fl / rec['global_batch'] * rec['world_size'])}/sample recomputed by "
                     f"activation checkpointing inside the backward (phase recompute), not in the model FLOPs")
        wasted = sum(fl["wasted_per_sample_by_phase"].values())
        if wasted:
            L.append(f"  + {_fmt_flops(wasted)}/sample executed on materialised zero tangents (forward-AD "
                     f"weight tangents), not counted: {wasted / fwd:.2f} forwards")
        mfu = rec.get("mfu")
        L.append(f"model {rec['model_tflops_per_s']:.4g} TFLOP/s over {rec['world_size']} device(s); MFU "
                 + (f"{100 * mfu:.1f} % of {rec['peak_tflops_per_device']:g} TFLOP/s {rec['peak_precision']} per device"
                    if mfu is not None else "n/a (no peak for this device: give --peak-tflops)")
                 + (f" (the JVP pass runs in {rec['jvp_dtype']})" if rec.get("jvp_dtype") and mfu is not None
                    and rec["jvp_dtype"] != rec.get("peak_precision") else ""))
    if rec.get("ceiling"):
        plan = rec["precision_plan"]
        used = [k for k in plan if per_sample.get(k)]
        L.append("precision plan on a GPU (from the config): " + ", ".join(f"{k} {plan[k]}" for k in used))
        L.append("ceiling (each phase's FLOPs at its dtype's peak): " + "; ".join(
            f"{gpu} MFU <= {100 * c['mfu']:.1f} % ({c['step_ms_at_peak']:.3g} ms/step)"
            for gpu, c in rec["ceiling"].items() if c["mfu"] is not None))
    mem = rec["per_rank"][0]["memory"]
    exp = rec["expected_state_bytes"]
    got = ", ".join(f"{k.replace('_bytes', '').replace('_', ' ')} {_fmt_bytes(b)}" for k, b in mem.items())
    L.append(f"memory (rank 0): {got}; ZeRO-{rec['zero_stage']} state expected per rank {_fmt_bytes(exp['total'])} "
             f"(weights {_fmt_bytes(exp['weights'])}, gradients {_fmt_bytes(exp['gradients'])}, optimizer "
             f"{_fmt_bytes(exp['optimizer'])}, EMA {_fmt_bytes(exp['ema'])}"
             + (f", frozen teacher {_fmt_bytes(exp['teacher'])}" if "teacher" in exp else "") + ")")
    act = rec.get("activations") or {}
    if act.get("model") or act.get("measured_saved_bytes") is not None:
        m, got = act.get("model"), act.get("measured_saved_bytes")
        line = f"activations (rank 0, micro-batch {rec.get('micro_batch')}): "
        if m:
            line += (f"model saved {_fmt_bytes(m['saved'] + m['weight_copies'])} (autocast weight copies "
                     f"{_fmt_bytes(m['weight_copies'])})" + (f", + {_fmt_bytes(m['recompute'])} while a block is "
                                                             "recomputed" if m["recompute"] else "")
                     + (f", JVP pass transient ~{_fmt_bytes(m['jvp_transient'])}" if m["jvp_transient"] else "")
                     + f", peak {_fmt_bytes(m['peak'])}")
        else:
            line += "no model for this backbone"
        if got is not None:
            line += f"; measured saved for backward {_fmt_bytes(got)}"
            if m:
                line += f" (model / measured {(m['saved'] + m['weight_copies']) / got:.2f})" if got else ""
        L.append(line)
    comp = rec["per_rank"][0].get("compile") or {}
    if comp.get("enabled"):
        L.append(f"compile: {comp['graphs']} graphs, {comp['frames_ok']} of {comp['frames']} frames compiled, "
                 f"{comp['graph_break_count']} graph breaks"
                 + (": " + "; ".join(f"{n}x {r}" for r, n in comp["graph_breaks"].items()) if comp["graph_breaks"]
                    else "")
                 + ("; gave up (eager there): " + "; ".join(f"{n}x {r}" for r, n in comp["unsupported"].items())
                    if comp["unsupported"] else "")
                 + (f"; JVP pass {comp['jvp_pass']}" if comp.get("jvp_pass") else ""))
    L.append("kernels: " + "; ".join(f"{k} {v}" for k, v in rec["backends"].items()))
    return "\n".join(L)


# -------------------------------------------------------------------------------------------- sweep
def parse_sweep(items: Sequence[str]) -> List[Tuple[str, Tuple[str, ...], List[Any]]]:
    """``["size=s,b", "zero=1,2"]`` -> ``[(name, config keys, values), ...]``; values parsed like ``--set``."""
    out = []
    for item in items:
        name, sep, text = item.partition("=")
        name = name.strip()
        if not sep or not name or not text.strip():
            raise ConfigError(f"--sweep {item!r}: expected KEY=V1,V2,... (keys: {', '.join(SWEEP_ALIASES)} or a "
                              f"dotted config key)")
        if name in SWEEP_ALIASES:
            keys = SWEEP_ALIASES[name]
        elif "." in name:
            keys = (name,)
        else:
            raise ConfigError(f"--sweep {item!r}: unknown sweep key {name!r}; expected one of "
                              f"{', '.join(SWEEP_ALIASES)} or a dotted config key such as train.micro_batch")
        values = []
        for raw in text.split(","):
            raw = raw.strip()
            try:
                v = json.loads(raw)
            except json.JSONDecodeError:
                v = raw
            if name == "size":
                v = str(v).upper() if str(v).lower() != "custom" else "custom"
            if name == "kernels":
                if v not in _KERNELS:
                    raise ConfigError(f"--sweep kernels: {v!r} is not one of {sorted(_KERNELS)}")
            values.append(v)
        out.append((name, keys, values))
    if len({n for n, _, _ in out}) != len(out):
        raise ConfigError("--sweep: a key is given twice")
    return out


def sweep_points(cfg_path: str, sweep: List[Tuple[str, Tuple[str, ...], List[Any]]],
                 base_overrides: Sequence[str]) -> List[Dict[str, Any]]:
    """Every point of the grid with its ``--set`` list, its resolved config (``cfg``) and parameter count;
    each resolved here first, so a bad value (a size that does not exist, an unknown key) fails before any
    process starts."""
    from .models import count_parameters

    points = []
    for combo in itertools.product(*[vals for _, _, vals in sweep]):
        sets, label = [], {}
        for (name, keys, _), v in zip(sweep, combo):
            label[name] = v
            for k in keys:
                val = _KERNELS[v] if name == "kernels" else v
                sets.append(f"{k}={json.dumps(val) if not isinstance(val, str) else val}")
        try:
            cfg = load_config(cfg_path, list(base_overrides) + sets)
            params = count_parameters(cfg.model)
        except (ConfigError, ValueError) as e:
            raise ConfigError(f"--sweep point {label}: {e}") from e
        points.append({"label": label, "sets": sets, "params": params, "cfg": cfg})
    return points


_OOM_PATTERNS = ("CUDA out of memory", "OutOfMemoryError", "can't allocate memory", "std::bad_alloc",
                 "Cannot allocate memory", "DefaultCPUAllocator", "CUDA error: out of memory",
                 "CUBLAS_STATUS_ALLOC_FAILED", "cudaErrorMemoryAllocation")
#: How launchers report a worker the kernel's OOM killer took (torchrun: "Signal 9 (SIGKILL)", exitcode -9).
_KILLED_PATTERNS = ("Signal 9 (SIGKILL)", "exitcode  : -9", "exit code -9", "signal 9")


def is_oom_error(e: BaseException) -> bool:
    """A CUDA OOM or a failed host allocation (what a memory cap or a full machine raises)."""
    if isinstance(e, (torch.OutOfMemoryError, MemoryError)):
        return True
    return any(p in str(e) for p in _OOM_PATTERNS)


def classify_exit(returncode: int, record: Optional[Dict[str, Any]], stderr_tail: str = "") -> Tuple[str, str]:
    """(status, detail) of a sweep point: ``ok``, ``oom`` (the child's own record says so; it, or one of a
    launcher's workers, was killed by SIGKILL -- the kernel's OOM killer -- seen as -9, 128+9 from a shell,
    256-9 from a launcher that re-raises it, or torchrun's "Signal 9 (SIGKILL)"; or an allocation failure in
    its stderr) or ``error``."""
    if record is not None and record.get("status") == "oom":
        return "oom", record.get("error", "out of memory")
    if returncode in (-signal.SIGKILL, 128 + signal.SIGKILL, 256 - signal.SIGKILL):
        return "oom", f"killed by SIGKILL (exit {returncode}): the kernel's OOM killer"
    if returncode != 0 and any(p in stderr_tail for p in _KILLED_PATTERNS):
        return "oom", f"a worker was killed by SIGKILL (exit {returncode}): the kernel's OOM killer"
    if returncode == 0 and record is not None and record.get("status") == "ok":
        return "ok", ""
    if any(p in stderr_tail for p in _OOM_PATTERNS):
        return "oom", stderr_tail.strip().splitlines()[-1][:200] if stderr_tail.strip() else "out of memory"
    last = stderr_tail.strip().splitlines()[-1][:300] if stderr_tail.strip() else ""
    return "error", f"exit {returncode}: {last}"


def run_point(cmd: Sequence[str], *, timeout: Optional[float] = None, preexec_fn=None) -> subprocess.CompletedProcess:
    """Run one sweep point in its own session, so that on a timeout the whole process group -- a launcher and
    every worker it started, which would otherwise keep their GPU memory -- is killed."""
    proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=preexec_fn)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(list(cmd), proc.returncode, out, err)


def read_point_record(pdir: str) -> Optional[Dict[str, Any]]:
    """A point's ``profile.json``, else the first rank's OOM record (``profile-oom-rank<r>.json``); None when
    there is none or it does not parse (a child killed while writing)."""
    names = ["profile.json"] + sorted(n for n in os.listdir(pdir) if n.startswith("profile-oom-rank"))
    for name in names:
        path = os.path.join(pdir, name)
        if os.path.exists(path):
            try:
                with open(path) as f:
                    return json.load(f)
            except (OSError, json.JSONDecodeError):
                continue
    return None


def _point_dir(out_dir: str, label: Dict[str, Any]) -> str:
    name = "-".join(f"{k}_{v}" for k, v in label.items())
    return os.path.join(out_dir, "points", re.sub(r"[^A-Za-z0-9_.=-]+", "_", name))


def run_sweep(cfg_path: str, sweep_items: Sequence[str], base_overrides: Sequence[str], out_dir: str, *,
              profile_argv: Sequence[str], launcher: Sequence[str], memory_cap_gb: Optional[float] = None,
              timeout_s: Optional[float] = None, skip_above_gb: Optional[float] = None, world_size: int = 1,
              runner: Optional[Callable[..., subprocess.CompletedProcess]] = None,
              log: Callable[[str], None] = print) -> List[Dict[str, Any]]:
    """Run every sweep point as ``launcher + [launch/profile.py, ...]`` in a fresh process; write
    ``sweep.csv``, ``sweep.md`` and ``sweep.png`` in ``out_dir``; return the rows. A point whose predicted
    bytes per rank (:func:`lct_fast.memory.predicted_bytes` on ``world_size`` ranks) exceed ``skip_above_gb``
    is a ``skipped`` row, never launched."""
    sweep = parse_sweep(sweep_items)
    points = sweep_points(cfg_path, sweep, base_overrides)
    os.makedirs(out_dir, exist_ok=True)
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "launch", "profile.py")
    runner = runner or run_point
    rows = []
    for i, pt in enumerate(points):
        pdir = _point_dir(out_dir, pt["label"])
        os.makedirs(pdir, exist_ok=True)
        for name in os.listdir(pdir):  # a stale record must not pass for this run's
            if name.startswith("profile") and name.endswith(".json"):
                os.remove(os.path.join(pdir, name))
        cmd = list(launcher) + [script, "--config", cfg_path] + sum((["--set", s] for s in base_overrides), []) \
            + sum((["--set", s] for s in pt["sets"]), []) + list(profile_argv) + ["--out", pdir]
        log(f"sweep [{i + 1}/{len(points)}] {pt['label']}: {shlex.join(cmd)}")
        try:
            pred = predicted_bytes(pt["cfg"], pt["params"], world_size)
        except ConfigError:  # a batch layout the launcher's world size cannot meet: the point says so itself
            pred = None
        if pred and skip_above_gb and pred["total"] > skip_above_gb * 2 ** 30:
            row = {**pt["label"], "params": pt["params"], "status": "skipped",
                   "predicted_gib": pred["total"] / 2 ** 30,
                   "detail": f"predicted {pred['total'] / 2 ** 30:.1f} GiB per rank on {world_size} rank(s) "
                             f"(state {pred['state'] / 2 ** 30:.1f}, activations {pred['activations'] / 2 ** 30:.1f}"
                             f"{'' if pred['activations_modelled'] else ' (not modelled for this backbone)'}) "
                             f"> {skip_above_gb:g} GiB"}
            log(f"  -> skipped: {row['detail']}")
            rows.append(row)
            write_sweep(rows, out_dir, sweep, cfg_path=cfg_path, command=" ".join(sys.argv))
            continue
        preexec = None
        if memory_cap_gb:
            cap = int(memory_cap_gb * 2 ** 30)
            preexec = lambda: resource.setrlimit(resource.RLIMIT_AS, (cap, cap))  # noqa: E731
        try:
            proc = runner(cmd, timeout=timeout_s, preexec_fn=preexec)
            rc, err = proc.returncode, proc.stderr or ""
        except subprocess.TimeoutExpired:
            rc, err = None, f"timed out after {timeout_s} s (process group killed)"
        with open(os.path.join(pdir, "stderr.log"), "w") as f:
            f.write(err)
        rec = read_point_record(pdir)
        if rc is None:
            status, detail = "timeout", err
        else:
            status, detail = classify_exit(rc, rec, err[-4000:])
        row = {**pt["label"], "params": pt["params"], "status": status,
               "predicted_gib": pred["total"] / 2 ** 30 if pred else None}
        if status == "ok" and "per_rank" not in rec:
            status, detail = "error", "the point's profile.json is incomplete"
        if status == "ok":
            mem = rec["per_rank"][0]["memory"]
            row.update({"samples_per_s": rec["samples_per_s"], "step_ms": rec["step_ms"]["median"],
                        "model_tflops_per_s": rec.get("model_tflops_per_s"), "mfu": rec.get("mfu"),
                        "peak_mem_gib": max(mem.values()) / 2 ** 30 if mem else None,
                        "expected_state_gib": rec["expected_state_bytes"]["total"] / 2 ** 30,
                        "micro_batch_used": rec["micro_batch"], "world_size": rec["world_size"]})
        else:
            row["detail"] = detail
        log(f"  -> {status}" + (f": {row.get('samples_per_s', 0):.2f} samples/s" if status == "ok" else f": {detail}"))
        rows.append(row)
        write_sweep(rows, out_dir, sweep, cfg_path=cfg_path, command=" ".join(sys.argv))
    return rows


def _kernel_ratios(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """fused / reference samples/s for points that differ only in ``kernels``."""
    out = []
    ref = {tuple((k, v) for k, v in r.items() if k not in _ROW_FIGURES and k != "kernels"): r
           for r in rows if r.get("kernels") == "reference" and r["status"] == "ok"}
    for r in rows:
        if r.get("kernels") in ("fused", "auto") and r["status"] == "ok":
            key = tuple((k, v) for k, v in r.items() if k not in _ROW_FIGURES and k != "kernels")
            if key in ref:
                out.append({**dict(key), "speedup_fused_vs_reference": r["samples_per_s"] / ref[key]["samples_per_s"]})
    return out


_ROW_FIGURES = ("params", "status", "samples_per_s", "step_ms", "model_tflops_per_s", "mfu", "peak_mem_gib",
                "expected_state_gib", "predicted_gib", "micro_batch_used", "world_size", "detail")


def write_sweep(rows: List[Dict[str, Any]], out_dir: str, sweep, *, cfg_path: str, command: str) -> List[str]:
    keys = [n for n, _, _ in sweep]
    cols = keys + [c for c in _ROW_FIGURES if any(c in r for r in rows)]
    csv_path, md_path = os.path.join(out_dir, "sweep.csv"), os.path.join(out_dir, "sweep.md")
    with open(csv_path + ".tmp", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({c: r.get(c, "") for c in cols})
    os.replace(csv_path + ".tmp", csv_path)

    def fmt(v: Any) -> str:
        if v is None:
            return "n/a"
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    v = versions()
    with open(md_path + ".tmp", "w") as f:
        f.write(f"# Throughput sweep: {os.path.basename(cfg_path)}\n\n")
        f.write(f"Device: {device_name()}; torch {v['torch']}, triton {v['triton']}, deepspeed {v['deepspeed']}, "
                f"python {v['python']}; {_dt.datetime.now().strftime('%Y-%m-%d')}.\n\nCommand: `{command}`\n\n")
        f.write("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n")
        for r in rows:
            f.write("| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |\n")
        ratios = _kernel_ratios(rows)
        if ratios:
            f.write("\nFused kernels vs the PyTorch reference (samples/s ratio):\n\n")
            rc = list(ratios[0])
            f.write("| " + " | ".join(rc) + " |\n|" + "---|" * len(rc) + "\n")
            for r in ratios:
                f.write("| " + " | ".join(fmt(r[c]) for c in rc) + " |\n")
    os.replace(md_path + ".tmp", md_path)
    paths = [csv_path, md_path]
    png = os.path.join(out_dir, "sweep.png")
    try:
        plot_sweep(rows, keys, png)
        paths.append(png)
    except Exception as e:  # noqa: BLE001 -- a plotting failure must not lose the table
        print(f"profile: warning: sweep.png not written ({type(e).__name__}: {e})", file=sys.stderr)
    return paths


def plot_sweep(rows: List[Dict[str, Any]], keys: List[str], path: str) -> None:
    """samples/s and MFU (model TFLOP/s where no peak is known) against model size (parameters), one line per
    ZeRO stage (or per value of the second sweep key), the best over the other keys; OOM points as crosses."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series_key = "zero" if "zero" in keys else next((k for k in keys if k != "size"), None)
    use_mfu = any(r.get("mfu") is not None for r in rows)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    groups: Dict[Any, List[Dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(r.get(series_key) if series_key else "", []).append(r)
    for label, rs in groups.items():
        by_size: Dict[int, Dict[str, Any]] = {}
        for r in rs:
            if r["status"] == "ok" and (r["params"] not in by_size or r["samples_per_s"] > by_size[r["params"]]["samples_per_s"]):
                by_size[r["params"]] = r
        xs = sorted(by_size)
        name = f"{series_key}={label}" if series_key else "all"
        axes[0].plot(xs, [by_size[x]["samples_per_s"] for x in xs], "o-", label=name)
        y2 = [(100 * by_size[x]["mfu"]) if use_mfu else (by_size[x].get("model_tflops_per_s") or float("nan")) for x in xs]
        axes[1].plot(xs, y2, "o-", label=name)
        oom = sorted({r["params"] for r in rs if r["status"] != "ok"} - set(xs))
        for ax in axes:
            if oom:
                ax.plot(oom, [ax.get_ylim()[0]] * len(oom), "x", color="red", markersize=9)
    for ax, yl in zip(axes, ("samples/s", "MFU (%)" if use_mfu else "model TFLOP/s")):
        ax.set_xscale("log")
        ax.set_xlabel("parameters")
        ax.set_ylabel(yl)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_title("throughput (best over the other sweep keys; x = failed/OOM)")
    axes[1].set_title("MFU" if use_mfu else "model TFLOP/s")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
