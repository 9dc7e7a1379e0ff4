"""Before start-up, in one line: every user error the training command line can find before DeepSpeed starts is
one ``config error:`` line naming the path or key and what to do, exit status 2, also under ``--dry-run``; a
small data set shrinks the evaluation and says so with the numbers."""
import glob
import os

import numpy as np
import pytest

from lct_fast.cli.train import main
from lct_fast.data import ShardWriter

SHAPE = (4, 8, 8)


def _dataset(path, n=40, classes=4, shape=SHAPE):
    rng = np.random.default_rng(0)
    with ShardWriter(str(path), samples_per_shard=16, dtype="float32", num_classes=classes) as w:
        for i in range(n):
            w.write(rng.standard_normal(shape).astype(np.float32), i % classes)
    return str(path)


def _run(capsys, *args):
    code = main(["--config", "configs/tiny.json", "--dry-run", *args])
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


@pytest.fixture(autouse=True)
def _root(monkeypatch):
    monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_data_path_errors_name_the_missing_part(capsys, tmp_path):
    code, err = _run(capsys, "--set", f"data.path={tmp_path}/nope/data")
    assert code == 2 and len(err) == 1 and err[0].startswith("config error: data.path:")
    assert f"{tmp_path}/nope/data does not exist" in err[0] and f"nearest existing folder is {tmp_path}" in err[0]

    (tmp_path / "file").write_text("x")
    code, err = _run(capsys, "--set", f"data.path={tmp_path}/file")
    assert code == 2 and len(err) == 1 and "is a file" in err[0]

    (tmp_path / "empty").mkdir()
    code, err = _run(capsys, "--set", f"data.path={tmp_path}/empty")
    assert code == 2 and len(err) == 1 and "missing stats.json" in err[0]

    d = _dataset(tmp_path / "noshards")
    for f in glob.glob(os.path.join(d, "shard-*.tar")):
        os.remove(f)
    code, err = _run(capsys, "--set", f"data.path={d}")
    assert code == 2 and len(err) == 1 and "no shard-*.tar" in err[0]


def test_model_against_data_and_the_fix(capsys, tmp_path):
    d = _dataset(tmp_path / "d", shape=(3, 8, 8))
    code, err = _run(capsys, "--set", f"data.path={d}")
    assert code == 2 and len(err) == 1 and "set model.in_channels=3 model.resolution=8" in err[0]
    d = _dataset(tmp_path / "c", classes=9)
    code, err = _run(capsys, "--set", f"data.path={d}")
    assert code == 2 and len(err) == 1 and "set model.num_classes=9" in err[0]


