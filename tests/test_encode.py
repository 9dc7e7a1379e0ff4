"""Encoder tool end to end with a tiny random-weight AutoencoderKL saved locally."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import tarfile

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from PIL import Image  # noqa: E402

from lct_fast.data import load_stats  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _encode_cli():
    spec = importlib.util.spec_from_file_location("lct_encode_cli", os.path.join(ROOT, "launch", "encode.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, latent_channels=4, sample_size=16,
    ).eval()
    path = str(tmp_path_factory.mktemp("vae"))
    vae.save_pretrained(path)
    return vae, path


def _read_shards(path):
    """Read the written tars directly (independently of the loader): source -> (latent, cls)."""
    out = {}
    for name in sorted(os.listdir(path)):
        if not name.endswith(".tar"):
            continue
        with tarfile.open(os.path.join(path, name)) as tf:
            files = {m.name: tf.extractfile(m).read() for m in tf.getmembers()}
        for key in {n.split(".")[0] for n in files}:
            meta = json.loads(files[f"{key}.json"])
            lat = np.load(io.BytesIO(files[f"{key}.latent.npy"]), allow_pickle=False)
            cls = int(files[f"{key}.cls"]) if f"{key}.cls" in files else None
            out[meta["source"]] = (lat, cls)
    return out


def _reference_latents(vae, images_uint8):
    x = torch.from_numpy(images_uint8).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        return (vae.encode(x).latent_dist.mean * vae.config.scaling_factor).numpy()


def test_encode_image_folder_with_classes(tmp_path, tiny_vae):
    vae, vae_path = tiny_vae
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(6, 16, 16, 3), dtype=np.uint8)
    files = []
    for i, img in enumerate(images):
        d = tmp_path / "imgs" / f"class{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        p = d / f"img{i}.png"
        Image.fromarray(img).save(p)
        files.append(str(p))
    out = str(tmp_path / "lat")
    rc = _encode_cli()(["--src", str(tmp_path / "imgs"), "--out", out, "--vae", vae_path, "--mode", "mean",
                        "--class-dirs", "--dtype", "float32", "--samples-per-shard", "4", "--batch-size", "4"])
    assert rc == 0
    stats = load_stats(out)
    assert stats.count == 6 and stats.shape == (4, 8, 8) and stats.num_classes == 2
    assert stats.class_names == ["class0", "class1"]           # the label map: id -> folder name
    assert stats.vae == vae_path and stats.vae_scale == pytest.approx(0.18215)
    written = _read_shards(out)
    ref = _reference_latents(vae, images)
    for i, f in enumerate(files):
        lat, cls = written[f]
        assert cls == i % 2
        np.testing.assert_allclose(lat, ref[i], rtol=1e-5, atol=1e-6)
    stacked = np.stack([written[f][0] for f in files]).astype(np.float64)
    np.testing.assert_allclose(stats.mean, stacked.mean(axis=(0, 2, 3)), rtol=1e-10, atol=1e-12)


def test_encode_npz_mean_and_sample(tmp_path, tiny_vae):
    vae, vae_path = tiny_vae
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(5, 16, 16, 3), dtype=np.uint8)
    labels = np.array([3, 0, 2, 1, 3])
    np.savez(tmp_path / "imgs.npz", images=images, labels=labels)
    out = str(tmp_path / "lat")
    _encode_cli()(["--src", str(tmp_path / "imgs.npz"), "--out", out, "--vae", vae_path, "--dtype", "float32",
                   "--vae-scale", "0.5"])
    written = _read_shards(out)
    ref = _reference_latents(vae, images) / vae.config.scaling_factor * 0.5
    for i in range(5):
        lat, cls = written[f"{tmp_path / 'imgs.npz'}[{i}]"]
        assert cls == labels[i]
        np.testing.assert_allclose(lat, ref[i], rtol=1e-5, atol=1e-6)
    assert load_stats(out).num_classes == 4

    # Posterior samples: seeded (same seed -> same latents), different from the mean.
    outs = []
    for name in ("s1", "s2"):
        _encode_cli()(["--src", str(tmp_path / "imgs.npz"), "--out", str(tmp_path / name), "--vae", vae_path,
                       "--mode", "sample", "--dtype", "float32", "--seed", "7"])
        outs.append(_read_shards(str(tmp_path / name)))
    key = f"{tmp_path / 'imgs.npz'}[0]"
    np.testing.assert_array_equal(outs[0][key][0], outs[1][key][0])
    assert not np.allclose(outs[0][key][0], written[key][0] / 0.5 * 0.18215, atol=1e-4)


def test_npy_latents_pass_through(tmp_path):
    lat = np.random.default_rng(2).normal(size=(9, 4, 4, 4)).astype(np.float32)
    np.save(tmp_path / "lat.npy", lat)
    np.save(tmp_path / "y.npy", np.arange(9) % 3)
    out = str(tmp_path / "ds")
    _encode_cli()(["--src", str(tmp_path / "lat.npy"), "--labels", str(tmp_path / "y.npy"), "--out", out,
                   "--dtype", "float16", "--vae-scale", "0.18215", "--samples-per-shard", "4"])
    stats = load_stats(out)
    assert stats.count == 9 and stats.dtype == "float16" and stats.num_classes == 3 and len(stats.shards) == 3
    # Read the tars directly; each sample's json records its index in the source .npy.
    seen = []
    for name in os.listdir(out):
        if name.endswith(".tar"):
            with tarfile.open(os.path.join(out, name)) as tf:
                files = {m.name: tf.extractfile(m).read() for m in tf.getmembers()}
            for key in {n.split(".")[0] for n in files}:
                i = json.loads(files[f"{key}.json"])["index"]
                got = np.load(io.BytesIO(files[f"{key}.latent.npy"]), allow_pickle=False)
                np.testing.assert_array_equal(got, lat[i].astype(np.float16))
                assert int(files[f"{key}.cls"]) == i % 3
                seen.append(i)
    assert sorted(seen) == list(range(9))


def test_encode_errors(tmp_path, capsys):
    """Checked before any work, one line naming the flag, exit status 2."""
    main = _encode_cli()
    (tmp_path / "empty").mkdir()
    np.save(tmp_path / "lat.npy", np.zeros((4, 4, 2, 2), np.float32))
    out = tmp_path / "o"
    cases = [(["--src", str(tmp_path / "nothing_here"), "--out", str(out)], "--src", "nothing_here"),
             (["--src", str(tmp_path / "empty"), "--out", str(out)], "--vae", "pass --vae PATH"),
             (["--src", str(tmp_path / "lat.npy"), "--out", str(out), "--batch-size", "-1"], "--batch-size -1", ">= 1"),
             (["--src", str(tmp_path / "empty"), "--out", str(out), "--vae", str(tmp_path / "novae")], "--vae",
              "not a folder")]
    for argv, flag, text in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"lct-encode: error: {flag}") and text in err[0], err
    assert main(["--src", str(tmp_path / "lat.npy"), "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["--src", str(tmp_path / "lat.npy"), "--out", str(out)]) == 2          # before any work
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"lct-encode: error: --out {out}: already holds a dataset; pass --overwrite")
