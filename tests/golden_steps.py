"""Golden training steps: what a user sees, pinned to the bit, so that moving code cannot move a number.

For every CPU preset (and ZeRO-3 in one process), :func:`record` runs a few optimizer steps of the real
:class:`lct_fast.trainer.Trainer` at a fixed seed and returns each step's logged metrics (losses, gradient
norm, learning rate), a digest of the weights after the last step, and 1- and 2-step samples of the
trained network (their digest and their sum). ``tests/golden/steps.json`` holds the values recorded on one
machine; ``tests/test_golden_steps.py`` compares a fresh recording with it:

* on the machine (CPU model, torch build) that recorded it: **bit-identical** (floats are stored as
  ``float.hex``, weights and samples as SHA-256 of their bytes);
* elsewhere: every float within rtol 1e-4 (another CPU's SIMD kernels reorder sums; three Adam steps carry
  that at ~1e-6), digests skipped.

Re-record only when a change is meant to move a number, and say so where the change is described::

    python tests/golden_steps.py --write      # rewrites tests/golden/steps.json
    python tests/golden_steps.py --check      # prints the first difference, exit 1 on one
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import tempfile
from typing import Dict, List

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
GOLDEN = os.path.join(HERE, "golden", "steps.json")

#: (case name, preset, overrides). Small enough that all cases take seconds; every method, OT on (tiny),
#: ZeRO-3 for the discrete and the JVP method, and bf16 autocast for the JVP path.
SMALL = ["train.global_batch=16", "train.log_interval=16", "optim.warmup_samples=0", "data.shuffle_buffer=64",
         "train.ckpt_interval=0", "train.sample_interval=0", "train.eval_interval=0", "train.seed=3"]
CASES = [
    ("ict", "tiny", []),
    ("ict_zero3", "tiny", ["deepspeed.zero_optimization.stage=3"]),
    ("sct", "tiny_sct", []),
    ("sct_bf16", "tiny_sct", ["train.precision=bf16", "method.sct.jvp_dtype=bf16"]),
    ("sct_zero3", "tiny_sct", ["deepspeed.zero_optimization.stage=3"]),
    ("trigflow", "tiny_trigflow", []),
    ("scd", "tiny_scd", []),
]
STEPS = 3
SAMPLE_N = 8


def fingerprint() -> Dict[str, str]:
    """What decides bit-exactness: the CPU model and its kernels, and the torch build."""
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__}


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().float().contiguous().cpu().numpy().tobytes()).hexdigest()[:16]


def _teacher(tmp: str) -> str:
    """A tiny_trigflow teacher export (weights at seed 1 + config.json), as launch/export.py writes one."""
    from safetensors.torch import save_file

    from lct_fast.config import load_config, save_config
    from lct_fast.methods import build_model

    cfg = load_config("tiny_trigflow")
    torch.manual_seed(1)
    net = build_model(cfg.model, cfg.method)
    d = os.path.join(tmp, "teacher")
    os.makedirs(d, exist_ok=True)
    save_file({k: v.float().contiguous() for k, v in net.state_dict().items()}, os.path.join(d, "ema.safetensors"))
    save_config(cfg, os.path.join(d, "config.json"))
    return os.path.join(d, "ema.safetensors")


def record_case(preset: str, overrides: List[str], tmp: str) -> dict:
    from lct_fast.config import load_config
    from lct_fast.methods import build_model
    from lct_fast.sample import generate
    from lct_fast.trainer import Trainer

    sets = SMALL + list(overrides) + [f"train.total_samples={16 * STEPS}"]
    if preset == "tiny_scd":
        sets.append(f"method.scd.teacher={_teacher(tmp)}")
    cfg = load_config(preset, sets)
    tr = Trainer(cfg, os.path.join(tmp, "run"))
    tr.begin()
    steps = [{k: float(v).hex() for k, v in sorted(tr.train_step().items())} for _ in range(STEPS)]
    weights = tr.parallel.gathered_state_dict(everywhere=True, is_main=True)
    flat = torch.cat([weights[k].flatten().float() for k in sorted(weights)])
    net = build_model(cfg.model, cfg.method)
    net.load_state_dict(weights)
    net.eval()
    m = cfg.model
    samples = {}
    for n_steps in (1, 2):
        x = generate(net, cfg.method, n=SAMPLE_N, shape=(m.in_channels, m.resolution, m.resolution),
                     num_classes=m.num_classes, steps=n_steps, seed=5).latents
        samples[str(n_steps)] = {"sum": float(x.double().sum()).hex(), "abs_sum": float(x.double().abs().sum()).hex(),
                                 "sha": _digest(x)}
    return {"steps": steps, "weights": {"sum": float(flat.double().sum()).hex(),
                                        "abs_sum": float(flat.double().abs().sum()).hex(), "sha": _digest(flat)},
            "samples": samples}


def record() -> dict:
    """Every case, recorded in one process (world size 1, gloo) on one thread: a CPU reduction's order, and so
    its last bits, depends on the thread count."""
    out = {"fingerprint": fingerprint(), "cases": {}}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name, preset, overrides in CASES:
            with tempfile.TemporaryDirectory() as tmp:
                out["cases"][name] = record_case(preset, overrides, tmp)
    finally:
        torch.set_num_threads(threads)
    return out


def differences(golden: dict, fresh: dict, *, exact: bool, rtol: float = 1e-4, atol: float = 1e-7) -> List[str]:
    """Where ``fresh`` departs from ``golden``: every key and value (bit-exact, or floats within rtol/atol)."""
    out: List[str] = []

    def walk(a, b, path):
        if isinstance(a, dict):
            if not isinstance(b, dict) or set(a) != set(b):
                out.append(f"{path}: keys {sorted(a) if isinstance(a, dict) else a} != "
                           f"{sorted(b) if isinstance(b, dict) else b}")
                return
            for k in a:
                walk(a[k], b[k], f"{path}.{k}")
        elif isinstance(a, list):
            if not isinstance(b, list) or len(a) != len(b):
                out.append(f"{path}: length differs")
                return
            for i, (x, y) in enumerate(zip(a, b)):
                walk(x, y, f"{path}[{i}]")
        elif path.endswith(".sha"):
            if exact and a != b:
                out.append(f"{path}: {a} != {b}")
        elif a != b:
            if exact:
                out.append(f"{path}: {float.fromhex(a)!r} != {float.fromhex(b)!r}")
            else:
                x, y = float.fromhex(a), float.fromhex(b)
                if not abs(x - y) <= atol + rtol * abs(x):
                    out.append(f"{path}: {x!r} != {y!r} (rtol {rtol})")

    walk(golden["cases"], fresh["cases"], "cases")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--write", action="store_true", help=f"record and write {GOLDEN}")
    g.add_argument("--check", action="store_true", help="record and compare with the committed values")
    args = ap.parse_args()
    fresh = record()
    if args.write:
        os.makedirs(os.path.dirname(GOLDEN), exist_ok=True)
        tmp = GOLDEN + ".tmp"
        with open(tmp, "w") as f:
            json.dump(fresh, f, indent=1, sort_keys=True)
        os.replace(tmp, GOLDEN)
        print(f"wrote {GOLDEN} ({len(fresh['cases'])} cases)")
        return 0
    with open(GOLDEN) as f:
        golden = json.load(f)
    exact = golden["fingerprint"] == fresh["fingerprint"]
    diff = differences(golden, fresh, exact=exact)
    print(f"{'bit-exact' if exact else 'rtol 1e-4 (another machine)'} comparison: "
          f"{'identical' if not diff else f'{len(diff)} differences'}")
    for line in diff[:20]:
        print("  " + line)
    return 1 if diff else 0


if __name__ == "__main__":
    sys.exit(main())
