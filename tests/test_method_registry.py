"""The method registry: every method is found through its spec, code outside lct_fast/methods never compares a
method name, a new method is one module plus its registration (shown with a toy method that has a second time
as an extra condition, run through config, trainer and sampler without any other edit), and the backbones embed
a method's extra conditions generically."""
import ast
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from lct_fast.config import MethodConfig, load_config
from lct_fast.methods import build_loss, build_model, get_method, method_names, method_specs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_method_is_registered_with_its_section_and_presets():
    assert method_names() == ["ict", "sct", "trigflow", "scd", "meanflow"]
    fields = set(MethodConfig.__dataclass_fields__)
    for spec in method_specs():
        for key, cls in spec.sections:
            assert key in fields and isinstance(getattr(MethodConfig(), key), cls)
    for preset, name in [("tiny", "ict"), ("tiny_sct", "sct"), ("tiny_trigflow", "trigflow"), ("tiny_scd", "scd"),
                         ("tiny_meanflow", "meanflow")]:
        cfg = load_config(preset)
        assert get_method(cfg.method.name).name == name
    with pytest.raises(ValueError, match="method.name: expected one of"):
        get_method("edm")


def test_no_method_name_is_compared_outside_the_methods():
    """``x == "sct"`` / ``x in ("sct", "scd")`` anywhere in lct_fast but its methods package is a dispatch the
    registry should make."""
    names = set(method_names())
    bad = []
    for folder, _, files in os.walk(os.path.join(ROOT, "lct_fast")):
        if os.path.basename(folder) == "methods":
            continue
        for f in files:
            if not f.endswith(".py"):
                continue
            path = os.path.join(folder, f)
            for node in ast.walk(ast.parse(open(path).read())):
                if not isinstance(node, ast.Compare):
                    continue
                consts = [c for side in [node.left, *node.comparators] for c in ast.walk(side)
                          if isinstance(c, ast.Constant) and c.value in names]
                if consts:
                    bad.append(f"{os.path.relpath(path, ROOT)}:{node.lineno}")
    assert not bad, f"method-name comparisons outside lct_fast/methods: {bad}"


@pytest.mark.parametrize("arch", ["dit", "unet"])
def test_backbones_embed_any_extra_condition(arch):
    from lct_fast.models import build_backbone

    m = load_config("tiny").model
    if arch == "unet":
        m.arch, m.norm, m.unet_channels, m.channel_mult, m.num_res_blocks = "unet", "groupnorm", 16, [1, 2], 1
        m.attn_resolutions, m.head_channels = [8], 8
    torch.manual_seed(0)
    plain = build_backbone(m, {})
    torch.manual_seed(0)
    net = build_backbone(m, {"r": 0.0, "guidance": 1.0})
    assert net.condition_names == ("r", "guidance") and hasattr(net, "r_embed") and hasattr(net, "guidance_embed")
    x, c = torch.randn(3, 4, 16, 16), torch.rand(3)
    missing = net.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert missing and all(k.startswith(("r_embed.", "guidance_embed.")) for k in missing)
    # adaLN-zero style: a new condition starts as a no-op at every value (the output layer is zero) ...
    torch.testing.assert_close(net(x, c, r=torch.tensor([0.3, 0.1, 0.9])), plain(x, c), rtol=0, atol=0)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    # ... and once trained, the value matters and None is the neutral value.
    out = net(x, c, r=torch.full((3,), 0.5))
    assert not torch.allclose(out, net(x, c, r=torch.full((3,), 0.1)))
    torch.testing.assert_close(net(x, c), net(x, c, r=torch.zeros(3), guidance=torch.ones(3)))
    with pytest.raises(ValueError, match=r"condition\(s\) \['s'\]"):
        net(x, c, s=torch.ones(3))


def test_checkpoints_that_call_the_guidance_embedding_g_embed_still_load(tmp_path):
    """Old sCD students (guidance embedding ``g_embed``) load everywhere weights are read: the module, an export
    through load_weights, a resumed run's EMA, launch/export.py's consolidation."""
    from safetensors.torch import save_file

    from lct_fast.ema import EMA, consolidate
    from lct_fast.weights import load_weights

    cfg = load_config("tiny_scd", ["method.scd.teacher=unused"])
    torch.manual_seed(0)
    net = build_model(cfg.model, cfg.method)
    old = {k.replace("guidance_embed.", "g_embed."): v for k, v in net.state_dict().items()}
    assert any(".g_embed." in k for k in old)
    fresh = build_model(cfg.model, cfg.method)
    fresh.load_state_dict(old, strict=True)
    for k, v in net.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[k], v)

    save_file({k: v.contiguous() for k, v in old.items()}, str(tmp_path / "old.safetensors"))
    loaded = load_weights(build_model(cfg.model, cfg.method), str(tmp_path / "old.safetensors"))
    torch.testing.assert_close(loaded.backbone.guidance_embed.mlp[0].weight, net.backbone.guidance_embed.mlp[0].weight)

    ema = EMA(net.named_parameters(), decays=[0.99], power_stds=[])
    state = ema.state_dict()
    state["tensors"] = {k.replace("guidance_embed.", "g_embed."): v for k, v in state["tensors"].items()}
    again = EMA(fresh.named_parameters(), decays=[0.99], power_stds=[])
    again.load_state_dict(state)                                   # a resumed run from before the rename
    assert set(consolidate([state])[ema.names[0]]) == {n for n, _ in net.named_parameters()}


