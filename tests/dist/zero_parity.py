"""ZeRO parity check: DeepSpeed ZeRO stages 0/1/2/3 against a single-process reference.

Launched by the DeepSpeed launcher (2 ranks, CPU/gloo on a machine without GPUs)::

    DS_ACCELERATOR=cpu PYTHONPATH=. deepspeed --num_gpus 2 --master_port PORT \
        tests/dist/zero_parity.py --out result.json

For every method (``ict``, ``sct``, ``scd`` with a fixed frozen teacher, ``meanflow`` with training-time guidance) and ZeRO stage (0, 1, 2, 3) it builds a tiny DiT twice from the same
seed: once wrapped in a DeepSpeed engine (each rank trains on its half of a fixed global batch, seeded
exactly as :meth:`lct_fast.trainer.Trainer.train_step` seeds it), once as a plain module that computes
the whole global batch in one process (rank r's half with rank r's generator). Each step compares the
global loss, every full parameter gradient (``deepspeed.utils.safe_get_full_grad``, before clipping) and,
after the optimizer step (DeepSpeed's clipping vs ``torch.nn.utils.clip_grad_norm_`` + a plain torch
optimizer), every updated parameter (gathered under ZeRO-3). After the last step, the EMA kept by
:class:`lct_fast.ema.EMA` on the engine's parameters (ZeRO-3: on each rank's partition) is consolidated
from all ranks with :func:`lct_fast.ema.consolidate` and compared with the reference EMA.

Rank 0 writes every measured error to ``--out`` (JSON); the pytest wrapper
(``tests/test_trainer_zero.py``) asserts on it. The script itself never asserts, so one failing case
still reports the others.

Every engine is built as the trainer builds it (``parallel.deepspeed_config(cfg, world)`` as is, the
NaN-guarded optimizer of :mod:`lct_fast.optim`, the trainer's ``target_net`` wrapper); ZeRO-3 cases
only add persistence thresholds of 0 so that the tiny model is really partitioned. A failing case is
recorded (error and traceback) instead of killing the launch, and the report is rewritten after every
case, so a crash (e.g. a segfault in a DeepSpeed hook) still leaves the earlier results and names the
case it died in (``running``).

Also recorded per case: whether DeepSpeed's process-wide ``torch.nn.functional.linear`` patch (ZeRO-3
``memory_efficient_linear``, an autograd.Function without forward-mode AD) was installed -- it must not
be, or the sCT tangent fails for every module of the process.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import math
import os
import sys
import time
import traceback
from typing import Any

if os.environ.get("DS_ACCELERATOR") == "cpu":
    # The launcher's CPU accelerator still exports CUDA_VISIBLE_DEVICES=0,1; lct_fast.distributed picks
    # NCCL/CUDA whenever torch sees a GPU. This check is a CPU/gloo one: hide GPUs before torch loads.
    os.environ["CUDA_VISIBLE_DEVICES"] = ""

import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from lct_fast.config import Config, load_config  # noqa: E402
from lct_fast.distributed import init_distributed, shutdown_distributed  # noqa: E402
from lct_fast.ema import EMA, consolidate  # noqa: E402
from lct_fast.methods import build_loss  # noqa: E402
from lct_fast.methods import build_model  # noqa: E402
from lct_fast.parallel import deepspeed_config  # noqa: E402
from lct_fast.optim import build_optimizer  # noqa: E402
from lct_fast.trainer import step_seed  # noqa: E402

WORLD = 2
GLOBAL_BATCH = 8
LR = 1e-3
# fp32 tolerances. The DeepSpeed and reference paths run the same per-rank forward/backward (same shapes,
# same kernels, same seeds); they differ only in where partial sums are added: the all-reduce /
# reduce-scatter of the two ranks' gradients vs autograd's accumulation of the two branches, ZeRO's
# flattened buffers, and the gradient norm used for clipping (DeepSpeed accumulates it in fp64, torch's
# clip_grad_norm_ in fp32). Each is a few fp32 roundings (~6e-8 relative) per element, so gradients and
# losses agree to ~1e-7 relative; GRAD_RTOL = 1e-4 leaves three orders of margin and is still three
# orders below what a real fault produces (a rank dropped or not averaged, the JVP term lost: O(1)
# relative, see discriminating_power). GRAD_ATOL only covers gradient entries that are exactly 0 on one
# side. Parameters: Adam-type updates are lr * m/(sqrt(v)+eps), i.e. ~lr per element whatever the
# gradient's size, so a rounding difference delta in a gradient entry g moves that parameter by
# ~lr * delta/|g| -- large in relative terms only for entries with |g| near zero. Any real fault (wrong
# lr or clipping, a skipped step, a partition written to the wrong parameter) is O(lr) per element, so
# parameters (and the EMAs, convex combinations of them) are compared with atol = 1% of one step.
GRAD_RTOL, GRAD_ATOL = 1e-4, 1e-7
LOSS_RTOL = 1e-6
PARAM_RTOL, PARAM_ATOL = 1e-5, 1e-2 * LR


# ----------------------------------------------------------------------------------------- set-up
def make_config(method: str, stage: int, grad_clip: float, compile: bool = False) -> Config:
    """Tiny DiT (width 32, depth 2, heads 2, 8x8 latents), fp32, global batch 8 on 2 ranks."""
    preset = {"ict": "tiny", "sct": "tiny_sct", "scd": "tiny_scd", "meanflow": "tiny_meanflow"}[method]
    if method == "meanflow":
        # its adaptive weight (p = 1) normalises each sample's loss, so the gradient norm stays near 0.3 here: a
        # lower threshold keeps DeepSpeed's clipping exercised
        grad_clip = min(grad_clip, 0.1)
    overrides = [
        "model.width=32", "model.depth=2", "model.heads=2", "model.resolution=8",
        # dropout on: the online and the stop-gradient/JVP passes must share the seeded masks on every path
        "model.dropout=0.1",
        # pinned: both paths use the same PyTorch ops on any machine; the question here is DeepSpeed's, not
        # the kernels' (tests/test_ops_*.py cover those)
        "model.ops_backend=reference",
        f"train.global_batch={GLOBAL_BATCH}", f"train.total_samples={GLOBAL_BATCH * 1000}",
        f"train.grad_clip={grad_clip}", "train.ema.decays=[0.9]", "train.ema.power_stds=[0.1]",
        # no warm-up: a full-size learning rate makes the parameter comparison after a step meaningful
        "optim.warmup_samples=0", f"optim.lr={LR}",
        # both torch optimizers of lct_fast.optim are exercised: AdamW for ict and meanflow (the paper's Adam;
        # RAdam's un-rectified first steps move MeanFlow's normalised-loss weights too little for the EMA check),
        # RAdam (the paper's) for sct
        f"optim.name={'adamw' if method in ('ict', 'meanflow') else 'radam'}",
        # scd: the teacher is built by make_teacher (fixed weights), not loaded; guidance on
        *(["method.scd.guidance=1.5"] if method == "scd" else []),
        # meanflow: half the samples with r != t (the JVP term), and eq. 21's guidance passes (more collectives)
        *(["method.meanflow.ratio=0.5", "method.meanflow.guidance_mix=0.5"] if method == "meanflow" else []),
        "optim.weight_decay=0.01",
        f"deepspeed.zero_optimization.stage={stage}",
        # train.compile: the DeepSpeed path's blocks compiled (inductor), the reference stays eager
        f"train.compile={str(compile).lower()}",
    ]
    if stage == 3:
        # The default persistence threshold (1e5 elements) would keep every parameter of the tiny model
        # unpartitioned, i.e. ZeRO-3 would not be tested at all. 0 partitions every parameter.
        overrides += ["deepspeed.zero_optimization.stage3_param_persistence_threshold=0",
                      "deepspeed.zero_optimization.stage3_model_persistence_threshold=0"]
    return load_config(preset, overrides)


def make_module(cfg: Config) -> torch.nn.Module:
    """The same module on every rank and path: the trainer's seeding, then a fixed perturbation.

    adaLN-zero initialises the modulation and output layers to zero, which makes most gradients of the
    first step exactly zero; the perturbation gives every parameter a non-trivial gradient to compare.
    """
    torch.manual_seed(cfg.train.seed)
    module = build_model(cfg.model, cfg.method)
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return module


def make_teacher(cfg: Config):
    """sCD's frozen teacher, the same on every rank and path: a method=trigflow network of the student's
    architecture with fixed random weights (the DeepSpeed path hands it to wrap, which partitions it under ZeRO-3
    as the trainer's is; the reference keeps a whole copy)."""
    if cfg.method.name != "scd":
        return None
    import dataclasses

    tmethod = dataclasses.replace(cfg.method, name="trigflow")
    torch.manual_seed(99)
    teacher = build_model(cfg.model, tmethod)
    g = torch.Generator().manual_seed(77)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
            p.requires_grad_(False)
    return teacher.eval()


def make_batch(cfg: Config) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed global batch (identical on all ranks) of latents with sigma_data scale, and labels."""
    m = cfg.model
    g = torch.Generator().manual_seed(4321)
    x = cfg.method.sigma_data * torch.randn(GLOBAL_BATCH, m.in_channels, m.resolution, m.resolution, generator=g)
    labels = torch.randint(0, m.num_classes, (GLOBAL_BATCH,), generator=g)
    return x, labels


def reference_optimizer(params, cfg: Config) -> torch.optim.Optimizer:
    """A plain torch optimizer with the settings of lct_fast.optim.build_optimizer (independent of it)."""
    o = cfg.optim
    common = dict(lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    if o.name == "adamw":
        return torch.optim.AdamW(params, **common)
    return torch.optim.RAdam(params, decoupled_weight_decay=True, **common)


# ------------------------------------------------------------------------------------ comparisons
def _max_err(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(max |a - b|, max |a - b| / max |b|) in float64."""
    d = (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
    scale = b.double().abs().max().item() if b.numel() else 0.0
    return d, d / scale if scale > 0 else (0.0 if d == 0 else math.inf)


def compare_tensors(ds: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], rtol: float, atol: float) -> dict:
    """Worst absolute / relative error over named tensors and whether all are allclose(rtol, atol)."""
    out = {"max_abs_err": 0.0, "max_rel_err": 0.0, "worst": "", "allclose": True, "missing": [], "count": 0}
    for name, r in ref.items():
        d = ds.get(name)
        if d is None or d.shape != r.shape:
            out["missing"].append(name)
            out["allclose"] = False
            continue
        out["count"] += 1
        abs_err, rel_err = _max_err(d, r)
        if abs_err > out["max_abs_err"]:
            out["max_abs_err"], out["worst"] = abs_err, name
        out["max_rel_err"] = max(out["max_rel_err"], rel_err)
        if not torch.allclose(d.double(), r.double(), rtol=rtol, atol=atol):
            out["allclose"] = False
    return out


def gathered_params(engine) -> dict[str, torch.Tensor]:
    """Full parameters of the engine's module (a collective under ZeRO-3)."""
    import deepspeed

    params = list(engine.module.parameters())
    ctx = (deepspeed.zero.GatheredParameters(params, modifier_rank=None)
           if engine.zero_optimization_stage() == 3 else contextlib.nullcontext())
    with ctx:
        return {n: p.detach().float().clone() for n, p in engine.module.named_parameters()}


def _float_metrics(metrics: dict) -> dict:
    return {k: float(v) for k, v in metrics.items()}


# ------------------------------------------------------------------------------------------- cases
def build_engine(cfg: Config):
    """The trainer's construction: module, lct_fast.optim optimizer, parallel.deepspeed_config unchanged, wrapped
    by lct_fast.parallel.wrap (engine, the target_net view Trainer.train_step passes -- under ZeRO-3 its
    no-grad/JVP pass bypasses DeepSpeed's backward-hook autograd.Functions, which have no jvp -- and the
    per-micro-step hook); for sCD the teacher goes in as wrap's frozen module (partitioned under ZeRO-3)."""
    from lct_fast.parallel import wrap

    module = make_module(cfg)
    optimizer = build_optimizer(module.parameters(), cfg.optim, torch.device("cpu"))
    return wrap(module, optimizer, deepspeed_config(cfg, WORLD), frozen=make_teacher(cfg),
                compile=cfg.train.compile), optimizer


def destroy_engine(engine) -> None:
    if engine is None:
        return
    with contextlib.suppress(Exception):
        engine.destroy()
    gc.collect()


def restore_linear() -> bool:
    """Undo DeepSpeed's process-wide ``torch.nn.functional.linear`` patch (ZeRO-3 memory_efficient_linear).

    Returns whether it was patched. ZeRO-3's parameter conversion replaces F.linear by
    ``zero3_linear_wrap`` (an autograd.Function without a ``jvp``) for *every* module in the process and
    never restores it; later cases and the plain reference module must not inherit it.
    """
    from deepspeed.runtime.zero.partition_parameters import InsertPostInitMethodToModuleSubClasses as _Ins

    original = getattr(_Ins, "linear_bk", None)
    if original is not None and torch.nn.functional.linear is not original:
        torch.nn.functional.linear = original
        return True
    return False


def run_case(method: str, stage: int, rank: int, *, steps: int, k0: int, grad_clip: float,
             compile: bool = False) -> dict:
    """One (method, stage) case: ``steps`` optimizer steps on both paths, comparisons per step."""
    import deepspeed

    cfg = make_config(method, stage, grad_clip, compile)
    if compile:  # a fresh dynamo cache and counters per case: its report is this case's alone
        from torch._dynamo import reset as dynamo_reset
        from torch._dynamo.utils import counters

        dynamo_reset()
        counters.clear()
    m = cfg.model
    data_dim = m.in_channels * m.resolution * m.resolution
    x, labels = make_batch(cfg)
    per_rank = GLOBAL_BATCH // WORLD
    halves = [(x[r * per_rank:(r + 1) * per_rank], labels[r * per_rank:(r + 1) * per_rank]) for r in range(WORLD)]
    result: dict[str, Any] = {"method": method, "stage": stage, "compile": compile, "steps": [],
                              "memory_efficient_linear": deepspeed_config(cfg, WORLD)["zero_optimization"].get(
                                  "memory_efficient_linear")}

    wrapped, optimizer = build_engine(cfg)
    engine = wrapped.engine
    try:
        ds_loss = build_loss(cfg.method, data_dim=data_dim, total_steps=cfg.train.total_steps,
                             teacher=wrapped.frozen)
        ds_ema = EMA(engine.module.named_parameters(), decays=cfg.train.ema.decays,
                     power_stds=cfg.train.ema.power_stds)
        if stage == 3:
            ps = list(engine.module.parameters())
            # every parameter with more than one element must be split (1-element ones are replicated)
            result["zero3_partitioned"] = all(p.ds_tensor.numel() < p.ds_numel for p in ps if p.ds_numel > 1)
            result["zero3_local_numel"] = int(sum(p.ds_tensor.numel() for p in ps))
            result["zero3_full_numel"] = int(sum(p.ds_numel for p in ps))
            if wrapped.frozen is not None:  # the teacher: partitioned like the student, nothing trainable
                tp = list(wrapped.frozen.parameters())
                result["teacher_zero3_partitioned"] = all(p.ds_tensor.numel() < p.ds_numel for p in tp
                                                          if p.ds_numel > 1)
                result["teacher_zero3_local_numel"] = int(sum(p.ds_tensor.numel() for p in tp))
                result["teacher_zero3_full_numel"] = int(sum(p.ds_numel for p in tp))
                result["teacher_trainable"] = any(p.requires_grad for p in tp)

        ref = make_module(cfg)
        ref_opt = reference_optimizer(ref.parameters(), cfg)
        ref_loss = build_loss(cfg.method, data_dim=data_dim, total_steps=cfg.train.total_steps,
                              teacher=make_teacher(cfg))  # a plain, whole copy
        ref_ema = EMA(ref.named_parameters(), decays=cfg.train.ema.decays, power_stds=cfg.train.ema.power_stds)

        target = wrapped.target_net
        result["target_net"] = type(target).__name__

        for i in range(steps):
            k = k0 + i
            samples = k * GLOBAL_BATCH
            row: dict[str, Any] = {"k": k}

            # --- DeepSpeed path: this rank's half, seeded as Trainer.train_step seeds it.
            xr, lr_ = halves[rank]
            wrapped.before_micro_step()
            gen = torch.Generator().manual_seed(step_seed(cfg.train.seed, rank, samples))
            per_sample = ds_loss(wrapped.online, xr, lr_, step=k, generator=gen, target_net=target)
            row["metrics_rank"] = _float_metrics(ds_loss.metrics)
            loss = per_sample.mean()
            wrapped.backward(loss)
            ds_grads = {}
            for n, p in engine.module.named_parameters():
                g = deepspeed.utils.safe_get_full_grad(p)
                ds_grads[n] = g.detach().float().clone() if g is not None else None
            ds_grads = {n: g for n, g in ds_grads.items() if g is not None}
            global_loss = loss.detach().clone()
            torch.distributed.all_reduce(global_loss)
            global_loss /= WORLD
            wrapped.step()
            row["overflow"] = not wrapped.step_applied()
            if not row["overflow"]:
                ds_ema.update()

            # --- Reference: the whole global batch in this process.
            ref_opt.zero_grad(set_to_none=True)
            total = torch.zeros(())
            ref_metrics = []
            for r in range(WORLD):
                gr = torch.Generator().manual_seed(step_seed(cfg.train.seed, r, samples))
                total = total + ref_loss(ref, *halves[r], step=k, generator=gr, target_net=ref).mean()
                ref_metrics.append(_float_metrics(ref_loss.metrics))
            total = total / WORLD
            total.backward()
            ref_grads = {n: p.grad.detach().clone() for n, p in ref.named_parameters() if p.grad is not None}
            grad_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), cfg.train.grad_clip)
            ref_opt.step()
            ref_ema.update()

            row["loss_ds"] = float(global_loss)
            row["loss_ref"] = float(total.detach())
            row["loss_rel_err"] = abs(row["loss_ds"] - row["loss_ref"]) / max(abs(row["loss_ref"]), 1e-30)
            row["loss_ok"] = row["loss_rel_err"] <= LOSS_RTOL
            row["metrics_ref"] = ref_metrics
            row["grad_norm_ref"] = float(grad_norm)
            row["clipped"] = bool(cfg.train.grad_clip > 0 and float(grad_norm) > cfg.train.grad_clip)
            row["grad"] = compare_tensors(ds_grads, ref_grads, GRAD_RTOL, GRAD_ATOL)
            row["param"] = compare_tensors(gathered_params(engine), {n: p.detach().clone() for n, p in
                                                                   ref.named_parameters()}, PARAM_RTOL, PARAM_ATOL)
            result["steps"].append(row)

        # --- EMA: consolidate every rank's (partition) state and compare with the reference EMA.
        states: list[Any] = [None] * WORLD
        torch.distributed.all_gather_object(states, ds_ema.state_dict())
        full = consolidate(states)
        result["ema"] = {}
        live = {n: p.detach().clone() for n, p in ref.named_parameters()}
        for key in ref_ema.names:
            cmp = compare_tensors(full.get(key, {}), ref_ema.shadows[key], PARAM_RTOL, PARAM_ATOL)
            # non-triviality: the EMA must differ from the live weights by far more than the tolerance
            cmp["ema_vs_live_max_diff"] = max(_max_err(ref_ema.shadows[key][n].view_as(t), t)[0]
                                              for n, t in live.items())
            cmp["num_updates"] = ds_ema.num_updates
            result["ema"][key] = cmp
        if compile:  # what was compiled, and whether dynamo gave up anywhere (counters are per process)
            from lct_fast.profiler import compile_report

            result["compiled_blocks"] = wrapped.compiled_blocks
            result["compile_report"] = compile_report(cfg)
    finally:
        destroy_engine(engine)
        result["linear_was_patched"] = restore_linear()
    return result


