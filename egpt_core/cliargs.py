"""The arguments every `egpt` stage command shares: ``--config FILE`` (the stage's config as JSON or
YAML, possibly partial; flags given on the command line override it) and ``--storage-option
KEY=VALUE`` (fsspec options of every URL). Errors are the project's (ConfigError) or pydantic's
ValidationError; :func:`egpt_core.cli.main` turns either into one line and exit status 2.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from typing import Any, TypeVar

from pydantic import BaseModel

from egpt_core.credentials import credential_paths, refusal_message
from egpt_core.errors import ConfigError

ConfigT = TypeVar("ConfigT", bound=BaseModel)


def add_config_arguments(parser: argparse.ArgumentParser, model: type[BaseModel],
                         storage_options: bool = True, required: bool = False) -> None:
    """``--config FILE`` (fields of ``model``; flags override it) and, unless the command reaches no
    storage, ``--storage-option KEY=VALUE`` (repeatable)."""
    parser.add_argument("--config", metavar="FILE", required=required,
                        help=f"JSON/YAML file with {model.__name__} fields (flags override it)")
    if storage_options:
        add_storage_option_argument(parser)


def add_storage_option_argument(parser: argparse.ArgumentParser) -> None:
    """``--storage-option KEY=VALUE`` (repeatable), read by :func:`parse_storage_options`."""
    parser.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                        help="fsspec option of every URL, repeatable (e.g. endpoint_url=http://minio:9000, "
                        "anon=true); credentials are refused (they come from the environment)")


def parse_storage_options(items: list[str] | None) -> dict[str, Any]:
    """``k=v`` pairs -> dict; values are JSON when they parse (true, 3, {...}), else strings;
    dotted keys nest (``client_kwargs.region_name=eu-west-1``). Credentials are refused: a command
    line lands in shell history and `ps` (they come from the environment's AWS chain)."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--storage-option {item!r}: expected KEY=VALUE")
        key, raw = item.split("=", 1)
        try:
            val: Any = json.loads(raw)
        except ValueError:
            val = raw
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = val
    if paths := credential_paths(out):
        raise ConfigError(refusal_message(paths, "--storage-option"))
    return out


def _section_default(model: type[BaseModel], section: str) -> dict[str, Any]:
    """The settings a nested section's default sets explicitly (``ModelLoadConfig(quant="nf4")`` -> nf4)."""
    default = model.model_fields[section].default
    return default.model_dump(exclude_unset=True) if isinstance(default, BaseModel) else {}


def config_from_args(args: argparse.Namespace, model: type[ConfigT], flags: Mapping[str, Any],
                     sections: Mapping[str, Mapping[str, Any]] | None = None) -> ConfigT:
    """``model`` from ``--config`` (when given) overridden by the ``flags`` that are not None, the
    nested ``sections`` (e.g. ``{"load": {"dtype": ...}}``, merged into the file's section) and
    ``--storage-option`` (merged into the file's storage_options)."""
    from egpt_core.config import read_config_file

    data: dict[str, Any] = read_config_file(args.config, model) if getattr(args, "config", None) else {}
    data.update({k: v for k, v in flags.items() if v is not None})
    for section, values in (sections or {}).items():
        given = {k: v for k, v in values.items() if v is not None}
        if given:  # over the file's section, else over the section's default (e.g. L6 loads nf4)
            data[section] = {**(data.get(section) or _section_default(model, section)), **given}
    if so := parse_storage_options(getattr(args, "storage_option", None)):
        data["storage_options"] = {**(data.get("storage_options") or {}), **so}
    return model.model_validate(data)


__all__ = ["add_config_arguments", "add_storage_option_argument", "config_from_args", "parse_storage_options"]
