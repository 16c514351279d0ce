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


def error_line(exc: BaseException) -> str:
    """One line for a user: what is wrong and where (a pydantic error: each field and its problem)."""
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        problems = []
        for err in exc.errors(include_url=False):
            loc = ".".join(str(p) for p in err.get("loc", ()))
            msg = str(err.get("msg")).removeprefix("Value error, ")
            if err.get("type") == "value_error" and not err.get("loc"):  # a config rule: its message names the fields
                problems.append(msg)
                continue
            got = f" (got {err['input']!r})" if "input" in err and not isinstance(err["input"], dict | list) else ""
            problems.append(f"{loc or '(config)'}: {msg}{got}")
        return f"invalid {exc.title} settings: " + "; ".join(problems)
    return " ".join(str(exc).split()) or type(exc).__name__


#: packages whose exceptions mean "the storage behind a URL could not be reached or read"
_STORAGE_PACKAGES = ("botocore", "aiobotocore", "aiohttp", "s3fs", "gcsfs", "adlfs", "google", "azure")


def storage_error(exc: BaseException) -> bool:
    """An I/O or storage-client error (unreachable endpoint, refused credentials, missing file)."""
    return isinstance(exc, OSError) or any(
        c.__module__.split(".")[0] in _STORAGE_PACKAGES for c in type(exc).__mro__ if c is not Exception)


def main(argv: list[str] | None = None) -> int:
    """Run one `egpt` sub-command (see :func:`run_command`)."""
    return run_command(build_parser().parse_args(argv))


def run_command(args: argparse.Namespace) -> int:
    """Run a parsed sub-command (``args.func``). The project's own errors (bad input, settings, stores,
    output directories), invalid settings (pydantic) and storage errors (unreachable endpoint, missing
    file) end with one line on stderr and exit status 2, no traceback; anything else is a bug and keeps
    its traceback. Command modules do not catch these themselves."""
    from pydantic import ValidationError

    from egpt_core.errors import EgptError

    try:
        rc = args.func(args)
    except KeyboardInterrupt:
        return 130
    except (EgptError, ValidationError) as exc:
        print(f"egpt {args.command}: error: {error_line(exc)}", file=sys.stderr)
        return 2
    except Exception as exc:
        if not storage_error(exc):
            raise  # a bug: keep the traceback
        hint = "" if isinstance(exc, OSError) else " (check the URL and storage_options: endpoint_url, credentials)"
        print(f"egpt {args.command}: error: {error_line(exc)}{hint}", file=sys.stderr)
        return 2
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