TOY = textwrap.dedent('''
    """A toy method in its own file: average-velocity regression with a second time r as a network input."""
    from dataclasses import dataclass

    import torch

    from lct_fast.methods.base import MethodLoss
    from lct_fast.methods.common import config_coupler, unwrap
    from lct_fast.registry import Condition, MethodSpec, register
    from lct_fast.methods.sampling import Sampler
    from lct_fast.methods.sct import trigflow_precond


    @dataclass
    class ToyConfig:
        scale: float = 1.0
        """Loss scale."""


    class ToyLoss(MethodLoss):
        def draw_times(self, batch, generator, x0, step):
            return torch.rand(batch, generator=generator, device=generator.device).to(x0) * 1.5 + 0.01

        def loss(self, net, target_net, d, *, step, generator):
            t = d.t
            b = d.bshape
            x_t = torch.cos(t).view(b) * d.x0 + torch.sin(t).view(b) * d.z
            v = torch.cos(t).view(b) * d.z - torch.sin(t).view(b) * d.x0
            f = unwrap(net).F(x_t / self.sigma_data, t, d.labels, dropout_seed=d.dropout_seed, r=0.5 * t)
            m = (self.sigma_data * f - v).flatten(1).square().mean(1)
            self.metrics = {"loss": m.detach().mean()}
            return self.scale * m


    def _loss(method_cfg, *, data_dim, total_steps, coupler=None, teacher=None):
        loss = ToyLoss(data_dim=data_dim, sigma_data=method_cfg.sigma_data, label_dropout=method_cfg.label_dropout,
                       noise_std=method_cfg.sigma_data, coupler=coupler or config_coupler(method_cfg.ot))
        loss.scale = method_cfg.toy.scale
        return loss


    def toy_sampler(method_cfg, steps, *, schedule=None, cfg_scale=1.0, null_label=0, conditions=None):
        """Euler steps of the average velocity from t to the next time s, the second time r = s per step."""
        import math

        sd = method_cfg.sigma_data
        ts = tuple(math.pi / 2 * (1 - i / steps) for i in range(steps + 1))

        def run(net, noise, labels):
            x = sd * noise[0]
            with torch.no_grad():
                for t, s in zip(ts, ts[1:]):
                    tt = torch.full((x.shape[0],), t)
                    x = x - (t - s) * sd * net.F(x / sd, tt, labels, r=torch.full_like(tt, s))
            return x

        return Sampler(schedule=ts, draws=1, run=run)


    SPEC = register(MethodSpec(
        name="toy", summary="toy", sections=(("toy", ToyConfig),),
        precond=lambda backbone, m: trigflow_precond(backbone, m.sigma_data, 1.0), loss=_loss, sampler=toy_sampler,
        nfe=lambda m, steps: steps, probe_level=0.7,
        conditions=lambda m: {"r": Condition(neutral=0.0, sample_at=0.0)}))
''')

DRIVER = textwrap.dedent('''
    import sys, torch
    import toy_method  # noqa: F401  (its registration: the one line a new method adds)
    from lct_fast.config import load_config
    from lct_fast.methods import build_model
    from lct_fast.sample import generate
    from lct_fast.trainer import Trainer

    cfg = load_config("tiny_sct", ["method.name=toy", "method.toy.scale=2.0", "model.adaptive_weight=false",
                                   "method.sct.adaptive_weight=false", "train.global_batch=16",
                                   "train.total_samples=32", "train.log_interval=16", "optim.warmup_samples=0",
                                   "data.shuffle_buffer=64", "train.ckpt_interval=0", "train.sample_interval=0",
                                   "train.eval_interval=0"])
    tr = Trainer(cfg, sys.argv[1])
    tr.begin()
    losses = [tr.train_step()["loss"] for _ in range(2)]
    net = build_model(cfg.model, cfg.method)
    net.load_state_dict(tr.parallel.gathered_state_dict(everywhere=True, is_main=True))
    assert hasattr(net.backbone, "r_embed")
    x = generate(net, cfg.method, n=4, shape=(4, 16, 16), num_classes=cfg.model.num_classes, steps=2).latents
    print("OK", losses, float(x.std()))
''')


