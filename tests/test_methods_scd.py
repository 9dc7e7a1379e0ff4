"""sCD (method scd): the tangent with the teacher's guided velocity against float64 finite differences of f⁻ along
the teacher's probability-flow ODE; teacher loading and its errors; the student starting as the teacher."""
import os

import pytest
import torch

from lct_fast.config import ConfigError, load_config, save_config
from lct_fast.methods import build_loss
from lct_fast.methods.sct import sct_tangent
from lct_fast.methods import build_model

SD = 0.5


def _net(preset, seed, sets=()):
    cfg = load_config(preset, list(sets))
    torch.manual_seed(seed)
    net = build_model(cfg.model, cfg.method).double()
    for p in net.parameters():  # leave the zero init: non-trivial outputs and tangents everywhere
        torch.nn.init.normal_(p, std=0.05)
    return cfg, net.eval()


def test_scd_tangent_matches_finite_differences_along_the_teacher_ode():
    _, teacher = _net("tiny_trigflow", 1)
    cfg, student = _net("tiny_scd", 2, ["method.scd.guidance=2.0", "method.sct.tangent_warmup=0"])
    loss = build_loss(cfg.method, data_dim=256, total_steps=10, teacher=teacher)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64) * SD
    z = torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64) * SD
    t = torch.tensor([0.1, 0.8, 1.4], dtype=torch.float64)
    labels = torch.tensor([0, 3, 1])
    ct, st = torch.cos(t).view(-1, 1, 1, 1), torch.sin(t).view(-1, 1, 1, 1)
    xt = ct * x0 + st * z

    def teacher_v(x, tt):  # σ_d·(F_u + s·(F_c − F_u)), computed here independently of the loss
        fc = teacher.F(x / SD, tt, labels)
        fu = teacher.F(x / SD, tt, torch.full_like(labels, 4))
        return SD * (fu + 2.0 * (fc - fu))

    v = loss.velocity(x0, z, xt, t, labels)
    torch.testing.assert_close(v, teacher_v(xt, t))
    assert not torch.allclose(v, ct * z - st * x0)  # not the data velocity

    def f_minus(x, tt):
        c, s = torch.cos(tt).view(-1, 1, 1, 1), torch.sin(tt).view(-1, 1, 1, 1)
        return c * x - s * SD * student.F(x / SD, tt, labels)

    gvec, _, _, _ = sct_tangent(student, xt, t, v, labels, sigma_data=SD, r=1.0, g_norm_c=0.1)
    h = 1e-6
    df = (f_minus(xt + h * v, t + h) - f_minus(xt - h * v, t - h)) / (2 * h)   # d f⁻/dt along dx/dt = v_T
    raw = ct * df
    ref = raw / (raw.flatten(1).norm(dim=1).view(-1, 1, 1, 1) + 0.1)
    err = (gvec - ref).abs().max() / ref.abs().max()
    assert err < 1e-6, err
    with pytest.raises(ValueError, match="teacher"):
        build_loss(cfg.method, data_dim=256, total_steps=10)


def _export_teacher(tmp_path, sets=()):
    """A teacher 'export' as launch/export.py writes it: <dir>/ema.safetensors + config.json."""
    from safetensors.torch import save_file

    cfg, teacher = _net("tiny_trigflow", 1, sets)
    d = tmp_path / "teacher"
    d.mkdir(exist_ok=True)
    save_file({k: v.float().contiguous() for k, v in teacher.state_dict().items()}, str(d / "ema.safetensors"))
    save_config(cfg, str(d / "config.json"))
    return str(d / "ema.safetensors"), teacher.float()


def test_teacher_loading_and_clear_errors(tmp_path):
    from lct_fast.distill import init_student_from_teacher, load_teacher

    path, ref = _export_teacher(tmp_path)
    student_cfg = load_config("tiny_scd", [f"method.scd.teacher={path}"])
    teacher = load_teacher(student_cfg.method.scd, student_cfg)
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([0.3, 1.2]), torch.tensor([1, 2])
    torch.testing.assert_close(teacher.F(x, t, y), ref.F(x, t, y))
    student = build_model(student_cfg.model, student_cfg.method)
    kept = init_student_from_teacher(student, teacher)
    assert kept and all("logvar_head" in k or ".guidance_embed." in k for k in kept)       # what the teacher lacks
    torch.testing.assert_close(student.F(x, t, y), teacher.F(x, t, y))           # the student starts as the teacher
    assert torch.count_nonzero(student.logvar(t)) == 0                            # its own w(t) starts at zero

    with pytest.raises(ConfigError, match="method.scd.teacher"):
        load_teacher(load_config("tiny_scd").method.scd, student_cfg)
    with pytest.raises(ConfigError, match="not found"):
        load_teacher(load_config("tiny_scd", ["method.scd.teacher=/nope.safetensors"]).method.scd, student_cfg)
    (tmp_path / "b").mkdir()
    bad_path, _ = _export_teacher(tmp_path / "b", ["model.width=48", "model.heads=2"])
    bad = load_config("tiny_scd", [f"method.scd.teacher={bad_path}"])
    with pytest.raises(ConfigError, match="model.width = 48"):
        load_teacher(bad.method.scd, bad)
    sct_cfg = load_config("tiny_sct")
    save_config(sct_cfg, os.path.join(os.path.dirname(path), "config.json"))    # not a trigflow run
    with pytest.raises(ConfigError, match="method=trigflow"):
        load_teacher(student_cfg.method.scd, student_cfg)


