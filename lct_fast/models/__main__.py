"""``python -m lct_fast.models --size XXL``: print the parameter count of a backbone."""
from __future__ import annotations

import argparse
from types import SimpleNamespace

from . import DIT_PRESETS, count_parameters


def main() -> None:
    ap = argparse.ArgumentParser(description="Print backbone parameter counts (meta device, no allocation).")
    ap.add_argument("--arch", default="dit", choices=["dit", "unet"])
    ap.add_argument("--size", default="all", help=f"one of {list(DIT_PRESETS)} or 'all' (DiT only)")
    ap.add_argument("--patch-size", type=int, default=2)
    ap.add_argument("--resolution", type=int, default=32)
    ap.add_argument("--in-channels", type=int, default=4)
    ap.add_argument("--num-classes", type=int, default=0)
    ap.add_argument("--norm", default="nsln")
    ap.add_argument("--adaptive-weight", action="store_true")
    args = ap.parse_args()
    sizes = list(DIT_PRESETS) if (args.size == "all" and args.arch == "dit") else [args.size]
    for size in sizes:
        cfg = SimpleNamespace(arch=args.arch, size=size if args.arch == "dit" else "custom", width=0, depth=0,
                              heads=0, patch_size=args.patch_size, mlp_ratio=4.0, in_channels=args.in_channels,
                              resolution=args.resolution, num_classes=args.num_classes, dropout=0.0,
                              norm=args.norm, unet_channels=128, channel_mult=[1, 2, 3, 4], num_res_blocks=4,
                              attn_resolutions=[16, 8], head_channels=64, adaptive_weight=args.adaptive_weight,
                              checkpointing=False, ops_backend="auto")
        n = count_parameters(cfg)
        label = f"DiT-{size}/{args.patch_size}" if args.arch == "dit" else "ADM UNet"
        print(f"{label}: {n:,} parameters ({n / 1e9:.3f} B)")


if __name__ == "__main__":
    main()
