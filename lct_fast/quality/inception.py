"""Inception-v3 features and the papers' image metrics (FID, KID, IS, precision/recall) through torch-fidelity.

torch-fidelity's extractor either downloads its weights or loads a local file with ``weights_only=False``
(arbitrary unpickling). Neither may happen here: :func:`load_inception` reads a local file with
``torch.load(weights_only=True)``, checks its keys against the architecture, and hands the state dict to
torch-fidelity's constructor in place of its downloader. The metrics themselves are torch-fidelity's own
functions applied to feature tensors, so cached reference features (:mod:`lct_fast.quality.reference`) and
features gathered from several ranks are scored exactly as ``torch_fidelity.calculate_metrics`` would.

Feature layers: '64', '192', '768', '2048' (FID/KID/PR, 2048 is the standard one) and 'logits_unbiased'
(Inception Score). The FID covariance of a d-dimensional layer needs at least d samples per set.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
from typing import Iterable, Optional, Sequence

import numpy as np
import torch

__all__ = ["INCEPTION_FILE", "INCEPTION_URL", "FEATURE_LAYERS", "METRICS", "load_inception", "file_sha256",
           "inception_features", "image_metrics", "check_fid_sample_count", "required_layers", "STANDARD_SHA256",
           "check_standard_weights"]

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
#: The first hex digits of the standard file's SHA-256, as the torch.hub convention puts them in its name.
STANDARD_SHA256 = "6726825d"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"
FEATURE_LAYERS = ("64", "192", "768", "2048")
METRICS = ("fid", "kid", "isc", "prc")
ISC_LAYER = "logits_unbiased"


def _where_from() -> str:
    return (f"the standard file is {INCEPTION_FILE} (torch-fidelity's TF-ported Inception-v3, {INCEPTION_URL}); "
            f"fetch it on a machine with network access and pass its local path")


def file_sha256(path: str, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def check_standard_weights(path: str, sha256: str, allow_nonstandard: bool = False) -> bool:
    """Whether ``path`` (SHA-256 ``sha256``) is the standard Inception file every published FID uses; a different
    file is an error unless ``allow_nonstandard`` (its metrics are then comparable with nothing else)."""
    from ..validate import UserError

    standard = sha256.startswith(STANDARD_SHA256)
    if not standard and not allow_nonstandard:
        raise UserError(f"{path}: SHA-256 {sha256[:8]}... is not the standard Inception weights' ({STANDARD_SHA256}..., "
                        f"{INCEPTION_FILE}): FID and the other metrics would not be comparable with any paper's. "
                        f"Use the standard file, or pass --allow-nonstandard-weights "
                        f"(train.eval.allow_nonstandard_weights=true) to compute them anyway")
    return standard


def required_layers(metrics: Iterable[str], feature_layer: str = "2048") -> list[str]:
    """The extractor outputs the metrics need: ``feature_layer`` for fid/kid/prc, logits for isc."""
    metrics = list(metrics)
    bad = sorted(set(metrics) - set(METRICS))
    if bad:
        raise ValueError(f"unknown image metric(s) {bad}; known: {list(METRICS)}")
    if feature_layer not in FEATURE_LAYERS:
        raise ValueError(f"feature layer {feature_layer!r}: expected one of {list(FEATURE_LAYERS)}")
    out = [feature_layer] if set(metrics) & {"fid", "kid", "prc"} else []
    if "isc" in metrics:
        out.append(ISC_LAYER)
    return out


@contextlib.contextmanager
def _state_dict_instead_of_download(module, state: dict):
    """Make torch-fidelity's ``load_state_dict_from_url`` return ``state`` (and never touch the network)."""
    saved = module.load_state_dict_from_url

    def provide(*args, **kwargs):
        return state

    module.load_state_dict_from_url = provide
    try:
        yield
    finally:
        module.load_state_dict_from_url = saved


def load_inception(weights: str, layers: Sequence[str], device: str | torch.device = "cpu"):
    """torch-fidelity's ``FeatureExtractorInceptionV3`` producing ``layers``, with the weights of the local
    file ``weights`` (a state dict saved by ``torch.save``, loaded with ``weights_only=True``)."""
    if not weights or not os.path.isfile(weights):
        raise FileNotFoundError(f"Inception weights not found: {weights!r}; {_where_from()}")
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{weights}: not a loadable tensor state dict ({type(e).__name__}: {e}); {_where_from()}"
                         ) from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{weights}: expected a dict of tensors (Inception-v3 state dict); {_where_from()}")
    try:
        from torch_fidelity import feature_extractor_inceptionv3 as fe
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("image metrics need torch-fidelity: pip install -c constraints.txt -e '.[eval]'") from e
    layers = list(dict.fromkeys(layers))
    try:
        with _state_dict_instead_of_download(fe, state):
            net = fe.FeatureExtractorInceptionV3("inception-v3-compat", layers)
    except RuntimeError as e:  # load_state_dict(strict=True): missing / unexpected keys or wrong shapes
        raise ValueError(f"{weights}: does not match torch-fidelity's Inception-v3 ({str(e).splitlines()[0]}); "
                         f"{_where_from()}") from e
    return net.to(device)


