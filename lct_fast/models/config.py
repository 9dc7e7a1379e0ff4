"""The ``model`` section of a run's config: the backbone's settings, their defaults and checks, in one place
(:func:`lct_fast.models.build_backbone` reads its defaults from here). A leaf of the models package."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..backends import BACKENDS
from ..validate import ConfigError, choice, positive, unit

__all__ = ["ModelConfig"]


@dataclass
class ModelConfig:
    arch: str = "dit"
    """Backbone family: ``dit`` (latent DiT, adaLN-zero) or ``unet`` (the paper's ADM UNet)."""
    size: str = "S"
    """DiT preset S|B|L|XL|XXL (width/depth/heads from the preset table) or ``custom``."""
    width: int = 0
    """DiT hidden size; 0 takes the preset's."""
    depth: int = 0
    """DiT number of blocks; 0 takes the preset's."""
    heads: int = 0
    """DiT attention heads; 0 takes the preset's."""
    patch_size: int = 2
    """DiT patch size on the latent grid (1 or 2)."""
    mlp_ratio: float = 4.0
    """DiT MLP hidden size as a multiple of the width."""
    in_channels: int = 4
    """Latent channels C (must match the dataset's stats.json shape)."""
    resolution: int = 32
    """Latent height = width H (must match the dataset's stats.json shape)."""
    num_classes: int = 0
    """Number of classes; 0 = unconditional. Label id ``num_classes`` is the null class."""
    dropout: float = 0.0
    """Dropout probability inside the backbone (masks drawn from an explicit generator)."""
    norm: str = "nsln"
    """Normalisation: nsln (Non-scaling LayerNorm, eq. 12) | layernorm; the UNet also groupnorm | instancenorm |
    rmsnorm (the paper's Table 2d ablation)."""
    unet_channels: int = 128
    """UNet base channels."""
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 3, 4])
    """UNet channel multipliers per resolution level."""
    num_res_blocks: int = 4
    """UNet residual blocks per level."""
    attn_resolutions: list[int] = field(default_factory=lambda: [16, 8])
    """UNet resolutions (in latent pixels) that get self-attention."""
    head_channels: int = 64
    """UNet channels per attention head."""
    adaptive_weight: bool = False
    """Build the scalar head w_phi(t) used by sCT's adaptive loss weighting."""
    adaptive_double_norm: bool = False
    """Adaptive double normalization (sCM sec. 4.1): every conditioned norm computes
    norm(x) * pnorm(1 + scale(emb)) + pnorm(shift(emb)), pnorm = unit RMS over the feature dim, bounding the
    conditioning's scale. On in the continuous-time presets (Tables 3-4: every size)."""
    guidance_embed: bool = False
    """A classifier-free-guidance-scale input (an MLP on the embedding of s - 1, added to the conditioning, its
    output layer zero at init): the guidance-conditioned sCD student (method.scd.guidance_conditioned)."""
    checkpointing: bool = False
    """Activation checkpointing per block (only in grad-enabled passes, never in the JVP pass)."""
    ops_backend: str = "auto"
    """Default backend for lct_fast.ops (norm, attention): auto | reference | triton | cuda."""

    def __post_init__(self) -> None:
        choice("model.arch", self.arch, ["dit", "unet"])
        choice("model.size", self.size, ["S", "B", "L", "XL", "XXL", "custom"])
        for k in ("width", "depth", "heads"):
            positive(f"model.{k}", getattr(self, k), allow_zero=True)
        if self.arch == "dit" and self.size == "custom" and 0 in (self.width, self.depth, self.heads):
            raise ConfigError("model.size: 'custom' needs model.width, model.depth and model.heads > 0")
        if self.width and self.heads and self.width % self.heads:
            raise ConfigError(f"model.width: {self.width} is not divisible by model.heads={self.heads}")
        choice("model.patch_size", self.patch_size, [1, 2] if self.arch == "dit" else [1, 2, 4])  # the UNet ignores it
        positive("model.mlp_ratio", self.mlp_ratio)
        positive("model.in_channels", self.in_channels)
        positive("model.resolution", self.resolution)
        if self.arch == "dit" and self.resolution % self.patch_size:
            raise ConfigError(f"model.resolution: {self.resolution} is not divisible by model.patch_size={self.patch_size}")
        positive("model.num_classes", self.num_classes, allow_zero=True)
        unit("model.dropout", self.dropout)
        choice("model.norm", self.norm, ["nsln", "layernorm", "groupnorm", "instancenorm", "rmsnorm"]
                if self.arch == "unet" else ["nsln", "layernorm"])
        positive("model.unet_channels", self.unet_channels)
        if not self.channel_mult or any(m <= 0 for m in self.channel_mult):
            raise ConfigError(f"model.channel_mult: expected a non-empty list of positive ints, got {self.channel_mult!r}")
        positive("model.num_res_blocks", self.num_res_blocks)
        positive("model.head_channels", self.head_channels)
        choice("model.ops_backend", self.ops_backend, BACKENDS)
