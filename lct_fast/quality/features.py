"""A small nonlinear feature space for image-patch metrics, fitted on real patches.

Fréchet / kernel distances are only informative in a *nonlinear* feature space: on the latents themselves, or
any linear function of them, a full-covariance Gaussian fit matches the first two moments exactly and wins by
construction. For ImageNet-scale images that space is Inception-v3's; for the 32x32 patches of the quality
benchmark it is this small CNN, trained to tell which photograph a patch comes from. Its penultimate layer
(global-average-pooled, ``feature_dim`` values after a GELU) is the feature; its logits give the
class-accuracy metric of class-conditional samples.

Weights load with safetensors only (no pickle).
"""
from __future__ import annotations

import os
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["PatchFeatureNet", "images_to_input", "train_feature_net", "save_feature_net", "load_feature_net",
           "extract_features"]


def images_to_input(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float32 [N, 3, H, W] in [-1, 1]."""
    x = torch.as_tensor(np.ascontiguousarray(images)) if isinstance(images, np.ndarray) else images
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected uint8 images [N, H, W, 3], got {x.dtype} {tuple(x.shape)}")
    return x.permute(0, 3, 1, 2).float() / 127.5 - 1.0


class PatchFeatureNet(nn.Module):
    """Three stride-2 stages of two 3x3 convolutions (width w, 2w, 4w), GELU, global average pool, linear head."""

    def __init__(self, num_classes: int = 8, width: int = 32) -> None:
        super().__init__()
        self.num_classes, self.width = num_classes, width
        chans = [3, width, width, 2 * width, 2 * width, 4 * width, 4 * width]
        self.convs = nn.ModuleList(
            nn.Conv2d(chans[i], chans[i + 1], 3, stride=2 if i % 2 else 1, padding=1) for i in range(6))
        self.head = nn.Linear(4 * width, num_classes)

    @property
    def feature_dim(self) -> int:
        return 4 * self.width

    def features(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:
            x = F.gelu(conv(x))
        return x.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@torch.no_grad()
def extract_features(net: PatchFeatureNet, images: np.ndarray, batch: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """(features [N, feature_dim] float64, class probabilities [N, classes] float64) of uint8 images."""
    net.eval()
    feats, probs = [], []
    for s in range(0, len(images), batch):
        f = net.features(images_to_input(images[s:s + batch]))
        feats.append(f.double().numpy())
        probs.append(torch.softmax(net.head(f), dim=1).double().numpy())
    return np.concatenate(feats), np.concatenate(probs)


def train_feature_net(train_images: np.ndarray, train_labels: np.ndarray, test_images: np.ndarray,
                      test_labels: np.ndarray, *, steps: int = 1500, batch: int = 128, lr: float = 2e-3,
                      width: int = 32, seed: int = 0, flip: bool = True) -> tuple[PatchFeatureNet, float]:
    """Train the classifier (AdamW, cosine lr); returns (net in eval mode, test accuracy). ``flip``: random
    horizontal flips (textures; not for digits, whose mirror image is another shape)."""
    torch.manual_seed(seed)
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    net = PatchFeatureNet(num_classes, width)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    gen = torch.Generator().manual_seed(seed)
    labels = torch.as_tensor(train_labels)
    for k in range(steps):
        idx = torch.randint(0, len(train_images), (batch,), generator=gen)
        x = images_to_input(train_images[idx.numpy()])
        # Random flips make the features less tied to one orientation of a texture.
        if flip:
            flipped = torch.rand(batch, generator=gen) < 0.5
            x = torch.where(flipped[:, None, None, None], x.flip(3), x)
        loss = F.cross_entropy(net(x), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if k % 250 == 0:
            print(f"feature net step {k}/{steps}: loss {loss.item():.4f}", flush=True)
    _, probs = extract_features(net, test_images)
    acc = float((probs.argmax(1) == test_labels).mean())
    return net.eval(), acc


def save_feature_net(net: PatchFeatureNet, path: str, meta: Optional[dict] = None) -> str:
    from safetensors.torch import save_file

    md = {"num_classes": str(net.num_classes), "width": str(net.width), **(meta or {})}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, tmp, metadata=md)
    os.replace(tmp, path)
    return path


def load_feature_net(path: str) -> PatchFeatureNet:
    """Load weights written by :func:`save_feature_net` (safetensors; architecture from its metadata)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: feature network weights not found (benchmarks/quality_assets.py "
                                "trains and writes them)")
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        md = f.metadata() or {}
        state = {k: f.get_tensor(k) for k in f.keys()}
    try:
        net = PatchFeatureNet(int(md["num_classes"]), int(md["width"]))
    except KeyError as e:
        raise ValueError(f"{path}: metadata lacks {e} (not written by save_feature_net)") from None
    net.load_state_dict(state)
    return net.eval()
