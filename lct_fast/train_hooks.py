"""What the training loop calls at intervals, apart from the step: the metrics log (JSONL, TensorBoard, progress
bar), the metrics window between log lines, the divergence watch, the evaluation and the sample grids. Each hook
writes where :class:`lct_fast.run_dir.RunDir` says."""
from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from .progress import duration
from .run_dir import RunDir

__all__ = ["MetricsLog", "Window", "RunState", "divergence_floors", "DivergenceWatch", "EvalHook",
           "write_sample_grids"]


class MetricsLog:
    """Rank-0 JSONL + TensorBoard + progress (a bar on a terminal, else a line every ``progress_s`` seconds);
    every other rank logs nothing."""

    def __init__(self, run: RunDir, enabled: bool, total_samples: int, start_samples: int, *,
                 progress_s: float = 30.0, interactive: Optional[bool] = None,
                 clock: Callable[[], float] = time.monotonic, stream: Any = None):
        self.enabled = enabled
        self.jsonl = open(run.metrics, "a") if enabled else None
        self.tb = None
        self.bar = None
        self.stream = stream or sys.stderr
        self.total, self.samples = total_samples, start_samples
        self.clock, self.progress_s = clock, float(progress_s)
        self.t_line = self.t0 = clock()
        self.samples_line = start_samples
        self.last: dict = {}
        interactive = self.stream.isatty() if interactive is None else interactive
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(run.tensorboard)
        except Exception as e:  # tensorboard is optional at run time
            print(f"lct_fast: TensorBoard disabled ({e})", file=sys.stderr)
        if interactive:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total_samples, initial=start_samples, unit="sample", unit_scale=True,
                                dynamic_ncols=True, file=self.stream)
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
        self.last.update({k: v for k, v in row.items() if isinstance(v, (int, float))})
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{row.get('loss', float('nan')):.4g}",
                                 sps=f"{row.get('samples_per_s', 0):.0f}")

    def advance(self, n: int) -> None:
        self.samples += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled and self.progress_s > 0 and self.clock() - self.t_line >= self.progress_s:
            self.line()

    def line(self, prefix: str = "") -> str:
        """One progress line (samples, rate since the last line, loss, last evaluation, ETA) to the stream."""
        now = self.clock()
        rate = (self.samples - self.samples_line) / max(now - self.t_line, 1e-9)
        parts = [f"{self.samples:,}/{self.total:,} samples ({100 * self.samples / max(self.total, 1):.0f}%)",
                 f"{rate:,.0f} samples/s"]
        if "loss" in self.last:
            parts.append(f"loss {self.last['loss']:.4g}")
        evals = sorted(k for k in self.last if k.startswith("eval/") and k.rsplit("/", 1)[-1] in ("mw1", "fid"))
        if evals:
            parts.append(f"{evals[0][5:]} {self.last[evals[0]]:.4g}")
        if 0 < rate and self.samples < self.total:
            parts.append(f"ETA {duration((self.total - self.samples) / rate)}")
        text = f"lct_fast: {prefix}{' | '.join(parts)}"
        print(text, file=self.stream, flush=True)
        self.t_line, self.samples_line = now, self.samples
        return text

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.jsonl is not None:
            self.jsonl.close()


def divergence_floors(cfg: Any) -> dict:
    """Healthy scales of the method's divergence metrics (its spec's ``divergence_floors``; see
    :class:`DivergenceWatch`)."""
    from .registry import get_method

    return get_method(cfg.method.name).divergence_floors(cfg)


class DivergenceWatch:
    """One-line warnings (rank 0, once per metric) when a divergence metric runs away: a tangent metric above
    ``factor`` x max(its first logged value, its healthy scale), or 1-step samples beyond ``range_factor`` x the
    largest |x0| seen. sCT's instability shows first in ∂F/∂t and the tangent (sCM Fig. 4); a diverged model's
    samples leave the data range long before the loss says anything.

    Healthy scales (``floors``) come from the method's spec (``MethodSpec.divergence_floors``): the
    zero-initialised output makes the first values ~0, so a floor stands for a healthy value."""

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
                           f"{floor:.3g}): the network's time derivative is running away (a diverging JVP "
                           f"target; check the learning rate, and for sCT method.sct.time_scale)")
        self.data_absmax = max(self.data_absmax, row.get("data_absmax", 0.0))
        smax = row.get("sample_absmax")
        if (smax is not None and self.data_absmax > 0 and smax > self.range_factor * self.data_absmax
                and "sample_absmax" not in self.warned):
            self.warned.add("sample_absmax")
            out.append(f"1-step samples reach |x| = {smax:.3g}, {smax / self.data_absmax:.1f}x the data's largest "
                       f"|x0| = {self.data_absmax:.3g}: the model is leaving the data range")
        return out


@dataclass
class Window:
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
class RunState:
    """What a run carries from one iteration to the next (see :meth:`Trainer.begin`)."""

    total: Optional[int]
    """Samples at which the run ends (None: open-ended, as a profile runs)."""
    log: MetricsLog
    watch: DivergenceWatch
    window: Window = field(default_factory=Window)
    train_s: float = 0.0
    """Seconds spent in optimizer steps (the training rate's denominator, without evaluation or checkpoints)."""
    last: dict = field(default_factory=dict)