def inception_features(net, images: np.ndarray | torch.Tensor, *, batch_size: int = 64) -> dict[str, torch.Tensor]:
    """Features of uint8 images [N, H, W, 3] (or [N, 3, H, W] tensors): {layer: float32 [N, d]} on the CPU.
    The extractor resizes every image to 299² itself (TF1-compatible bilinear), as the reference FID does."""
    x = torch.as_tensor(np.ascontiguousarray(images)) if isinstance(images, np.ndarray) else images
    if x.dtype != torch.uint8 or x.ndim != 4:
        raise ValueError(f"inception_features: expected uint8 images [N, H, W, 3], got {x.dtype} {tuple(x.shape)}")
    if x.shape[-1] == 3 and x.shape[1] != 3:
        x = x.permute(0, 3, 1, 2)
    dev = next(net.parameters()).device
    out: dict[str, list[torch.Tensor]] = {k: [] for k in net.features_list}
    with torch.no_grad():
        for s in range(0, len(x), batch_size):
            feats = net(x[s:s + batch_size].contiguous().to(dev))
            for k, f in zip(net.features_list, feats):
                out[k].append(f.float().cpu())
    return {k: torch.cat(v) if v else torch.empty(0) for k, v in out.items()}


def check_fid_sample_count(n: int, feature_layer: str, what: str) -> None:
    """FID's covariance of a d-dimensional feature needs n >= d samples (else it is singular and FID biased)."""
    d = int(feature_layer)
    if n < d:
        raise ValueError(f"{what}: FID on the {d}-d Inception layer needs at least {d} samples, got {n}; "
                         f"use more samples or a smaller layer (--feature-layer 64/192/768)")


def image_metrics(gen: dict[str, torch.Tensor], ref: Optional[dict[str, torch.Tensor]], metrics: Sequence[str], *,
                  feature_layer: str = "2048", kid_subsets: int = 100, kid_subset_size: int = 1000,
                  isc_splits: int = 10, prc_neighborhood: int = 3, seed: int = 2020) -> dict[str, float]:
    """torch-fidelity's FID / KID / IS / precision-recall of generated features ``gen`` against reference
    features ``ref`` (each {layer: [N, d]}). KID's subset size is capped at the smaller set."""
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
    from torch_fidelity.metric_isc import isc_features_to_metric
    from torch_fidelity.metric_kid import kid_features_to_metric
    from torch_fidelity.metric_prc import prc_features_to_metric

    required_layers(metrics, feature_layer)
    out: dict[str, float] = {}
    if set(metrics) & {"fid", "kid", "prc"}:
        if ref is None or feature_layer not in ref or feature_layer not in gen:
            raise ValueError(f"image_metrics: fid/kid/prc need layer {feature_layer!r} features of both sets")
        g, r = gen[feature_layer].double(), ref[feature_layer].double()
    if "fid" in metrics:
        check_fid_sample_count(len(g), feature_layer, "generated set")
        check_fid_sample_count(len(r), feature_layer, "reference set")
        s1, s2 = fid_features_to_statistics(g), fid_features_to_statistics(r)
        out["fid"] = fid_statistics_to_metric(s1, s2, verbose=False)["frechet_inception_distance"]
    if "kid" in metrics:
        m = kid_features_to_metric(g, r, kid_subsets=kid_subsets, kid_subset_size=min(kid_subset_size, len(g), len(r)),
                                   rng_seed=seed, verbose=False)
        out["kid_mean"], out["kid_std"] = m["kernel_inception_distance_mean"], m["kernel_inception_distance_std"]
    if "isc" in metrics:
        m = isc_features_to_metric(gen[ISC_LAYER], splits=min(isc_splits, len(gen[ISC_LAYER])), shuffle=True,
                                   rng_seed=seed)
        out["isc_mean"], out["isc_std"] = m["inception_score_mean"], m["inception_score_std"]
    if "prc" in metrics:
        m = prc_features_to_metric(g.float(), r.float(), prc_neighborhood=prc_neighborhood, prc_batch_size=10000,
                                   save_cpu_ram=False, verbose=False)
        out["precision"], out["recall"], out["f_score"] = m["precision"], m["recall"], m["f_score"]
    return out
