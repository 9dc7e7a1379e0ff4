"""Throughput profiling (launch/profile.py, lct_fast.profiler, lct_fast.profiler.phases).

Phase attribution is checked with an injected clock, never with wall-clock ratios (2 shared cores make
those flaky): the trainer's real step runs, and each phase advances a virtual clock by a known amount,
so the breakdown must return exactly those amounts and sum to the step.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from lct_fast.config import ConfigError, load_config
from lct_fast.profiler.phases import UNTRACKED, PhaseTimer, current_phase, phase
from lct_fast.profiler import (ProfileOptions, classify_exit, expected_state_bytes, parse_sweep, profile_trainer,
                                 run_sweep, summarise, sweep_points)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROFILE = os.path.join(ROOT, "launch", "profile.py")
SMALL = ["model.width=32", "train.global_batch=8", "data.shuffle_buffer=64", "optim.warmup_samples=0"]


class VirtualClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def advance(self, dt):
        self.now += dt


# ----------------------------------------------------------------------------------------- timer
def test_phase_timer_exclusive_times_sum_to_step():
    clk = VirtualClock()
    timer = PhaseTimer("cpu", clock=clk)
    with timer.active():
        with phase("outside-a-step"):  # not charged: no step is open
            clk.advance(5.0)
        with timer.step() as res:
            clk.advance(0.5)                      # untracked
            with phase("loss"):
                clk.advance(1.0)                  # loss (exclusive)
                with phase("ot"):
                    assert current_phase() == "ot"
                    clk.advance(2.0)
                clk.advance(0.25)                 # loss again
                with phase("jvp"):
                    clk.advance(3.0)
            with phase("ot"):                     # a phase seen twice in a step adds up
                clk.advance(0.125)
    assert res == {UNTRACKED: 0.5, "loss": 1.25, "ot": 2.125, "jvp": 3.0, "step": 6.875}
    assert sum(v for k, v in res.items() if k != "step") == res["step"]
    assert timer.steps == [res]
    assert current_phase() is None
    with phase("x"):  # inactive: a no-op
        pass
    with timer.step(), pytest.raises(RuntimeError, match="nest"):
        with timer.step():
            pass


# ------------------------------------------------------------------------- the trainer's own step
AMOUNTS = {"data": 0.010, "ot": 0.020, "target_forward": 0.060, "jvp": 0.070, "online_forward": 0.011,
           "backward": 0.050, "optimizer": 0.030, "ema": 0.004}


def _instrument(trainer, clk, method):
    """Make each phase of the real step take a known virtual time (the real work takes none)."""
    def slow(fn, dt):
        def call(*a, **k):
            out = fn(*a, **k)
            clk.advance(dt)
            return out
        return call

    begin = trainer.begin

    def begin_slow(*a, **k):
        st = begin(*a, **k)
        batches = trainer._batches

        def gen():
            for b in batches:
                clk.advance(AMOUNTS["data"])
                yield b
        trainer._batches = gen()
        return st

    trainer.begin = begin_slow
    trainer.loss_fn.coupler = slow(trainer.loss_fn.coupler, AMOUNTS["ot"])
    trainer.engine.backward = slow(trainer.engine.backward, AMOUNTS["backward"])
    trainer.engine.step = slow(trainer.engine.step, AMOUNTS["optimizer"])
    trainer.ema.update = slow(trainer.ema.update, AMOUNTS["ema"])
    module = trainer.engine.module
    if method == "sct":
        import lct_fast.methods.sct as sct

        real_f = module.F

        def online_f(*a, **k):  # the JVP pass calls F too, without gradients: only the online pass is slow
            out = real_f(*a, **k)
            if torch.is_grad_enabled():
                clk.advance(AMOUNTS["online_forward"])
            return out
        return sct, slow(sct.sct_tangent, AMOUNTS["jvp"]), module, online_f
    trainer.engine.forward = slow(trainer.engine.forward, AMOUNTS["online_forward"])
    target = trainer.target_net

    class SlowTarget:
        def __call__(self, *a, **k):
            out = target(*a, **k)
            clk.advance(AMOUNTS["target_forward"])
            return out

        def __getattr__(self, name):
            return getattr(target, name)
    trainer.target_net = SlowTarget()
    return None, None, None, None


@pytest.mark.parametrize("method", ["ict", "sct"])
def test_breakdown_returns_injected_phase_times(tmp_path, monkeypatch, method):
    from lct_fast.trainer import Trainer

    preset = "tiny" if method == "ict" else "tiny_sct"
    cfg = load_config(preset, SMALL + ["train.log_interval=0", "train.ckpt_interval=0", "train.sample_interval=0",
                                       "train.eval_interval=0", "train.grad_accum=2"])
    trainer = Trainer(cfg, str(tmp_path / "run"))
    clk = VirtualClock()
    mod, tangent, module, online_f = _instrument(trainer, clk, method)
    if mod is not None:
        monkeypatch.setattr(mod, "sct_tangent", tangent)
        monkeypatch.setattr(module, "F", online_f, raising=False)
    out = profile_trainer(trainer, ProfileOptions(steps=3, warmup=1), clock=clk)
    accum = trainer.grad_accum
    assert accum == 2
    expect = {k: accum * v for k, v in AMOUNTS.items() if k not in ("ema",)}
    expect["ema"] = AMOUNTS["ema"]
    expect.pop("jvp" if method == "ict" else "target_forward")
    assert len(out["steps"]) == 3
    for step in out["steps"]:
        for k, v in expect.items():
            assert step[k] == pytest.approx(v, abs=1e-12), (k, step)
        rest = {k: v for k, v in step.items() if k not in expect and k != "step"}
        assert all(v == pytest.approx(0.0, abs=1e-12) for v in rest.values()), rest
        assert step["step"] == pytest.approx(sum(expect.values()), abs=1e-12)
    # FLOPs were counted on the extra step, per phase: the passes the method runs, nothing in the others.
    fl = out["flops"]
    passes = ("online_forward", "backward", "jvp") if method == "sct" else ("online_forward", "target_forward",
                                                                           "backward")
    assert all(fl.get(p, 0) > 0 for p in passes), fl
    assert fl["backward"] == pytest.approx(2 * fl["online_forward"], rel=0.05)
    assert "data" not in fl and "optimizer" not in fl
    # and the record a rank-0 summary makes of it: phases sum to the step.
    info = {"params": trainer.num_params, "micro_batch": trainer.micro_batch, "grad_accum": accum,
            "expected_state_bytes": {"total": 0}, "backends": {}, "log_interval": 0}
    rec = summarise(cfg, info, [out], ProfileOptions(steps=3, warmup=1), device="CPU test")
    assert rec["phase_sum_ms"] == pytest.approx(rec["rank0_step_mean_ms"], rel=1e-9)
    assert rec["samples_per_s"] == pytest.approx(cfg.train.global_batch / (sum(expect.values())))
    assert rec["mfu"] is None  # no peak known for a CPU
    # ... but the ceiling is known for every GPU of the table, from the config's plan: fp32 products as TF32
    # (train.tf32 on), the OT cost in IEEE fp32
    plan = rec["precision_plan"]
    assert plan["online_forward"] == "tf32" and plan["ot"] == "fp32"
    peak = {"tf32": 494.7e12, "fp32": 66.9e12}
    seconds = sum(f / peak[plan[k]] for k, f in fl.items())
    assert rec["ceiling"]["H200"]["step_ms_at_peak"] == pytest.approx(seconds * 1e3)
    assert rec["ceiling"]["H200"]["mfu"] == pytest.approx(sum(fl.values()) / 989.0e12 / seconds)
    assert rec["flops"]["forward_per_sample"] == pytest.approx(fl["online_forward"] / (cfg.train.global_batch), rel=1e-6)


# ------------------------------------------------------------------------------------ the ceiling
def test_ceiling_matches_the_closed_form():
    """A step of 5.5 forwards whose JVP pass (2.2 of them) runs in fp32, the rest in bf16, on an H200 (bf16 989,
    TF32 494.7, fp32 66.9 TFLOP/s): MFU <= 5.5/989 / (2.2/66.9 + 3.3/989) ~ 15 %; TF32 ~ 71 %; bf16 100 %."""
    from lct_fast.profiler import ceiling

    fl = {"online_forward": 1.0e12, "jvp": 2.2e12, "backward": 2.3e12, "recompute": 1.0e12}  # recompute: not model
    plan = {"online_forward": "bf16", "backward": "bf16", "jvp": "fp32"}
    c = ceiling(fl, plan)["H200"]
    assert c["mfu"] == pytest.approx(5.5 / 989 / (2.2 / 66.9 + 3.3 / 989))
    assert 0.14 < c["mfu"] < 0.16
    assert c["step_ms_at_peak"] == pytest.approx(1e3 * (2.2 / 66.9 + 3.3 / 989))
    assert ceiling(fl, {**plan, "jvp": "tf32"})["H200"]["mfu"] == pytest.approx(5.5 / 989 / (2.2 / 494.7 + 3.3 / 989))
    assert ceiling(fl, {**plan, "jvp": "bf16"})["A100"]["mfu"] == pytest.approx(1.0)


@pytest.mark.parametrize("sets, jvp, rest", [
    (["method.sct.jvp_dtype=fp32", "train.tf32=false"], "fp32", "bf16"),   # bf16 step, fp32 JVP as PyTorch runs it
    (["method.sct.jvp_dtype=fp32"], "tf32", "bf16"),
    (["method.sct.jvp_dtype=bf16"], "bf16", "bf16"),
    (["train.precision=fp32", "method.sct.jvp_dtype=fp32"], "tf32", "tf32"),
    (["train.precision=fp32", "method.sct.jvp_dtype=bf16", "train.tf32=false"], "bf16", "fp32"),
])
def test_precision_plan_follows_the_config(sets, jvp, rest):
    from lct_fast.precision import PLAN_PHASES
    from lct_fast.precision import precision_plan
    from lct_fast.profiler import NON_MODEL_PHASES, STEP_PHASES

    cfg = load_config("s", sets)
    plan = precision_plan(cfg)
    assert set(plan) == set(PLAN_PHASES) == set(STEP_PHASES) - set(NON_MODEL_PHASES) - {UNTRACKED}
    assert (plan["jvp"], plan["teacher_forward"], plan["online_forward"], plan["backward"]) == (jvp, jvp, rest, rest)
    # the OT cost runs neither under autocast nor as TF32 (ot.py: ieee_fp32)
    assert plan["ot"] == precision_plan(cfg, tf32=True)["ot"] == precision_plan(cfg, tf32=False)["ot"] == "fp32"
    assert precision_plan(cfg, tf32=False)["online_forward"] == ("bf16" if rest == "bf16" else "fp32")


# --------------------------------------------------------------------------------- memory model
def test_expected_state_bytes_follow_zero_partitioning():
    n, w = 1000, 4
    z0 = expected_state_bytes(n, stage=0, world=w, bf16_weights=False, num_emas=2)
    assert z0 == {"weights": 4000, "gradients": 4000, "optimizer": 8000, "ema": 8000, "total": 24000}
    z1 = expected_state_bytes(n, stage=1, world=w, bf16_weights=False, num_emas=2)
    assert z1["optimizer"] == 2000 and z1["gradients"] == 4000
    z2 = expected_state_bytes(n, stage=2, world=w, bf16_weights=True, num_emas=1)
    assert z2["weights"] == 2000 and z2["gradients"] == 500 and z2["optimizer"] == (8 + 4) * 1000 / 4
    z3 = expected_state_bytes(n, stage=3, world=w, bf16_weights=True, num_emas=1)
    assert z3["weights"] == 500 and z3["ema"] == 1000


# ---------------------------------------------------------------------------------------- sweep
def test_sweep_keys_aliases_and_bad_input():
    sw = parse_sweep(["size=s,b", "zero=1,3", "micro_batch=8", "train.grad_accum=1,2", "kernels=reference,fused"])
    assert sw[0] == ("size", ("model.size",), ["S", "B"])
    assert sw[1] == ("zero", ("deepspeed.zero_optimization.stage",), [1, 3])
    assert sw[2][1] == ("train.micro_batch",) and sw[3][2] == [1, 2]
    assert sw[4][1] == ("model.ops_backend", "method.ot.backend")
    with pytest.raises(ConfigError, match="unknown sweep key 'sizes'"):
        parse_sweep(["sizes=s"])
    with pytest.raises(ConfigError, match="KEY=V1,V2"):
        parse_sweep(["size"])
    with pytest.raises(ConfigError, match="kernels"):
        parse_sweep(["kernels=fast"])
    pts = sweep_points("s", parse_sweep(["size=s,b", "zero=1,3"]), [])
    assert len(pts) == 4 and pts[0]["sets"] == ["model.size=S", "deepspeed.zero_optimization.stage=1"]
    assert pts[0]["params"] < pts[2]["params"]
    with pytest.raises(ConfigError, match="model.size.*'Q'"):
        sweep_points("s", parse_sweep(["size=s,q"]), [])
    with pytest.raises(ConfigError, match="model.no_such_key"):
        sweep_points("s", parse_sweep(["model.no_such_key=1"]), [])


def test_classify_exit():
    assert classify_exit(0, {"status": "ok"}) == ("ok", "")
    assert classify_exit(3, {"status": "oom", "error": "CUDA out of memory"}) == ("oom", "CUDA out of memory")
    for rc in (-9, 137, 247):
        status, detail = classify_exit(rc, None)
        assert status == "oom" and "OOM killer" in detail
    assert classify_exit(1, None, "Traceback...\ntorch.OutOfMemoryError: CUDA out of memory")[0] == "oom"
    assert classify_exit(1, None, "RuntimeError: CUDA error: out of memory\nCUDA kernel errors...")[0] == "oom"
    torchrun = ("torch.distributed.elastic.multiprocessing.errors.ChildFailedError:\n  exitcode  : -9 (pid: 41)\n"
                "  error_file: <N/A>\n  traceback : Signal 9 (SIGKILL) received by PID 41")
    status, detail = classify_exit(1, None, torchrun)
    assert status == "oom" and "OOM killer" in detail
    status, detail = classify_exit(1, None, "Traceback\nValueError: boom")
    assert status == "error" and "boom" in detail


def test_sweep_records_oom_and_errors_without_failing(tmp_path):
    """An injected OOM-killer death and a crashing point are rows of the table, not a failed sweep."""
    calls = []

    def fake_runner(cmd, **kw):
        out = cmd[cmd.index("--out") + 1]
        width = next(s.split("=")[1] for s in cmd if s.startswith("model.width="))
        calls.append(width)
        if width == "32":
            rec = {"status": "ok", "samples_per_s": 100.0, "step_ms": {"median": 80.0}, "model_tflops_per_s": 1e-3,
                   "mfu": None, "per_rank": [{"memory": {"peak_rss_bytes": 2 ** 30}}],
                   "expected_state_bytes": {"total": 2 ** 20}, "micro_batch": 8, "world_size": 1}
            with open(os.path.join(out, "profile.json"), "w") as f:
                json.dump(rec, f)
            return subprocess.CompletedProcess(cmd, 0, "", "")
        if width == "48":
            return subprocess.CompletedProcess(cmd, -9, "", "")  # the kernel's OOM killer
        return subprocess.CompletedProcess(cmd, 1, "", "Traceback\nRuntimeError: something else")

    rows = run_sweep("tiny", ["model.width=32,48,64"], [], str(tmp_path), profile_argv=["--steps", "1"],
                     launcher=[sys.executable], runner=fake_runner, log=lambda m: None)
    assert calls == ["32", "48", "64"]
    assert [r["status"] for r in rows] == ["ok", "oom", "error"]
    assert "something else" in rows[2]["detail"]
    md = (tmp_path / "sweep.md").read_text()
    assert "| 48 |" in md and "oom" in md and "OOM killer" in md
    assert (tmp_path / "sweep.csv").read_text().count("\n") == 4
    assert (tmp_path / "sweep.png").stat().st_size > 1000


def _gone(pid: int, within_s: float) -> bool:
    """Whether process ``pid`` has exited (and been reaped) within ``within_s`` seconds."""
    import time

    deadline = time.time() + within_s
    while time.time() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def test_a_stopped_sweep_kills_its_running_point(tmp_path):
    """SIGTERM to a sweep (a job's time limit) must not leave the running point's own session holding the
    device: the sweep's handler unwinds, and run_point kills the point's process group on the way out."""
    import signal
    import subprocess
    import textwrap
    import time

    pidfile = tmp_path / "point.pid"
    parent = textwrap.dedent(f"""
        import signal, sys
        from lct_fast.profiler.sweep import run_point
        signal.signal(signal.SIGTERM, lambda s, f: sys.exit(128 + s))  # as lct_fast.cli.profile._sweep does
        child = "import os, time; open({str(pidfile)!r}, 'w').write(str(os.getpid())); time.sleep(120)"
        run_point([sys.executable, "-c", child], timeout=300)
    """)
    proc = subprocess.Popen([sys.executable, "-c", parent], env=dict(os.environ, PYTHONPATH=ROOT))
    deadline = time.time() + 60
    while not (pidfile.exists() and pidfile.read_text()) and time.time() < deadline:
        time.sleep(0.1)
    pid = int(pidfile.read_text())
    os.kill(pid, 0)  # the point runs, in a session of its own
    assert os.getsid(pid) != os.getsid(proc.pid)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    if not _gone(pid, 10.0):
        os.kill(pid, signal.SIGKILL)
        pytest.fail("the sweep point outlived its sweep")


def test_sweep_skips_points_predicted_not_to_fit(tmp_path):
    """A point whose ZeRO state plus modelled activations exceed the budget is a row, never a process."""
    from lct_fast.profiler.memory import predicted_bytes
    from lct_fast.models import count_parameters

    launched = []

    def fake_runner(cmd, **kw):
        launched.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, "", "Traceback\nRuntimeError: not this one")

    small, big = (predicted_bytes(load_config("s", [f"model.size={z}"]), count_parameters(load_config(
        "s", [f"model.size={z}"]).model), 1)["total"] / 2 ** 30 for z in ("S", "XL"))
    budget = (small + big) / 2
    rows = run_sweep("s", ["size=s,xl"], [], str(tmp_path), profile_argv=["--steps", "1"], launcher=[sys.executable],
                     runner=fake_runner, log=lambda m: None, skip_above_gb=budget)
    assert len(launched) == 1 and "model.size=S" in launched[0]
    assert [r["status"] for r in rows] == ["error", "skipped"]
    assert rows[1]["predicted_gib"] == pytest.approx(big) and f"> {budget:g} GiB" in rows[1]["detail"]
    assert "skipped" in (tmp_path / "sweep.md").read_text()
    # the prediction per rank falls with ZeRO-3 over more ranks (the state is partitioned)
    z3 = load_config("s", ["model.size=XL", "deepspeed.zero_optimization.stage=3", "train.global_batch=64",
                           "train.micro_batch=8"])
    n = count_parameters(z3.model)
    assert predicted_bytes(z3, n, 8)["state"] == pytest.approx(predicted_bytes(z3, n, 1)["state"] / 8)


def test_launcher_world_size():
    import importlib.util

    spec = importlib.util.spec_from_file_location("lct_profile_cli", PROFILE)  # not the standard `profile`
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    launcher_world_size = cli.launcher_world_size

    assert launcher_world_size([sys.executable]) == 1
    assert launcher_world_size(["torchrun", "--nproc_per_node", "8"]) == 8
    assert launcher_world_size(["torchrun", "--nnodes=1:4", "--nproc-per-node=8"]) == 32
    assert launcher_world_size(["deepspeed", "--num_gpus", "4", "--num_nodes", "2"]) == 8
    assert launcher_world_size(["deepspeed", "--num_accelerators=2"]) == 2
    # a count the launcher decides: this host's GPUs, or unknown (then the sweep skips nothing)
    assert launcher_world_size(["deepspeed"], gpus=8) == 8 and launcher_world_size(["deepspeed"]) is None
    assert launcher_world_size(["torchrun", "--nproc-per-node", "gpu"], gpus=4) == 4
    assert launcher_world_size(["torchrun", "--nproc-per-node", "auto"]) is None


# ----------------------------------------------------------------------------- the command line
def _env():
    env = {k: v for k, v in os.environ.items()
           if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(DS_ACCELERATOR="cpu", PYTHONPATH=ROOT, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    return env


def profile(*args, ranks=1, check=True):
    from lct_fast.distributed import free_port

    launcher = [sys.executable] if ranks == 1 else [
        sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks), "--master_port", str(free_port())]
    proc = subprocess.run([*launcher, PROFILE, *args], env=_env(), cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def sets(items):
    return [a for it in items for a in ("--set", it)]


@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory):
    """The tiny presets under both methods, ZeRO 0 and 3 (really partitioned), on 2 gloo ranks."""
    out = {}
    for method, preset in (("ict", "configs/tiny.json"), ("sct", "configs/tiny_sct.json")):
        for stage in (0, 3):
            d = tmp_path_factory.mktemp(f"prof-{method}-z{stage}")
            proc = profile("--config", preset, "--steps", "3", "--warmup", "1", "--out", str(d),
                           *sets(SMALL + [f"deepspeed.zero_optimization.stage={stage}",
                                          "deepspeed.zero_optimization.stage3_param_persistence_threshold=0"]),
                           ranks=2)
            with open(d / "profile.json") as f:
                out[method, stage] = (json.load(f), proc.stdout)
    return out


@pytest.mark.parametrize("method", ["ict", "sct"])
@pytest.mark.parametrize("stage", [0, 3])
def test_two_ranks_profile(two_rank_runs, method, stage):
    rec, stdout = two_rank_runs[method, stage]
    assert rec["status"] == "ok" and rec["world_size"] == 2 and rec["zero_stage"] == stage
    assert [r["rank"] for r in rec["per_rank"]] == [0, 1]
    assert rec["phase_sum_ms"] == pytest.approx(rec["rank0_step_mean_ms"], rel=1e-6)
    passes = {"ict": "target_forward", "sct": "jvp"}[method]
    for p in ("data", "online_forward", "backward", "optimizer", "ema", passes):
        assert rec["phases_ms"][p]["rank0_ms"] > 0, p
    assert ({"ict": "jvp", "sct": "target_forward"}[method]) not in rec["phases_ms"]
    fl = rec["flops"]
    assert fl["forward_per_sample"] == pytest.approx(fl["forward_per_sample_closed_form"], rel=0.05)
    per = fl["per_sample_by_phase"]
    assert per["online_forward"] == pytest.approx(fl["forward_per_sample"], rel=0.01)
    assert per["backward"] == pytest.approx(2 * fl["forward_per_sample"], rel=0.05)
    if method == "sct":
        assert per["jvp"] == pytest.approx(fl["jvp_per_sample_closed_form"], rel=0.05)
    # every rank did the same work: the FLOPs of the whole step are both ranks' (global batch 8)
    assert fl["per_step_all_ranks"] == pytest.approx(8 * sum(per.values()), rel=1e-6)
    assert rec["samples_per_s"] > 0 and rec["model_tflops_per_s"] > 0 and rec["mfu"] is None
    assert rec["per_rank"][0]["memory"]["peak_rss_bytes"] > 0
    exp = rec["expected_state_bytes"]
    assert exp["weights"] == pytest.approx(rec["params"] * 4 / (2 if stage == 3 else 1))
    assert "attention" in rec["backends"] and "ot" in rec["backends"]
    assert "phase" in stdout and "samples/s" in stdout and "MFU n/a" in stdout
    # the activation model against what the step's forward really saved; the stop-gradient and JVP passes
    # save nothing
    act = rec["activations"]
    assert set(act["measured_saved_bytes_by_phase"]) <= {"online_forward", "loss"}
    # 0.92-0.93 measured at 16 tokens: the model leaves out the per-sample adaLN vectors; under ZeRO-3 the
    # gathered weights are parameters (ds_id), not activations
    assert 0.85 < act["model"]["saved"] / act["measured_saved_bytes"] <= 1.0, act
    assert "activations (rank 0" in stdout


def test_zero3_counts_the_same_flops_as_zero0(two_rank_runs):
    for method in ("ict", "sct"):
        a = two_rank_runs[method, 0][0]["flops"]["per_sample_by_phase"]
        b = two_rank_runs[method, 3][0]["flops"]["per_sample_by_phase"]
        assert a.keys() == b.keys() and all(a[k] == pytest.approx(b[k], rel=1e-9) for k in a)


def test_scd_profile_reports_the_teacher_phase_on_zero3(tmp_path):
    """sCD on 2 gloo ranks, ZeRO-3: the step's phases include the teacher's forward, whose FLOPs are those of two
    forwards (classifier-free guidance at s = 1.5 runs the conditional and the null-class halves), beside the
    JVP, online forward and backward; the state model counts the teacher's weights, halved by ZeRO-3."""
    from safetensors.torch import save_file

    from lct_fast.config import save_config
    from lct_fast.methods import build_model

    tcfg = load_config("tiny_trigflow", ["model.width=32"])
    teacher = build_model(tcfg.model, tcfg.method)
    (tmp_path / "teacher").mkdir()
    save_file({k: v.contiguous() for k, v in teacher.state_dict().items()}, str(tmp_path / "teacher" / "ema.safetensors"))
    save_config(tcfg, str(tmp_path / "teacher" / "config.json"))
    out = tmp_path / "prof"
    profile("--config", "configs/tiny_scd.json", "--steps", "2", "--warmup", "1", "--out", str(out),
            *sets(SMALL + [f"method.scd.teacher={tmp_path / 'teacher' / 'ema.safetensors'}",
                           "method.scd.guidance=1.5", "deepspeed.zero_optimization.stage=3",
                           "deepspeed.zero_optimization.stage3_param_persistence_threshold=0"]), ranks=2)
    with open(out / "profile.json") as f:
        rec = json.load(f)
    assert rec["status"] == "ok" and rec["zero_stage"] == 3
    for p in ("teacher_forward", "jvp", "online_forward", "backward", "optimizer"):
        assert rec["phases_ms"][p]["rank0_ms"] > 0, p
    assert rec["phase_sum_ms"] == pytest.approx(rec["rank0_step_mean_ms"], rel=1e-6)
    fl = rec["flops"]
    per = fl["per_sample_by_phase"]
    assert per["teacher_forward"] == pytest.approx(2 * fl["forward_per_sample"], rel=0.02)
    assert per["jvp"] == pytest.approx(fl["jvp_per_sample_closed_form"], rel=0.05)
    n_teacher = sum(p.numel() for p in teacher.parameters())
    assert rec["expected_state_bytes"]["teacher"] == pytest.approx(n_teacher * 4 / 2)


def test_single_process_trace_and_peak(tmp_path):
    proc = profile("--config", "configs/tiny_sct.json", "--steps", "2", "--warmup", "1", "--trace", "--trace-steps",
                   "1", "--peak-tflops", "1.5", "--out", str(tmp_path), *sets(SMALL))
    rec = json.loads((tmp_path / "profile.json").read_text())
    assert rec["mfu"] == pytest.approx(rec["model_tflops_per_s"] / 1.5)
    assert "MFU" in proc.stdout and "% of 1.5 TFLOP/s" in proc.stdout
    trace = json.loads((tmp_path / "trace-rank0.json").read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    assert {"lct_fast/jvp", "lct_fast/backward", "lct_fast/optimizer"} <= names


def test_real_sweep_with_memory_cap_records_oom(tmp_path):
    """Two real points in fresh processes under an 8 GiB address-space cap: the tiny DiT runs, a 16384-wide one
    (10 B parameters) fails its allocation and is recorded as oom."""
    proc = profile("--config", "configs/tiny.json", "--steps", "1", "--warmup", "0", "--no-flops",
                   "--memory-cap-gb", "8", "--sweep", "model.width=32,16384", "--out", str(tmp_path), *sets(SMALL))
    md = (tmp_path / "sweep.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| 32 ") or line.startswith("| 16384 ")]
    assert "| ok |" in rows[0] and "| oom |" in rows[1], md
    assert "can't allocate memory" in rows[1] or "bad_alloc" in rows[1]
    assert proc.returncode == 0 and (tmp_path / "sweep.png").exists()


@pytest.mark.parametrize("args, message", [
    (["--steps", "0"], "--steps must be >= 1"),
    (["--sweep", "sizes=s"], "unknown sweep key 'sizes'"),
    (["--sweep", "size=s,q"], "'Q'"),
    (["--set", "train.no_such=1"], "train.no_such"),
])
def test_bad_input_is_a_clear_error(tmp_path, args, message):
    proc = profile("--config", "configs/tiny.json", "--out", str(tmp_path), *args, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_measure_step_ms_is_the_profiled_trainer_step():
    """bench_ot's step time comes from the same trainer step as the profile (one micro-batch per step)."""
    from lct_fast.profiler import measure_step_ms

    ms, micro, dim, phases = measure_step_ms("tiny_sct", ["model.width=32", "train.micro_batch=4"], steps=2, warmup=1)
    assert micro == 4 and dim == 4 * 8 * 8
    assert ms > 0 and phases["jvp"] > 0 and phases["backward"] > 0
    mean = phases.pop("step")
    assert sum(phases.values()) == pytest.approx(mean, rel=1e-9)
    assert min(ms, mean) > 0.3 * max(ms, mean)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_event_phases_measure_device_time():
    """On GPU the marks are CUDA events: kernels that spin a known number of cycles are charged to the phase
    that runs them on the device, and the phases sum to the step."""
    torch.cuda.synchronize()
    timer = PhaseTimer("cuda")
    cycles = 20_000_000
    with timer.active():
        with timer.step():  # warm-up
            torch.cuda._sleep(cycles)
        with timer.step() as res:
            with phase("a"):
                torch.cuda._sleep(cycles)
            with phase("b"):
                torch.cuda._sleep(2 * cycles)
    assert res["b"] == pytest.approx(2 * res["a"], rel=0.2)
    assert res["a"] + res["b"] + res.get(UNTRACKED, 0.0) == pytest.approx(res["step"], rel=1e-6)


def test_point_records_per_rank_oom_and_corrupt_json(tmp_path):
    from lct_fast.profiler import read_point_record

    assert read_point_record(str(tmp_path)) is None
    (tmp_path / "profile.json").write_text('{"status": "ok", "per_ra')  # killed while writing
    (tmp_path / "profile-oom-rank1.json").write_text(json.dumps({"status": "oom", "error": "CUDA out of memory"}))
    assert read_point_record(str(tmp_path))["status"] == "oom"
    assert classify_exit(3, read_point_record(str(tmp_path))) == ("oom", "CUDA out of memory")


def test_sweep_timeout_kills_the_whole_process_group(tmp_path):
    """A point past --point-timeout is a 'timeout' row, and the workers a launcher started die with it."""
    pidfile = tmp_path / "worker.pid"
    code = ("import os, sys, time\n"
            "pid = os.fork()\n"
            "if pid == 0:\n"
            f"    open({str(pidfile)!r}, 'w').write(str(os.getpid())); time.sleep(120)\n"
            "time.sleep(120)\n")
    rows = run_sweep("tiny", ["model.width=32"], [], str(tmp_path / "sweep"), profile_argv=[],
                     launcher=[sys.executable, "-c", code], timeout_s=3, log=lambda m: None)
    assert rows[0]["status"] == "timeout" and "killed" in rows[0]["detail"]
    pid = int(pidfile.read_text())
    if not _gone(pid, 5.0):
        pytest.fail(f"worker {pid} outlived its timed-out sweep point")


def test_recompute_of_checkpointing_is_not_model_flops(tmp_path):
    """With activation checkpointing the blocks run again inside the backward: that work is the 'recompute'
    phase, apart from the backward, and stays out of the model FLOPs (MFU)."""
    from lct_fast.trainer import Trainer

    cfg = load_config("tiny_sct", SMALL + ["model.checkpointing=true", "train.ckpt_interval=0",
                                           "train.sample_interval=0", "train.eval_interval=0"])
    trainer = Trainer(cfg, str(tmp_path / "run"))
    out = profile_trainer(trainer, ProfileOptions(steps=1, warmup=0))
    fl = out["flops"]
    assert 0.8 * fl["online_forward"] < fl["recompute"] < fl["online_forward"]  # the blocks, not the embeddings
    assert fl["backward"] == pytest.approx(2 * fl["online_forward"], rel=0.05)
    assert out["steps"][0]["recompute"] > 0
    info = {"params": trainer.num_params, "micro_batch": trainer.micro_batch, "grad_accum": trainer.grad_accum,
            "expected_state_bytes": {"total": 0}, "backends": {}, "log_interval": 0}
    rec = summarise(cfg, info, [out], ProfileOptions(steps=1, warmup=0), device="CPU test")
    assert "recompute" not in rec["flops"]["per_sample_by_phase"]
    assert rec["flops"]["non_model_per_step"]["recompute"] == fl["recompute"]


def test_launch_folder_on_path_keeps_the_standard_profile_module():
    """launch/profile.py shares its name with the standard library's profile (cProfile imports it, so does
    torch._dynamo): with launch/ on sys.path -- any launch/ script -- the import still gets the real one."""
    code = ("import sys; sys.path.insert(0, 'launch'); import profile, cProfile; "
            "assert hasattr(profile, 'Profile') and hasattr(profile, 'run'), profile; cProfile.run('1 + 1')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
