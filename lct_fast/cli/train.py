"""Train a latent consistency model.

    python launch/train.py --config configs/tiny.json                 # one process
    torchrun --nproc_per_node 8 launch/train.py --config configs/b.json
    deepspeed launch/train.py --config configs/xxl.json --set optim.lr=2e-4
    deepspeed --hostfile launch/hostfile launch/train.py --config configs/xxl.json --resume auto

``--set KEY=VALUE`` overrides any config key (dotted, repeatable); ``--dry-run`` prints the resolved
config and the parameter count (model built on the meta device) and exits.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from lct_fast.cli import one_line_errors
from lct_fast.config import ConfigError, config_to_dict, load_config
from lct_fast.preflight import preflight


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="preset name or path, e.g. configs/tiny.json (required to train)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (dotted; VALUE parsed as JSON when possible); repeatable")
    p.add_argument("--out", default=None, help="run directory (default runs/<preset>)")
    p.add_argument("--resume", default=None, help="'auto' (latest complete checkpoint in --out) or a tag")
    p.add_argument("--max-samples", type=int, default=None,
                   help="end this invocation (with a checkpoint) once this many samples are seen, without "
                        "changing the schedule; e.g. to fit a cluster time limit, then --resume auto")
    p.add_argument("--dry-run", action="store_true", help="check the run (data, model, evaluation, resume, teacher) "
                   "and print the resolved config and parameter count, exit")
    p.add_argument("--list-keys", action="store_true", help="print every config key with its type, default and "
                   "meaning, exit (with --config: the preset's values instead of the defaults)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


@one_line_errors("lct-train")
def list_keys(config: str = None) -> None:
    """Every config key, its type, its default (or the preset's value) and its meaning."""
    from lct_fast.config import config_to_dict, describe_keys

    values = {}
    if config:
        def flat(d, prefix=""):
            for k, v in d.items():
                if isinstance(v, dict) and k != "deepspeed":
                    flat(v, f"{prefix}{k}.")
                else:
                    values[f"{prefix}{k}"] = json.dumps(v)

        flat(config_to_dict(load_config(config)))
    for key, tp, default, meaning in describe_keys():
        print(f"{key}  ({tp}) = {values.get(key, default)}\n    {meaning}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.list_keys:
        list_keys(args.config)
        return 0
    if not args.config:
        print("error: --config is required (a preset name or path, e.g. configs/tiny.json)", file=sys.stderr)
        return 2
    if args.resume and not args.out:
        print("error: --resume needs --out (the run directory to resume)", file=sys.stderr)
        return 2
    main_rank = os.environ.get("RANK", "0") == "0"
    try:
        cfg = load_config(args.config, args.overrides)
        # Deterministic default so every rank (and a later --resume auto) agrees on it without a collective.
        run_dir = args.out or os.path.join("runs", cfg.name)
        # Every check that can run before DeepSpeed starts: data, model against data, evaluation, resume, teacher.
        notes = preflight(cfg, run_dir=run_dir, resume=args.resume)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    for note in notes if main_rank else ():
        print(f"lct_fast: {note}", file=sys.stderr)
    if args.dry_run:
        from lct_fast.methods import model_conditions
        from lct_fast.models import count_parameters

        print(json.dumps(config_to_dict(cfg), indent=2))
        print(f"parameters: {count_parameters(cfg.model, model_conditions(cfg.method)):,}")
        return 0

    from lct_fast.distributed import shutdown_distributed
    from lct_fast.trainer import Trainer, TrainingStopped

    try:
        Trainer(cfg, run_dir, resume=args.resume).run(max_samples=args.max_samples)
    except TrainingStopped as e:
        print(f"lct_fast: stopped: {e}", file=sys.stderr)
        return 3
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
