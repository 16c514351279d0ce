"""One filesystem abstraction for every URL setting: plain paths, file://, memory://, s3://, gs://.

Everything that reads or writes a URL goes through :func:`url_to_fs`; nothing calls ``open()`` on a
URL by hand. ``storage_options`` (``endpoint_url``, ``profile``, ...) are passed through to fsspec;
credentials never are part of them (``egpt_core.credentials``): they come from the environment's
standard chain or, in Prefect runs, from the Secret block named by ``storage_options.secret_block``,
merged in here at run time and scrubbed from every log record.
"""

from __future__ import annotations

import logging
import os
import posixpath
from collections.abc import Callable
from typing import Any

import fsspec
from fsspec.core import url_to_fs as _url_to_fs

from egpt_core import credentials
from egpt_core.config import credential_env_values
from egpt_core.errors import ConfigError

#: resolves a Prefect Secret block name to fsspec options; installed by tasks/ (egpt_core never imports Prefect)
_secret_resolver: Callable[[str], dict[str, Any]] | None = None


def set_secret_resolver(resolver: Callable[[str], dict[str, Any]] | None) -> None:
    """Install how ``storage_options.secret_block`` names are resolved (tasks/credentials.py does it)."""
    global _secret_resolver
    _secret_resolver = resolver


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def normalize_options(url: str, storage_options: dict[str, Any] | None) -> dict[str, Any]:
    """The fsspec options for ``url``: the credentials of ``secret_block`` merged in, the project's
    flat ``endpoint_url`` convenience mapped onto s3fs's ``client_kwargs``."""
    opts = dict(storage_options or {})
    block = opts.pop(credentials.SECRET_BLOCK_OPTION, None)
    if block:
        if _secret_resolver is None:
            raise ConfigError(f"storage_options.{credentials.SECRET_BLOCK_OPTION}={block!r} names a Prefect Secret "
                              "block, which only Prefect runs (flows/, tasks/) resolve; outside Prefect give the "
                              "credentials through the environment (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
                              "AWS_PROFILE) or the machine's role")
        opts = _merge(_secret_resolver(str(block)), opts)
    _remember_secrets(opts)
    if str(url).startswith(("s3://", "s3a://")) and "endpoint_url" in opts:
        ck = dict(opts.get("client_kwargs") or {})
        ck.setdefault("endpoint_url", opts.pop("endpoint_url"))
        opts["client_kwargs"] = ck
    return opts


def url_to_fs(url: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return ``(filesystem, path)`` for ``url`` (a plain path means the local disk)."""
    return _url_to_fs(str(url), **normalize_options(str(url), storage_options))


def join(url: str, *parts: str) -> str:
    """Join URL path components with '/' (works for local paths and every protocol)."""
    return posixpath.join(str(url).rstrip("/"), *parts)


def canonical_url(url: str) -> str:
    """``url`` in one comparable, cwd-independent form: local paths (plain or file://) absolute and
    normalised, other URLs without a trailing '/'. Stores record their inputs this way."""
    u = str(url)
    if u.startswith("file://"):
        u = u[len("file://"):]
    if "://" not in u:
        return os.path.normpath(os.path.abspath(os.path.expanduser(u)))
    return u.rstrip("/")


def is_relative_path(url: str) -> bool:
    """True for a plain local path that depends on the current directory."""
    u = str(url)
    return "://" not in u and not os.path.isabs(os.path.expanduser(u))


def is_local(url: str) -> bool:
    """True for plain paths and file:// URLs."""
    u = str(url)
    return "://" not in u or u.startswith("file://")


_secrets: frozenset[str] = frozenset()
_base_record_factory = None


def _remember_secrets(options: dict[str, Any]) -> None:
    """Credentials in (resolved) storage options or the environment are scrubbed from every log
    record created afterwards.

    Third-party DEBUG logging would otherwise carry them (botocore logs each request's headers,
    the access key id inside ``Authorization: ... Credential=<key>/...``).
    """
    global _secrets, _base_record_factory
    found = credentials.secret_strings(options) | {v for v in credential_env_values() if len(v) >= 8}
    if not found - _secrets:
        return
    _secrets = frozenset(_secrets | found)
    if _base_record_factory is None:
        _base_record_factory = logging.getLogRecordFactory()
        logging.setLogRecordFactory(_scrubbing_record_factory)


def _scrubbing_record_factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
    record = _base_record_factory(*args, **kwargs)
    secrets = _secrets
    try:
        msg = record.getMessage()
    except Exception:  # a malformed record: leave it to logging's own error handling
        return record
    if any(sec in msg for sec in secrets):
        for sec in secrets:
            msg = msg.replace(sec, "***")
        record.msg, record.args = msg, None
    return record


def redact(options: dict[str, Any] | None) -> dict[str, Any]:
    """A copy of storage options safe to log: credentials replaced by '***' (by name and by value)."""
    return credentials.redact(dict(options or {}))


def open_input(url: str, storage_options: dict[str, Any] | None = None):
    """Open an input file for binary reading; missing or unopenable -> BadInputError naming it."""
    from egpt_core.errors import BadInputError

    fs, path = url_to_fs(url, storage_options)
    try:
        return fs, path, fs.open(path, "rb")
    except FileNotFoundError:
        raise BadInputError(url, "file not found") from None
    except (IsADirectoryError, PermissionError) as exc:
        raise BadInputError(url, f"cannot open: {exc}") from None
