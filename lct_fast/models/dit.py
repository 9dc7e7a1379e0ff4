"""DiT backbone for latents: patchify → adaLN-zero transformer blocks with NsLN → unpatchify.

Interface (contract): ``DiT(...)(x_in, c_noise, labels=None, *, dropout_seed=None, **conditions) -> F`` with
x_in [B, C, H, W], c_noise [B] (fp32 positional time embedding), labels [B] or None (null class), and the
method's extra scalar conditions by name, [B] or None (e.g. ``guidance``, the CFG scale of a
guidance-conditioned student; None = the condition's neutral value, see ``layers.ScalarEmbed``);
``logvar(c_noise) -> [B]`` is the adaptive weight head w_φ when ``adaptive_weight`` is set.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from lct_fast import ops

from .layers import (
    Conv2d,
    add_condition_embeds,
    embed_conditions,
    Linear,
    LogVarHead,
    NsLN,
    SeededDropout,
    assign_dropout_sites,
    broadcast_batch,
    double_norm_modulation,
    label_or_null,
    maybe_checkpoint,
    sinusoidal_embedding,
)

# (width, depth, heads). S…XL follow DiT; XXL is sized to land in 1.45–1.60 B parameters
# (sCM's XXL is 1.52 B), head dim 64.
DIT_PRESETS: Dict[str, Tuple[int, int, int]] = {
    "S": (384, 12, 6),
    "B": (768, 12, 12),
    "L": (1024, 24, 16),
    "XL": (1152, 28, 16),
    "XXL": (1536, 36, 24),
}
FREQ_DIM = 256
DIT_NORMS = ("nsln", "layernorm")


def dit_norm(kind: str, width: int, eps: float, backend: str) -> NsLN:
    """The norm in front of each adaLN modulation (Table 2d's two arms for a transformer): ``nsln`` learns a
    bias with the scale fixed to 1 (eq. 12), ``layernorm`` learns scale and bias."""
    if kind not in DIT_NORMS:
        raise ValueError(f"model.norm={kind!r}: the DiT takes one of {list(DIT_NORMS)}")
    return NsLN(width, eps, bias=True, weight=kind == "layernorm", backend=backend)


@dataclass(frozen=True)
class DiTDims:
    width: int
    depth: int
    heads: int


def resolve_dit_dims(size: str, width: int = 0, depth: int = 0, heads: int = 0) -> DiTDims:
    """Preset dims for ``size`` with any non-zero explicit ``width/depth/heads`` taking precedence."""
    if size == "custom":
        if not (width and depth and heads):
            raise ValueError("model.size='custom' needs non-zero model.width, model.depth and model.heads")
        base = (width, depth, heads)
    elif size in DIT_PRESETS:
        base = DIT_PRESETS[size]
    else:
        raise ValueError(f"model.size={size!r} is not one of {list(DIT_PRESETS) + ['custom']}")
    w, d, h = (width or base[0]), (depth or base[1]), (heads or base[2])
    if w % h:
        raise ValueError(f"model.width={w} must be divisible by model.heads={h}")
    return DiTDims(w, d, h)


def _sincos_2d(h: int, w: int, dim: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Fixed 2D sin-cos position embedding [h·w, dim] (half the channels per axis)."""
    if dim % 4:
        raise ValueError(f"DiT width must be divisible by 4 for the 2D position embedding, got {dim}")
    quarter = dim // 4
    omega = 1.0 / (10000.0 ** (torch.arange(quarter, device=device, dtype=dtype) / quarter))
    ys, xs = torch.meshgrid(torch.arange(h, device=device, dtype=dtype),
                            torch.arange(w, device=device, dtype=dtype), indexing="ij")
    ay = ys.reshape(-1, 1) * omega[None]
    ax = xs.reshape(-1, 1) * omega[None]
    return torch.cat([torch.sin(ay), torch.cos(ay), torch.sin(ax), torch.cos(ax)], dim=1)


class SelfAttention(nn.Module):
    """Multi-head self-attention on tokens [B, L, W] through ``lct_fast.ops.attention``."""

    def __init__(self, width: int, heads: int, backend: str) -> None:
        super().__init__()
        self.heads, self.backend = heads, backend
        self.qkv = Linear(width, 3 * width)
        self.proj = Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, w = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        o = ops.attention(qkv[0], qkv[1], qkv[2], backend=self.backend)
        return self.proj(o.transpose(1, 2).reshape(b, n, w))


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.fc1 = Linear(width, hidden)
        self.drop = SeededDropout(dropout)
        self.fc2 = Linear(hidden, width)

    def forward(self, x: torch.Tensor, seed: Optional[int]) -> torch.Tensor:
        return self.fc2(self.drop(F.gelu(self.fc1(x), approximate="tanh"), seed))


class DiTBlock(nn.Module):
    """adaLN-zero block: x += g1·Attn(N(x)(1+s1)+b1); x += g2·MLP(N(x)(1+s2)+b2) with N the block's norm
    (``nsln``: x̂ + β, Table 2d's NsLN; ``layernorm``: x̂·γ + β, an affine LayerNorm), its affine applied
    before the modulation; with ``double_norm`` the (1+s, b) pairs go through sCM's adaptive double
    normalization."""

    SHIFT_ROWS = (0, 3)  # chunks of ``ada``'s output that are shifts (sh1, sh2)

    def __init__(self, width: int, heads: int, mlp_ratio: float, dropout: float, norm: str,
                 eps: float, backend: str, double_norm: bool = False) -> None:
        super().__init__()
        self.double_norm = double_norm
        self.norm1 = dit_norm(norm, width, eps, backend)
        self.attn = SelfAttention(width, heads, backend)
        self.norm2 = dit_norm(norm, width, eps, backend)
        self.mlp = Mlp(width, int(width * mlp_ratio), dropout)
        self.ada = Linear(width, 6 * width)

    def forward(self, x: torch.Tensor, c: torch.Tensor, seed: Optional[int]) -> torch.Tensor:
        sh1, sc1, g1, sh2, sc2, g2 = self.ada(F.silu(c)).chunk(6, dim=-1)
        sh1, sc1 = double_norm_modulation(sh1, sc1, self.double_norm)
        sh2, sc2 = double_norm_modulation(sh2, sc2, self.double_norm)
        x = x + g1[:, None] * self.attn(self.norm1(x, sh1, sc1))
        return x + g2[:, None] * self.mlp(self.norm2(x, sh2, sc2), seed)


class FinalLayer(nn.Module):
    SHIFT_ROWS = (0,)

    def __init__(self, width: int, patch: int, out_channels: int, norm: str, eps: float, backend: str,
                 double_norm: bool = False) -> None:
        super().__init__()
        self.double_norm = double_norm
        self.norm = dit_norm(norm, width, eps, backend)
        self.ada = Linear(width, 2 * width)
        self.linear = Linear(width, patch * patch * out_channels)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = double_norm_modulation(*self.ada(F.silu(c)).chunk(2, dim=-1), self.double_norm)
        return self.linear(self.norm(x, shift, scale))


class DiT(nn.Module):
    """Diffusion transformer on latents [B, C, H, W] (Peebles & Xie) with NsLN norms."""

    BLOCK_LISTS = ("blocks",)  # the units of activation checkpointing and of train.compile

    def __init__(
        self,
        *,
        in_channels: int = 4,
        resolution: int = 32,
        patch_size: int = 2,
        width: int = 384,
        depth: int = 12,
        heads: int = 6,
        mlp_ratio: float = 4.0,
        num_classes: int = 0,
        dropout: float = 0.0,
        norm: str = "nsln",
        adaptive_weight: bool = False,
        adaptive_double_norm: bool = False,
        checkpointing: bool = False,
        ops_backend: str = "auto",
        eps: float = 1e-6,
        conditions: Optional[Dict[str, float]] = None,
    ) -> None:
        super().__init__()
        if patch_size not in (1, 2):
            raise ValueError(f"model.patch_size must be 1 or 2, got {patch_size}")
        if resolution % patch_size:
            raise ValueError(f"model.resolution={resolution} must be divisible by patch_size={patch_size}")
        if norm not in DIT_NORMS:
            raise ValueError(f"model.norm={norm!r} is not supported by the DiT; expected one of {list(DIT_NORMS)}")
        if width % heads:
            raise ValueError(f"model.width={width} must be divisible by model.heads={heads}")
        if ops_backend not in ops.BACKENDS:
            raise ValueError(f"model.ops_backend={ops_backend!r} is not one of {list(ops.BACKENDS)}")
        self.in_channels, self.resolution, self.patch = in_channels, resolution, patch_size
        self.width, self.num_classes = width, num_classes
        self.checkpointing, self.ops_backend = checkpointing, ops_backend

        self.x_embed = Conv2d(in_channels, width, patch_size, stride=patch_size)
        self.t_embed = nn.Sequential(Linear(FREQ_DIM, width), nn.SiLU(), Linear(width, width))
        # num_classes + 1 rows: the last one is the null class used for label dropout
        self.y_embed = nn.Embedding(num_classes + 1, width) if num_classes > 0 else None
        self.condition_names = add_condition_embeds(self, conditions, FREQ_DIM, width)
        self.adaptive_double_norm = adaptive_double_norm
        self.blocks = nn.ModuleList(
            DiTBlock(width, heads, mlp_ratio, dropout, norm, eps, ops_backend, adaptive_double_norm)
            for _ in range(depth))
        self.final = FinalLayer(width, patch_size, in_channels, norm, eps, ops_backend, adaptive_double_norm)
        self.logvar_head = LogVarHead(FREQ_DIM) if adaptive_weight else None
        assign_dropout_sites(self)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """DiT init: Xavier linears, N(0, 0.02) embeddings, zero adaLN and output layers (adaLN-zero)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.x_embed.weight.view(self.width, -1))
        nn.init.zeros_(self.x_embed.bias)
        for lin in (self.t_embed[0], self.t_embed[2]):
            nn.init.normal_(lin.weight, std=0.02)
        if self.y_embed is not None:
            nn.init.normal_(self.y_embed.weight, std=0.02)
        zero = [blk.ada for blk in self.blocks] + [self.final.ada, self.final.linear]
        for lin in zero:
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)
        if self.adaptive_double_norm:
            # pnorm(shift) needs a direction at init: random shift rows (the zero gates / zero output layer
            # downstream still make every block, and the network's output, start at zero).
            for mod in [*self.blocks, self.final]:
                for k in mod.SHIFT_ROWS:
                    nn.init.xavier_uniform_(mod.ada.weight[k * self.width:(k + 1) * self.width])
        if self.logvar_head is not None:
            nn.init.zeros_(self.logvar_head.weight)
            nn.init.zeros_(self.logvar_head.bias)
        for name in self.condition_names:
            getattr(self, f"{name}_embed").reset_parameters()

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.in_channels or x.shape[2] % self.patch or x.shape[3] % self.patch:
            raise ValueError(f"DiT expects x of shape [B, {self.in_channels}, H, W] with H, W divisible by "
                             f"{self.patch}; got {tuple(x.shape)}")

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, labels: Optional[torch.Tensor] = None, *,
                dropout_seed: Optional[int] = None, **conditions: Optional[torch.Tensor]) -> torch.Tensor:
        self._check_input(x)
        b, _, h, w = x.shape
        p = self.patch
        c_noise = broadcast_batch(torch.as_tensor(c_noise, device=x.device), b, "c_noise")
        c = self.t_embed(sinusoidal_embedding(c_noise, FREQ_DIM).to(self.t_embed[0].weight.dtype))
        if self.y_embed is not None:
            c = c + self.y_embed(label_or_null(labels, b, self.num_classes, x.device))
        c = embed_conditions(self, c, conditions, b)

        tok = self.x_embed(x).flatten(2).transpose(1, 2)
        pos = _sincos_2d(h // p, w // p, self.width, x.device, torch.promote_types(tok.dtype, torch.float32))
        tok = tok + pos[None]
        for blk in self.blocks:
            tok = maybe_checkpoint(self.checkpointing, blk, tok, c, dropout_seed)
        out = self.final(tok, c)  # [B, L, p·p·C]
        out = out.reshape(b, h // p, w // p, p, p, self.in_channels)
        return out.permute(0, 5, 1, 3, 2, 4).reshape(b, self.in_channels, h, w)

    def logvar(self, c_noise: torch.Tensor) -> torch.Tensor:
        """Adaptive weight w_φ at c_noise, [B] in fp32."""
        if self.logvar_head is None:
            raise RuntimeError("this backbone has no adaptive weight head; set model.adaptive_weight=true")
        return self.logvar_head(c_noise)