def test_a_new_method_is_one_module_and_its_registration(tmp_path):
    (tmp_path / "toy_method.py").write_text(TOY)
    (tmp_path / "driver.py").write_text(DRIVER)
    # the child picks its own rendezvous (an in-process trainer test leaves MASTER_PORT etc. behind)
    env = {k: v for k, v in os.environ.items()
           if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(PYTHONPATH=os.pathsep.join([str(tmp_path), ROOT]), OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, str(tmp_path / "driver.py"), str(tmp_path / "run")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "OK" in res.stdout, res.stdout[-2000:] + res.stderr[-4000:]
    line = res.stdout.split("OK", 1)[1].strip().splitlines()[0]
    losses, std = line.rsplit(" ", 1)
    first, second = (float(v) for v in losses.strip("[]").split(","))
    assert 0 < first < 10 and 0 < second < 10 and first != second   # trained: finite, and the weights moved
    assert 0 < float(std) < 10                                       # the sampler ran through the r input


def test_the_loss_base_runs_the_prologue_once_for_every_method():
    from lct_fast.methods.base import MethodLoss

    for preset in ("tiny", "tiny_sct", "tiny_trigflow"):
        cfg = load_config(preset)
        assert isinstance(build_loss(cfg.method, data_dim=1024, total_steps=10), MethodLoss)


def test_one_karras_spacing_for_training_grid_and_samplers():
    """iCT's multi-step levels and TrigFlow's EDM-spaced times are the training grid's ρ-spacing
    (schedules.karras_sigmas), equal to the closed form σ_i = (σ_a^{1/ρ} + f_i (σ_b^{1/ρ} − σ_a^{1/ρ}))^ρ to
    rounding (the three copies this replaces agreed with it to within 3.6e-15 relative)."""
    import math

    from lct_fast.methods.schedules import karras_sigmas
    from lct_fast.sample import ict_sigmas, trigflow_times

    def closed(a, b, f, rho=7.0):
        return (a ** (1 / rho) + f * (b ** (1 / rho) - a ** (1 / rho))) ** rho

    for steps in (3, 5, 17):
        levels = ict_sigmas(steps, sigma_mid=0.821)
        k = steps - 1
        assert levels[:2] == (80.0, 0.821)
        want = [closed(0.821, 0.002, j / k) for j in range(1, k)]
        assert all(abs(x - y) <= 1e-14 * y for x, y in zip(levels[2:], want)) and len(levels) == steps
        grid = karras_sigmas(k + 1, 0.002, 0.821).tolist()
        assert list(levels[2:]) == grid[-2:0:-1]
        ts = trigflow_times(steps, spacing="edm")
        want = [math.atan(closed(80.0, 0.002, i / (k - 1)) / 0.5) for i in range(k)]
        assert ts[0] == math.pi / 2 and ts[-1] == 0.0
        assert all(abs(x - y) <= 1e-14 * y for x, y in zip(ts[1:-1], want))


def test_model_defaults_and_checks_live_in_model_config():
    from types import SimpleNamespace

    from lct_fast.config import ConfigError
    from lct_fast.models import ModelConfig, build_backbone

    net = build_backbone(SimpleNamespace(arch="dit", size="custom", width=32, depth=1, heads=2, resolution=8))
    d = ModelConfig()
    assert net.patch == d.patch_size and net.in_channels == d.in_channels and net.num_classes == d.num_classes
    with pytest.raises(ConfigError, match=r"model.patch_size: expected one of \[1, 2\]"):
        load_config("tiny", ["model.patch_size=4"])


def test_a_methods_conditions_are_counted_by_the_parameter_count_flops_and_memory_models():
    from lct_fast.models import count_parameters
    from lct_fast.models.dit import FREQ_DIM
    from lct_fast.profiler.flops import dit_forward_flops
    from lct_fast.profiler.memory import dit_matrix_params

    m = load_config("tiny").model
    w = build_backbone_width(m)
    assert count_parameters(m, {"r": 0.0}) - count_parameters(m, {}) == FREQ_DIM * w + w + w * w + w
    assert dit_forward_flops(m, {"r": 0.0, "s": 1.0}) - dit_forward_flops(m, {}) == 2 * 2 * (FREQ_DIM * w + w * w)
    assert dit_matrix_params(m, {"r": 0.0})[1] - dit_matrix_params(m, {})[1] == w * w


def build_backbone_width(model_cfg) -> int:
    from lct_fast.models import build_backbone

    return build_backbone(model_cfg, {}).width
