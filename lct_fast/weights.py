"""Trained weights from disk: the config beside an export, and a model (or an sCD teacher) built from a config
with its safetensors weights, checked key by key. Safetensors only: nothing here unpickles."""
from __future__ import annotations

import os
from typing import Any, Optional

import torch

from .legacy_keys import upgrade_keys
from .validate import UserError

__all__ = ["find_config", "load_weights", "load_model"]


def find_config(checkpoint: str, config: Optional[str] = None) -> str:
    """``config`` if given, else ``<checkpoint stem>.json`` or ``config.json`` beside the checkpoint."""
    if config:
        return config
    stem = os.path.splitext(checkpoint)[0]
    for cand in (stem + ".json", os.path.join(os.path.dirname(os.path.abspath(checkpoint)), "config.json")):
        if os.path.isfile(cand):
            return cand
    raise FileNotFoundError(f"{checkpoint}: no config found beside the checkpoint (looked for {stem}.json and "
                            f"config.json in its folder); pass --config")


def load_weights(net: torch.nn.Module, path: str, *, against: str = "the config",
                 error: type = UserError) -> torch.nn.Module:
    """Load the safetensors file ``path`` into ``net`` (strict). Accepts the preconditioned model's keys
    (``backbone.*``) or the bare backbone's; any other mismatch raises ``ValueError`` naming the file, ``against``
    (what the model was built from) and the first missing / unexpected keys."""
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights not found: {path}")
    state = upgrade_keys(load_file(path, device="cpu"))
    expected = set(net.state_dict())
    if set(state) != expected and {"backbone." + k for k in state} == expected:
        state = {"backbone." + k: v for k, v in state.items()}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise error(f"{path}: weights do not match the model of {against} "
                         f"(missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                         f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''})")
    net.load_state_dict(state, strict=True)
    return net


def load_model(checkpoint: str, cfg: Any, device: str = "cpu") -> torch.nn.Module:
    """``lct_fast.methods.build_model(cfg.model, cfg.method)`` with the weights of ``checkpoint``, in eval mode."""
    from .methods import build_model

    return load_weights(build_model(cfg.model, cfg.method), checkpoint).to(device).eval()