def test_tiny_scd_trains_from_an_exported_teacher(tmp_path):
    """Teacher run -> export -> sCD run on the trainer: the student starts at the teacher and trains."""
    import numpy as np

    from lct_fast.trainer import Trainer

    import importlib.util

    launch = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "launch")
    spec = importlib.util.spec_from_file_location("_export", os.path.join(launch, "export.py"))
    export = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(export)
    small = ["train.global_batch=16", "train.log_interval=160", "train.sample_interval=0", "train.eval_interval=0",
             "optim.warmup_samples=0"]
    teacher_run = str(tmp_path / "teacher")
    Trainer(load_config("tiny_trigflow", small + ["train.ckpt_interval=0"]), teacher_run).run(max_samples=320)
    paths = export.export(teacher_run)
    weights = next(p for p in paths if p.endswith("ema_0.99.safetensors"))
    cfg = load_config("tiny_scd", small + ["train.ckpt_interval=0", f"method.scd.teacher={weights}"])
    tr = Trainer(cfg, str(tmp_path / "student"))
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([0.4, 1.0]), torch.tensor([0, 1])
    torch.testing.assert_close(tr.module.F(x, t, y), tr.teacher.F(x, t, y))
    summary = tr.run(max_samples=160)
    assert summary["samples"] == 160 and np.isfinite(summary["final"]["loss"])
    assert summary["final"]["g_norm_mean"] > 0


@pytest.mark.parametrize("size, dropout", [("s", 0.0), ("b", 0.0), ("l", 0.1), ("xl", 0.1), ("xxl", 0.1)])
def test_large_scd_presets_follow_table_4(size, dropout):
    """The DiT S…XXL sCD presets: the base preset's architecture and parameter count, Table 4's sCD iterations
    (200k at batch 2048) and dropout, the sCT settings, method scd."""
    from lct_fast.models import count_parameters

    base, scd = load_config(size), load_config(f"{size}_scd")
    assert scd.method.name == "scd" and scd.model.dropout == dropout
    assert scd.train.total_samples == 200_000 * 2048 == 200_000 * scd.train.global_batch
    assert (scd.method.sct.p_mean, scd.method.sct.p_std, scd.method.sct.g_norm_c) == (-0.8, 1.6, 0.1)
    # the base architecture plus the guidance-scale MLP (FREQ_DIM -> width -> width) of the conditioned student
    from lct_fast.models import resolve_dit_dims
    from lct_fast.models.dit import FREQ_DIM

    w = resolve_dit_dims(base.model.size).width
    assert count_parameters(scd.model) == count_parameters(base.model) + FREQ_DIM * w + w + w * w + w
    assert scd.optim.lr == base.optim.lr and 1.0 < scd.method.scd.guidance <= 2.0
    assert scd.method.scd.guidance_conditioned and scd.model.guidance_embed
    assert (scd.method.scd.guidance_min, scd.method.scd.guidance_max) == (1.0, 2.0)


COND = ["model.guidance_embed=true", "method.scd.guidance_conditioned=true"]


def test_guidance_conditioned_tangent_and_teacher_velocity_per_sample():
    """Per-sample scales s_i: the teacher velocity is σ_d·(F_u + s_i·(F_c − F_u)) row by row, and the tangent is
    float64 finite differences of f⁻(·, ·, s_i) along that velocity (s is a condition: no tangent)."""
    from lct_fast.methods.sct import sct_tangent

    _, teacher = _net("tiny_trigflow", 1)
    cfg, student = _net("tiny_scd", 2, COND + ["method.sct.tangent_warmup=0"])
    loss = build_loss(cfg.method, data_dim=256, total_steps=10, teacher=teacher)
    assert loss.guidance_range == (1.0, 2.0)
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64) * SD
    z = torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64) * SD
    t = torch.tensor([0.2, 0.9, 1.3], dtype=torch.float64)
    labels, s = torch.tensor([0, 3, 1]), torch.tensor([1.0, 1.5, 2.0], dtype=torch.float64)
    ct, st = torch.cos(t).view(-1, 1, 1, 1), torch.sin(t).view(-1, 1, 1, 1)
    xt = ct * x0 + st * z
    v = loss.velocity(x0, z, xt, t, labels, guidance=s)
    for i in range(3):
        fc = teacher.F(xt[i:i + 1] / SD, t[i:i + 1], labels[i:i + 1])
        fu = teacher.F(xt[i:i + 1] / SD, t[i:i + 1], torch.tensor([4]))
        torch.testing.assert_close(v[i:i + 1], SD * (fu + float(s[i]) * (fc - fu)))

    def f_minus(x, tt):
        c, sn = torch.cos(tt).view(-1, 1, 1, 1), torch.sin(tt).view(-1, 1, 1, 1)
        return c * x - sn * SD * student.F(x / SD, tt, labels, guidance=s)

    gvec, _, _, _ = sct_tangent(student, xt, t, v, labels, sigma_data=SD, r=1.0, g_norm_c=0.1, guidance=s)
    h = 1e-6
    raw = ct * (f_minus(xt + h * v, t + h) - f_minus(xt - h * v, t - h)) / (2 * h)
    ref = raw / (raw.flatten(1).norm(dim=1).view(-1, 1, 1, 1) + 0.1)
    assert (gvec - ref).abs().max() / ref.abs().max() < 1e-6
    # the guidance input matters to this (randomly initialised) student
    assert not torch.allclose(student.F(xt / SD, t, labels, guidance=s),
                              student.F(xt / SD, t, labels, guidance=torch.ones_like(s)))


