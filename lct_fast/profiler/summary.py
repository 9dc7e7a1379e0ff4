"""The profile record (``profile.json``) from every rank's measurements, and its table."""
from __future__ import annotations

import datetime as _dt
import statistics
from typing import Any, Dict, List, Optional, Sequence


from ..config import Config
from ..registry import get_method
from ..precision import precision_plan
from .flops import dit_forward_flops, dit_jvp_flops, peak_tflops
from .memory import activation_model
from .step import (NON_MODEL_PHASES, STEP_PHASES, ProfileOptions, ceiling, device_is_gpu, matmul_precision,
                   versions)


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
        conds = spec.conditions(cfg.method)
        closed = dit_forward_flops(cfg.model, conds) if cfg.model.arch == "dit" else None
        model_tf = step_flops / agg["median"] / 1e12  # the same statistic as samples/s
        peak = opts.peak_tflops or (peak_tflops(device, matmul_precision(cfg, device)) if device_is_gpu(device)
                                    else None)
        out["flops"] = {
            "forward_per_sample": fwd,
            "forward_per_sample_closed_form": closed,
            "jvp_per_sample_closed_form": dit_jvp_flops(cfg.model, conds) if closed and spec.jvp else None,
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