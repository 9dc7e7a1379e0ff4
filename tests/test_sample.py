"""Tests of lct_fast.sample: samplers against the SPEC §2/§3 formulas, seeding, writing, VAE grids, CLI."""
from __future__ import annotations

import importlib.util
import math
import os

import numpy as np
import pytest
import torch
import torch.nn as nn

from lct_fast import sample as S
from lct_fast.config import MethodConfig, load_config, save_config
from lct_fast.methods.ict import ICTConfig
from lct_fast.methods.sct import SCTConfig
from lct_fast.methods import build_model
from lct_fast.models import TrigFlowPrecond, VEPrecond

SHAPE = (4, 8, 8)


def _model(name: str, seed: int = 0) -> tuple[nn.Module, object]:
    cfg = load_config("tiny" if name == "ict" else "tiny_sct")
    torch.manual_seed(seed)  # weight init only; sampling itself uses explicit generators
    net = build_model(cfg.model, cfg.method)
    with torch.no_grad():  # make F non-trivial (zero-initialised output layers would give F = 0)
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return net, cfg


def _noise(seed: int, i: int, steps: int) -> torch.Tensor:
    """The documented stream: row i % 256 of randn(steps, 256, *SHAPE) from a generator seeded with the
    SeedSequence hash of (seed, 0, i // 256)."""
    s = int(np.random.SeedSequence([seed, 0, i // 256]).generate_state(1, dtype=np.uint32)[0])
    return torch.randn((steps, 256, *SHAPE), generator=torch.Generator().manual_seed(s))[:, i % 256]


class Recorder(nn.Module):
    """Stand-in precond following the contract: f(x, s, labels) = 0.5·x + s (+ label id) and records calls."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(0.5))
        self.drop = nn.Dropout(0.5)
        self.calls = []

    def forward(self, x, s, labels=None, *, dropout_seed=None):
        self.calls.append((x.clone(), float(s), None if labels is None else labels.clone(), self.training))
        lab = 0.0 if labels is None else labels.float().reshape(-1, 1, 1, 1)
        return self.drop(self.w * x) + s + lab


def test_schedules():
    assert S.ict_sigmas(1) == (80.0,)
    assert S.ict_sigmas(2, sigma_mid=0.821) == (80.0, 0.821)
    s4 = S.ict_sigmas(4, sigma_max=80.0, sigma_mid=1.0, sigma_min=0.002, rho=7.0)
    a, b = 1.0 ** (1 / 7), 0.002 ** (1 / 7)
    assert s4[:2] == (80.0, 1.0)
    assert s4[2] == pytest.approx((a + (b - a) / 3) ** 7) and s4[3] == pytest.approx((a + 2 * (b - a) / 3) ** 7)
    assert S.sct_times(1) == (math.pi / 2,) and S.sct_times(2, t_mid=1.1) == (math.pi / 2, 1.1)
    assert S.sct_times(3, t_mid=1.0) == (math.pi / 2, 1.0, 0.5)
    with pytest.raises(ValueError, match="steps"):
        S.ict_sigmas(0)


@pytest.mark.parametrize("steps", [1, 2, 3])
def test_ict_generate_matches_spec_formula(steps):
    net, cfg = _model("ict")
    assert isinstance(net, VEPrecond)
    net.train()
    res = S.generate(net, cfg.method, n=5, shape=SHAPE, num_classes=4, steps=steps, seed=3, batch_size=2)
    assert net.training  # mode restored
    assert res.labels is not None and res.labels.shape == (5,) and 0 <= int(res.labels.min()) <= int(res.labels.max()) < 4
    ic = cfg.method.ict
    sig = S.ict_sigmas(steps, sigma_max=ic.sigma_max, sigma_mid=ic.sigma_mid, sigma_min=ic.sigma_min, rho=ic.rho)
    net.eval()
    with torch.no_grad():
        for i in range(5):
            z = _noise(3, i, steps)
            lab = res.labels[i:i + 1]
            x = net(ic.sigma_max * z[:1], torch.tensor([ic.sigma_max]), lab)  # SPEC §2: f(σ_max z, σ_max)
            for k, s in enumerate(sig[1:], start=1):
                x = net(x + math.sqrt(s**2 - ic.sigma_min**2) * z[k:k + 1], torch.tensor([s]), lab)
            torch.testing.assert_close(res.latents[i:i + 1], x, rtol=1e-5, atol=1e-5)
    assert not res.latents.requires_grad


@pytest.mark.parametrize("steps", [1, 2])
def test_sct_generate_matches_spec_formula(steps):
    net, cfg = _model("sct")
    assert isinstance(net, TrigFlowPrecond)
    res = S.generate(net, cfg.method, n=3, shape=SHAPE, num_classes=cfg.model.num_classes, steps=steps, seed=5,
                     batch_size=3, labels=[0, 1, cfg.model.num_classes])  # the last one: null class
    sd, t_mid = cfg.method.sigma_data, cfg.method.sct.t_mid
    net.eval()
    with torch.no_grad():
        for i in range(3):
            z = _noise(5, i, steps)
            lab = res.labels[i:i + 1]
            # 1 step: f(σ_d z, π/2) = −σ_d·F(z, π/2) (cos π/2 ≈ 0)
            x = -sd * net.F(z[:1], torch.tensor([math.pi / 2]), lab) + math.cos(math.pi / 2) * sd * z[:1]
            if steps == 2:
                x = net(math.cos(t_mid) * x + math.sin(t_mid) * sd * z[1:2], torch.tensor([t_mid]), lab)
            torch.testing.assert_close(res.latents[i:i + 1], x, rtol=1e-5, atol=1e-5)


def test_deterministic_and_batch_size_independent():
    net, cfg = _model("ict")
    a = S.generate(net, cfg.method, n=7, shape=SHAPE, num_classes=4, steps=2, seed=11, batch_size=7)
    b = S.generate(net, cfg.method, n=7, shape=SHAPE, num_classes=4, steps=2, seed=11, batch_size=7)
    c = S.generate(net, cfg.method, n=7, shape=SHAPE, num_classes=4, steps=2, seed=11, batch_size=3)
    d = S.generate(net, cfg.method, n=7, shape=SHAPE, num_classes=4, steps=2, seed=12, batch_size=7)
    assert torch.equal(a.latents, b.latents) and torch.equal(a.labels, b.labels)
    torch.testing.assert_close(a.latents, c.latents, rtol=1e-5, atol=1e-6)
    assert torch.equal(a.labels, c.labels)
    assert not torch.allclose(a.latents, d.latents)
    # The first samples of a larger run are the same samples.
    e = S.generate(net, cfg.method, n=9, shape=SHAPE, num_classes=4, steps=2, seed=11, batch_size=4)
    torch.testing.assert_close(e.latents[:7], a.latents, rtol=1e-5, atol=1e-6)


def test_stand_in_sampler_chain_labels_and_eval_mode():
    """Contract-following stand-in: checks inputs seen at each step, labels passed through, eval mode."""
    net = Recorder()
    method = MethodConfig(name="ict", ict=ICTConfig(sigma_mid=1.5))
    res = S.generate(net, method, n=4, shape=(1, 2, 2), num_classes=3, steps=2, seed=0, batch_size=4, labels=2)
    assert torch.equal(res.labels, torch.full((4,), 2))
    (x1_in, s1, l1, tr1), (x2_in, s2, l2, tr2) = net.calls
    assert (s1, s2) == (80.0, 1.5) and not tr1 and not tr2
    assert torch.equal(l1, torch.full((4,), 2)) and torch.equal(l2, l1)
    z = S.sample_noise(0, range(4), 2, (1, 2, 2))
    torch.testing.assert_close(x1_in, 80.0 * z[0])
    x1 = 0.5 * x1_in + 80.0 + 2.0
    torch.testing.assert_close(x2_in, x1 + math.sqrt(1.5**2 - 0.002**2) * z[1])
    torch.testing.assert_close(res.latents, 0.5 * x2_in + 1.5 + 2.0)
    net.calls.clear()
    sres = S.generate(net, MethodConfig(name="sct", sct=SCTConfig(t_mid=0.7)), n=2, shape=(1, 2, 2),
                      num_classes=0, steps=2, seed=1)
    assert sres.labels is None and net.calls[0][2] is None
    z = S.sample_noise(1, range(2), 2, (1, 2, 2))
    torch.testing.assert_close(net.calls[0][0], 0.5 * z[0])
    x1 = 0.25 * z[0] + math.pi / 2
    torch.testing.assert_close(net.calls[1][0], math.cos(0.7) * x1 + math.sin(0.7) * 0.5 * z[1])


def test_direct_sampler_with_generator_and_errors():
    net = Recorder()
    z = torch.randn(3, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    a = S.ict_sample(net, z, sigmas=(80.0, 0.5), generator=g1)
    b = S.ict_sample(net, z, sigmas=(80.0, 0.5), noise=[torch.randn(z.shape, generator=g2)])
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="generator"):
        S.ict_sample(net, z, sigmas=(80.0, 0.5))
    with pytest.raises(ValueError, match="sigma_min"):
        S.ict_sample(net, z, sigmas=(80.0, 0.001))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\]"):
        S.sample_labels(2, 3, 0, [0, 4])
    with pytest.raises(ValueError, match="unconditional"):
        S.sample_labels(2, 0, 0, 1)
    with pytest.raises(ValueError, match="seed"):
        S.sample_noise(-1, [0], 1, (1,))


def test_save_latents_roundtrip(tmp_path):
    x = torch.randn(3, *SHAPE)
    path = S.save_latents(str(tmp_path / "sub" / "lat.npy"), x)
    back = np.load(path, allow_pickle=False)
    assert back.dtype == np.float32 and np.array_equal(back, x.numpy())
    with pytest.raises(ValueError, match=r"\.npy"):
        S.save_latents(str(tmp_path / "lat.bin"), x)


def _stats(tmp_path, vae_scale=0.5, vae_shift=None):
    from lct_fast.data.stats import Stats, write_stats

    g = np.random.default_rng(0)
    st = Stats(count=10, shape=SHAPE, dtype="float32", mean=g.normal(size=4), std=g.uniform(0.5, 2, size=4),
               mean_element=g.normal(size=SHAPE), std_element=g.uniform(0.5, 2, size=SHAPE),
               vae="tiny", vae_scale=vae_scale, vae_shift=vae_shift, num_classes=4)
    d = tmp_path / "data"
    d.mkdir(exist_ok=True)
    write_stats(st, str(d))
    return st, str(d)


@pytest.mark.parametrize("normalize", ["channel", "element"])
def test_denormalize_inverts_spec_normalisation(tmp_path, normalize):
    st, d = _stats(tmp_path)
    lat = torch.randn(2, *SHAPE, dtype=torch.float64)
    if normalize == "channel":
        mean, std = torch.tensor(st.mean).reshape(1, -1, 1, 1), torch.tensor(st.std).reshape(1, -1, 1, 1)
    else:
        mean, std = torch.tensor(st.mean_element)[None], torch.tensor(st.std_element)[None]
    x0 = (lat - mean) / std * 0.5  # SPEC §1
    back = S.denormalize_latents(x0.float(), d, sigma_data=0.5, normalize=normalize)
    torch.testing.assert_close(back.double(), lat, rtol=1e-5, atol=1e-5)


def test_denormalize_follows_the_readers_zero_std_rule(tmp_path):
    """A constant channel (std 0) is normalised with std 1 by the reader; the sampler's inverse must agree."""
    from lct_fast.data import LatentNormalizer

    st, _ = _stats(tmp_path)
    st.std = st.std.copy()
    st.std[1] = 0.0
    lat = torch.randn(3, *SHAPE)
    lat[:, 1] = float(st.mean[1])
    x0 = LatentNormalizer(st, "channel", 0.5).normalize(lat)
    assert torch.isfinite(x0).all()
    torch.testing.assert_close(S.denormalize_latents(x0, st, sigma_data=0.5), lat, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="do not match"):
        S.denormalize_latents(torch.zeros(2, 3, 1, 1), st)


def _tiny_vae(path):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 16),
        layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=16)
    with torch.no_grad():  # shrink the output so that decoded pixels do not all saturate at ±1
        vae.decoder.conv_out.weight.mul_(0.6)
    vae.save_pretrained(str(path))
    return vae.eval()


@pytest.mark.parametrize("vae_shift", [None, 0.3])
def test_decode_and_save_grid_pixels(tmp_path, vae_shift):
    from PIL import Image

    vae = _tiny_vae(tmp_path / "vae")
    st, d = _stats(tmp_path, vae_scale=0.5, vae_shift=vae_shift)
    x0 = torch.randn(5, *SHAPE, generator=torch.Generator().manual_seed(1))
    out_png = str(tmp_path / "out" / "grid.png")
    S.decode_and_save_grid(x0, str(tmp_path / "vae"), d, out_png, sigma_data=0.5, nrow=3, padding=2, batch_size=2)
    img = np.asarray(Image.open(out_png).convert("RGB"))
    h = w = 16  # two encoder levels: 8x8 latents -> 16x16 pixels
    assert img.shape == (2 * (h + 2) + 2, 3 * (w + 2) + 2, 3)  # 5 images, 3 per row -> 2 rows
    # Independent decode: SPEC §1 inverse, / vae_scale (+ vae_shift, which the encoder subtracted), diffusers
    # decoder, [-1, 1] -> [0, 255].
    lat = x0.double() * torch.tensor(st.std).reshape(1, -1, 1, 1) / 0.5 + torch.tensor(st.mean).reshape(1, -1, 1, 1)
    with torch.no_grad():
        ref = vae.decode((lat / 0.5 + (vae_shift or 0.0)).float()).sample
    ref = ((ref.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    # The check below compares real images: varied pixels, mostly not saturated.
    assert ref.std() > 10 and ((ref == 0) | (ref == 255)).mean() < 0.2
    for i in range(5):
        y, x = 2 + (i // 3) * (h + 2), 2 + (i % 3) * (w + 2)
        tile = img[y:y + h, x:x + w].astype(int)
        assert np.abs(tile - ref[i].astype(int)).max() <= 1  # rounding of near-.5 values may differ
    assert (img[:2] == 0).all() and (img[2 + h + 2:, 2 + 2 * (w + 2):] == 0).all()  # padding, empty slot


def test_missing_vae_is_a_clear_error(tmp_path):
    _, d = _stats(tmp_path)
    missing = str(tmp_path / "no-such-vae")
    with pytest.raises(FileNotFoundError, match="no-such-vae"):
        S.decode_and_save_grid(torch.zeros(1, *SHAPE), missing, d, str(tmp_path / "g.png"))


def test_cli_writes_latents_labels_and_grid(tmp_path, capsys):
    from safetensors.torch import save_file

    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "launch", "sample.py")
    spec = importlib.util.spec_from_file_location("lct_launch_sample", script)
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    net, cfg = _model("ict", seed=2)
    run = tmp_path / "run"
    run.mkdir()
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(run / "model.safetensors"))
    save_config(cfg, str(run / "config.json"))
    _tiny_vae(tmp_path / "vae")
    _, d = _stats(tmp_path)
    out = tmp_path / "samples"
    rc = cli.main(["--checkpoint", str(run / "model.safetensors"), "--steps", "2", "--n", "6", "--seed", "4",
                   "--batch-size", "4", "--out", str(out), "--vae", str(tmp_path / "vae"), "--stats", d,
                   "--device", "cpu", "--images"])
    assert rc == 0
    # --images: every decoded image as a PNG and all of them as images.npz (what FID tools read), equal
    from PIL import Image as _Image

    imgs = np.load(out / "images.npz", allow_pickle=False)["arr_0"]
    assert imgs.shape == (6, 16, 16, 3) and imgs.dtype == np.uint8
    assert sorted(os.listdir(out / "images")) == [f"{i:06d}.png" for i in range(6)]
    np.testing.assert_array_equal(np.asarray(_Image.open(out / "images" / "000003.png")), imgs[3])
    lat = np.load(out / "latents.npy", allow_pickle=False)
    labels = np.load(out / "labels.npy", allow_pickle=False)
    ref = S.generate(net, cfg.method, n=6, shape=SHAPE, num_classes=4, steps=2, seed=4, batch_size=4)
    np.testing.assert_allclose(lat, ref.latents.numpy(), rtol=1e-5, atol=1e-6)
    assert np.array_equal(labels, ref.labels.numpy())
    from PIL import Image
    assert Image.open(out / "grid.png").size == (3 * 18 + 2, 2 * 18 + 2)
    # Weights that do not fit the config: a clear error naming the file.
    save_file({"bogus": torch.zeros(1)}, str(run / "bad.safetensors"))
    assert cli.main(["--checkpoint", str(run / "bad.safetensors"), "--config", str(run / "config.json"),
                     "--out", str(out), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lct-sample: error:") and "bad.safetensors" in err[0], err
    lone = tmp_path / "lone"
    lone.mkdir()
    save_file({"bogus": torch.zeros(1)}, str(lone / "w.safetensors"))
    assert cli.main(["--checkpoint", str(lone / "w.safetensors"), "--out", str(out), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pass --config" in err[0], err