def test_resume_and_teacher_are_checked_before_start_up(capsys, tmp_path):
    code, err = _run(capsys, "--out", str(tmp_path / "run"), "--resume", "ck-00000064")
    assert code == 2 and len(err) == 1 and "--resume ck-00000064" in err[0] and "--resume auto" in err[0]
    code = main(["--config", "configs/tiny_scd.json", "--dry-run"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "method.scd.teacher" in err[0]
    code = main(["--config", "configs/tiny_scd.json", "--dry-run", "--set", f"method.scd.teacher={tmp_path}/t.st"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "teacher weights not found" in err[0]


def test_a_small_data_set_shrinks_the_evaluation_and_says_so(capsys, tmp_path):
    from lct_fast.config import load_config
    from lct_fast.preflight import data_facts, eval_size

    d = _dataset(tmp_path / "d", n=40)
    code, err = _run(capsys, "--set", f"data.path={d}")
    assert code == 0 and err == ["lct_fast: evaluation: train.eval.n=2000 needs 4000 latents (two disjoint sets), "
                                 "the data has 40: evaluating 20 samples (set train.eval.n to choose)"]
    cfg = load_config("tiny", [f"data.path={d}"])
    assert eval_size(cfg, data_facts(cfg.data)) == 20
    cfg = load_config("tiny", [f"data.path={d}", "train.eval.n=8"])
    assert eval_size(cfg, data_facts(cfg.data)) == 8
    assert eval_size(load_config("tiny", [f"data.path={d}", "train.eval_interval=0"]), data_facts(cfg.data)) is None


def test_progress_lines_outside_a_terminal(tmp_path):
    """No terminal: a line every progress_s seconds with samples, rate, loss, the last evaluation and the ETA."""
    import io

    from lct_fast.run_dir import RunDir
    from lct_fast.train_hooks import MetricsLog

    t = [0.0]
    out = io.StringIO()
    log = MetricsLog(RunDir(str(tmp_path)), True, 1000, 0, progress_s=10, interactive=False, clock=lambda: t[0],
                     stream=out)
    for _ in range(4):          # 400 samples in 8 s: no line yet
        t[0] += 2
        log.advance(100)
    assert out.getvalue() == ""
    log.log(400, {"loss": 0.25, "eval/1step/mw1": 0.0512, "eval/1step/gaussian_mw1": 0.09})
    t[0] += 2
    log.advance(100)            # 10 s: 500 samples at 50/s, 500 to go
    log.close()
    assert out.getvalue().strip() == ("lct_fast: 500/1,000 samples (50%) | 50 samples/s | loss 0.25 | "
                                      "1step/mw1 0.0512 | ETA 0m10s")


def test_other_command_lines_print_user_errors_in_one_line(capsys, tmp_path):
    from lct_fast.cli import evaluate, export, report, sample

    cases = [(export.main, ["--run", str(tmp_path / "norun")], "lct-export: error:", "no complete checkpoint"),
             (sample.main, ["--checkpoint", str(tmp_path / "none.safetensors"), "--out", str(tmp_path / "o")],
              "lct-sample: error:", "no config found beside the checkpoint"),
             (report.main, ["--run", str(tmp_path / "norun")], "lct-report: error:", "metrics.jsonl"),
             (evaluate.main, ["--checkpoint", str(tmp_path / "none.safetensors"), "--out", str(tmp_path / "e")],
              "lct_fast.evaluate: error:", "pass --config")]
    for main_fn, argv, head, text in cases:
        code = main_fn(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and err[0].startswith(head) and text in err[0], (argv, err)


def test_every_config_key_is_listed_with_a_meaning(capsys):
    """``--list-keys`` prints every key of the dataclasses (the methods' sections included) with its type, default
    (or a preset's value) and the docstring under its field; a key without one fails here."""
    import dataclasses

    from lct_fast.config import Config, describe_keys

    keys = describe_keys()
    assert all(meaning for _, _, _, meaning in keys), [k for k, _, _, m in keys if not m]

    def count(cls):  # leaf fields of the dataclass tree
        values = [getattr(cls(), f.name) for f in dataclasses.fields(cls)]
        return sum(count(type(v)) if dataclasses.is_dataclass(v) else 1 for v in values)

    assert len(keys) == count(Config) and {"method.sct.jvp_dtype", "method.scd.teacher", "train.progress_s"} <= {
        k for k, *_ in keys}
    assert main(["--list-keys", "--config", "configs/tiny_sct.json"]) == 0
    out = capsys.readouterr().out
    assert 'method.name  (str) = "sct"' in out and "Precision of the forward-mode JVP pass" in out


def test_the_evaluator_reads_a_validated_seeded_subset(tmp_path, monkeypatch):
    """Bad samples (wrong shape, NaN, no class id, a class id out of range) are skipped and counted as the
    training reader does, not fatal; only the 2n samples of the evaluation are decoded; the draw equals the one
    made from the whole data set."""
    import io
    import tarfile

    import torch

    from lct_fast.data import reader
    from lct_fast.evaluate import LatentEvaluator
    from lct_fast.quality.latent import LatentReference

    d = _dataset(tmp_path / "d", n=64)
    bad = {"bad0.latent.npy": np.zeros((3, 8, 8), np.float32), "bad1.latent.npy": np.full(SHAPE, np.nan, np.float32),
           "bad2.latent.npy": np.zeros(SHAPE, np.float32), "bad3.latent.npy": np.zeros(SHAPE, np.float32)}
    with tarfile.open(os.path.join(d, "shard-999999.tar"), "w") as tf:
        for name, arr in bad.items():
            buf = io.BytesIO()
            np.save(buf, arr)
            info = tarfile.TarInfo(name)
            info.size = buf.tell()
            buf.seek(0)
            tf.addfile(info, buf)
        for name, text in (("bad0.cls", b"1"), ("bad1.cls", b"1"), ("bad3.cls", b"99")):   # bad2: no cls
            info = tarfile.TarInfo(name)
            info.size = len(text)
            tf.addfile(info, io.BytesIO(text))
    lat, lab, errors = reader.read_all_latents(d)
    assert len(lat) == 64 and errors.total == 4
    assert set(errors.reasons) == {"bad_shape", "non_finite", "missing_cls", "bad_cls"}

    calls = [0]
    real = reader.NpyDecoder.__call__

    def counted(self, data):
        calls[0] += 1
        return real(self, data)

    monkeypatch.setattr(reader.NpyDecoder, "__call__", counted)
    ev = LatentEvaluator(d, n=8, seed=5)
    assert 16 <= calls[0] <= 16 + 4                    # the subset (and any bad sample drawn into it), not all 68
    monkeypatch.setattr(reader.NpyDecoder, "__call__", real)
    assert ev.reference.ref.shape == (8, *SHAPE) and ev.info["data_errors"]
    clean = _dataset(tmp_path / "clean", n=64)                    # the same draw as from all N (before: all read)
    lat, lab, _ = reader.read_all_latents(clean)
    ev = LatentEvaluator(clean, n=8, seed=5)
    full = LatentReference(ev.normalizer.normalize(torch.as_tensor(lat)).numpy(), 8, seed=5, labels=lab)
    np.testing.assert_array_equal(ev.reference.ref, full.ref)
    np.testing.assert_array_equal(ev.reference.real, full.real)
    np.testing.assert_array_equal(ev.reference.gaussian_class, full.gaussian_class)