class EvalHook:
    """``train.eval`` during training: image metrics when it names a VAE, else latent metrics on the run's dataset
    (every rank builds it: the reference features and the generated rows are gathered across ranks)."""

    def __init__(self, cfg: Any, run: RunDir, *, stats: Any, data: Any, ema_names: list, device: Any,
                 is_main: bool) -> None:
        from .evaluate import ImageEvaluator, LatentEvaluator
        from .preflight import eval_size
        from .validate import ConfigError

        ev = cfg.train.eval
        name = ev.ema or (ema_names[0] if ema_names else "live")
        if name != "live" and name not in ema_names:
            raise ConfigError(f"train.eval.ema: {name!r} is not one of this run's EMAs {ema_names} (or 'live')")
        self.cfg, self.run, self.stats, self.device, self.is_main = cfg, run, stats, device, is_main
        self.ema = name
        """The EMA evaluated (or ``live``)."""
        self.n = eval_size(cfg, data) or ev.n
        """Samples per evaluation: ``train.eval.n``, or what a small data set allows (lct_fast.preflight)."""
        self.last: dict = {}
        """The latest evaluation's row ({} before the first)."""
        if ev.vae:
            self.evaluator = ImageEvaluator(vae_path=ev.vae, stats=stats, inception_weights=ev.inception_weights,
                                            ref=ev.reference, latent_resolution=cfg.model.resolution, n=self.n,
                                            metrics=ev.metrics, feature_layer=str(ev.feature_layer),
                                            allow_nonstandard_weights=ev.allow_nonstandard_weights,
                                            normalize=cfg.data.normalize, device=device)
        else:
            self.evaluator = LatentEvaluator(data.path, n=self.n, normalize=cfg.data.normalize, seed=ev.seed,
                                             stats=stats)

    def __call__(self, net: torch.nn.Module) -> dict:
        """Evaluate ``net`` (the evaluated EMA, whole, on every rank): {"eval/<k>step/<metric>": value, ...} on
        rank 0, {} elsewhere. Writes the standardised samples and the reference set under <run>/eval/ for the
        report (latent runs)."""
        import numpy as np

        from .evaluate import EvalSpec, evaluate_model
        from .sample import save_latents

        ev, m = self.cfg.train.eval, self.cfg.model
        spec = EvalSpec(n=self.n, steps=tuple(ev.steps), seed=ev.seed, grid=64)
        out_dir = self.run.eval
        if self.is_main:
            os.makedirs(out_dir, exist_ok=True)
        t0 = time.perf_counter()
        res = evaluate_model(net, self.cfg.method, m, spec, self.evaluator,
                             num_classes=m.num_classes if self.stats.num_classes else 0, device=self.device,
                             grid_stem=os.path.join(out_dir, "latest") if self.is_main else None,
                             keep_rows=self.evaluator.mode == "latent")
        if not self.is_main:
            return {}
        row: dict = {"eval/ema": self.ema, "eval/n": self.n, "eval/seconds": time.perf_counter() - t0}
        for k, metrics in res["steps"].items():
            row.update({f"eval/{k}step/{name}": float(v) for name, v in metrics.items()})
        if self.evaluator.mode == "latent":
            shape = (m.in_channels, m.resolution, m.resolution)
            for k, rows in res["rows"].items():
                save_latents(os.path.join(out_dir, f"latest-{k}step-standardised.npy"), rows.reshape(-1, *shape))
            ref = os.path.join(out_dir, "reference-standardised.npy")
            if not os.path.exists(ref):
                save_latents(ref, np.asarray(self.evaluator.reference.ref))
        self.last = row
        return row

    def quality_line(self) -> str:
        """One line: the headline figure at 1 step (or the fewest steps) beside its baselines."""
        row, ev = self.last, self.cfg.train.eval
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
            return (f"quality ({self.ema}, {self.n} samples, {k} step): marginal W1 {v:.4f} vs {bar} "
                    f"{g:.4f} (second real set {r:.4f}; lower is better): {verdict} the {bar}")
        return f"quality ({self.ema}, {self.n} samples, {k} step): FID {v:.3f}"


def write_sample_grids(net: torch.nn.Module, cfg: Any, run: RunDir, tag: str, n: int = 16) -> None:
    """Samples of ``net`` at 1 and 2 steps and at every ``train.eval.steps`` count (a diffusion model's ODE
    steps) as .npy + a latent-channel PNG grid under <run>/samples/<tag>-<k>step."""
    from .sample import generate, save_latent_grid

    os.makedirs(run.samples, exist_ok=True)
    m = cfg.model
    for steps in sorted({1, 2, *(int(k) for k in cfg.train.eval.steps)}):
        x = generate(net, cfg.method, n=n, shape=(m.in_channels, m.resolution, m.resolution),
                     num_classes=m.num_classes, steps=steps, seed=cfg.train.seed).latents
        save_latent_grid(x, os.path.join(run.samples, f"{tag}-{steps}step"))
