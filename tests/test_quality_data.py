"""The real-patch data set (scikit-image's photographs) and the patch feature network."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lct_fast.quality.features import PatchFeatureNet, extract_features, load_feature_net, save_feature_net
from benchmarks.patches import PHOTOS, PatchSpec, load_photo, make_patches, photo_cells


def test_train_val_and_test_regions_are_disjoint_and_cover_every_photo():
    spec, two_way = PatchSpec(), PatchSpec(val_fraction=0.0)
    for cls, name in enumerate(PHOTOS):
        img = load_photo(name, spec.max_side)
        assert max(img.shape[:2]) <= spec.max_side and img.dtype == np.uint8 and img.shape[2] == 3
        cells = photo_cells(img.shape[:2], spec, np.random.default_rng([spec.seed, cls]))
        train, val, test = (set(cells[k]) for k in ("train", "val", "test"))
        assert train and val and test and not (train & val or train & test or val & test)
        total = len(train) + len(val) + len(test)
        assert abs(len(test) / total - spec.test_fraction) < 0.1 and abs(len(val) / total - spec.val_fraction) < 0.1
        # The test cells are those of the two-way split the committed feature net was trained beside.
        old = photo_cells(img.shape[:2], two_way, np.random.default_rng([spec.seed, cls]))
        assert set(old["test"]) == test and set(old["train"]) == train | val and not old["val"]


def test_patches_come_from_their_split_cells():
    spec = PatchSpec(train_per_class=64, test_per_class=32, val_per_class=16)
    d = make_patches(spec)
    assert np.bincount(d["val_labels"]).tolist() == [16] * len(PHOTOS)
    assert d["train_images"].shape == (64 * len(PHOTOS), 32, 32, 3)
    assert np.bincount(d["test_labels"]).tolist() == [32] * len(PHOTOS)
    P = spec.patch
    for cls, name in enumerate(PHOTOS):
        img = load_photo(name, spec.max_side)
        cells = photo_cells(img.shape[:2], spec, np.random.default_rng([spec.seed, cls]))
        boxes = {}
        for split in ("train", "val", "test"):
            sel = d[f"{split}_labels"] == cls
            corners, images = d[f"{split}_corners"][sel], d[f"{split}_images"][sel]
            # The stored corner is where the patch really is in the photograph ...
            for (y, x), patch in zip(corners, images):
                np.testing.assert_array_equal(img[y:y + P, x:x + P], patch)
            # ... and the whole crop lies inside one cell of its own split.
            tl = np.asarray(cells[split])
            inside = ((corners[:, None, 0] >= tl[None, :, 0]) & (corners[:, None, 0] + P <= tl[None, :, 0] + spec.block)
                      & (corners[:, None, 1] >= tl[None, :, 1]) & (corners[:, None, 1] + P <= tl[None, :, 1] + spec.block))
            assert inside.any(1).all(), (name, split)
            boxes[split] = corners
        # No pixel is shared between splits: every cross-split pair of P x P boxes is disjoint.
        for s1, s2 in (("train", "test"), ("train", "val"), ("val", "test")):
            a, b = boxes[s1][:, None, :], boxes[s2][None, :, :]
            overlap = (np.abs(a - b) < P).all(-1)
            assert not overlap.any(), (name, s1, s2)
    # Same spec, same patches.
    np.testing.assert_array_equal(make_patches(spec)["train_images"], d["train_images"])


def test_feature_net_roundtrip(tmp_path):
    net = PatchFeatureNet(num_classes=3, width=8)
    imgs = np.random.default_rng(0).integers(0, 256, size=(5, 32, 32, 3), dtype=np.uint8)
    f, p = extract_features(net, imgs)
    assert f.shape == (5, net.feature_dim) and p.shape == (5, 3)
    np.testing.assert_allclose(p.sum(1), 1.0, rtol=1e-6)
    path = save_feature_net(net, str(tmp_path / "f.safetensors"), meta={"note": "x"})
    again = load_feature_net(path)
    f2, _ = extract_features(again, imgs)
    np.testing.assert_array_equal(f, f2)
    with pytest.raises(FileNotFoundError, match="quality_assets"):
        load_feature_net(str(tmp_path / "missing.safetensors"))
    with pytest.raises(ValueError, match="uint8"):
        extract_features(net, imgs.astype(np.float32))
