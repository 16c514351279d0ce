"""The `egpt` command: thin argument parsing; each area registers its sub-commands."""

from __future__ import annotations

import argparse
import importlib
import sys

# Each module exposes ``register(subparsers)`` adding its sub-commands with ``set_defaults(func=...)``.
COMMAND_MODULES = [
    "egpt_core.models.commands",
    "egpt_core.events.commands",
    "egpt_core.extraction.commands",
    "egpt_core.store.commands",
    "egpt_core.adapters.commands",
    "egpt_core.lora.commands",
    "egpt_core.evaluation.commands",
    "egpt_core.speculative.commands",
    "flows.commands",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="egpt", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as exc:  # an area not built yet
            if exc.name == name:
                continue
            raise
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rc = args.func(args)
    except KeyboardInterrupt:
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
