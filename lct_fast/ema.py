"""Evaluation EMAs of the trained weights, kept in fp32 on each rank's own parameter shard.

Constant decays (``beta``) and EDM2's power-function EMA (``sigma_rel`` -> exponent gamma, Karras et al.
2024, eq. 3: beta_t = (1 - 1/t)^(gamma + 1)) are supported side by side. Under ZeRO-3 each rank only
holds its partition of every parameter (``param.ds_tensor``); the EMA is taken over exactly that
partition, so no gather happens per step. Export (:func:`consolidate`) stitches the partitions back
together offline from the per-rank files.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import torch

from .legacy_keys import upgrade_key, upgrade_keys

__all__ = ["EMA", "sigma_rel_to_gamma", "consolidate"]


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """Exponent gamma of the power-function EMA with relative std ``sigma_rel`` (EDM2, Algorithm 2)."""
    t = sigma_rel ** -2
    # Solve gamma^3 + 7 gamma^2 + (16 - t) gamma + (12 - t) = 0 for its largest real root.
    roots = np.roots([1.0, 7.0, 16.0 - t, 12.0 - t])
    return float(max(r.real for r in roots if abs(r.imag) < 1e-9))


def _local_view(p: torch.nn.Parameter) -> torch.Tensor:
    """The tensor this rank owns: the ZeRO-3 partition when partitioned, else the full parameter."""
    shard = getattr(p, "ds_tensor", None)
    return shard if shard is not None else p.data


class EMA:
    """fp32 EMAs over named parameters (local shards under ZeRO-3)."""

    def __init__(self, named_params: Iterable[tuple[str, torch.nn.Parameter]], *,
                 decays: Iterable[float] = (), power_stds: Iterable[float] = ()):
        self.params = [(n, p) for n, p in named_params if p.requires_grad]
        self.decays = [float(d) for d in decays]
        self.power_stds = [float(s) for s in power_stds]
        self.names = [f"ema_{d:g}" for d in self.decays] + [f"power_{s:g}" for s in self.power_stds]
        self.num_updates = 0
        self.shadows: dict[str, dict[str, torch.Tensor]] = {
            key: {n: _local_view(p).detach().float().clone() for n, p in self.params} for key in self.names}

    def _betas(self) -> list[float]:
        t = self.num_updates  # updates applied so far, this one included
        betas = list(self.decays)
        for s in self.power_stds:
            betas.append((1.0 - 1.0 / t) ** (sigma_rel_to_gamma(s) + 1.0) if t > 0 else 0.0)
        return betas

    @torch.no_grad()
    def update(self) -> None:
        """Blend the current weights in; call once after every applied optimizer step."""
        self.num_updates += 1
        current = [_local_view(p).detach().float() for _, p in self.params]
        for key, beta in zip(self.names, self._betas()):
            shadow = list(self.shadows[key].values())
            torch._foreach_lerp_(shadow, current, 1.0 - beta)

    def state_dict(self) -> dict:
        flat = {f"{key}/{n}": t.contiguous() for key, d in self.shadows.items() for n, t in d.items()}
        meta = {"num_updates": self.num_updates, "names": self.names}
        for n, p in self.params:
            if getattr(p, "ds_tensor", None) is not None:
                meta[f"shape/{n}"] = list(p.ds_shape)
                meta[f"numel/{n}"] = int(p.ds_numel)
        return {"tensors": flat, "meta": meta}

    def load_state_dict(self, state: dict) -> None:
        meta = state["meta"]
        if list(meta["names"]) != self.names:
            raise ValueError(f"EMA: checkpoint has EMAs {meta['names']}, config asks for {self.names}")
        self.num_updates = int(meta["num_updates"])
        tensors = upgrade_keys(state["tensors"])  # entries of older versions under today's names
        for key, d in self.shadows.items():
            for n in d:
                src = tensors.get(f"{key}/{n}")
                if src is None or src.shape != d[n].shape:
                    raise ValueError(f"EMA: checkpoint entry {key}/{n} missing or of another shape")
                d[n].copy_(src)

    def load_full(self, full: dict, num_updates: int) -> None:
        """Load whole EMA tensors ({name: {param: tensor}}, as :func:`consolidate` returns) on any world size:
        under ZeRO-3 each rank keeps the slice of the flattened, zero-padded tensor its partition covers
        (partition r of M holds elements [r·P, (r+1)·P) with P = ceil(numel / M))."""
        if sorted(full) != sorted(self.names):
            raise ValueError(f"EMA: checkpoint has EMAs {sorted(full)}, config asks for {self.names}")
        self.num_updates = int(num_updates)
        for key, d in self.shadows.items():
            src_all = upgrade_keys(full[key])
            for n, p in self.params:
                src = src_all.get(n)
                if src is None or src.numel() != (p.ds_numel if getattr(p, "ds_tensor", None) is not None
                                                  else p.numel()):
                    raise ValueError(f"EMA: checkpoint entry {key}/{n} missing or of another size")
                if getattr(p, "ds_tensor", None) is not None:
                    part = d[n].numel()
                    rank = torch.distributed.get_rank()
                    flat = torch.nn.functional.pad(src.reshape(-1).float(),
                                                   (0, max(0, part * (rank + 1) - src.numel())))
                    d[n].copy_(flat[part * rank:part * (rank + 1)].view_as(d[n]))
                else:
                    d[n].copy_(src.view_as(d[n]))

    def copy_to(self, module: torch.nn.Module, key: str) -> None:
        """Load EMA ``key`` into an unpartitioned ``module`` with the same parameter names. Under ZeRO-3 this
        is a collective: every rank's partition of each parameter is all-gathered and stitched (as
        :func:`consolidate` does offline), so every rank must call it."""
        params = dict(module.named_parameters())
        with torch.no_grad():
            for n, p in self.params:
                t = self.shadows[key][n]
                if getattr(p, "ds_tensor", None) is not None:
                    parts = [torch.empty_like(t) for _ in range(torch.distributed.get_world_size())]
                    torch.distributed.all_gather(parts, t.contiguous())
                    t = _unpartition(parts, p.ds_numel, p.ds_shape)
                params[n].copy_(t.view_as(params[n]))


def _unpartition(parts: list[torch.Tensor], numel: int, shape) -> torch.Tensor:
    """A parameter from its ZeRO-3 partitions in rank order (the last one is padded to the common size)."""
    return torch.cat([q.reshape(-1) for q in parts])[:numel].view(shape)


def consolidate(shard_states: list[dict]) -> dict[str, dict[str, torch.Tensor]]:
    """Full EMA tensors from the per-rank states of :meth:`EMA.state_dict` (rank order).

    Unpartitioned parameters are taken from rank 0; ZeRO-3 partitions are concatenated in rank order,
    cut to the parameter's numel (the last partition is padded) and reshaped.
    """
    meta0 = shard_states[0]["meta"]
    out: dict[str, dict[str, torch.Tensor]] = {key: {} for key in meta0["names"]}
    for full_key, t0 in shard_states[0]["tensors"].items():
        key, name = full_key.split("/", 1)
        if f"shape/{name}" in meta0:
            t = _unpartition([s["tensors"][full_key] for s in shard_states], meta0[f"numel/{name}"],
                             meta0[f"shape/{name}"])
        else:
            t = t0
        out[key][upgrade_key(name)] = t.clone()
    return out


