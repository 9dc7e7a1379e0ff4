"""ADM UNet (Dhariwal & Nichol 2021) as used by iCT and the latent-CT paper (SPEC §2 end).

Paper setting on 4×32×32 latents: 128 channels, multipliers 1,2,3,4, 4 res-blocks per level,
attention at 16 and 8 (and in the middle block), 64 channels per head, scale-shift conditioning,
up/down-sampling inside res-blocks (BigGAN style). The normalisation is selectable for Table 2d:
groupnorm | instancenorm | layernorm | rmsnorm | nsln (see ``layers.make_norm2d``).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

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
    SeededDropout,
    assign_dropout_sites,
    broadcast_batch,
    double_norm_modulation,
    label_or_null,
    make_norm2d,
    maybe_checkpoint,
    sinusoidal_embedding,
)

FREQ_DIM_LOGVAR = 256


class ResBlock(nn.Module):
    """ADM res-block with scale-shift conditioning, optional up/down-sampling and self-attention.

    h = conv0(SiLU(norm0(x))); h = SiLU(norm1(h)·(1 + scale) + shift); h = conv1(dropout(h));
    x = skip(x) + h; then, if ``attn``, x = x + proj(Attention(qkv(norm2(x)))).
    """

    def __init__(self, cin: int, cout: int, emb_dim: int, *, up: bool = False, down: bool = False,
                 attn: bool = False, head_channels: int = 64, dropout: float = 0.0,
                 norm: str = "groupnorm", eps: float = 1e-6, backend: str = "auto",
                 double_norm: bool = False) -> None:
        super().__init__()
        self.up, self.down, self.cout, self.backend = up, down, cout, backend
        self.double_norm = double_norm
        self.norm0 = make_norm2d(norm, cin, eps=eps, backend=backend)
        self.conv0 = Conv2d(cin, cout, 3, padding=1)
        self.affine = Linear(emb_dim, 2 * cout)
        self.norm1 = make_norm2d(norm, cout, eps=eps, backend=backend)
        self.drop = SeededDropout(dropout)
        self.conv1 = Conv2d(cout, cout, 3, padding=1)
        self.skip = Conv2d(cin, cout, 1) if cin != cout else None
        self.attn = attn
        if attn:
            if cout % head_channels:
                raise ValueError(f"UNet: {cout} channels are not divisible by head_channels={head_channels}")
            self.heads = cout // head_channels
            self.norm2 = make_norm2d(norm, cout, eps=eps, backend=backend)
            self.qkv = Conv2d(cout, 3 * cout, 1)
            self.proj = Conv2d(cout, cout, 1)

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.up:
            return F.interpolate(x, scale_factor=2.0, mode="nearest")
        if self.down:
            return F.avg_pool2d(x, 2)
        return x

    def forward(self, x: torch.Tensor, emb: torch.Tensor, seed: Optional[int]) -> torch.Tensor:
        h = self.conv0(self._resample(F.silu(self.norm0(x))))
        x = self._resample(x)
        scale, shift = self.affine(emb).chunk(2, dim=1)
        shift, scale = double_norm_modulation(shift, scale, self.double_norm)
        h = self.norm1(h) * (1 + scale[:, :, None, None]) + shift[:, :, None, None]
        h = self.conv1(self.drop(F.silu(h), seed))
        x = (self.skip(x) if self.skip is not None else x) + h
        if self.attn:
            x = x + self._attention(x)
        return x

    def _attention(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hh, ww = x.shape
        dh = c // self.heads
        qkv = self.qkv(self.norm2(x)).reshape(b, 3, self.heads, dh, hh * ww).transpose(-1, -2)
        o = ops.attention(qkv[:, 0], qkv[:, 1], qkv[:, 2], backend=self.backend)  # [B, H, L, Dh]
        return self.proj(o.transpose(-1, -2).reshape(b, c, hh, ww))


class UNet(nn.Module):
    """ADM UNet backbone: ``UNet(...)(x_in, c_noise, labels=None, *, dropout_seed=None, **conditions) -> F``
    (the method's extra scalar conditions: see :class:`lct_fast.models.layers.ScalarEmbed`)."""

    BLOCK_LISTS = ("enc", "dec")  # the units of activation checkpointing and of train.compile

    def __init__(
        self,
        *,
        in_channels: int = 4,
        resolution: int = 32,
        model_channels: int = 128,
        channel_mult: Sequence[int] = (1, 2, 3, 4),
        num_res_blocks: int = 4,
        attn_resolutions: Sequence[int] = (16, 8),
        head_channels: int = 64,
        dropout: float = 0.0,
        num_classes: int = 0,
        norm: str = "groupnorm",
        adaptive_weight: bool = False,
        adaptive_double_norm: bool = False,
        checkpointing: bool = False,
        ops_backend: str = "auto",
        eps: float = 1e-6,
        conditions: Optional[Dict[str, float]] = None,
    ) -> None:
        super().__init__()
        if resolution % (2 ** (len(channel_mult) - 1)):
            raise ValueError(f"model.resolution={resolution} cannot be halved {len(channel_mult) - 1} times "
                             f"(channel_mult={list(channel_mult)})")
        if ops_backend not in ops.BACKENDS:
            raise ValueError(f"model.ops_backend={ops_backend!r} is not one of {list(ops.BACKENDS)}")
        self.in_channels, self.resolution, self.num_classes = in_channels, resolution, num_classes
        self.model_channels = model_channels
        self.down_factor = 2 ** (len(channel_mult) - 1)
        self.checkpointing, self.ops_backend = checkpointing, ops_backend
        emb_dim = 4 * model_channels
        kw = dict(head_channels=head_channels, dropout=dropout, norm=norm, eps=eps, backend=ops_backend,
                  double_norm=adaptive_double_norm)

        self.map = nn.Sequential(Linear(model_channels, emb_dim), nn.SiLU(), Linear(emb_dim, emb_dim))
        self.y_embed = nn.Embedding(num_classes + 1, emb_dim) if num_classes > 0 else None
        self.condition_names = add_condition_embeds(self, conditions, model_channels, emb_dim)

        cout = model_channels * channel_mult[0]
        self.conv_in = Conv2d(in_channels, cout, 3, padding=1)
        skips: List[int] = [cout]
        self.enc = nn.ModuleList()
        for level, mult in enumerate(channel_mult):
            res = resolution >> level
            if level > 0:
                self.enc.append(ResBlock(cout, cout, emb_dim, down=True, **kw))
                skips.append(cout)
            for _ in range(num_res_blocks):
                cin, cout = cout, model_channels * mult
                self.enc.append(ResBlock(cin, cout, emb_dim, attn=res in attn_resolutions, **kw))
                skips.append(cout)

        self.dec = nn.ModuleList()
        self.dec_takes_skip: List[bool] = []
        last = len(channel_mult) - 1
        for level in reversed(range(len(channel_mult))):
            res = resolution >> level
            if level == last:  # middle block: res, attention, res
                self.dec.append(ResBlock(cout, cout, emb_dim, attn=True, **kw))
                self.dec.append(ResBlock(cout, cout, emb_dim, attn=False, **kw))
                self.dec_takes_skip += [False, False]
            else:
                self.dec.append(ResBlock(cout, cout, emb_dim, up=True, **kw))
                self.dec_takes_skip.append(False)
            for _ in range(num_res_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * channel_mult[level]
                self.dec.append(ResBlock(cin, cout, emb_dim, attn=res in attn_resolutions, **kw))
                self.dec_takes_skip.append(True)
        self.norm_out = make_norm2d(norm, cout, eps=eps, backend=ops_backend)
        self.conv_out = Conv2d(cout, in_channels, 3, padding=1)
        self.logvar_head = LogVarHead(FREQ_DIM_LOGVAR) if adaptive_weight else None
        assign_dropout_sites(self)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Default PyTorch init, zero-init of every residual branch's last layer and of the output
        conv (ADM's zero_module), so the network starts as the identity on each residual path."""
        for m in self.modules():
            if isinstance(m, ResBlock):
                zero = [m.conv1] + ([m.proj] if m.attn else [])
                for layer in zero:
                    nn.init.zeros_(layer.weight)
                    nn.init.zeros_(layer.bias)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)
        if self.logvar_head is not None:
            nn.init.zeros_(self.logvar_head.weight)
            nn.init.zeros_(self.logvar_head.bias)
        for name in self.condition_names:
            getattr(self, f"{name}_embed").reset_parameters()

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, labels: Optional[torch.Tensor] = None, *,
                dropout_seed: Optional[int] = None, **conditions: Optional[torch.Tensor]) -> torch.Tensor:
        f = self.down_factor
        if x.dim() != 4 or x.shape[1] != self.in_channels or x.shape[2] % f or x.shape[3] % f:
            raise ValueError(f"UNet expects x of shape [B, {self.in_channels}, H, W] with H, W divisible by {f}, "
                             f"got {tuple(x.shape)}")
        b = x.shape[0]
        c_noise = broadcast_batch(torch.as_tensor(c_noise, device=x.device), b, "c_noise")
        emb = self.map(sinusoidal_embedding(c_noise, self.model_channels).to(self.map[0].weight.dtype))
        if self.y_embed is not None:
            emb = emb + self.y_embed(label_or_null(labels, b, self.num_classes, x.device))
        emb = embed_conditions(self, emb, conditions, b)
        emb = F.silu(emb)

        h = self.conv_in(x)
        skips = [h]
        for blk in self.enc:
            h = maybe_checkpoint(self.checkpointing, blk, h, emb, dropout_seed)
            skips.append(h)
        for blk, takes_skip in zip(self.dec, self.dec_takes_skip):
            if takes_skip:
                h = torch.cat([h, skips.pop()], dim=1)
            h = maybe_checkpoint(self.checkpointing, blk, h, emb, dropout_seed)
        return self.conv_out(F.silu(self.norm_out(h)))

    def logvar(self, c_noise: torch.Tensor) -> torch.Tensor:
        """Adaptive weight w_φ at c_noise, [B] in fp32."""
        if self.logvar_head is None:
            raise RuntimeError("this backbone has no adaptive weight head; set model.adaptive_weight=true")
        return self.logvar_head(c_noise)
