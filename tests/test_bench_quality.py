"""The real-data quality benchmark end to end (``--quick``: a small patch set, a short budget): it runs the
user's path (encode -> train -> export -> sample -> decode), writes its table and figures, and its metrics
rank the baselines the way they must (a metric that cannot tell real patches from a Gaussian fit, or a fit
from an untrained network, would be useless)."""
import csv
import glob
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quick_benchmark_ranks_baselines(tmp_path):
    env = dict(os.environ, LCT_FAST_CACHE=str(tmp_path / "cache"), PYTHONPATH=ROOT)
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_quality.py"), "--quick", "--rows",
                          "heldout", "real", "gaussian", "untrained_sct", "sct", "--out", str(out)],
                         env=env, capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    (csv_path,) = glob.glob(str(out / "quality-*.csv"))
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    fd = {r["row"]: float(r["fd"]) for r in rows if r["kind"] == "baseline"}
    assert fd["real"] < fd["gaussian"] < fd["untrained_sct"], fd
    assert fd["heldout"] < fd["gaussian"], fd                # the resolution row: real vs real on the split
    swd = {r["row"]: float(r["swd"]) for r in rows if r["kind"] == "baseline"}
    # Random 1-D projections of 3072 pixels are near-Gaussian (CLT): pixel SWD separates a Gaussian fit from
    # real patches only weakly (2048 samples: 0.037 vs 0.056), and not at all at --quick's 256 (0.084 vs
    # 0.083, measured); it must still separate an untrained network. The feature-space FD ranks all three.
    assert max(swd["real"], swd["gaussian"]) < 0.5 * swd["untrained_sct"], swd
    trained = [r for r in rows if r["row"] == "sct"]
    assert {r["steps"] for r in trained} == {"1", "2"} and len({r["ema"] for r in trained}) >= 2
    for stem in ("-samples.png", "-curves.png"):
        assert os.path.getsize(csv_path.replace(".csv", stem)) > 1000
    md = open(csv_path.replace(".csv", ".md")).read()
    assert "excess kurtosis" in md and "| sct |" in md and "Split scored: **val**" in md and "Resolution:" in md
    # The validation run chose one EMA per (row, steps): the lowest validation FD.
    sel = json.load(open(out / "quality-selection.json"))
    for steps in ("1", "2"):
        best = min((r for r in trained if r["steps"] == steps), key=lambda r: float(r["fd"]))
        assert sel["choices"][f"sct|{steps}|"] == best["ema"]
    # The test split scores only those choices, re-using the trained row (cached by config + code hash).
    test_out = tmp_path / "test"
    again = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_quality.py"), "--quick", "--rows",
                            "sct", "--split", "test", "--selection", str(out / "quality-selection.json"), "--out",
                            str(test_out)], env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "trained run cached" in again.stdout, again.stdout[-2000:]
    (test_csv,) = glob.glob(str(test_out / "quality-*.csv"))
    with open(test_csv) as f:
        scored = [r for r in csv.DictReader(f) if r["row"] == "sct"]
    assert sorted((r["steps"], r["ema"]) for r in scored) == sorted(
        (steps, sel["choices"][f"sct|{steps}|"]) for steps in ("1", "2"))


