"""The training loop: loss objects, EMA, checkpoints, logging, NaN guard, on the wrapped model of
lct_fast.parallel.

The loss objects receive ``lct_fast.parallel``'s online view as ``net`` (the pass whose gradient DeepSpeed
reduces) and its stop-gradient view as ``target_net`` (the target pass and the JVP); how the model is wrapped
(DeepSpeed, ZeRO-3's hooks and prefetcher) and what a step did (applied, gradient norm) live in that one module.

Progress is counted in samples seen; every step's randomness is seeded from (seed, rank, samples), so
a resumed run draws exactly what the uninterrupted run drew.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
import time

import torch

from . import checkpoint as ckpt
from .config import Config, save_config
from .distributed import DistEnv, init_distributed
from .ema import EMA
from .methods import get_method
from .methods.probe import denoising_probe
from .optim import build_optimizer, build_scheduler
from .parallel import deepspeed_config, wrap
from .precision import precision_plan, set_tf32
from .profiler.phases import phase
from .preflight import DataFacts, check_model_matches_data
from .run_dir import RunDir
from .seeding import derive_seed
from .train_hooks import (DivergenceWatch, EvalHook, MetricsLog, RunState, Window, divergence_floors,
                          write_sample_grids)

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


class Trainer:
    """Builds model, data, loss, optimizer and the DeepSpeed engine from a :class:`Config` and trains.

    Reads top-down: set-up (``__init__``), the loop (:meth:`run`, :meth:`begin`, :meth:`iteration`), the step
    (:meth:`train_step`), then what the loop calls at intervals (diagnostics, evaluation, sample grids,
    checkpoints)."""

    # ------------------------------------------------------------------------------------------ set-up
    def __init__(self, cfg: Config, run_dir: str, *, resume: str | None = None, dist: DistEnv | None = None):
        from .data import load_stats
        from .methods import build_loss, build_model

        self.cfg = cfg
        self.run_dir = run_dir
        self.run_files = RunDir(run_dir)
        self.dist = dist or init_distributed(timeout_s=cfg.train.collective_timeout_s)
        d = self.dist
        if d.is_main:
            os.makedirs(run_dir, exist_ok=True)
            # The plan is the GPU's (what each phase's products run in there), also on a CPU run: it is what
            # the config asks for, and what the profile's ceiling is computed from.
            save_config(cfg, self.run_files.config, derived={"precision_plan": precision_plan(cfg)})
        torch.distributed.barrier()
        self.ckpt_dir = self.run_files.checkpoints

        # Data first: its stats fix the latent shape the model must match. The embedded dataset is written
        # once per node (local rank 0; nodes need not share a filesystem), then every rank reads the cache.
        if d.local_rank == 0:
            resolve_data_path(cfg)
        torch.distributed.barrier()
        self.data_path = resolve_data_path(cfg)
        self.stats = load_stats(self.data_path)
        self.data = DataFacts(self.data_path, int(self.stats.count), tuple(self.stats.shape),
                              int(self.stats.num_classes))
        check_model_matches_data(cfg, self.data)  # also run before start-up by the command line (preflight)
        m = cfg.model

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
        # The checkpoint to resume from is chosen (and verified) before DeepSpeed starts: one written on another
        # number of ranks under ZeRO 1-3 loads through DeepSpeed's universal checkpoint, a start-up setting.
        self.resume_tag = self._resume_tag(resume) if resume else None
        ds_config = deepspeed_config(cfg, d.world_size)
        self.saved_world = ckpt.saved_world_size(self.ckpt_dir, self.resume_tag) if self.resume_tag else None
        self.resharded = self.saved_world is not None and self.saved_world != d.world_size
        self.universal = self.resharded and ds_config["zero_optimization"].get("stage", 0) >= 1
        if self.resharded and not cfg.data.resample and cfg.data.num_workers > 1:
            from .validate import UserError

            raise UserError(
                f"data.num_workers={cfg.data.num_workers}: {self.ckpt_dir}/{self.resume_tag} was written by "
                f"{self.saved_world} ranks and this run has {d.world_size}; one-epoch mode (data.resample=false) "
                f"re-splits the rest of the epoch sample by sample, which needs data.num_workers <= 1")
        if self.universal:
            try:
                ckpt.ensure_universal(self.ckpt_dir, self.resume_tag, is_main=d.is_main)
            finally:
                torch.distributed.barrier()
            ds_config["checkpoint"] = {**ds_config.get("checkpoint", {}), "load_universal": True}
        self.parallel = wrap(self.module, optimizer, ds_config, lr_scheduler=scheduler,
                             frozen=teacher, compile=cfg.train.compile)
        self.engine = self.parallel.engine  # for inspection; the loop goes through self.parallel
        self.target_net = self.parallel.target_net
        self.teacher = self.parallel.frozen  # None unless sCD; under ZeRO-3 partitioned like the student
        self.loss_fn = build_loss(cfg.method, data_dim=data_dim, total_steps=cfg.train.total_steps, coupler=coupler,
                                  teacher=self.teacher)
        self.ema = EMA(self.parallel.module.named_parameters(), decays=cfg.train.ema.decays,
                       power_stds=cfg.train.ema.power_stds)

        self._probe = None  # the denoising probe's fixed batch, drawn at its first use (_probe_batch)
        self.samples = 0
        # One-epoch mode: the epoch's earlier (world size, samples per rank) layouts and the samples seen when the
        # current one began; a resume on another number of ranks adds one (the reader re-splits the rest).
        self.epoch_layout: list[tuple[int, int]] = []
        self.layout_start = 0
        self.bad_streak = 0
        self.bad_total = 0
        if self.resume_tag is not None:
            self._resume(self.resume_tag)
        self.loader = self._make_loader()
        self.eval_hook = (EvalHook(cfg, self.run_files, stats=self.stats, data=self.data,
                                   ema_names=self.ema.names, device=d.device, is_main=d.is_main)
                          if cfg.train.eval_interval else None)
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
                            start_sample=self._stream_start(), device=d.device, stats=self.stats,
                            epoch_history=self.epoch_layout)

    def _stream_start(self) -> int:
        """This rank's position in its stream: samples seen since the current layout began, over the ranks."""
        return (self.samples - self.layout_start) // self.dist.world_size

    # -------------------------------------------------------------------------------------------- loop
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
        wall = time.perf_counter() - t_start
        done = self.samples - start_samples
        end = cfg.train.total_samples - cfg.train.total_samples % cfg.train.global_batch
        summary = {"name": cfg.name, "samples": self.samples, "params": self.num_params,
                   "world_size": d.world_size, "wall_s": wall,
                   "samples_per_s": done / max(wall, 1e-9),
                   "train_samples_per_s": done / max(st.train_s, 1e-9),
                   "stopped_early": self.samples < end,
                   "bad_steps_total": self.bad_total, "data": self.loader.report(), "final": last,
                   "eval": self.last_eval}
        if d.is_main:
            with open(self.run_files.summary, "w") as f:
                json.dump(summary, f, indent=2)
            print(f"lct_fast: done, {self.samples:,} samples in {wall:.1f}s: {summary['train_samples_per_s']:,.1f} "
                  f"samples/s training, {summary['samples_per_s']:,.1f} overall (evaluation, checkpoints and sample "
                  f"grids included); run directory {self.run_dir}", file=sys.stderr)
            if summary["stopped_early"]:
                print(f"lct_fast: stopped early at {self.samples:,} of train.total_samples={cfg.train.total_samples:,} "
                      f"(max_samples); continue with --resume auto --out {self.run_dir}", file=sys.stderr)
            if self.last_eval:
                print(f"lct_fast: {self.quality_line()}", file=sys.stderr)
            try:
                from .report import write_report

                print(f"lct_fast: report {write_report(self.run_dir, self.run_files.report)}", file=sys.stderr)
            except Exception as e:  # a plotting failure must not fail a finished run
                print(f"lct_fast: warning: report.png not written ({type(e).__name__}: {e})", file=sys.stderr)
        return summary

    def begin(self, max_samples: int | None = None, *, endless: bool = False) -> RunState:
        """Open a run: the logger, the metrics window, the divergence watch and this rank's batch stream.
        :meth:`run` is ``begin``, :meth:`iteration` until the total, ``close``. ``endless``: no end (the
        profiler drives the same iterations under its phase timer, never at the end of training, where an
        iteration would checkpoint and log)."""
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
        if self.loader.start_sample != self._stream_start():
            self.loader = self._make_loader()  # a second run() continues where the first stopped
        self._batches = iter(self.loader)
        return RunState(total=None if endless else total,
                        log=MetricsLog(self.run_files, d.is_main, total, self.samples,
                                       progress_s=cfg.train.progress_s),
                        watch=DivergenceWatch(divergence_floors(cfg)))

    def iteration(self, st: RunState) -> None:
        """One optimizer step and what its sample count triggers: the bad-step guard, evaluation, the log line
        (with the divergence diagnostics), checkpoint and sample grids."""
        cfg, d = self.cfg, self.dist
        before = self.samples
        t0 = time.perf_counter()
        metrics = self.train_step()
        st.train_s += time.perf_counter() - t0
        st.window.add(metrics)
        st.window.samples += cfg.train.global_batch
        st.log.advance(cfg.train.global_batch)
        if self.bad_streak >= cfg.train.max_bad_steps:
            tag = self.save_checkpoint()
            raise TrainingStopped(
                f"{self.bad_streak} consecutive steps had a NaN/Inf loss or gradient (limit "
                f"train.max_bad_steps={cfg.train.max_bad_steps}); none was applied. The last good state "
                f"is saved as {self.ckpt_dir}/{tag}.")
        done = st.total is not None and self.samples >= st.total
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
                st.window = Window()
            elif eval_row:
                st.log.log(self.samples, eval_row)
        with phase("checkpoint"):
            if self._crossed(cfg.train.ckpt_interval, before) or done:
                self.save_checkpoint()
        with phase("samples"):
            if self._crossed(cfg.train.sample_interval, before) or (done and cfg.train.sample_interval):
                self.write_samples()

    def _crossed(self, interval: int, before: int) -> bool:
        return interval > 0 and before // interval != self.samples // interval

    # -------------------------------------------------------------------------------------------- step
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
                per_sample = self.loss_fn(self.parallel.online, x0, labels, step=k, generator=gen,
                                          target_net=self.target_net)
                loss = per_sample.mean()
            # A NaN/Inf loss is back-propagated on purpose: the guarded optimizer then sees non-finite
            # gradients on every rank (they are reduced) and skips the step as a whole.
            with phase("backward"):
                self.parallel.backward(loss)
            with phase("optimizer"):
                self.parallel.step()
            for key, v in self.loss_fn.metrics.items():
                metrics[key] = metrics.get(key, 0.0) + float(v) / self.grad_accum
        applied = self.parallel.step_applied()
        if applied:
            with phase("ema"):
                self.ema.update()
            self.bad_streak = 0
        else:
            self.bad_streak += 1
            self.bad_total += 1
        self.samples += cfg.train.global_batch
        self._last_batch = (x0, labels)
        grad_norm = self.parallel.grad_norm()
        if grad_norm is not None:
            # Pre-clipping norm; clip_frac's window mean is the fraction of steps that clipping rescaled.
            metrics["grad_norm"] = grad_norm
            metrics["clip_frac"] = float(cfg.train.grad_clip > 0 and grad_norm > cfg.train.grad_clip)
        metrics["step_applied"] = float(applied)
        metrics["lr"] = self.parallel.lr()
        return metrics

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
        out["data_std"] = float(x0.std())
        px0, pz, plabels = self._probe_batch()
        with self.autocast:
            out.update(denoising_probe(self.target_net, cfg.method, px0, pz, plabels))
        return out

    def _probe_batch(self, n: int = 64):
        """The denoising probe's fixed batch (lct_fast.methods.probe): this rank's first ``n`` samples of the
        stream at sample 0 and noise seeded by (seed, rank), the same after a resume (on another world size, the
        rank's stream differs)."""
        if self._probe is None:
            import dataclasses

            from .data import build_loader

            cfg, d = self.cfg, self.dist
            loader = build_loader(dataclasses.replace(cfg.data, num_workers=0), batch_size=min(n, self.micro_batch),
                                  rank=d.rank, world_size=d.world_size, seed=cfg.train.seed,
                                  sigma_data=cfg.method.sigma_data, path=self.data_path, start_sample=0,
                                  device=d.device, stats=self.stats)
            x0, labels = next(iter(loader))
            x0 = x0.to(d.device)
            labels = labels.to(d.device) if self.stats.num_classes else None
            gen = torch.Generator(d.device).manual_seed(derive_seed(cfg.train.seed, "probe", d.rank))
            z = torch.randn(x0.shape, generator=gen, device=d.device)
            self._probe = (x0, z, labels)
        return self._probe

    # ------------------------------------------------------------------------------ interval hooks
    def evaluate(self) -> dict:
        """``train.eval`` on the chosen EMA (see :class:`lct_fast.train_hooks.EvalHook`); a collective."""
        return self.eval_hook(self._whole_net(self.eval_hook.ema, everywhere=True))

    @property
    def last_eval(self) -> dict:
        return self.eval_hook.last if self.eval_hook is not None else {}

    def quality_line(self) -> str:
        return self.eval_hook.quality_line() if self.eval_hook is not None else ""

    def write_samples(self, n: int = 16) -> None:
        """1- and 2-step sample grids of the first EMA (rank 0; a collective under ZeRO-3). Under ZeRO-3 the EMA
        lives in per-rank partitions, so the periodic grid shows the live weights instead (the exported EMA is
        consolidated offline by ``launch/export.py``)."""
        ema = self.ema.names[0] if self.ema.names and not self.parallel.partitioned else "live"
        net = self._whole_net(ema, everywhere=False)
        if net is not None:
            write_sample_grids(net, self.cfg, self.run_files, ckpt.tag_for(self.samples), n=n)

    def _whole_net(self, ema: str, *, everywhere: bool):
        """An unpartitioned copy of the model holding ``ema`` (or the live weights), on every rank with
        ``everywhere``, else on rank 0 (None elsewhere). A collective under ZeRO-3."""
        from .methods import build_model

        gathered = self._gathered_weights(everywhere=everywhere)
        if not (everywhere or self.dist.is_main):
            return None
        net = build_model(self.cfg.model, self.cfg.method)
        net.load_state_dict(gathered)
        if ema != "live":
            self.ema.copy_to(net, ema)
        return net.to(self.dist.device).eval()

    def _gathered_weights(self, everywhere: bool = False) -> dict:
        """Full live weights on rank 0, or on every rank with ``everywhere`` (a collective under ZeRO-3)."""
        return self.parallel.gathered_state_dict(everywhere=everywhere, is_main=self.dist.is_main)

    # ----------------------------------------------------------------------------------- checkpoints
    def _resume_tag(self, resume: str) -> str | None:
        """The tag ``resume`` names (``auto``: the newest complete one that matches its manifest; every candidate
        is verified, the ranks sharing the hashing, and a damaged one is skipped for the previous; a damaged tag
        named explicitly is an error), or None to start from scratch."""
        say = (lambda m: print(f"lct_fast: {m}", file=sys.stderr)) if self.dist.is_main else (lambda m: None)
        tag = ckpt.find_resume_tag(self.ckpt_dir, check=True, say=say) if resume == "auto" else resume
        if tag is None:
            say(f"no complete checkpoint in {self.ckpt_dir}, starting from scratch")
            return None
        if not ckpt.is_complete(self.ckpt_dir, tag):
            raise FileNotFoundError(f"{self.ckpt_dir}/{tag}: not a complete checkpoint (no COMPLETE marker)")
        if resume != "auto":
            problems = ckpt.resume_problems(self.ckpt_dir, tag, say)
            if problems:
                raise FileNotFoundError(f"{self.ckpt_dir}/{tag} is damaged: {'; '.join(problems[:3])} "
                                        f"(--resume auto falls back to the previous complete checkpoint)")
        return tag

    def _resume(self, tag: str) -> None:
        """Load ``tag``: DeepSpeed's state (weights, optimizer moments, LR schedule), then ours (samples seen,
        counters, every EMA, RNG). Written on another number of ranks: DeepSpeed's state comes from the universal
        checkpoint (re-partitioned for this world size) and the EMA is stitched whole and cut into this rank's
        share; the data stream continues at the same samples seen as this world size's seeded stream, or in one-epoch
        mode with the rest of the epoch re-split over this world size (the epoch's layouts travel in the client
        state)."""
        d = self.dist
        if self.universal:
            self.parallel.load_checkpoint(os.path.join(self.ckpt_dir, tag), tag=ckpt.UNIVERSAL)
        else:
            self.parallel.load_checkpoint(self.ckpt_dir, tag=tag)
        state = ckpt.load_client_state_resharded(self.ckpt_dir, tag, d.rank, d.world_size)
        self.samples = int(state["samples"])
        self.bad_total = int(state["bad_total"])
        self.epoch_layout = [(int(w), int(n)) for w, n in state.get("epoch_layout", [])]
        self.layout_start = int(state.get("layout_start", 0))
        if self.resharded and not self.cfg.data.resample:
            if int(state.get("data_workers", 0)) > 1:
                from .validate import UserError

                raise UserError(
                    f"{self.ckpt_dir}/{tag} was written with data.num_workers={state['data_workers']}: its ranks' "
                    f"one-epoch streams cannot be replayed to re-split the epoch over {d.world_size} ranks; "
                    f"resume on {self.saved_world} ranks")
            self.epoch_layout.append((self.saved_world, (self.samples - self.layout_start) // self.saved_world))
            self.layout_start = self.samples
        if state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])
        else:
            self.ema.load_full(state["ema_full"], state["ema_updates"])
        if state["rng"] is not None:
            ckpt.set_rng_state(state["rng"])
        if d.is_main:
            how = f" (written on {self.saved_world} ranks, resumed on {d.world_size})" if self.resharded else ""
            print(f"lct_fast: resumed from {self.ckpt_dir}/{tag} at {self.samples} samples{how}", file=sys.stderr)

    def save_checkpoint(self) -> str:
        state = {"samples": self.samples, "bad_total": self.bad_total, "ema": self.ema.state_dict(),
                 "rng": ckpt.rng_state(), "world_size": self.dist.world_size,
                 "epoch_layout": [list(p) for p in self.epoch_layout], "layout_start": self.layout_start,
                 "data_workers": self.cfg.data.num_workers}
        return ckpt.save(self.parallel, self.ckpt_dir, self.samples, state, rank=self.dist.rank,
                         keep=self.cfg.train.keep_checkpoints)
