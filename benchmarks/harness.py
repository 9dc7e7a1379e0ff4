"""Tiny shared benchmark helper: describe the machine and append result rows to
``benchmarks/results/<name>-<machine>-<date>.csv`` and ``.md``.

Usage::

    from benchmarks.harness import machine_info, machine_tag, write_results
    rows = [{"workers": 1, "latents_per_s": 1234.5}, ...]
    csv_path, md_path = write_results("loader", rows, notes="4x32x32 fp16")
"""

from __future__ import annotations

import csv
import datetime as _dt
import os
import platform
import re
from typing import Any, Optional, Sequence

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """CPU model, usable cores, GPU name (or 'none'), torch version, 1-min load average, date."""
    info: dict[str, Any] = {"cpu": _cpu_model(), "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()}
    try:
        import torch

        info["torch"] = torch.__version__
        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
        info["gpus"] = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:
        info["torch"], info["gpu"], info["gpus"] = "n/a", "none", 0
    info["python"] = platform.python_version()
    try:  # other jobs on a shared machine skew timings; record how busy it was
        info["load"] = round(os.getloadavg()[0], 2)
    except OSError:
        info["load"] = "n/a"
    info["date"] = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    return info


def machine_string(info: Optional[dict[str, Any]] = None) -> str:
    i = info or machine_info()
    gpu = f"{i['gpus']}x {i['gpu']}" if i.get("gpus") else "no GPU"
    return f"{i['cpu']} ({i['cores']} cores), {gpu}, torch {i['torch']}, python {i['python']}, load avg {i.get('load', 'n/a')}, {i['date']}"


def machine_tag(info: Optional[dict[str, Any]] = None) -> str:
    """Short file-name-safe tag, e.g. ``cpu2-xeon`` or ``h100``."""
    i = info or machine_info()
    if i.get("gpus"):
        m = re.search(r"(H100|H200|A100|A10G?|L4|L40S?|V100|T4|RTX ?\w+|GB?\d+)", i["gpu"])
        base = (m.group(1) if m else i["gpu"]).replace(" ", "").lower()
        return f"{i['gpus']}x{base}" if i["gpus"] > 1 else base
    cpu = re.sub(r"\(R\)|\(TM\)|CPU|Processor|@.*", "", i["cpu"]).split()
    name = (cpu[1] if len(cpu) > 1 else cpu[0] if cpu else "cpu").lower()
    return re.sub(r"[^a-z0-9]+", "", f"cpu{i['cores']}{name}")


def write_results(
    name: str,
    rows: Sequence[dict[str, Any]],
    *,
    notes: str = "",
    info: Optional[dict[str, Any]] = None,
    results_dir: str = RESULTS_DIR,
) -> tuple[str, str]:
    """Write ``rows`` to ``<results_dir>/<name>-<machine tag>-<YYYYMMDD>.csv`` and ``.md``.

    Every row gets a ``machine`` column; the Markdown file starts with the full machine
    description and ``notes``. Returns the two paths.
    """
    if not rows:
        raise ValueError("write_results: no rows")
    i = info or machine_info()
    os.makedirs(results_dir, exist_ok=True)
    stem = f"{name}-{machine_tag(i)}-{_dt.datetime.now().strftime('%Y%m%d')}"
    csv_path = os.path.join(results_dir, stem + ".csv")
    md_path = os.path.join(results_dir, stem + ".md")
    columns = list(dict.fromkeys(k for r in rows for k in r)) + ["machine"]
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        for r in rows:
            w.writerow({**r, "machine": machine_string(i)})

    def fmt(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    with open(md_path, "w") as f:
        f.write(f"# {name}\n\nMachine: {machine_string(i)}\n\n")
        if notes:
            f.write(notes.strip() + "\n\n")
        cols = columns[:-1]
        f.write("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n")
        for r in rows:
            f.write("| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |\n")
    return csv_path, md_path