def test_quick_distillation_rows(tmp_path):
    """The teacher -> student rows: the sCD row trains (or reuses) its trigflow teacher row first and distils
    its export; the table gives each evaluation's sampler setting, network evaluations and the teacher's cost."""
    env = dict(os.environ, LCT_FAST_CACHE=str(tmp_path / "cache"), PYTHONPATH=ROOT)
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_quality.py"), "--quick", "--rows",
                          "trigflow", "scd", "--seeds", "0", "--emas", "ema_0.99", "--out", str(out)],
                         env=env, capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    (csv_path,) = glob.glob(str(out / "quality-*.csv"))
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    teacher = {(r["steps"], r["sample"]): r for r in rows if r["row"] == "trigflow"}
    # Heun: 2 evaluations per step but the first and the last; guidance doubles them
    assert {k: int(r["nfe"]) for k, r in teacher.items()} == {
        ("8", ""): 14, ("32", ""): 62, ("8", "method.trigflow.guidance=1.5"): 28,
        ("32", "method.trigflow.guidance=1.5"): 124}
    student = [r for r in rows if r["row"] == "scd"]
    assert {(r["steps"], r["sample"]) for r in student} == {
        (s, g) for s in ("1", "2") for g in ("", "method.scd.guidance=1.5", "method.scd.guidance=2.0")}
    assert all(int(r["nfe"]) == int(r["steps"]) and float(r["teacher_s"]) > 0 for r in student)
    teacher_s = float(next(iter(teacher.values()))["train_s"])
    assert all(float(r["teacher_s"]) == teacher_s for r in student)  # the trigflow row is the teacher
    # the guidance input is live: the scales give different samples, hence different scores
    assert len({r["fd"] for r in student if r["steps"] == "1"}) == 3


def test_code_digest_ignores_layout_comments_and_docstrings(tmp_path, monkeypatch):
    """A cached row is re-trained when the code it runs changes, and only then: rewrapping, comments and
    docstrings leave the key alone; an edited constant does not."""
    sys.path.insert(0, ROOT)
    from benchmarks import bench_quality as bq

    src = tmp_path / "pkg"
    src.mkdir()
    f = src / "mod.py"
    monkeypatch.setattr(bq, "ROOT", str(tmp_path))

    def digest(text):
        f.write_text(text)
        return bq._file_digest(["pkg"])

    base = digest('"""Doc."""\n__all__ = ["a", "b"]\n\n\ndef g(x):\n    """Old doc."""\n    return x * 2\n')
    assert base == digest('"""Other doc."""\n__all__ = [\n    "a",\n    "b",\n]  # why\n\n\ndef g(x):\n'
                          '    """New doc."""\n    # a comment\n    return x * 2\n')
    assert base != digest('"""Doc."""\n__all__ = ["a", "b"]\n\n\ndef g(x):\n    """Old doc."""\n    return x * 3\n')
    assert base != digest('"""Doc."""\n__all__ = ["a", "b"]\n\n\ndef g(x):\n    return "Old doc."\n')


def test_digits_are_scored_untuned_with_the_photographs_choices(tmp_path):
    """The second data set has no validation split: it is scored on test with the committed selection, through
    its own VAE and feature network, and its metric still ranks the baselines."""
    env = dict(os.environ, LCT_FAST_CACHE=str(tmp_path / "cache"), PYTHONPATH=ROOT)
    script = os.path.join(ROOT, "benchmarks", "bench_quality.py")
    bad = subprocess.run([sys.executable, script, "--data", "digits", "--split", "val", "--quick"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "has the splits ['test']" in bad.stderr, bad.stderr[-2000:]
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, script, "--data", "digits", "--quick", "--rows", "heldout", "vae",
                          "gaussian", "gaussian_class", "--out", str(out)], env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    (csv_path,) = glob.glob(str(out / "quality-*.csv"))
    with open(csv_path) as f:
        fd = {r["row"]: float(r["fd"]) for r in csv.DictReader(f)}
    # Full size: held-out 3.1, decoded training latents 3.3, per-class Gaussian 8.4, one Gaussian 41.7 (committed
    # quality-digits table). At --quick's 256 samples (measured: 10.3, 18.5, 18.1, 54.7) the decoded latents and
    # the per-class fit are not told apart; real data, the per-class fit and the single fit are.
    assert fd["heldout"] < fd["gaussian_class"] < fd["gaussian"] and fd["vae"] < 0.5 * fd["gaussian"], fd
    md = open(csv_path.replace(".csv", ".md")).read()
    assert "Split scored: **test**" in md and "quality-val-selection.json" in md and "**digits**" in md
