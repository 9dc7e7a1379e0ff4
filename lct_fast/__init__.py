"""lct_fast: distributed training of latent consistency models (iLCT and TrigFlow sCT)."""

__version__ = "0.1.0"
