"""One phase of a run that changes world size between checkpoints (launched by tests/test_reshard.py).

    DS_ACCELERATOR=cpu PYTHONPATH=. deepspeed --num_gpus N tests/dist/reshard.py --run DIR --stage S \
        --total T [--expect state-prev.pt] --save-state state-this.pt --report report-this.json

Builds the trainer with ``--resume auto`` (from scratch when ``DIR`` has no checkpoint). With ``--expect``
(the whole state the previous phase's engine held when it wrote its last checkpoint, on its own world size) it
records, right after the load and before any step, how far this world size's engine is from it: every full
fp32 weight (gathered), both Adam moments of every parameter (``deepspeed.utils.safe_get_full_optimizer_state``),
every EMA (gathered across ZeRO-3 partitions), the optimizer's step count, the learning rate and samples seen;
and the data position: each rank's stream start and a digest of its first batch (ranks must not share a
stream). Then it trains to ``--total`` and saves the whole state the same way. Rank 0 writes the report; the
script never asserts, the test does.

With ``--reference state.pt`` (and ``--stage 0``) it is the independent reference instead: a fresh run on this
world size as plain data parallelism (DeepSpeed without ZeRO, torch's own AdamW), its weights, Adam moments and
step, learning-rate schedule, EMAs and samples seen set by hand from that whole, consolidated state (no
checkpoint, no universal conversion), then trained to ``--total`` like a resumed phase.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys

if os.environ.get("DS_ACCELERATOR") == "cpu":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # a CPU/gloo check: hide GPUs before torch loads

import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from lct_fast.config import load_config  # noqa: E402
from lct_fast.distributed import shutdown_distributed  # noqa: E402
from lct_fast.methods import build_model  # noqa: E402
from lct_fast.trainer import Trainer  # noqa: E402

SETS = ["model.width=32", "train.global_batch=8", "train.log_interval=8", "optim.warmup_samples=0",
        "data.shuffle_buffer=64", "train.ckpt_interval=0", "train.sample_interval=0", "train.eval_interval=0",
        "optim.name=adamw", "optim.schedule=rsqrt", "optim.t_ref=2",
        # really partition the tiny model under ZeRO-3 (default thresholds would keep its small tensors whole)
        "deepspeed.zero_optimization.stage3_param_persistence_threshold=0",
        "deepspeed.zero_optimization.stage3_prefetch_bucket_size=0"]


def whole_state(tr: Trainer) -> dict:
    """Everything a resume must carry, whole and on CPU (collectives: every rank calls it)."""
    from deepspeed.utils import safe_get_full_optimizer_state

    out = {"weights": tr.parallel.gathered_state_dict(everywhere=True, is_main=True)}
    moments = {}
    for n, p in tr.parallel.engine.module.named_parameters():
        for key in ("exp_avg", "exp_avg_sq"):
            t = safe_get_full_optimizer_state(p, key)
            if t is None:  # ZeRO 0: DeepSpeed's helper covers ZeRO optimizers only; the torch optimizer's state
                opt = tr.parallel.engine.optimizer
                t = getattr(opt, "optimizer", opt).state[p][key]
            moments[f"{key}/{n}"] = t.detach().float().cpu().clone()
    out["moments"] = moments
    emas = {}
    plain = build_model(tr.cfg.model, tr.cfg.method)
    for key in tr.ema.names:
        tr.ema.copy_to(plain, key)
        emas.update({f"{key}/{n}": v.detach().clone() for n, v in plain.state_dict().items()})
    out["ema"] = emas
    inner = tr.parallel.engine.optimizer
    inner = getattr(inner, "optimizer", inner)
    steps = {int(s["step"]) for s in inner.state.values() if "step" in s}
    out["meta"] = {"samples": tr.samples, "lr": tr.parallel.lr(), "opt_steps": sorted(steps),
                   "ema_updates": tr.ema.num_updates}
    return out


def inject(tr: Trainer, state: dict) -> None:
    """Start ``tr`` (ZeRO 0) from a whole state as :func:`whole_state` returns it."""
    meta = state["meta"]
    inner = tr.parallel.engine.optimizer
    inner = getattr(inner, "optimizer", inner)
    [steps] = meta["opt_steps"]
    with torch.no_grad():
        for n, p in tr.parallel.engine.module.named_parameters():
            p.copy_(state["weights"][n])
            inner.state[p] = {"step": torch.tensor(float(steps)),
                              "exp_avg": state["moments"][f"exp_avg/{n}"].clone(),
                              "exp_avg_sq": state["moments"][f"exp_avg_sq/{n}"].clone()}
    sched = tr.parallel.engine.lr_scheduler
    sched.last_epoch = steps - 1
    sched.step()  # the LambdaLR at `steps` applied steps, as the saved engine had it
    full: dict = {}
    for key, v in state["ema"].items():
        name, _, param = key.partition("/")
        full.setdefault(name, {})[param] = v
    tr.ema.load_full(full, meta["ema_updates"])
    tr.samples = meta["samples"]


class Recorder:
    """The training stream, with a digest of every sample it hands out (content identifies a sample)."""

    def __init__(self, loader):
        self.loader, self.digests = loader, []

    def __getattr__(self, key):
        return getattr(self.loader, key)

    def __iter__(self):
        for x0, labels in self.loader:
            self.digests += [hashlib.sha256(row.numpy().tobytes()).hexdigest()[:16] for row in x0]
            yield x0, labels


def max_err(a: dict, b: dict) -> dict:
    keys = sorted(set(a) | set(b))
    missing = [k for k in keys if k not in a or k not in b]
    errs = [float((a[k].float().reshape(-1) - b[k].float().reshape(-1)).abs().max()) for k in keys if k not in missing]
    return {"max": max(errs) if errs else None, "missing": missing[:5], "count": len(keys)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", required=True)
    ap.add_argument("--stage", type=int, required=True)
    ap.add_argument("--total", type=int, required=True)
    ap.add_argument("--expect", default=None)
    ap.add_argument("--reference", default=None)
    ap.add_argument("--save-state", required=True)
    ap.add_argument("--report", required=True)
    ap.add_argument("--set", action="append", default=[], help="extra config overrides")
    ap.add_argument("--local_rank", type=int, default=None)
    a = ap.parse_args()
    cfg = load_config("tiny", SETS + [f"deepspeed.zero_optimization.stage={a.stage}", f"train.total_samples={a.total}"] + a.set)
    tr = Trainer(cfg, a.run, resume=None if a.reference else "auto")
    d = tr.dist
    if a.reference:
        inject(tr, torch.load(a.reference, weights_only=True))
    report: dict = {"world": d.world_size, "samples_after_load": tr.samples, "resharded": tr.resharded,
                    # under ZeRO-3 some parameter is really split across ranks (else the EMA slicing is untested)
                    "partitioned": any(getattr(p, "ds_tensor", None) is not None and p.ds_tensor.numel() < p.ds_numel
                                       for p in tr.parallel.engine.module.parameters())}
    if a.expect:
        got, want = whole_state(tr), torch.load(a.expect, weights_only=True)
        report["weights"] = max_err(got["weights"], want["weights"])
        report["moments"] = max_err(got["moments"], want["moments"])
        report["ema"] = max_err(got["ema"], want["ema"])
        report["meta_loaded"], report["meta_expected"] = got["meta"], want["meta"]
    # the data position: every rank's stream starts at samples/world and no two ranks draw the same batches
    loader = tr._make_loader()
    x0, _ = next(iter(loader))
    digest = hashlib.sha256(x0.numpy().tobytes()).hexdigest()[:16]
    starts, digests = [None] * d.world_size, [None] * d.world_size
    torch.distributed.all_gather_object(starts, loader.start_sample)
    torch.distributed.all_gather_object(digests, digest)
    report["stream_starts"], report["first_batch_digests"] = starts, digests
    tr.loader = Recorder(tr._make_loader())
    summary = tr.run()
    consumed = [None] * d.world_size
    torch.distributed.all_gather_object(consumed, tr.loader.digests)
    report["consumed"], report["epoch_layout"] = consumed, tr.epoch_layout
    report["final_loss"] = summary["final"].get("loss")
    report["samples_at_end"] = tr.samples
    state = whole_state(tr)
    if d.is_main:
        torch.save(state, a.save_state)
        with open(a.report, "w") as f:
            json.dump(report, f, indent=1)
    shutdown_distributed()


if __name__ == "__main__":
    main()