def test_guidance_conditioned_student_starts_as_teacher_and_learns_its_scale_input(tmp_path):
    """The student initialised from the teacher equals it at every scale (zero output layer of the guidance
    embedding); one loss backward reaches that layer; sampling asks for the scale; bad combinations are errors."""
    from lct_fast.distill import init_student_from_teacher, load_teacher
    from lct_fast.sample import generate

    path, _ = _export_teacher(tmp_path)
    cfg = load_config("tiny_scd", COND + [f"method.scd.teacher={path}", "method.sct.tangent_warmup=0"])
    teacher = load_teacher(cfg.method.scd, cfg)
    torch.manual_seed(0)
    student = build_model(cfg.model, cfg.method)
    kept = init_student_from_teacher(student, teacher)
    assert any(k.startswith("backbone.guidance_embed.") for k in kept)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([0.3, 1.2]), torch.tensor([1, 2])
    for s in (1.0, 1.7, 2.0):
        torch.testing.assert_close(student.F(x, t, y, guidance=s), teacher.F(x, t, y))

    loss = build_loss(cfg.method, data_dim=256, total_steps=10, teacher=teacher)
    gen = torch.Generator().manual_seed(0)
    loss(student, torch.randn(8, 4, 8, 8) * SD, torch.arange(8) % 8 % 4, step=5, generator=gen).mean().backward()
    out_layer = student.backbone.guidance_embed.mlp[2]
    assert out_layer.weight.grad is not None and out_layer.weight.grad.abs().sum() > 0

    with torch.no_grad():  # a student whose scale input is no longer zero: the sampler's guidance matters
        out_layer.weight.normal_(std=0.5)
    kw = dict(n=4, shape=(4, 8, 8), num_classes=4, steps=1, seed=0)
    a = generate(student, cfg.method, guidance=1.0, **kw).latents
    b = generate(student, cfg.method, guidance=2.0, **kw).latents
    c = generate(student, cfg.method, **kw).latents                      # default: method.scd.guidance
    assert not torch.allclose(a, b)
    torch.testing.assert_close(c, generate(student, cfg.method, guidance=cfg.method.scd.guidance, **kw).latents)
    with pytest.raises(ValueError, match="guidance-conditioned"):
        generate(teacher, load_config("tiny_trigflow").method, guidance=1.5, **kw)

    with pytest.raises(ConfigError, match="model.guidance_embed"):
        load_config("tiny_scd", ["model.guidance_embed=false"])
    with pytest.raises(ConfigError, match="model.guidance_embed"):
        load_config("tiny_sct", ["model.guidance_embed=true"])
    with pytest.raises(ConfigError, match="guidance_max"):
        load_config("tiny_scd", COND + ["method.scd.guidance_min=1.5", "method.scd.guidance_max=1.2"])


@pytest.mark.parametrize("size, kiters, dropout", [("s", 1048, 0.0), ("b", 1048, 0.0), ("l", 1048, 0.1),
                                                   ("xl", 696, 0.1), ("xxl", 376, 0.1)])
def test_large_teacher_presets_follow_table_4_and_fit_their_students(size, kiters, dropout):
    """The DiT S…XXL TrigFlow teachers: Table 4's teacher iterations (batch 2048), dropout and P_mean/P_std, the
    base architecture and a DiT learning rate (not EDM2's 1e-2); each passes its sCD student's teacher check."""
    from lct_fast.distill import MATCH_KEYS
    from lct_fast.models import count_parameters

    base, teacher, student = load_config(size), load_config(f"{size}_trigflow"), load_config(f"{size}_scd")
    assert teacher.method.name == "trigflow" and teacher.model.dropout == dropout
    assert teacher.train.total_samples == kiters * 1000 * teacher.train.global_batch and teacher.train.global_batch == 2048
    assert (teacher.method.trigflow.p_mean, teacher.method.trigflow.p_std) == (-0.4, 1.0)
    assert teacher.optim.lr == base.optim.lr <= 1e-4 and teacher.method.label_dropout > 0
    assert count_parameters(teacher.model) == count_parameters(base.model)
    for key in MATCH_KEYS:
        assert getattr(teacher.model, key) == getattr(student.model, key), key
    assert teacher.method.sigma_data == student.method.sigma_data
