"""`egpt train-adapter`: train an alignment adapter, or list the levels with exact parameter counts."""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from typing import get_args

from egpt_core import cliargs
from egpt_core.config import AdapterConfig, AdapterLevel, TrainAdapterConfig, read_config_file
from egpt_core.errors import ConfigError

LEVELS = get_args(AdapterLevel)  # the registry's levels (egpt_core.adapters.modules.LEVEL_SPECS checks them)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train-adapter", help="train an alignment adapter (L1..L5, B1, L5F) on hidden-state stores",
        description="Train an alignment adapter on one or more hidden-state stores, or --list-levels.",
    )
    p.add_argument("--level", choices=LEVELS, help="adapter level")
    p.add_argument("--train", action="append", default=None, metavar="URL", help="train store URL (repeatable)")
    p.add_argument("--val", metavar="URL", help="validation store URL (default: seeded split by scene)")
    p.add_argument("--out", metavar="URL", help="run directory URL")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--hidden-size", type=int, help="adapter hidden size (default: the store's)")
    p.add_argument("--device", help="'auto', 'cpu', 'cuda', 'cuda:1'")
    cliargs.add_config_arguments(p, TrainAdapterConfig)
    p.add_argument("--no-resume", action="store_true", help="start over even if --out holds a checkpoint")
    p.add_argument("--allow-mixed-models", action="store_true",
                   help="accept train/val stores extracted with different drafter/target models")
    p.add_argument("--list-levels", action="store_true", help="print each level with its exact parameter count")
    p.set_defaults(func=_run)

    imp = subparsers.add_parser(
        "import-adapter", help="convert a research best_model.pt into an adapter run directory",
        description="Read a research-pipeline adapter checkpoint (torch.load weights_only=True), map its "
                    "tensors onto the project's module names and write OUT/best.safetensors + OUT/config.json, "
                    "usable by `egpt evaluate --adapter OUT` and the pipeline.",
    )
    imp.add_argument("checkpoint", help="research best_model.pt / final_model.pt")
    imp.add_argument("out", help="adapter run directory to write")
    imp.add_argument("--level", required=True, choices=LEVELS,
                     help="the level it was trained as (B1 = L5 trained with --vlm_only)")
    imp.add_argument("--which", choices=["best", "last"], default="best", help="write best.safetensors or last")
    cliargs.add_storage_option_argument(imp)
    imp.set_defaults(func=_import)


def _import(args) -> int:
    from egpt_core import runfiles as rf
    from egpt_core.adapters.research_import import import_research_adapter
    from egpt_core.fsio import Location

    out = Location(args.out, cliargs.parse_storage_options(args.storage_option) or None)
    prev = rf.read_json(out.child("config.json"))
    if prev is not None and prev.get("task") != "import_adapter":
        raise ConfigError(f"{args.out} already holds a run that was not imported (config.json task "
                          f"{prev.get('task')!r}); choose a new directory")
    record = import_research_adapter(args.checkpoint, out, args.level, which=args.which)
    print(json.dumps({k: record[k] for k in ("level", "hidden_size", "param_count", "weights", "source")}, indent=2))
    return 0


def _list_levels(args) -> int:
    from egpt_core.adapters.modules import LEVEL_DESCRIPTIONS, level_parameter_count

    d = args.hidden_size or 4096
    base = dict(read_config_file(args.config, TrainAdapterConfig).get("adapter") or {}) if args.config else {}
    base = AdapterConfig.model_validate(base).model_dump()
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
    """TrainAdapterConfig from --config (may be partial: flags fill in) and the flags given."""
    flags = {"train": args.train, "allow_mixed_models": True if getattr(args, "allow_mixed_models", False) else None,
             "val": args.val, "out": args.out, "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
             "seed": args.seed, "device": args.device}
    return cliargs.config_from_args(args, TrainAdapterConfig, flags,
                                    {"adapter": {"level": args.level, "hidden_size": args.hidden_size or None}})


@contextlib.contextmanager
def _data_cache_line():
    """Print the trainer's data-cache decision ("training data: ram|byte-range (why)", the one
    `decide_data_cache` makes and config.json records) on stderr as the training starts."""
    logger = logging.getLogger("egpt_core.adapters.trainer")

    class _Line(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            message = record.getMessage()
            if message.startswith("training data: "):
                print(message, file=sys.stderr)

    handler, level = _Line(logging.INFO), logger.level
    logger.addHandler(handler)
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _run(args) -> int:
    if args.list_levels:
        return _list_levels(args)
    cfg = build_config(args)
    from egpt_core.adapters.trainer import train_adapter

    with _data_cache_line():
        result = train_adapter(cfg, progress=lambda f, m: print(f"[{f:5.1%}] {m}", file=sys.stderr),
                               resume=not args.no_resume)
    print(json.dumps(result.model_dump(), indent=2))
    return 0


__all__ = ["register", "build_config"]
