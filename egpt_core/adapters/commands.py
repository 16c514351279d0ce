"""`egpt train-adapter`: train an alignment adapter, or list the levels with exact parameter counts."""

from __future__ import annotations

import contextlib
import json
import logging
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
    imp.add_argument("--level", required=True, choices=["L1", "L2", "L3", "L4", "L5", "B1", "L5F"],
                     help="the level it was trained as (B1 = L5 trained with --vlm_only)")
    imp.add_argument("--which", choices=["best", "last"], default="best", help="write best.safetensors or last")
    imp.set_defaults(func=_import)


def _import(args) -> int:
    from egpt_core import runfiles as rf
    from egpt_core.adapters.research_import import import_research_adapter
    from egpt_core.fsio import join

    try:
        prev = rf.read_json(join(args.out, "config.json")) if rf.exists(join(args.out, "config.json")) else None
        if prev is not None and prev.get("task") != "import_adapter":
            raise ConfigError(f"{args.out} already holds a run that was not imported (config.json task "
                              f"{prev.get('task')!r}); choose a new directory")
        record = import_research_adapter(args.checkpoint, args.out, args.level, which=args.which)
    except ConfigError as exc:
        print(f"egpt import-adapter: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({k: record[k] for k in ("level", "hidden_size", "param_count", "weights", "source")}, indent=2))
    return 0


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
    if getattr(args, "allow_mixed_models", False):
        data["allow_mixed_models"] = True
    for flag, key in (("val", "val"), ("out", "out"), ("epochs", "epochs"), ("batch_size", "batch_size"),
                      ("lr", "lr"), ("seed", "seed"), ("device", "device")):
        v = getattr(args, flag)
        if v is not None:
            data[key] = v
    return TrainAdapterConfig.model_validate(data)


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
    try:
        cfg = build_config(args)
        if not cfg.train:
            raise ConfigError("--train URL is required (or 'train' in --config)")
        from egpt_core.adapters.trainer import train_adapter

        with _data_cache_line():
            result = train_adapter(cfg, progress=lambda f, m: print(f"[{f:5.1%}] {m}", file=sys.stderr),
                                   resume=not args.no_resume)
    except (ConfigError, ValidationError) as exc:
        from egpt_core.cli import error_line

        print(f"egpt train-adapter: error: {error_line(exc)}", file=sys.stderr)
        return 2
    print(json.dumps(result.model_dump(), indent=2))
    return 0


__all__ = ["register", "build_config"]
