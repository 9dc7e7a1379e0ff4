"""The training loop: loss objects, EMA, checkpoints, logging, NaN guard, on the engine of lct_fast.parallel.

The loss objects receive the engine as ``net`` (the pass whose gradient DeepSpeed reduces) and
``lct_fast.parallel``'s unwrapped view as ``target_net`` (the stop-gradient pass and the sCT JVP); how the
model is wrapped (DeepSpeed, ZeRO-3's hooks and prefetcher) lives in that one module.

Progress is counted in samples seen; every step's randomness is seeded from (seed, rank, samples), so
a resumed run draws exactly what the uninterrupted run drew.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field

import torch

from . import checkpoint as ckpt
from .config import Config, save_config
from .distributed import DistEnv, init_distributed
from .ema import EMA
from .methods import get_method
from .optim import build_optimizer, build_scheduler
from .parallel import wrap
from .precision import precision_plan, set_tf32
from .profiling import phase
from .sample import save_latent_grid
from .seeding import derive_seed

__all__ = ["Trainer", "step_seed", "resolve_data_path", "TrainingStopped", "divergence_floors"]


class TrainingStopped(RuntimeError):
    """The run stopped on purpose (too many consecutive bad steps); a checkpoint was written."""


def step_seed(seed: int, rank: int, samples: int, micro: int = 0) -> int:
    """The seed of one micro-step's generator, from (seed, rank, samples seen, micro-batch index): stable
    across runs and resumes."""
    return derive_seed(seed, "step", rank, samples, micro)


def resolve_data_path(cfg: Config) -> str:
    """The dataset folder: ``data.path`` or the embedded synthetic dataset (written once, cached)."""
    from .data import resolve_dataset

    return resolve_dataset(cfg.data)


class _Logger:
    """Rank-0 JSONL + TensorBoard + tqdm; every other rank logs nothing."""

    def __init__(self, run_dir: str, enabled: bool, total_samples: int, start_samples: int):
        self.enabled = enabled
        self.jsonl = open(os.path.join(run_dir, "metrics.jsonl"), "a") if enabled else None
        self.tb = None
        self.bar = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))
        except Exception as e:  # tensorboard is optional at run time
            print(f"lct_fast: TensorBoard disabled ({e})", file=sys.stderr)
        try:
            from tqdm import tqdm

            self.bar = tqdm(total=total_samples, initial=start_samples, unit="sample", unit_scale=True,
                            dynamic_ncols=True, disable=not sys.stderr.isatty() and not os.environ.get("LCT_FAST_TQDM"))
        except ImportError:
            self.bar = None

    def log(self, samples: int, row: dict) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"samples": samples, **row}) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k, v, samples)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{row.get('loss', float('nan')):.4g}",
                                 sps=f"{row.get('samples_per_s', 0):.0f}")

    def advance(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.jsonl is not None:
            self.jsonl.close()


def divergence_floors(cfg: Config) -> dict:
    """Healthy scales of the sCT divergence metrics (see :class:`_DivergenceWatch`)."""
    sd, dim = cfg.method.sigma_data, cfg.model.in_channels * cfg.model.resolution ** 2
    return {"jvp_abs": sd / 2, "g_norm_mean": sd * math.sqrt(dim), "dFdt_rms": 1.0, "dxF_v_rms": 1.0}


class _DivergenceWatch:
    """One-line warnings (rank 0, once per metric) when a divergence metric runs away: a tangent metric above
    ``factor`` x max(its first logged value, its healthy scale), or 1-step samples beyond ``range_factor`` x the
    largest |x0| seen. sCT's instability shows first in ∂F/∂t and the tangent (sCM Fig. 4); a diverged model's
    samples leave the data range long before the loss says anything.

    Healthy scales (``floors``; the zero-initialised output makes the first values ~0): F's target is
    (dx_t/dt)/σ_d, of unit RMS, and t spans [0, π/2], so ∂F/∂t and ∇ₓF·v are O(1); J = cos t·sin t·σ_d·dF/dt
    is then O(σ_d/2) and ‖g‖ O(σ_d·√D)."""

    def __init__(self, floors: dict, factor: float = 10.0, range_factor: float = 2.0):
        self.floors, self.factor, self.range_factor = dict(floors), factor, range_factor
        self.first: dict = {}
        self.data_absmax = 0.0
        self.warned: set = set()

    def check(self, row: dict) -> list[str]:
        out = []
        for k, floor in self.floors.items():
            v = row.get(k)
            if v is None:
                continue
            base = max(self.first.setdefault(k, v), floor)
            if not v <= self.factor * base and k not in self.warned:  # NaN counts as a runaway
                self.warned.add(k)
                out.append(f"{k} = {v:.4g} is {v / base:.0f}x max(its first logged value, its healthy scale "
                           f"{floor:.3g}): the network's time derivative is running away (sCT divergence; "
                           f"check method.sct.time_scale and the learning rate)")
        self.data_absmax = max(self.data_absmax, row.get("data_absmax", 0.0))
        smax = row.get("sample_absmax")
        if (smax is not None and self.data_absmax > 0 and smax > self.range_factor * self.data_absmax
                and "sample_absmax" not in self.warned):
            self.warned.add("sample_absmax")
            out.append(f"1-step samples reach |x| = {smax:.3g}, {smax / self.data_absmax:.1f}x the data's largest "
                       f"|x0| = {self.data_absmax:.3g}: the model is leaving the data range")
        return out


@dataclass
class _Window:
    """Metrics accumulated between two log lines."""

    sums: dict = field(default_factory=dict)
    count: int = 0
    samples: int = 0
    t0: float = field(default_factory=time.perf_counter)

    def add(self, metrics: dict) -> None:
        self.count += 1
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)

    def means(self) -> dict:
        return {k: v / max(1, self.count) for k, v in self.sums.items()}


@dataclass
class _RunState:
    """What a run carries from one iteration to the next (see :meth:`Trainer.begin`)."""

    total: int
    log: "_Logger"
    watch: "_DivergenceWatch"
    window: _Window = field(default_factory=_Window)
    last: dict = field(default_factory=dict)


class Trainer:
    """Builds model, data, loss, optimizer and the DeepSpeed engine from a :class:`Config` and trains."""

    def __init__(self, cfg: Config, run_dir: str, *, resume: str | None = None, dist: DistEnv | None = None):
        from .data import load_stats
        from .methods import build_loss
        from .methods import build_model

        self.cfg = cfg
        self.run_dir = run_dir
        self.dist = dist or init_distributed()
        d = self.dist
        if d.is_main:
            os.makedirs(run_dir, exist_ok=True)
            # The plan is the GPU's (what each phase's products run in there), also on a CPU run: it is what
            # the config asks for, and what the profile's ceiling is computed from.
            save_config(cfg, os.path.join(run_dir, "config.json"),
                        derived={"precision_plan": precision_plan(cfg)})
        torch.distributed.barrier()
        self.ckpt_dir = os.path.join(run_dir, "checkpoints")

        # Data first: its stats fix the latent shape the model must match. The embedded dataset is written
        # once per node (local rank 0; nodes need not share a filesystem), then every rank reads the cache.
        if d.local_rank == 0:
            resolve_data_path(cfg)
        torch.distributed.barrier()
        self.data_path = resolve_data_path(cfg)
        self.stats = load_stats(self.data_path)
        m = cfg.model
        expect = (m.in_channels, m.resolution, m.resolution)
        if tuple(self.stats.shape) != expect:
            raise ValueError(f"{self.data_path}/stats.json: latent shape {tuple(self.stats.shape)} does not match "
                             f"model.in_channels/resolution {expect}")
        if m.num_classes and self.stats.num_classes > m.num_classes:
            raise ValueError(f"{self.data_path}/stats.json: num_classes={self.stats.num_classes} exceeds "
                             f"model.num_classes={m.num_classes}")

        self.micro_batch, self.grad_accum = cfg.train.batch_layout(d.world_size)
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        self.module = build_model(cfg.model, cfg.method).to(d.device)
        self.num_params = sum(p.numel() for p in self.module.parameters())
        data_dim = m.in_channels * m.resolution * m.resolution
        ot = cfg.method.ot
        coupler = None  # the loss's own per-micro-batch coupling of method.ot
        if ot.global_coupling and ot.method != "none":
            # One OT problem over the whole global micro-batch (all ranks); a collective, which is safe because
            # every rank calls the loss once per micro-step with the same micro-batch size.
            from .ot_global import couple_noise_global

            coupler = functools.partial(couple_noise_global, method=ot.method, backend=ot.backend,
                                        eps=ot.sinkhorn_eps, iters=ot.sinkhorn_iters, per_class=ot.per_class)
        teacher = None
        spec = get_method(cfg.method.name)
        if spec.teacher is not None:
            # The frozen teacher, checked against the student before anything trains; the student starts from it
            # (both still whole here: wrap partitions them under ZeRO-3).
            from .distill import init_student_from_teacher, load_teacher

            section = getattr(cfg.method, spec.teacher[0])
            teacher = load_teacher(section, cfg, d.device)
            if section.init_from_teacher:
                init_student_from_teacher(self.module, teacher)

        optimizer = build_optimizer(self.module.parameters(), cfg.optim, d.device)
        scheduler = build_scheduler(optimizer, cfg.optim, global_batch=cfg.train.global_batch,
                                    total_samples=cfg.train.total_samples)
        self.optimizer = optimizer
        self.parallel = wrap(self.module, optimizer, cfg.deepspeed_config(d.world_size), lr_scheduler=scheduler,
                             frozen=teacher, compile=cfg.train.compile)
        self.engine, self.target_net = self.parallel.engine, self.parallel.target_net
        self.teacher = self.parallel.frozen  # None unless sCD; under ZeRO-3 partitioned like the student
        self.loss_fn = build_loss(cfg.method, data_dim=data_dim, total_steps=cfg.train.total_steps, coupler=coupler,
                                  teacher=self.teacher)
        self.ema = EMA(self.engine.module.named_parameters(), decays=cfg.train.ema.decays,
                       power_stds=cfg.train.ema.power_stds)

        self.samples = 0
        self.bad_streak = 0
        self.bad_total = 0
        if resume:
            self._resume(resume)
        self.loader = self._make_loader()
        self.evaluator = self._make_evaluator() if cfg.train.eval_interval else None
        self.last_eval: dict = {}
        self.autocast = (torch.autocast(d.device.type, dtype=torch.bfloat16) if cfg.train.precision == "bf16"
                         else contextlib.nullcontext())
        if d.device.type == "cuda":
            set_tf32(cfg.train.tf32)

    def _make_loader(self):
        """This rank's stream (``data.reader``), positioned after the samples already seen (exact resume)."""
        from .data import build_loader

        cfg, d = self.cfg, self.dist
        return build_loader(cfg.data, batch_size=self.micro_batch, rank=d.rank, world_size=d.world_size,
                            seed=cfg.train.seed, sigma_data=cfg.method.sigma_data, path=self.data_path,
                            start_sample=self.samples // d.world_size, device=d.device)

    # ------------------------------------------------------------------------------------ evaluation
    def _make_evaluator(self):
        """Image metrics when train.eval names a VAE, else latent metrics on this run's dataset (every rank
        builds it: the reference features and the generated rows are gathered across ranks)."""
        from .config import ConfigError
        from .evaluate import ImageEvaluator, LatentEvaluator

        ev, cfg = self.cfg.train.eval, self.cfg
        name = ev.ema or (self.ema.names[0] if self.ema.names else "live")
        if name != "live" and name not in self.ema.names:
            raise ConfigError(f"train.eval.ema: {name!r} is not one of this run's EMAs {self.ema.names} (or 'live')")
        self.eval_ema = name
        if ev.vae:
            return ImageEvaluator(vae_path=ev.vae, stats=self.stats, inception_weights=ev.inception_weights,
                                  ref=ev.reference, latent_resolution=cfg.model.resolution, n=ev.n,
                                  metrics=ev.metrics, feature_layer=str(ev.feature_layer),
                                  normalize=cfg.data.normalize,
                                  device=self.dist.device)
        return LatentEvaluator(self.data_path, n=ev.n, normalize=cfg.data.normalize, seed=ev.seed)

    def _eval_net(self) -> torch.nn.Module:
        """An unpartitioned copy of the model holding the evaluated EMA, on every rank (a collective under
        ZeRO-3: the live weights and the EMA's per-rank partitions are gathered)."""
        from .methods import build_model

        net = build_model(self.cfg.model, self.cfg.method)
        net.load_state_dict(self._gathered_weights(everywhere=True))
        if self.eval_ema != "live":
            self.ema.copy_to(net, self.eval_ema)
        return net.to(self.dist.device).eval()

    def evaluate(self) -> dict:
        """train.eval on the chosen EMA: {"eval/<k>step/<metric>": value, ...} (rank 0; {} elsewhere). Writes
        the standardised samples and the reference set under <run>/eval/ for the report (latent runs)."""
        import numpy as np

        from .evaluate import EvalSpec, evaluate_model
        from .sample import save_latents

        ev, m = self.cfg.train.eval, self.cfg.model
        spec = EvalSpec(n=ev.n, steps=tuple(ev.steps), seed=ev.seed, grid=64)
        out_dir = os.path.join(self.run_dir, "eval")
        if self.dist.is_main:
            os.makedirs(out_dir, exist_ok=True)
        t0 = time.perf_counter()
        res = evaluate_model(self._eval_net(), self.cfg.method, m, spec, self.evaluator,
                             num_classes=m.num_classes if self.stats.num_classes else 0, device=self.dist.device,
                             grid_stem=os.path.join(out_dir, "latest") if self.dist.is_main else None,
                             keep_rows=self.evaluator.mode == "latent")
        if not self.dist.is_main:
            return {}
        row: dict = {"eval/ema": self.eval_ema, "eval/n": ev.n, "eval/seconds": time.perf_counter() - t0}
        for k, metrics in res["steps"].items():
            row.update({f"eval/{k}step/{name}": float(v) for name, v in metrics.items()})
        if self.evaluator.mode == "latent":
            shape = (m.in_channels, m.resolution, m.resolution)
            for k, rows in res["rows"].items():
                save_latents(os.path.join(out_dir, f"latest-{k}step-standardised.npy"), rows.reshape(-1, *shape))
            ref = os.path.join(out_dir, "reference-standardised.npy")
            if not os.path.exists(ref):
                save_latents(ref, np.asarray(self.evaluator.reference.ref))
        self.last_eval = row
        return row

    def quality_line(self) -> str:
        """One line: the headline figure at 1 step (or the fewest steps) beside its baselines."""
        row, ev = self.last_eval, self.cfg.train.eval
        if not row:
            return ""
        k = min(int(s) for s in ev.steps)
        head = self.evaluator.headline
        v = row.get(f"eval/{k}step/{head}")
        if self.evaluator.mode == "latent":
            # On class-conditional data the bar is the per-class Gaussian fit: the model is told the class.
            r = row.get(f"eval/{k}step/real_{head}")
            g = row.get(f"eval/{k}step/gaussian_class_{head}")
            bar = "per-class Gaussian fit"
            if g is None:
                g, bar = row.get(f"eval/{k}step/gaussian_{head}"), "Gaussian fit"
            verdict = "better than" if v < g else "worse than"
            return (f"quality ({self.eval_ema}, {ev.n} samples, {k} step): marginal W1 {v:.4f} vs {bar} "
                    f"{g:.4f} (second real set {r:.4f}; lower is better): {verdict} the {bar}")
        return f"quality ({self.eval_ema}, {ev.n} samples, {k} step): FID {v:.3f}"

    # ----------------------------------------------------------------------------------- checkpoints
    def _resume(self, resume: str) -> None:
        tag = ckpt.find_resume_tag(self.ckpt_dir) if resume == "auto" else resume
        if tag is None:
            if self.dist.is_main:
                print(f"lct_fast: no complete checkpoint in {self.ckpt_dir}, starting from scratch", file=sys.stderr)
            return
        if not ckpt.is_complete(self.ckpt_dir, tag):
            raise FileNotFoundError(f"{self.ckpt_dir}/{tag}: not a complete checkpoint (no COMPLETE marker)")
        self.engine.load_checkpoint(self.ckpt_dir, tag=tag)
        state = ckpt.load_client_state(self.ckpt_dir, tag, self.dist.rank)
        self.samples = int(state["samples"])
        self.bad_total = int(state["bad_total"])
        self.ema.load_state_dict(state["ema"])
        ckpt.set_rng_state(state["rng"])
        if self.dist.is_main:
            print(f"lct_fast: resumed from {self.ckpt_dir}/{tag} at {self.samples} samples", file=sys.stderr)

    def save_checkpoint(self) -> str:
        state = {"samples": self.samples, "bad_total": self.bad_total, "ema": self.ema.state_dict(),
                 "rng": ckpt.rng_state(), "world_size": self.dist.world_size}
        return ckpt.save(self.engine, self.ckpt_dir, self.samples, state, rank=self.dist.rank)

    # ---------------------------------------------------------------------------------------- steps
    def train_step(self) -> dict:
        """One optimizer step over ``grad_accum`` micro-batches; returns the step's mean metrics.

        The curriculum index k counts steps taken, skipped ones included (it is derived from samples seen,
        like everything else that must survive a resume); the LR schedule advances only on applied steps
        (DeepSpeed does not step the scheduler on a skipped step)."""
        cfg, d = self.cfg, self.dist
        k = self.samples // cfg.train.global_batch
        metrics: dict = {}
        for micro in range(self.grad_accum):
            self.parallel.before_micro_step()
            with phase("data"):
                x0, labels = next(self._batches)
                x0, labels = x0.to(d.device, non_blocking=True), labels.to(d.device, non_blocking=True)
            if self.stats.num_classes == 0:
                labels = None  # unconditional data: the null class, not class 0 of a conditional model
            gen = torch.Generator(d.device).manual_seed(step_seed(cfg.train.seed, d.rank, self.samples, micro))
            # "loss" holds the loss's own phases (ot, target_forward / jvp, online_forward); its exclusive
            # time is the rest of the loss (noising, distances, weights).
            with self.autocast, phase("loss"):
                per_sample = self.loss_fn(self.engine, x0, labels, step=k, generator=gen,
                                          target_net=self.target_net)
                loss = per_sample.mean()
            # A NaN/Inf loss is back-propagated on purpose: the guarded optimizer then sees non-finite
            # gradients on every rank (they are reduced) and skips the step as a whole.
            with phase("backward"):
                self.engine.backward(loss)
            pre_clip = self._local_grad_norm() if micro == self.grad_accum - 1 else None
            with phase("optimizer"):
                self.engine.step()
            for key, v in self.loss_fn.metrics.items():
                metrics[key] = metrics.get(key, 0.0) + float(v) / self.grad_accum
        # DeepSpeed skips a step itself when its own overflow / invalid-norm check fires (ZeRO 1-3, bf16,
        # clipping on) without calling our optimizer; our guard covers the cases it does not check.
        applied = self.engine.was_step_applied() and not getattr(self.optimizer, "overflow", False)
        if applied:
            with phase("ema"):
                self.ema.update()
            self.bad_streak = 0
        else:
            self.bad_streak += 1
            self.bad_total += 1
        self.samples += cfg.train.global_batch
        self._last_batch = (x0, labels)
        grad_norm = self.engine.get_global_grad_norm()
        grad_norm = pre_clip if grad_norm is None else float(grad_norm)
        if grad_norm is not None:
            # Pre-clipping norm; clip_frac's window mean is the fraction of steps that clipping rescaled.
            metrics["grad_norm"] = grad_norm
            metrics["clip_frac"] = float(cfg.train.grad_clip > 0 and grad_norm > cfg.train.grad_clip)
        metrics["step_applied"] = float(applied)
        metrics["lr"] = self.engine.get_lr()[0]
        return metrics

    def _local_grad_norm(self) -> float | None:
        """Global gradient norm before clipping where the module holds the full, reduced gradients (ZeRO-0,
        after the boundary backward); None under ZeRO 1-3, whose optimizer reports its own norm."""
        if self.engine.zero_optimization_stage() != 0:
            return None
        grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
        if not grads:
            return None
        return float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))))

    def diagnostics(self, n_samples: int = 32) -> dict:
        """Log-interval divergence metrics on the last batch (every rank calls it: a collective under ZeRO-3):
        the loss's own (sCT: RMS of ∂F/∂t and ∇ₓF·v), and the range of 1-step samples of the live network
        beside the batch's. Seeded from (seed, rank, samples), apart from the training stream."""
        from .sample import generate

        cfg, d = self.cfg, self.dist
        x0, labels = self._last_batch
        gen = torch.Generator(d.device).manual_seed(derive_seed(cfg.train.seed, "diagnostics", d.rank, self.samples))
        with self.autocast:
            out = {k: float(v) for k, v in
                   self.loss_fn.diagnostics(self.target_net, x0, labels, generator=gen).items()}
            m = cfg.model
            x = generate(self.target_net, cfg.method, n=n_samples, shape=(m.in_channels, m.resolution, m.resolution),
                         num_classes=m.num_classes if self.stats.num_classes else 0, steps=1,
                         seed=derive_seed(cfg.train.seed, "diagnostics", self.samples) % (2 ** 31)).latents
        out["sample_absmax"] = float(x.abs().max()) if torch.isfinite(x).all() else float("inf")
        out["sample_std"] = float(x.std())
        out["data_absmax"] = float(x0.abs().max())
        return out

    def _crossed(self, interval: int, before: int) -> bool:
        return interval > 0 and before // interval != self.samples // interval

    def begin(self, max_samples: int | None = None) -> "_RunState":
        """Open a run: the logger, the metrics window, the divergence watch and this rank's batch stream.
        :meth:`run` is ``begin``, :meth:`iteration` until the total, ``close``; ``launch/profile.py`` drives
        the same iterations under its phase timer."""
        cfg, d = self.cfg, self.dist
        total = cfg.train.total_samples - cfg.train.total_samples % cfg.train.global_batch
        if max_samples is not None:
            total = min(total, max_samples)
        if d.is_main:
            threads = (f" ({d.threads} CPU threads per rank)" if d.device.type == "cpu" and d.threads
                       else f" (TF32 {'on' if cfg.train.tf32 else 'off'})" if d.device.type == "cuda" else "")
            print(f"lct_fast: {cfg.name}: {cfg.model.arch} with {self.num_params:,} parameters, method "
                  f"{cfg.method.name}, world size {d.world_size}{threads}, micro-batch {self.micro_batch} x "
                  f"{self.grad_accum} accumulation, {total:,} samples", file=sys.stderr)
        if self.loader.start_sample != self.samples // d.world_size:
            self.loader = self._make_loader()  # a second run() continues where the first stopped
        self._batches = iter(self.loader)
        return _RunState(total=total, log=_Logger(self.run_dir, d.is_main, total, self.samples),
                         watch=_DivergenceWatch(divergence_floors(cfg)))

    def iteration(self, st: "_RunState") -> None:
        """One optimizer step and what its sample count triggers: the bad-step guard, evaluation, the log line
        (with the divergence diagnostics), checkpoint and sample grids."""
        cfg, d = self.cfg, self.dist
        before = self.samples
        metrics = self.train_step()
        st.window.add(metrics)
        st.window.samples += cfg.train.global_batch
        st.log.advance(cfg.train.global_batch)
        if self.bad_streak >= cfg.train.max_bad_steps:
            tag = self.save_checkpoint()
            raise TrainingStopped(
                f"{self.bad_streak} consecutive steps had a NaN/Inf loss or gradient (limit "
                f"train.max_bad_steps={cfg.train.max_bad_steps}); none was applied. The last good state "
                f"is saved as {self.ckpt_dir}/{tag}.")
        done = self.samples >= st.total
        # An evaluation on a logging step goes into that step's line; otherwise into a line of its own.
        with phase("eval"):
            eval_row = (self.evaluate() if self._crossed(cfg.train.eval_interval, before)
                        or (done and cfg.train.eval_interval) else {})
        with phase("logging"):
            if self._crossed(cfg.train.log_interval, before) or done:
                dt = time.perf_counter() - st.window.t0
                st.last = {**st.window.means(), "samples_per_s": st.window.samples / max(dt, 1e-9),
                           "bad_steps_total": self.bad_total, "step": self.samples // cfg.train.global_batch,
                           "data_skipped": self.loader.errors.total, **self.diagnostics(), **eval_row}
                st.log.log(self.samples, st.last)
                for msg in st.watch.check(st.last):
                    if d.is_main:
                        print(f"lct_fast: warning at {self.samples:,} samples: {msg}", file=sys.stderr)
                st.window = _Window()
            elif eval_row:
                st.log.log(self.samples, eval_row)
        with phase("checkpoint"):
            if self._crossed(cfg.train.ckpt_interval, before) or done:
                self.save_checkpoint()
        with phase("samples"):
            if self._crossed(cfg.train.sample_interval, before) or (done and cfg.train.sample_interval):
                self.write_samples()

    def run(self, max_samples: int | None = None) -> dict:
        """Train until ``train.total_samples`` (or ``max_samples``, ending with a checkpoint)."""
        cfg, d = self.cfg, self.dist
        t_start = time.perf_counter()
        start_samples = self.samples
        st = self.begin(max_samples)
        try:
            while self.samples < st.total:
                self.iteration(st)
        finally:
            st.log.close()
        last = st.last
        summary = {"name": cfg.name, "samples": self.samples, "params": self.num_params,
                   "world_size": d.world_size, "wall_s": time.perf_counter() - t_start,
                   "samples_per_s": (self.samples - start_samples) / max(time.perf_counter() - t_start, 1e-9),
                   "bad_steps_total": self.bad_total, "data": self.loader.report(), "final": last,
                   "eval": self.last_eval}
        if d.is_main:
            with open(os.path.join(self.run_dir, "summary.json"), "w") as f:
                json.dump(summary, f, indent=2)
            print(f"lct_fast: done, {self.samples:,} samples in {summary['wall_s']:.1f}s "
                  f"({summary['samples_per_s']:.1f} samples/s); run directory {self.run_dir}", file=sys.stderr)
            if self.last_eval:
                print(f"lct_fast: {self.quality_line()}", file=sys.stderr)
            try:
                from .report import write_report

                print(f"lct_fast: report {write_report(self.run_dir)}", file=sys.stderr)
            except Exception as e:  # a plotting failure must not fail a finished run
                print(f"lct_fast: warning: report.png not written ({type(e).__name__}: {e})", file=sys.stderr)
        return summary

    # -------------------------------------------------------------------------------------- samples
    def write_samples(self, n: int = 16) -> None:
        """1- and 2-step samples as .npy + a latent-channel PNG grid (rank 0; a collective under ZeRO-3).

        Uses the first EMA; under ZeRO-3 the EMA lives in per-rank partitions, so the periodic grid shows
        the live weights instead (the exported EMA is consolidated offline by ``launch/export.py``)."""
        from .methods import build_model
        from .sample import generate

        gathered = self._gathered_weights()
        if not self.dist.is_main:
            return
        net = build_model(self.cfg.model, self.cfg.method)
        net.load_state_dict(gathered)
        if self.ema.names and not self._zero3:
            self.ema.copy_to(net, self.ema.names[0])
        net = net.to(self.dist.device).eval()
        out = os.path.join(self.run_dir, "samples")
        os.makedirs(out, exist_ok=True)
        m = self.cfg.model
        for steps in (1, 2):
            x = generate(net, self.cfg.method, n=n, shape=(m.in_channels, m.resolution, m.resolution),
                         num_classes=m.num_classes, steps=steps, seed=self.cfg.train.seed).latents
            stem = os.path.join(out, f"{ckpt.tag_for(self.samples)}-{steps}step")
            save_latent_grid(x, stem)

    @property
    def _zero3(self) -> bool:
        return self.engine.zero_optimization_stage() == 3

    def _gathered_weights(self, everywhere: bool = False) -> dict:
        """Full live weights on rank 0, or on every rank with ``everywhere`` (a collective under ZeRO-3)."""
        return self.parallel.gathered_state_dict(everywhere=everywhere, is_main=self.dist.is_main)
