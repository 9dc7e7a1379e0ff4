"""launch/train.py end to end on CPU: dry run, a short tiny job, exact resume, config errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Small and quick: a 32-wide DiT, 8 samples per step, every step logged.
SMALL = ["model.width=32", "train.global_batch=8", "train.log_interval=8", "optim.warmup_samples=0",
         "data.shuffle_buffer=64"]


def train(*args, check=True, ranks=1):
    """Run launch/train.py: plain python for one rank, the deepspeed launcher (gloo) for several."""
    from lct_fast.distributed import free_port

    # A process group of this pytest process (in-process trainer tests) leaves MASTER_PORT etc. in the
    # environment; the child must pick its own rendezvous.
    env = {k: v for k, v in os.environ.items()
           if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(DS_ACCELERATOR="cpu", PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    launcher = [sys.executable] if ranks == 1 else [
        sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks), "--master_port", str(free_port())]
    cmd = [*launcher, os.path.join(ROOT, "launch", "train.py"), *args]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def sets(items):
    return [a for it in items for a in ("--set", it)]


def metrics(run):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_dry_run_prints_config_and_meta_param_count():
    from lct_fast.config import load_config
    from lct_fast.methods import build_model

    proc = train("--config", "configs/tiny.json", "--dry-run", "--set", "model.width=48")
    text = proc.stdout
    resolved = json.loads(text[: text.rindex("}") + 1])
    assert resolved["model"]["width"] == 48 and resolved["method"]["ict"]["distance"] == "cauchy"
    count = int(text.strip().splitlines()[-1].split(":")[1].replace(",", ""))
    cfg = load_config("tiny", ["model.width=48"])
    net = build_model(cfg.model, cfg.method)
    assert count == sum(p.numel() for p in net.parameters())


def test_config_error_exits_2_with_key():
    proc = train("--config", "configs/tiny.json", "--set", "optim.lr=-1", check=False)
    assert proc.returncode == 2
    assert "optim.lr" in proc.stderr and "tiny.json" in proc.stderr


def test_tiny_job_writes_run_directory(tmp_path):
    run = str(tmp_path / "run")
    train("--config", "configs/tiny.json", "--out", run,
          *sets(SMALL + ["train.total_samples=48", "train.sample_interval=48", "train.ckpt_interval=24"]))
    rows = metrics(run)
    assert [r["samples"] for r in rows] == [8, 16, 24, 32, 40, 48]
    assert all(np.isfinite(r["loss"]) and r["step_applied"] == 1.0 for r in rows)
    for key in ("c", "num_levels", "ot_cost_ratio", "samples_per_s", "lr"):
        assert key in rows[-1], key
    with open(os.path.join(run, "config.json")) as f:
        assert json.load(f)["train"]["total_samples"] == 48
    ck = os.path.join(run, "checkpoints")
    assert open(os.path.join(ck, "latest")).read().strip() == "samples-000000000048"
    assert os.path.exists(os.path.join(ck, "samples-000000000024", "COMPLETE"))
    x = np.load(os.path.join(run, "samples", "samples-000000000048-1step.npy"), allow_pickle=False)
    assert x.shape == (16, 4, 8, 8) and np.isfinite(x).all()
    assert os.path.getsize(os.path.join(run, "samples", "samples-000000000048-2step.png")) > 0
    assert os.listdir(os.path.join(run, "tensorboard"))
    summary = json.load(open(os.path.join(run, "summary.json")))
    assert summary["samples"] == 48 and summary["bad_steps_total"] == 0

    # encode -> train -> export -> sample, as the README shows it (the last two steps here).
    env = dict(os.environ, PYTHONPATH=ROOT)
    subprocess.run([sys.executable, os.path.join(ROOT, "launch", "export.py"), "--run", run], env=env, check=True,
                   capture_output=True, timeout=300)
    out = str(tmp_path / "samples")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "sample.py"), "--checkpoint",
                           os.path.join(run, "export", "ema_0.999.safetensors"), "--steps", "2", "--n", "6",
                           "--out", out], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lat = np.load(os.path.join(out, "latents.npy"), allow_pickle=False)
    assert lat.shape == (6, 4, 8, 8) and np.isfinite(lat).all()


@pytest.mark.parametrize("preset, ranks, stage, compiled", [("tiny", 1, 0, False), ("tiny_sct", 2, 3, False),
                                                            ("tiny_sct", 1, 0, True), ("tiny_meanflow", 1, 0, False)])
def test_resume_is_exact(tmp_path, preset, ranks, stage, compiled):
    """2N steps straight and N + resume + N give identical per-step losses and identical exported EMAs
    (one rank; two ranks under ZeRO-3, where optimizer state and EMA are per-rank partitions; and one rank
    with compiled blocks, train.compile, whose three processes each compile afresh)."""
    common = SMALL + ["train.total_samples=64", "train.ckpt_interval=0", "train.ema.decays=[0.9]",
                      "train.ema.power_stds=[0.1]", f"deepspeed.zero_optimization.stage={stage}",
                      f"train.compile={str(compiled).lower()}", *(["model.dropout=0.1"] if compiled else [])]
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    run = lambda *a: train("--config", f"configs/{preset}.json", *a, *sets(common), ranks=ranks)  # noqa: E731
    run("--out", straight)
    run("--out", split, "--max-samples", "32")
    assert [r["samples"] for r in metrics(split)] == [8, 16, 24, 32]
    run("--out", split, "--resume", "auto")
    a, b = metrics(straight), metrics(split)
    assert [r["samples"] for r in b] == [r["samples"] for r in a]
    assert [r["loss"] for r in b] == [r["loss"] for r in a]

    from lct_fast.cli.export import export
    from safetensors.torch import load_file

    from lct_fast.config import load_config
    from lct_fast.methods import build_model

    cfg = load_config(preset, common)
    shapes = {n: p.shape for n, p in build_model(cfg.model, cfg.method).named_parameters()}
    paths_a, paths_b = export(straight), export(split)
    assert [os.path.basename(p) for p in paths_a] == ["ema_0.9.safetensors", "power_0.1.safetensors"]
    for pa, pb in zip(paths_a, paths_b):
        ea, eb = load_file(pa), load_file(pb)
        assert {k: v.shape for k, v in ea.items()} == shapes  # consolidated: every parameter, full shape
        assert all(torch.equal(ea[k], eb[k]) for k in ea)


@pytest.mark.parametrize("ranks,zero", [(1, 0), (2, 3)])
def test_in_training_eval_equals_offline_eval_and_report(tmp_path, ranks, zero):
    """train.eval_interval logs eval/ figures of the named EMA; the last one equals launch/evaluate.py on the
    exported EMA (same n, seed, steps), the run ends with the quality line and report.png. On 2 ZeRO-3 ranks
    the EMA is gathered from its per-rank partitions and the samples are generated in two halves."""
    run = str(tmp_path / "run")
    proc = train("--config", "configs/tiny.json", "--out", run, ranks=ranks,
                 *sets(SMALL + ["train.total_samples=64", "train.eval_interval=32", "train.eval.n=300",
                                "train.eval.steps=[1, 2]", "train.eval.ema=ema_0.999", "train.ckpt_interval=0",
                                "train.sample_interval=0", f"deepspeed.zero_optimization.stage={zero}"]))
    rows = [r for r in metrics(run) if "eval/ema" in r]
    assert [r["samples"] for r in rows] == [32, 64] and {r["eval/ema"] for r in rows} == {"ema_0.999"}
    last = rows[-1]
    assert last["eval/1step/real_mw1"] < last["eval/1step/gaussian_mw1"]  # the baselines are what they claim
    assert "quality (ema_0.999, 300 samples, 1 step): marginal W1" in proc.stderr
    assert os.path.getsize(os.path.join(run, "report.png")) > 10_000
    subprocess.run([sys.executable, "launch/export.py", "--run", run], cwd=ROOT, check=True, capture_output=True)
    out = str(tmp_path / "eval")
    ev = subprocess.run([sys.executable, "launch/evaluate.py", "--checkpoint",
                         os.path.join(run, "export", "ema_0.999.safetensors"), "--num-samples", "300", "--steps", "1",
                         "2", "--out", out], cwd=ROOT, capture_output=True, text=True, env={**os.environ,
                                                                                          "PYTHONPATH": ROOT})
    assert ev.returncode == 0, ev.stderr[-2000:]
    offline = json.load(open(os.path.join(out, "metrics.json")))["metrics"]
    for k in ("1", "2"):
        for name in ("mw1", "swd", "kurtosis", "gaussian_mw1"):
            assert offline[k][name] == pytest.approx(last[f"eval/{k}step/{name}"], rel=1e-5), (k, name)
