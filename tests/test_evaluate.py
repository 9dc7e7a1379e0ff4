"""Evaluation: torch-fidelity's metrics through our weights loader, the reference cache, the latent metrics,
the evaluate CLI (bad input, image and latent mode) and 2-rank = 1-rank."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

pytest.importorskip("torch_fidelity")

from model_helpers import make_random_inception  # noqa: E402

from lct_fast.distributed import free_port  # noqa: E402
from lct_fast.quality.inception import (INCEPTION_FILE, image_metrics, inception_features,  # noqa: E402
                                        load_inception)
from lct_fast.quality.latent import LatentReference, marginal_w1  # noqa: E402
from lct_fast.quality.metrics import frechet_distance, knn_precision_recall  # noqa: E402
from lct_fast.quality.reference import load_reference_file, reference_features  # noqa: E402

VAE = os.path.join(ROOT, "benchmarks", "assets", "tiny_vae")  # the committed tiny AutoencoderKL (4x)


def smooth_images(n, res=16, seed=0):
    """Images with structure (low-frequency colour fields), unlike uniform noise."""
    g = np.random.default_rng(seed)
    u = np.linspace(0, 1, res)
    yy, xx = np.meshgrid(u, u, indexing="ij")
    fx, fy, ph = g.uniform(0.5, 2, (3, n, 3, 1, 1))
    img = 127.5 * (1 + np.sin(2 * np.pi * (fx * xx + fy * yy) + 6 * ph))
    return img.transpose(0, 2, 3, 1).astype(np.uint8)  # [n, 3, H, W] -> [n, H, W, 3]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return make_random_inception(tmp_path_factory.mktemp("inception") / INCEPTION_FILE)


@pytest.fixture(scope="module")
def net64(weights):
    return load_inception(weights, ["64"])


# ------------------------------------------------------------------------------------------ loader
def test_inception_weights_errors(tmp_path, weights):
    with pytest.raises(FileNotFoundError, match=r"missing\.pth.*weights-inception-2015-12-05"):
        load_inception(str(tmp_path / "missing.pth"), ["64"])
    junk = tmp_path / "pickled.pth"
    torch.save({"fc.weight": torch.zeros(1), "obj": {1, 2}.__class__}, junk)  # a class object: not weights-only
    with pytest.raises(ValueError, match="pickled.pth"):
        load_inception(str(junk), ["64"])
    wrong = tmp_path / "wrong.pth"
    torch.save({"fc.weight": torch.zeros(3, 3)}, wrong)
    with pytest.raises(ValueError, match="does not match torch-fidelity's Inception"):
        load_inception(str(wrong), ["64"])


# ------------------------------------------------------------------------------------------ metrics
def test_fid_plumbing_against_float64_reference(net64):
    ref, other = smooth_images(80, seed=0), smooth_images(80, seed=1)
    noise = np.random.default_rng(2).integers(0, 256, ref.shape, dtype=np.uint8)
    f_ref = inception_features(net64, ref, batch_size=32)
    f_ref7 = inception_features(net64, ref, batch_size=7)
    f_other, f_noise = inception_features(net64, other), inception_features(net64, noise)
    assert f_ref["64"].shape == (80, 64)
    m = lambda a, b: image_metrics(a, b, ["fid"], feature_layer="64")["fid"]  # noqa: E731
    self_fid, same_dist, noise_fid = m(f_ref, f_ref), m(f_other, f_ref), m(f_noise, f_ref)
    assert abs(self_fid) < 1e-6 * noise_fid
    assert noise_fid > 3 * same_dist > 0
    # Batch size does not change the figure; torch-fidelity's FID equals our float64 eigh-based one.
    assert m(f_ref7, f_other) == pytest.approx(m(f_ref, f_other), rel=1e-5)
    assert noise_fid == pytest.approx(frechet_distance(f_noise["64"].numpy(), f_ref["64"].numpy()), rel=1e-6)
    # Precision / recall: torch-fidelity's k-NN manifolds equal ours (Kynkaanniemi et al., k = 3).
    pr = image_metrics(f_other, f_ref, ["prc"], feature_layer="64")
    p, r = knn_precision_recall(f_ref["64"].numpy(), f_other["64"].numpy(), k=3)
    assert (pr["precision"], pr["recall"]) == (pytest.approx(p), pytest.approx(r))
    with pytest.raises(ValueError, match="at least 64 samples"):
        image_metrics({"64": f_ref["64"][:40]}, f_ref, ["fid"], feature_layer="64")


# ------------------------------------------------------------------------------------------ reference cache
def test_reference_cache_reused_and_invalidated(tmp_path, net64, weights):
    ref = tmp_path / "ref.npz"
    np.savez(ref, images=smooth_images(70))
    calls = []

    def extract(images):
        calls.append(len(images))
        return inception_features(net64, images)

    cache = str(tmp_path / "cache.safetensors")
    kw = dict(weights_sha="abc", layers=["64"], resolution=(16, 16), cache=cache, batch_size=32)
    f1, meta = reference_features(str(ref), extract, **kw)
    assert sum(calls) == 70 and meta["count"] == "70" and os.path.isfile(cache)
    f2, _ = reference_features(str(ref), extract, **kw)
    assert sum(calls) == 70 and torch.equal(f1["64"], f2["64"])  # reused, not recomputed
    f3, _ = reference_features(cache, extract, **kw)  # the file itself as --ref
    assert torch.equal(f1["64"], f3["64"])
    os.utime(ref, ns=(1, 1))
    np.savez(ref, images=smooth_images(70, seed=5))  # the reference changes
    f4, _ = reference_features(str(ref), extract, **kw)
    assert sum(calls) == 140 and not torch.equal(f1["64"], f4["64"])
    with pytest.raises(ValueError, match="other Inception weights"):
        load_reference_file(cache, weights_sha="def")
    with pytest.raises(ValueError, match="16x16.*8x8"):
        reference_features(str(ref), extract, **{**kw, "resolution": (8, 8)})
    with pytest.raises(ValueError, match="the requested metrics need"):
        load_reference_file(cache, layers=["2048"])


# ------------------------------------------------------------------------------------------ latent metrics
def test_marginal_w1_and_latent_baselines():
    from scipy.stats import wasserstein_distance

    g = np.random.default_rng(0)
    a, b = g.normal(size=(300, 2, 3, 3)), g.standard_t(3, size=(300, 2, 3, 3))
    ref = np.mean([wasserstein_distance(a.reshape(300, -1)[:, j], b.reshape(300, -1)[:, j]) for j in range(18)])
    assert marginal_w1(a, b) == pytest.approx(ref, rel=1e-9)
    # Bimodal, heavy-tailed data: a second real set beats the Gaussian fit by a wide margin; a shifted copy loses.
    n = 1500
    modes = g.choice([-1.5, 1.5], size=(3 * n, 1, 1, 1)) * np.ones((1, 2, 4, 4))
    x = (modes + 0.4 * g.standard_t(4, size=(3 * n, 2, 4, 4))).astype(np.float32)
    x = (x - x.mean((0, 2, 3), keepdims=True)) / x.std((0, 2, 3), keepdims=True)
    lr = LatentReference(x, n, seed=0)
    base = lr.baselines()
    assert base["real"]["mw1"] < 0.3 * base["gaussian"]["mw1"]
    assert lr.score(x[-n:] + 0.5)["mw1"] > base["gaussian"]["mw1"]
    with pytest.raises(ValueError, match="needs at least"):
        LatentReference(x[:100], 60)


def test_generate_share_equals_whole_draw_and_cfg():
    from lct_fast.config import load_config
    from lct_fast.methods import build_model
    from lct_fast.sample import generate
    from model_helpers import randomize

    cfg = load_config("configs/tiny.json")
    net = randomize(build_model(cfg.model, cfg.method))
    kw = dict(n=10, shape=(4, 8, 8), num_classes=4, steps=2, seed=3, batch_size=4)
    whole = generate(net, cfg.method, **kw)
    part = generate(net, cfg.method, start=3, count=5, **kw)
    assert torch.allclose(part.latents, whole.latents[3:8], atol=1e-6)
    assert torch.equal(part.labels, whole.labels[3:8])
    # CFG: f_u + s (f_c - f_u) at every step; s = 0 is the unconditional model.
    uncond = generate(net, cfg.method, labels=4, **kw)
    s0 = generate(net, cfg.method, cfg_scale=0.0, **kw)
    assert torch.allclose(s0.latents, uncond.latents, atol=1e-5)
    s2 = generate(net, cfg.method, cfg_scale=2.0, **{**kw, "steps": 1})
    c1 = generate(net, cfg.method, **{**kw, "steps": 1}).latents
    u1 = generate(net, cfg.method, labels=4, **{**kw, "steps": 1}).latents
    assert torch.allclose(s2.latents, u1 + 2 * (c1 - u1), atol=1e-5)


# ------------------------------------------------------------------------------------------ CLI
@pytest.fixture(scope="module")
def run(tmp_path_factory, weights):
    """A random-init tiny model on 4x4x4 latents (decoded by the tiny VAE), its dataset stats, a reference."""
    from safetensors.torch import save_file

    from lct_fast.config import load_config, save_config
    from lct_fast.data.writer import ShardWriter
    from lct_fast.methods import build_model

    root = tmp_path_factory.mktemp("evalrun")
    g = np.random.default_rng(0)
    with ShardWriter(str(root / "data"), samples_per_shard=64, vae="tiny", vae_scale=1.0, num_classes=3) as w:
        for i in range(128):
            w.write(g.normal(size=(4, 4, 4)).astype(np.float32), i % 3)
    cfg = load_config("configs/tiny.json", ["model.resolution=4", "model.num_classes=3",
                                            f"data.path={root / 'data'}"])
    torch.manual_seed(0)
    net = build_model(cfg.model, cfg.method)
    (root / "export").mkdir()
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(root / "export" / "ema_0.99.safetensors"))
    save_config(cfg, str(root / "export" / "config.json"))
    factor = 2 ** (len(json.load(open(os.path.join(VAE, "config.json")))["block_out_channels"]) - 1)
    np.savez(root / "ref.npz", images=smooth_images(70, res=4 * factor))
    np.savez(root / "ref_small.npz", images=smooth_images(70, res=4 * factor // 2))
    return root


def evaluate(*args, world=1, timeout=600):
    env = {**os.environ, "PYTHONPATH": ROOT, "CUDA_VISIBLE_DEVICES": ""}
    if world == 1:
        cmd = [sys.executable, "launch/evaluate.py", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "--master_port",
               str(free_port()), "launch/evaluate.py", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def image_args(run, weights, out, ref="ref.npz", n="70"):
    return ["--checkpoint", str(run / "export" / "ema_0.99.safetensors"), "--vae", VAE, "--ref", str(run / ref),
            "--ref-cache", str(out) + "-ref.safetensors", "--inception-weights", weights, "--num-samples", n,
            "--feature-layer", "64", "--metrics", "fid", "kid", "prc", "--kid-subset-size", "30", "--steps", "1", "2",
            "--out", str(out), "--allow-nonstandard-weights"]       # random-init test weights


def test_evaluate_cli_bad_input_writes_nothing(run, weights, tmp_path):
    cases = [
        (["--inception-weights", str(tmp_path / "nope.pth")], "nope.pth"),
        (["--vae", str(tmp_path / "novae")], "novae"),
        (["--ref", str(tmp_path / "noref")], "reference not found"),
        (["--ref", str(run / "ref_small.npz")], "comparable"),
        (["--num-samples", "40"], "at least 64 samples"),
    ]
    for i, (change, message) in enumerate(cases):
        args = image_args(run, weights, tmp_path / f"out{i}")
        for j in range(0, len(change), 2):
            args[args.index(change[j]) + 1] = change[j + 1]
        proc = evaluate(*args)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert message in proc.stderr, proc.stderr[-2000:]
        assert not (tmp_path / f"out{i}").exists()


def test_evaluate_two_ranks_equal_one(run, weights, tmp_path):
    """Image mode through the real torch-fidelity path, 1 process and 2 gloo ranks: the same figures."""
    res = {}
    for world in (1, 2):
        out = tmp_path / f"w{world}"
        proc = evaluate(*image_args(run, weights, out), world=world)
        assert proc.returncode == 0, proc.stderr[-3000:]
        res[world] = json.load(open(out / "metrics.json"))
        assert os.path.isfile(out / "grid-1step.png") and os.path.isfile(out / "grid-2step.png")
    one, two = res[1], res[2]
    assert two["world_size"] == 2 and one["n"] == 70 and one["steps"] == [1, 2]
    assert one["git_revision"] and one["evaluator"]["feature_layer"] == "64"
    for steps in ("1", "2"):
        a, b = one["metrics"][steps], two["metrics"][steps]
        assert a["fid"] > 0 and set(a) == {"fid", "kid_mean", "kid_std", "precision", "recall", "f_score"}
        for k in a:
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-7), k


def test_evaluate_latent_mode_two_ranks(run, tmp_path):
    res = {}
    for world in (1, 2):
        out = tmp_path / f"lat{world}"
        proc = evaluate("--checkpoint", str(run / "export" / "ema_0.99.safetensors"), "--num-samples", "60", "--steps", "1",
                        "--out", str(out), world=world)
        assert proc.returncode == 0, proc.stderr[-3000:]
        res[world] = json.load(open(out / "metrics.json"))
    a, b = res[1]["metrics"]["1"], res[2]["metrics"]["1"]
    assert res[1]["mode"] == "latent" and {"mw1", "swd", "real_mw1", "gaussian_mw1", "kurtosis"} <= set(a)
    for k in a:
        assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-7), k


def test_in_training_image_eval_equals_offline(run, weights, tmp_path):
    """train.eval with a VAE: torch-fidelity figures of the named EMA under eval/, equal to launch/evaluate.py
    on the exported EMA with the same settings."""
    out = str(tmp_path / "train")
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
    env.update(PYTHONPATH=ROOT, CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu")
    sets = ["model.resolution=4", "model.num_classes=3", "model.width=32", f"data.path={run / 'data'}",
            "data.shuffle_buffer=16", "train.global_batch=8", "train.total_samples=16", "train.log_interval=8",
            "train.ckpt_interval=0", "train.sample_interval=0", "train.eval_interval=16", "train.eval.n=70",
            "train.eval.steps=[1]", "train.eval.ema=ema_0.99", f"train.eval.vae={VAE}",
            f"train.eval.inception_weights={weights}", f"train.eval.reference={run / 'ref.npz'}",
            "train.eval.allow_nonstandard_weights=true",
            "train.eval.feature_layer=64", "train.eval.metrics=[\"fid\", \"prc\"]"]
    cmd = [sys.executable, "launch/train.py", "--config", "configs/tiny.json", "--out", out]
    for s in sets:
        cmd += ["--set", s]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "quality (ema_0.99, 70 samples, 1 step): FID" in proc.stderr
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    last = [r for r in rows if "eval/ema" in r][-1]
    subprocess.run([sys.executable, "launch/export.py", "--run", out], cwd=ROOT, env=env, check=True,
                   capture_output=True)
    ev = tmp_path / "offline"
    args = image_args(run, weights, ev)
    args[args.index("--checkpoint") + 1] = os.path.join(out, "export", "ema_0.99.safetensors")
    args[args.index("--metrics") + 1:args.index("--metrics") + 4] = ["fid", "prc"]
    args[args.index("--steps") + 1:args.index("--steps") + 3] = ["1"]
    proc = evaluate(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    offline = json.load(open(ev / "metrics.json"))["metrics"]["1"]
    assert offline["fid"] > 0
    for k in ("fid", "precision", "recall"):
        assert last[f"eval/1step/{k}"] == pytest.approx(offline[k], rel=1e-4, abs=1e-7), k


def test_nonstandard_inception_weights_are_refused_unless_allowed(weights):
    """The standard file's SHA-256 starts with the 6726825d its name carries; another file's metrics compare with
    no paper's, so it is an error without --allow-nonstandard-weights, and a flag in the metrics with it."""
    from lct_fast.quality.inception import STANDARD_SHA256, check_standard_weights, file_sha256
    from lct_fast.validate import UserError

    sha = file_sha256(weights)
    assert not sha.startswith(STANDARD_SHA256)                       # random-init test weights
    with pytest.raises(UserError, match="--allow-nonstandard-weights"):
        check_standard_weights(weights, sha)
    assert check_standard_weights(weights, sha, allow_nonstandard=True) is False
    assert check_standard_weights("std.pth", STANDARD_SHA256 + "0" * 56) is True

