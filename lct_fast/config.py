"""Typed run configuration: one JSON preset per run in ``configs/`` -> :class:`Config`.

A preset holds every section (``model``, ``method``, ``data``, ``optim``, ``train``, ``deepspeed``), or
names another preset in ``"extends"`` and holds only what it changes: the base (recursively) is loaded first
and the preset deep-merged on top (objects merge key by key; numbers, strings and lists replace).
:func:`load_config` resolves that, applies ``--set KEY=VALUE`` overrides (dotted keys), converts the result
into the dataclasses below and validates it.  Every error names the file, the dotted key and what was expected.
The ``deepspeed`` block is passed through to DeepSpeed untouched except for the batch and clipping keys,
which are derived from ``train`` (one source of truth) and must agree if the preset also sets them.

The dataclasses double as documentation: the string literal under each field is its docstring.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Sequence

from .backends import BACKENDS
from .registry import get_method, method_names
from .registry import sections as method_sections
from .models.config import ModelConfig
from .validate import ConfigError, choice, positive, unit

__all__ = [
    "ConfigError", "ModelConfig", "OTConfig", "MethodConfig",
    "SyntheticConfig", "DataConfig", "OptimConfig", "EMAConfig", "TrainConfig", "Config",
    "load_config", "parse_overrides", "apply_override", "config_to_dict", "save_config",
    "CONFIG_DIR", "preset_path",
]

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


_choice, _positive, _unit = choice, positive, unit


# -------------------------------------------------------------------------------------------- method
@dataclass
class OTConfig:
    method: str = "none"
    """Minibatch OT coupling of latents and noise (paper sec. 4.4): none | exact | sinkhorn."""
    backend: str = "auto"
    """Backend of the Sinkhorn solver: auto | reference | triton | cuda."""
    sinkhorn_eps: float = 0.05
    """Final entropic regularisation, relative to the mean of the row- and column-min-reduced cost matrix
    (raw mean(C) ~ 2D while entries differ by ~sqrt(D): relative to it the plan would stay near uniform)."""
    sinkhorn_iters: int = 100
    """Sinkhorn iteration budget (about 3/4 of it anneals eps from 1.0 down to sinkhorn_eps)."""
    global_coupling: bool = False
    """Couple over the whole global batch (all-gather) instead of per rank."""
    per_class: bool = True
    """With labels, pair noise with latents only within the label the network sees (a dropped label = the null
    class, its own group). Across classes the paired noise carries the class (SPEC §2); false restores the
    cross-class coupling of the unconditional paper runs, for ablations only. No effect without labels."""

    def __post_init__(self) -> None:
        _choice("method.ot.method", self.method, ["none", "exact", "sinkhorn"])
        _choice("method.ot.backend", self.backend, BACKENDS)
        _positive("method.ot.sinkhorn_eps", self.sinkhorn_eps)
        _positive("method.ot.sinkhorn_iters", self.sinkhorn_iters)


@dataclass
class _MethodCommon:
    name: str = "ict"
    """Training method: one of the registered methods (lct_fast.methods: ict, sct, trigflow, scd)."""
    sigma_data: float = 0.5
    """Data standard deviation after normalisation (x0 = (latent - mean) / std * sigma_data)."""
    label_dropout: float = 0.0
    """Probability of replacing a label by the null class during training."""

    def __post_init__(self) -> None:
        _choice("method.name", self.name, method_names())
        _positive("method.sigma_data", self.sigma_data)
        _unit("method.label_dropout", self.label_dropout)


# Every registered method's own section (ict, sct, trigflow, scd, ...) is a field of MethodConfig: the sections
# are declared beside their methods (lct_fast/methods/<name>.py), so a new method adds its keys without an edit
# here. Each section's dataclass documents its fields.
MethodConfig = dataclasses.make_dataclass(
    "MethodConfig", [(key, cls, field(default_factory=cls)) for key, cls in method_sections(sealed_by=__name__)]
    + [("ot", OTConfig, field(default_factory=OTConfig))],  # minibatch OT coupling (OTConfig)
    bases=(_MethodCommon,))
MethodConfig.__module__ = __name__
MethodConfig.__doc__ = ("The training objective: ``name``, the shared settings, the OT coupling and one section "
                        "per registered method (its dataclass in lct_fast/methods/<name>.py).")


# ---------------------------------------------------------------------------------------------- data
@dataclass
class SyntheticConfig:
    """The embedded synthetic latent dataset (``lct_fast.data.synthetic`` generates it from exactly these
    fields; its cache key hashes them)."""

    num_samples: int = 4096
    """Samples in the embedded synthetic latent dataset."""
    channels: int = 4
    """Latent channels of the synthetic dataset."""
    resolution: int = 8
    """Latent height = width of the synthetic dataset."""
    num_classes: int = 4
    """Classes in the synthetic dataset."""
    seed: int = 0
    """Seed of the synthetic dataset (part of its cache key)."""
    samples_per_shard: int = 256
    """Samples per shard-%06d.tar of the embedded dataset."""
    outlier_rate: float = 0.002
    """Fraction of elements replaced by large spikes (the heavy tails of SD-VAE latents, SPEC §1)."""
    dtype: str = "float32"
    """Stored dtype of the latents (float32 | float16)."""

    def __post_init__(self) -> None:
        for k in ("num_samples", "channels", "resolution", "samples_per_shard"):
            _positive(f"data.synthetic.{k}", getattr(self, k))
        _positive("data.synthetic.num_classes", self.num_classes, allow_zero=True)
        if not 0 <= self.outlier_rate < 1:
            raise ConfigError(f"data.synthetic.outlier_rate: expected a value in [0, 1), got {self.outlier_rate}")
        _choice("data.synthetic.dtype", self.dtype, ["float32", "float16"])


@dataclass
class DataConfig:
    reader: str = "webdataset"
    """webdataset (torch DataLoader workers) | dali (NVIDIA DALI pipeline; needs nvidia-dali-cuda130)."""
    dali_device: str = "cpu"
    """data.reader=dali: cpu pipeline (batches moved by the trainer) | gpu pipeline (untested so far)."""
    path: str = ""
    """Dataset folder (shard-%06d.tar + stats.json); empty = the embedded synthetic dataset."""
    normalize: str = "channel"
    """Normalisation statistics: channel (per-channel mean/std) | element (per-element, as the paper's code)."""
    shuffle_buffer: int = 1000
    """Samples in the seeded shuffle buffer."""
    num_workers: int = 0
    """DataLoader worker processes per rank (webdataset); DALI CPU threads per rank (dali, at least 1)."""
    resample: bool = True
    """Infinite stream: resample shards with replacement (else epochs over a fixed shard split)."""
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    """The embedded dataset used when path is empty."""

    def __post_init__(self) -> None:
        _choice("data.reader", self.reader, ["webdataset", "dali"])
        _choice("data.dali_device", self.dali_device, ["cpu", "gpu"])
        if self.reader == "dali" and not self.resample:
            raise ConfigError("data.resample: data.reader=dali streams without end; set data.resample=true or use "
                              "data.reader=webdataset for one-epoch mode")
        _choice("data.normalize", self.normalize, ["channel", "element"])
        _positive("data.shuffle_buffer", self.shuffle_buffer, allow_zero=True)
        _positive("data.num_workers", self.num_workers, allow_zero=True)


# --------------------------------------------------------------------------------------------- optim
@dataclass
class OptimConfig:
    name: str = "radam"
    """Optimizer: adamw (torch fused on CUDA) | radam (the paper's)."""
    lr: float = 1e-4
    """Peak learning rate."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """Adam betas."""
    eps: float = 1e-8
    """Adam epsilon."""
    weight_decay: float = 0.0
    """Decoupled weight decay."""
    schedule: str = "constant"
    """Learning-rate schedule after warm-up: constant | cosine | rsqrt (lr / sqrt(max(k / t_ref, 1)), k the
    optimizer step: EDM2 / sCM Tables 3-4)."""
    t_ref: int = 70000
    """rsqrt schedule: optimizer steps before the decay starts (sCM: 70k at 512px, 35k at 64px)."""
    warmup_samples: int = 0
    """Linear warm-up length, in training samples."""
    min_lr_ratio: float = 0.0
    """Cosine schedule floor, as a fraction of lr."""

    def __post_init__(self) -> None:
        _choice("optim.name", self.name, ["adamw", "radam"])
        _positive("optim.lr", self.lr)
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"optim.betas: expected two values in [0, 1), got {self.betas!r}")
        _positive("optim.eps", self.eps)
        _positive("optim.weight_decay", self.weight_decay, allow_zero=True)
        _choice("optim.schedule", self.schedule, ["constant", "cosine", "rsqrt"])
        _positive("optim.t_ref", self.t_ref)
        _positive("optim.warmup_samples", self.warmup_samples, allow_zero=True)
        _unit("optim.min_lr_ratio", self.min_lr_ratio, closed=True)


# --------------------------------------------------------------------------------------------- train
@dataclass
class EMAConfig:
    decays: list[float] = field(default_factory=lambda: [0.9999])
    """Constant EMA decays kept for evaluation (per optimizer step)."""
    power_stds: list[float] = field(default_factory=list)
    """Power-function EMA relative standard deviations (EDM2 sigma_rel), e.g. [0.05, 0.1]."""

    def __post_init__(self) -> None:
        for d in self.decays:
            _unit("train.ema.decays", d)
        for s in self.power_stds:
            if not 0.0 < s < 0.28:
                raise ConfigError(f"train.ema.power_stds: expected values in (0, 0.28), got {s!r}")


@dataclass
class EvalConfig:
    n: int = 2000
    """Samples per step count. Latent metrics need 2n real latents (two disjoint real sets); FID on the
    2048-d Inception layer needs n >= 2048."""
    steps: list[int] = field(default_factory=lambda: [1, 2])
    """Sampling step counts evaluated."""
    ema: str = ""
    """EMA evaluated, e.g. "ema_0.999" ("" = the first of train.ema; "live" = the current weights)."""
    seed: int = 0
    """Sampling seed (noise and labels): the same samples at every evaluation, so figures are comparable."""
    vae: str = ""
    """Local diffusers AutoencoderKL folder: image metrics (FID & co) on decoded samples; "" = latent metrics."""
    inception_weights: str = ""
    """Local Inception-v3 weights file (weights-inception-2015-12-05-6726825d.pth) for image metrics."""
    allow_nonstandard_weights: bool = False
    """Compute image metrics with an Inception file other than the standard one (its SHA-256 does not start
    with 6726825d); the figures are then comparable with nothing else, and the metrics say so."""
    reference: str = ""
    """Image metrics: reference image folder, .npz or cached reference .safetensors."""
    metrics: list[str] = field(default_factory=lambda: ["fid", "kid", "prc"])
    """Image metrics: any of fid, kid, isc, prc (latent runs always report mw1, swd and tails)."""
    feature_layer: int = 2048
    """Inception layer of FID/KID/precision-recall (64, 192, 768 or 2048)."""

    def __post_init__(self) -> None:
        _positive("train.eval.n", self.n)
        if not self.steps or any(int(k) < 1 for k in self.steps):
            raise ConfigError(f"train.eval.steps: expected a non-empty list of step counts >= 1, got {self.steps!r}")
        for m in self.metrics:
            _choice("train.eval.metrics", m, ["fid", "kid", "isc", "prc"])
        _choice("train.eval.feature_layer", self.feature_layer, [64, 192, 768, 2048])
        if self.vae and not (self.inception_weights and self.reference):
            raise ConfigError("train.eval.vae: image metrics also need train.eval.inception_weights and "
                              "train.eval.reference")


@dataclass
class TrainConfig:
    seed: int = 0
    """Base seed; each step is seeded from (seed, rank, samples seen)."""
    global_batch: int = 32
    """Samples per optimizer step over all ranks (= micro_batch * grad_accum * world size)."""
    micro_batch: int = 0
    """Samples per rank per forward; 0 = derived from global_batch, grad_accum and the world size."""
    grad_accum: int = 0
    """Gradient accumulation steps per optimizer step; 0 = derived (1 when micro_batch is also 0)."""
    total_samples: int = 64000
    """Training length in samples seen (steps = total_samples / global_batch)."""
    log_interval: int = 3200
    """Log metrics every this many samples."""
    progress_s: float = 30.0
    """When stderr is not a terminal (nohup, Slurm, CI): print a progress line (samples, samples/s, loss, last
    evaluation, ETA) every this many seconds; a terminal gets a progress bar instead. 0 = no progress lines."""
    ckpt_interval: int = 32000
    """Save a checkpoint every this many samples (0 = only at the end)."""
    keep_checkpoints: int = 0
    """Keep only the newest this many complete checkpoints (older ones, and crash leftovers older than the
    newest complete one, are deleted after each save); 0 = keep every checkpoint."""
    collective_timeout_s: float = 600.0
    """Bound on every collective (seconds): a rank that died or lost its network makes the others fail after
    this long instead of hanging, so a launcher with restarts (torchrun --max-restarts, Slurm --requeue) can
    bring the job back from the newest checkpoint."""
    sample_interval: int = 0
    """Write a sample grid every this many samples (0 = off)."""
    eval_interval: int = 0
    """Evaluate sample quality (train.eval) every this many samples and at the end (0 = off)."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """In-training evaluation: figures go to metrics.jsonl / TensorBoard under eval/."""
    precision: str = "fp32"
    """fp32 | bf16: bf16 autocast over fp32 weights (so method.sct.jvp_dtype=fp32 runs the JVP with fp32
    operands -- TF32 products under train.tf32 -- and the EMA tracks fp32 weights).
    deepspeed.bf16.enabled=true instead stores bf16 weights (less memory; the JVP then runs in bf16)."""
    tf32: bool = True
    """On CUDA, let the fp32 matrix products (an fp32 run, the fp32 JVP pass) use TF32 tensor cores: inputs
    rounded to a 10-bit mantissa, fp32 accumulation, 7.4x plain fp32's peak on an H100/H200 (PyTorch's
    own default for matmuls is off; the OT cost stays IEEE fp32 either way). Process-wide, set when the
    trainer starts; a run resumed from a config.json written before this key existed takes the default.
    No effect on CPU."""
    compile: bool = False
    """torch.compile each backbone block (DiT blocks, UNet encoder/decoder blocks; torchtitan's unit) for the
    online forward and backward, under every ZeRO stage (compiled before DeepSpeed wraps the module, so
    ZeRO-3's gather hooks run at the block boundaries). The JVP pass runs the same blocks eagerly:
    inductor has no forward-mode AD. The profile counts and names the graph breaks."""
    grad_clip: float = 1.0
    """Gradient-norm clipping (written into deepspeed.gradient_clipping; 0 disables)."""
    max_bad_steps: int = 10
    """Stop after this many consecutive steps with a NaN/Inf loss or gradient."""
    ema: EMAConfig = field(default_factory=EMAConfig)
    """Evaluation EMAs."""

    def __post_init__(self) -> None:
        _positive("train.global_batch", self.global_batch)
        _positive("train.micro_batch", self.micro_batch, allow_zero=True)
        _positive("train.grad_accum", self.grad_accum, allow_zero=True)
        per_rank_unit = (self.micro_batch or 1) * (self.grad_accum or 1)
        if self.global_batch % per_rank_unit:
            raise ConfigError(
                f"train.global_batch: {self.global_batch} is not a multiple of micro_batch*grad_accum={per_rank_unit}")
        if self.total_samples < self.global_batch:
            raise ConfigError(f"train.total_samples: expected >= global_batch={self.global_batch}, got {self.total_samples}")
        _positive("train.keep_checkpoints", self.keep_checkpoints, allow_zero=True)
        _positive("train.collective_timeout_s", self.collective_timeout_s)
        for k in ("log_interval", "ckpt_interval", "sample_interval", "eval_interval", "progress_s"):
            _positive(f"train.{k}", getattr(self, k), allow_zero=True)
        _choice("train.precision", self.precision, ["fp32", "bf16"])
        _positive("train.grad_clip", self.grad_clip, allow_zero=True)
        _positive("train.max_bad_steps", self.max_bad_steps)

    @property
    def total_steps(self) -> int:
        """Optimizer steps in the run (the curriculum's K)."""
        return self.total_samples // self.global_batch

    def batch_layout(self, world_size: int) -> tuple[int, int]:
        """(micro_batch, grad_accum) for ``world_size`` ranks; raises if the arithmetic does not close."""
        if self.global_batch % world_size:
            raise ConfigError(f"train.global_batch: {self.global_batch} is not divisible by world size {world_size}")
        per_rank = self.global_batch // world_size
        if self.micro_batch and self.grad_accum:
            micro, accum = self.micro_batch, self.grad_accum
        elif self.micro_batch:
            micro, accum = self.micro_batch, max(1, per_rank // self.micro_batch)
        else:
            accum = self.grad_accum or 1
            micro = per_rank // accum
        if micro < 1 or micro * accum * world_size != self.global_batch:
            raise ConfigError(
                f"train: global_batch={self.global_batch} != micro_batch={micro} * grad_accum={accum} "
                f"* world_size={world_size}; adjust train.global_batch, train.micro_batch or train.grad_accum")
        return micro, accum


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    """Backbone."""
    method: MethodConfig = field(default_factory=MethodConfig)
    """Training objective."""
    data: DataConfig = field(default_factory=DataConfig)
    """Latent dataset."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and learning-rate schedule."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Batch arithmetic, length, intervals, precision."""
    deepspeed: dict = field(default_factory=dict)
    """Passed through to deepspeed.initialize (batch/clipping keys derived from train)."""
    name: str = ""
    """Preset name (the JSON file's stem unless set; never inherited through ``extends``)."""
    notes: list[str] = field(default_factory=list)
    """Free-text notes, e.g. why the preset departs from a paper setting (JSON has no comments). A preset's
    list replaces its base's."""

    def __post_init__(self) -> None:
        spec = get_method(self.method.name)
        spec.check(self)
        conditions = spec.conditions(self.method)
        if "guidance" in conditions and not self.model.guidance_embed:
            raise ConfigError(f"model.guidance_embed: method {spec.name} takes a guidance scale as an input "
                              "(method.scd.guidance_conditioned=true) and needs model.guidance_embed=true")
        if self.model.guidance_embed and "guidance" not in conditions:
            raise ConfigError("model.guidance_embed: only the guidance-conditioned sCD student takes a guidance "
                              "scale (method.name=scd with method.scd.guidance_conditioned=true)")
        if self.model.num_classes == 0 and self.method.label_dropout > 0:
            raise ConfigError("method.label_dropout: label dropout needs model.num_classes > 0")

    @property
    def bf16_weights(self) -> bool:
        """DeepSpeed stores the weights in bf16 (``deepspeed.bf16.enabled``)."""
        return bool(self.deepspeed.get("bf16", {}).get("enabled", False))

    @property
    def zero_stage(self) -> int:
        """``deepspeed.zero_optimization.stage`` (0 when absent)."""
        return int(self.deepspeed.get("zero_optimization", {}).get("stage", 0))


# ------------------------------------------------------------------------------------------- loading
def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check/convert a JSON value against a field type; raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected an object, got {type(value).__name__} {value!r}")
        return value
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list of {_type_name(inner)}, got {type(value).__name__} {value!r}")
        return [_convert(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {type(value).__name__} {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            # 1e6-style floats with an integral value are accepted (sample counts are often written so).
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {type(value).__name__} {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {type(value).__name__} {value!r}")
        return value
    raise TypeError(f"unsupported config field type {tp!r} at {key}")  # programming error


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'config'}: expected an object, got {type(raw).__name__} {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(raw) - set(names))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"unknown key '{where}{unknown[0]}' (expected one of: {', '.join(names)})")
    kwargs = {k: _convert(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in raw.items()}
    return cls(**kwargs)


def parse_overrides(items: Sequence[str]) -> list[tuple[str, Any]]:
    """Parse ``KEY=VALUE`` strings; VALUE is JSON if it parses (numbers, true/false, lists), else a string."""
    out = []
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE with a dotted key, e.g. optim.lr=2e-4")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        out.append((key.strip(), value))
    return out


def apply_override(raw: dict, key: str, value: Any) -> None:
    """Set ``raw[a][b][c] = value`` for ``key='a.b.c'``, creating missing sections on the way."""
    parts = key.split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        if part not in node:
            # A missing section outside `deepspeed` is then reported by the schema check as unknown.
            node[part] = {}
        if not isinstance(node[part], dict):
            raise ConfigError(f"--set {key}: '{'.'.join(parts[:i + 1])}' is a value, not a section")
        node = node[part]
    node[parts[-1]] = value


def _find(name: str, folders: Sequence[str]) -> str | None:
    for folder in folders:
        for cand in (os.path.join(folder, name), os.path.join(folder, name + ".json")):
            if os.path.isfile(cand):
                return cand
    return None


def preset_path(name_or_path: str) -> str:
    """Resolve ``tiny`` / ``tiny.json`` / a path to a preset file."""
    if os.path.exists(name_or_path):
        return name_or_path
    found = _find(name_or_path, [CONFIG_DIR])
    if found is None:
        raise ConfigError(f"{name_or_path}: no such config file (presets live in {CONFIG_DIR})")
    return found


def _base_path(name: str, child: str) -> str:
    """Where ``"extends": name`` in ``child`` points: beside ``child`` first (so ``../s`` or a sibling
    works from ``configs/ablation/``), then ``configs/``."""
    found = _find(name, [os.path.dirname(child), CONFIG_DIR])
    if found is None:
        raise ConfigError(f"{child}: extends {name!r}: no such preset (looked next to it and in {CONFIG_DIR})")
    return found


def _merge(base: dict, top: dict) -> dict:
    """Deep merge: objects merge key by key, any other value (lists included) replaces the base's."""
    out = dict(base)
    for key, value in top.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = _merge(out[key], value) if both else value
    return out


def _read_preset(path: str, chain: tuple[str, ...] = ()) -> dict:
    """The raw preset at ``path`` with its ``extends`` chain merged in (``chain``: the files extending it)."""
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object at the top level")
    chain += (path,)
    raw.pop(DERIVED_KEY, None)  # a run's config.json read back: what the trainer derived is not a setting
    name = raw.pop("extends", None)
    if name is None:
        return raw
    if not isinstance(name, str):
        raise ConfigError(f"{path}: extends: expected a preset name, got {type(name).__name__} {name!r}")
    base_path = _base_path(name, path)
    if any(os.path.samefile(base_path, p) for p in chain):
        raise ConfigError(f"{chain[0]}: extends cycle: {' -> '.join(chain + (base_path,))}")
    base = _read_preset(base_path, chain)
    # The name identifies the file itself: a derived preset defaults to its own stem.
    base.pop("name", None)
    return _merge(base, raw)


def load_config(path: str, overrides: Sequence[str] | Sequence[tuple[str, Any]] = ()) -> Config:
    """Load a preset (its ``extends`` chain merged in), apply ``--set`` overrides and validate.
    Errors name ``path`` and the key."""
    path = preset_path(path)
    raw = _read_preset(path)
    pairs = parse_overrides(overrides) if overrides and isinstance(overrides[0], str) else list(overrides)
    for key, value in pairs:
        apply_override(raw, key, value)
    raw.setdefault("name", os.path.splitext(os.path.basename(path))[0])
    try:
        return _build(Config, raw, "")
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def config_to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


#: Top-level key of a run's config.json for what the trainer derived from the settings (the precision plan);
#: informational, dropped when the file is loaded again.
DERIVED_KEY = "derived"


def save_config(cfg: Config, path: str, derived: dict | None = None) -> None:
    """Write the fully resolved config (every field, defaults included) as JSON, atomically; ``derived``, when
    given, goes under :data:`DERIVED_KEY`."""
    out = config_to_dict(cfg)
    if derived:
        out[DERIVED_KEY] = derived
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(out, f, indent=2, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)



# ------------------------------------------------------------------------------------------- describing
def _field_docs(cls: type) -> dict:
    """Field name -> the string literal under it in ``cls``'s source (its docstring)."""
    import ast
    import inspect
    import textwrap

    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def describe_keys(cls: type = None, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """Every config key as (dotted key, type, default, meaning), from the dataclasses and their field docstrings
    (the sections of the registered methods included): what ``launch/train.py --list-keys`` prints."""
    cls = cls or Config
    hints = typing.get_type_hints(cls)
    docs: dict = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            docs.update(_field_docs(klass))
    out = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += describe_keys(tp, key + ".")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        out.append((key, _type_name(tp), json.dumps(default), docs.get(f.name, "")))
    return out
