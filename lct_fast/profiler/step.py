"""Profile the real training step: phases, FLOPs, MFU, memory (``launch/profile.py`` is the command line).

The step profiled is :meth:`lct_fast.trainer.Trainer.iteration` itself (same config, model, loss, DeepSpeed
engine, data stream), run under a :class:`lct_fast.profiler.phases.PhaseTimer`:

1. ``warmup`` iterations (allocator, autotuning, DeepSpeed's first-step work) -- not recorded;
2. one iteration under :class:`lct_fast.profiler.flops.FlopCounter` -- the FLOPs of every phase, counted;
3. ``steps`` timed iterations -- step time and the exclusive time of each phase;
4. with ``trace``, a few more under ``torch.profiler`` (Chrome trace per rank).

Every rank times its own steps; rank 0 gathers them (``all_gather_object``); :mod:`.summary` aggregates them
(the step time is the slowest rank's at each step: ranks meet in the gradient collectives anyway).
"""
from __future__ import annotations

import json
import os
import platform
import resource
import statistics
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..config import Config, load_config
from ..registry import get_method
from ..precision import tf32_allowed
from .flops import PEAK_TFLOPS, FlopCounter
from .memory import SavedTensorMeter
from .phases import UNTRACKED, PhaseTimer, current_phase, phase


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
    """Peak TFLOP/s per device for MFU; default from :data:`lct_fast.profiler.flops.PEAK_TFLOPS` by device name."""
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
def kernel_backends(cfg: Config, device: torch.device, ot_size: int | None = None) -> Dict[str, str]:
    """What computed each custom op in this process (the dispatcher's decisions) and the OT coupling, whose
    ``auto`` Sinkhorn backend depends on the problem size: ``ot_size`` is its largest (the micro-batch, times
    the world size for a global coupling; per-class groups are smaller)."""
    from .. import ops

    out: Dict[str, str] = {}
    for (op, requested, dev, chosen), _reason in sorted(ops.backend_choices().items()):
        key = f"{op}"
        val = f"{chosen} (requested {requested}, {dev})"
        out[key] = val if key not in out else out[key] + "; " + val
    ot = cfg.method.ot
    if ot.method == "sinkhorn":
        name = ops.get_sinkhorn_backend(ot.backend, device, ot_size)[0]
        out["ot"] = f"sinkhorn/{name}" + (f" (n ≤ {ot_size})" if ot_size else "")
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
    """Per GPU of :data:`lct_fast.profiler.flops.PEAK_TFLOPS`: the step's model FLOPs (one device's, by phase) run with each
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
                # memory the model in lct_fast.profiler.memory predicts; parameters left out, they are state).
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

    from ..distributed import init_distributed
    from ..trainer import Trainer

    micro, _ = load_config(config, list(overrides)).train.batch_layout(1)
    one = [f"train.global_batch={micro}", f"train.micro_batch={micro}", "train.grad_accum=1"]
    cfg = load_config(config, profile_overrides(config, list(overrides) + one, synthetic_data=synthetic_data))
    with tempfile.TemporaryDirectory(prefix="lct_fast-step-") as run_dir:
        trainer = Trainer(cfg, run_dir, dist=init_distributed(timeout_s=cfg.train.collective_timeout_s))
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


def device_is_gpu(device: str) -> bool:
    return not device.startswith("CPU")
