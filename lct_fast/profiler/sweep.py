"""The scaling sweep: one profile per point in a fresh process. A CUDA OOM, a CPU allocation failure or a child
killed by the kernel's OOM killer is a result (``status: oom``), not a failure; the points' figures are written
as CSV, Markdown and a plot."""
from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import itertools
import json
import os
import re
import resource
import shlex
import signal
import subprocess
import sys
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..config import ConfigError, load_config
from .memory import predicted_bytes
from .step import _KERNELS, SWEEP_ALIASES, device_name, versions


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
    from ..methods import model_conditions
    from ..models import count_parameters

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
            params = count_parameters(cfg.model, model_conditions(cfg.method))
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
    # The children import the lct_fast this process runs (an installed copy elsewhere would profile other code).
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p))
    proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=preexec_fn, env=env)
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException as exc:
        # The point's time is up, or the sweep itself is stopped (Ctrl-C, or SIGTERM from `timeout`, which
        # _sweep turns into SystemExit): its own session would otherwise outlive it and hold the GPU.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        if isinstance(exc, subprocess.TimeoutExpired):
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
    bytes per rank (:func:`lct_fast.profiler.memory.predicted_bytes` on ``world_size`` ranks) exceed ``skip_above_gb``
    is a ``skipped`` row, never launched."""
    sweep = parse_sweep(sweep_items)
    points = sweep_points(cfg_path, sweep, base_overrides)
    os.makedirs(out_dir, exist_ok=True)
    # launch/profile.py (not lct_fast/cli/profile.py: run as a file, that folder would shadow the standard profile)
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "launch",
                          "profile.py")
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