def discriminating_power(method: str, grad_clip: float, k: int) -> dict:
    """Relative gap between wrong answers and the right one, in the measure the tolerances apply to.

    * ``half_vs_global``: gradient of rank 0's half alone vs the global-batch gradient (a rank dropped
      or not averaged);
    * ``r0_vs_r`` (sct): gradient with the tangent warm-up r = 0 vs r at step k (the JVP term dropped).
    """
    cfg = make_config(method, 0, grad_clip)
    m = cfg.model
    data_dim = m.in_channels * m.resolution * m.resolution
    x, labels = make_batch(cfg)
    per_rank = GLOBAL_BATCH // WORLD
    halves = [(x[r * per_rank:(r + 1) * per_rank], labels[r * per_rank:(r + 1) * per_rank]) for r in range(WORLD)]

    def grads(step_for_loss: int, ranks: list[int], method_cfg=None) -> dict[str, torch.Tensor]:
        net = make_module(cfg)
        mcfg = method_cfg or cfg.method
        loss_fn = build_loss(mcfg, data_dim=data_dim, total_steps=cfg.train.total_steps,
                             teacher=make_teacher(cfg) if mcfg.name == "scd" else None)
        total = torch.zeros(())
        for r in ranks:
            gr = torch.Generator().manual_seed(step_seed(cfg.train.seed, r, k * GLOBAL_BATCH))
            total = total + loss_fn(net, *halves[r], step=step_for_loss, generator=gr, target_net=net).mean()
        (total / len(ranks)).backward()
        return {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}

    full = grads(k, list(range(WORLD)))
    out = {"half_vs_global": compare_tensors(grads(k, [0]), full, GRAD_RTOL, GRAD_ATOL)}
    if method in ("sct", "scd"):
        # step 0 has r = 0 (warm-up) but also draws the same noise (the seed does not depend on `step`)
        out["r0_vs_r"] = compare_tensors(grads(0, list(range(WORLD))), full, GRAD_RTOL, GRAD_ATOL)
    if method == "meanflow":
        # every sample at r = t (flow matching, no JVP term) instead of half of them at r < t
        import dataclasses

        fm = dataclasses.replace(cfg.method, meanflow=dataclasses.replace(cfg.method.meanflow, ratio=0.0))
        out["no_jvp_vs_jvp"] = compare_tensors(grads(k, list(range(WORLD)), fm), full, GRAD_RTOL, GRAD_ATOL)
    if method == "scd":
        # the data velocity (sCT) in place of the teacher's: the teacher must matter
        import dataclasses

        sct = dataclasses.replace(cfg.method, name="sct")
        out["teacher_vs_data"] = compare_tensors(grads(k, list(range(WORLD)), sct), full, GRAD_RTOL, GRAD_ATOL)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON file written by rank 0")
    ap.add_argument("--methods", default="ict,sct,scd,meanflow")
    ap.add_argument("--stages", default="0,1,2,3")
    ap.add_argument("--compile-stages", default="0,1,2,3",
                    help="ZeRO stages of the sct cases rerun with train.compile (compiled blocks)")
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps per case")
    ap.add_argument("--grad-clip", type=float, default=0.5)
    ap.add_argument("--local_rank", type=int, default=0, help="set by the deepspeed launcher")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    torch.set_num_threads(1)  # 2 ranks on a small shared machine
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    dist = init_distributed(timeout_s=300.0)
    if dist.world_size != WORLD:
        raise SystemExit(f"zero_parity.py: needs world size {WORLD}, got {dist.world_size}")
    import deepspeed

    deepspeed.utils.logger.setLevel(logging.WARNING)
    rank = dist.rank
    report: dict[str, Any] = {"world_size": dist.world_size, "torch": torch.__version__,
                              "deepspeed": deepspeed.__version__, "tolerances": {
                                  "grad_rtol": GRAD_RTOL, "grad_atol": GRAD_ATOL, "loss_rtol": LOSS_RTOL,
                                  "param_rtol": PARAM_RTOL, "param_atol": PARAM_ATOL},
                              "cases": [], "discriminating_power": {}}
    methods = [s for s in args.methods.split(",") if s]
    stages = [int(s) for s in args.stages.split(",") if s]
    k0 = {"ict": 5, "sct": 100, "scd": 100, "meanflow": 5}  # sct/scd: tangent warm-up H = 200 -> r = 0.5, the JVP term is live

    runs = [(method, stage, False) for method in methods for stage in stages]
    runs += [("sct", int(s), True) for s in args.compile_stages.split(",") if s]

    def write_report() -> None:
        if rank == 0:
            report["wall_s"] = time.perf_counter() - t0
            tmp = args.out + ".tmp"
            with open(tmp, "w") as f:
                json.dump(report, f, indent=1, default=str)
            os.replace(tmp, args.out)

    report["complete"] = False
    for method in methods:
        report["discriminating_power"][method] = discriminating_power(method, args.grad_clip, k0[method])
    for method, stage, compiled in runs:
        t_case = time.perf_counter()
        name = f"{method} ZeRO-{stage}" + (" compiled" if compiled else "")
        if rank == 0:
            print(f"zero_parity: {name}", file=sys.stderr, flush=True)
        report["running"] = {"method": method, "stage": stage, "compile": compiled}
        write_report()
        try:
            case = run_case(method, stage, rank, steps=args.steps, k0=k0[method], grad_clip=args.grad_clip,
                            compile=compiled)
            case["error"] = None
        except Exception as e:
            tb = traceback.format_exc()
            case = {"method": method, "stage": stage, "compile": compiled, "error": f"{type(e).__name__}: {e}",
                    "traceback": tb[-3000:]}
            if rank == 0:
                print(f"zero_parity: {name} failed:\n{tb}", file=sys.stderr, flush=True)
            restore_linear()
        case["wall_s"] = time.perf_counter() - t_case
        report["cases"].append(case)
        report["running"] = None
        torch.distributed.barrier()
        write_report()
    report["complete"] = True
    write_report()
    shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
