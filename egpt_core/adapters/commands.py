"""`egpt train-adapter`: train an alignment adapter, or list the levels with exact parameter counts."""

from __future__ import annotations

import json
import sys

from pydantic import ValidationError

from egpt_core.config import AdapterConfig, TrainAdapterConfig, load_config
from egpt_core.errors import ConfigError


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train-adapter", help="train an alignment adapter (L1..L5, B1, L5F) on hidden-state stores",
        description="Train an alignment adapter on one or more hidden-state stores, or --list-levels.",
    )
    p.add_argument("--level", choices=["L1", "L2", "L3", "L4", "L5", "B1", "L5F"], help="adapter level")
    p.add_argument("--train", action="append", default=None, metavar="URL", help="train store URL (repeatable)")
    p.add_argument("--val", metavar="URL", help="validation store URL (default: seeded split by scene)")
    p.add_argument("--out", metavar="URL", help="run directory URL")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--hidden-size", type=int, help="adapter hidden size (default: the store's)")
    p.add_argument("--device", help="'auto', 'cpu', 'cuda', 'cuda:1'")
    p.add_argument("--config", metavar="FILE", help="TrainAdapterConfig as JSON/YAML; flags override it")
    p.add_argument("--no-resume", action="store_true", help="start over even if --out holds a checkpoint")
    p.add_argument("--list-levels", action="store_true", help="print each level with its exact parameter count")
    p.set_defaults(func=_run)


def _list_levels(args) -> int:
    from egpt_core.adapters.modules import LEVEL_DESCRIPTIONS, LEVELS, level_parameter_count

    d = args.hidden_size or 4096
    base = {}
    if args.config:
        base = load_config(args.config, TrainAdapterConfig).adapter.model_dump()
    base.pop("level", None)
    base["hidden_size"] = d
    print(f"hidden size D = {d}")
    print(f"{'level':6s} {'research objective':>20s} {'default (sep. head)':>20s}  description")
    for level in LEVELS:
        research = level_parameter_count(AdapterConfig(**{**base, "level": level, "separate_prediction_head": False}))
        ours = level_parameter_count(AdapterConfig(**{**base, "level": level, "separate_prediction_head": True}))
        print(f"{level:6s} {research:20,d} {ours:20,d}  {LEVEL_DESCRIPTIONS[level]}")
    return 0


def build_config(args) -> TrainAdapterConfig:
    data = load_config(args.config, TrainAdapterConfig).model_dump() if args.config else {}
    adapter = dict(data.get("adapter") or {})
    if args.level:
        adapter["level"] = args.level
    if args.hidden_size:
        adapter["hidden_size"] = args.hidden_size
    data["adapter"] = adapter
    if args.train:
        data["train"] = args.train
    for flag, key in (("val", "val"), ("out", "out"), ("epochs", "epochs"), ("batch_size", "batch_size"),
                      ("lr", "lr"), ("seed", "seed"), ("device", "device")):
        v = getattr(args, flag)
        if v is not None:
            data[key] = v
    return TrainAdapterConfig.model_validate(data)


def _run(args) -> int:
    if args.list_levels:
        return _list_levels(args)
    try:
        cfg = build_config(args)
        if not cfg.train:
            raise ConfigError("--train URL is required (or 'train' in --config)")
        from egpt_core.adapters.trainer import train_adapter

        result = train_adapter(cfg, progress=lambda f, m: print(f"[{f:5.1%}] {m}", file=sys.stderr),
                               resume=not args.no_resume)
    except (ConfigError, ValidationError) as exc:
        from egpt_core.cli import error_line

        print(f"egpt train-adapter: error: {error_line(exc)}", file=sys.stderr)
        return 2
    print(json.dumps(result.model_dump(), indent=2))
    return 0


__all__ = ["register", "build_config"]
