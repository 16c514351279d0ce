"""Storage credentials from a Prefect Secret block, resolved at run time in the worker's process.

A config's ``storage_options`` may name a block (``{"secret_block": "egpt-s3"}``) but never hold a
credential (egpt_core/credentials.py), so flow and task parameters, Prefect's database, run files
and cache keys only ever see the block's *name*. The block's value is a JSON object of fsspec
options, e.g. ``{"key": "...", "secret": "..."}``, saved once:

    Secret(value={"key": "...", "secret": "..."}).save("egpt-s3")

(the server keeps block values encrypted; the UI and API show them masked).
"""

from __future__ import annotations

import copy
import json
from functools import lru_cache
from typing import Any

from egpt_core import fsio
from egpt_core.errors import ConfigError


@lru_cache(maxsize=16)
def _block_value(name: str) -> dict[str, Any]:
    from prefect.blocks.system import Secret

    try:
        value = Secret.load(name, _sync=True).get()
    except ValueError as exc:  # Prefect: "Unable to find block document named ..."
        raise ConfigError(f"storage_options.secret_block={name!r}: no Prefect Secret block of that name on this "
                          f"server ({exc}); save it once: Secret(value={{\"key\": ..., \"secret\": ...}})"
                          f".save({name!r})") from None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            value = None
    if not isinstance(value, dict):
        raise ConfigError(f"Prefect Secret block {name!r} must hold a JSON object of fsspec options "
                          "(e.g. {\"key\": ..., \"secret\": ...})")
    return value


def resolve_secret_block(name: str) -> dict[str, Any]:
    """The fsspec options a Secret block holds (read once per process)."""
    return copy.deepcopy(_block_value(name))


def install() -> None:
    """Let egpt_core's filesystem layer resolve ``storage_options.secret_block`` in this process."""
    fsio.set_secret_resolver(resolve_secret_block)
