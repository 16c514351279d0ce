"""One filesystem abstraction for every URL setting: plain paths, file://, memory://, s3://, gs://.

Everything that reads or writes a URL goes through :func:`url_to_fs`; nothing calls ``open()`` on a
URL by hand. ``storage_options`` (``endpoint_url``, ``profile``, ...) are passed through to fsspec;
credentials never are part of them (``egpt_core.credentials``): they come from the environment's
standard chain or, in Prefect runs, from the Secret block named by ``storage_options.secret_block``,
merged in here at run time and scrubbed from every log record.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import posixpath
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import IO, Any

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


def open_input(where: str | Location, storage_options: dict[str, Any] | None = None):
    """Open an input file (a Location, or a URL with its ``storage_options``) for binary reading ->
    ``(fs, path, file)``; missing or unopenable -> BadInputError naming it."""
    from egpt_core.errors import BadInputError

    src = Location.of(where, storage_options)
    url, fs, path = src.url, src.fs, src.path
    try:
        return fs, path, fs.open(path, "rb")
    except FileNotFoundError:
        raise BadInputError(url, "file not found") from None
    except (IsADirectoryError, PermissionError) as exc:
        raise BadInputError(url, f"cannot open: {exc}") from None


# --------------------------------------------------------------------------------------------------
# atomic whole-file writes and Location
# --------------------------------------------------------------------------------------------------
#: marks a temporary sibling of a file being written (``<name>.tmp-<hex>``); store gc recognises it
TMP_MARK = ".tmp-"
#: protocols without real directories: a whole PUT needs no parent to exist
_OBJECT_PROTOCOLS = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "memory", "oss", "r2"}


def is_local_fs(fs: fsspec.AbstractFileSystem) -> bool:
    """True for the local disk (temp + rename is atomic there)."""
    from fsspec.implementations.local import LocalFileSystem

    return isinstance(fs, LocalFileSystem)


def fsync_dir(path: str) -> None:
    """Make a rename inside directory ``path`` durable (best effort: not every filesystem allows it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_local_tmp(path: str, data: bytes) -> str:
    """Write ``data`` to a unique temporary sibling of local ``path`` (fsynced); return the temp path."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}{TMP_MARK}{uuid.uuid4().hex[:12]}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        _remove_quietly(tmp)
        raise
    return tmp


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def put_whole(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """One whole-object PUT (readers see the old object or the new one, never a part)."""
    protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
    if not protocols & _OBJECT_PROTOCOLS:  # filesystems with real directories
        parent = path.rsplit("/", 1)[0]
        if parent:
            fs.makedirs(parent, exist_ok=True)
    fs.pipe_file(path, data)


def atomic_put(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Make ``path`` hold ``data`` all at once: temp + fsync + rename locally, one whole PUT elsewhere.
    A crash part-way leaves the old file (or none), never a truncated one."""
    if is_local_fs(fs):
        tmp = write_local_tmp(path, data)
        try:
            os.replace(tmp, path)
        except BaseException:
            _remove_quietly(tmp)
            raise
        fsync_dir(os.path.dirname(path) or ".")
    else:
        put_whole(fs, path, data)


def finite_json(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, ±Infinity) replaced by None: JSON has no such numbers,
    and strict readers reject Python's ``NaN``/``Infinity`` tokens."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite_json(v) for v in obj]
    return obj


def dumps_json(obj: Any, **kwargs: Any) -> str:
    """``json.dumps`` that always writes valid JSON (non-finite floats become null)."""
    return json.dumps(finite_json(obj), allow_nan=False, **kwargs)


class _AtomicWriter:
    """``Location.open("wb"/"w")``: collects what is written; one atomic write on a clean ``close()`` /
    ``with`` exit, nothing at all when the ``with`` block raises or the object is dropped unclosed."""

    def __init__(self, location: Location, text: bool, encoding: str = "utf-8"):
        self._location, self._encoding = location, encoding
        self._buf: io.StringIO | io.BytesIO = io.StringIO() if text else io.BytesIO()
        self.closed = False

    def write(self, data: Any) -> int:
        return self._buf.write(data)

    def __getattr__(self, name: str) -> Any:  # tell, seek, writelines, ... of the buffer
        return getattr(self._buf, name)

    def flush(self) -> None:
        """Nothing reaches the file before close (that is the point)."""

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        data = self._buf.getvalue()
        self._location.write_atomic(data.encode(self._encoding) if isinstance(data, str) else data)

    def discard(self) -> None:
        self.closed = True

    def __enter__(self) -> _AtomicWriter:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.discard()


@dataclass(frozen=True)
class Location:
    """A file or directory on any fsspec URL with the options to reach it (datatrove's ``DataFolder``
    idea): one value instead of a loose ``(url, storage_options)`` pair.

    Every write is whole and atomic (:meth:`write_atomic`: temp + rename locally, one whole PUT on
    object stores); ``open("wb"/"w")`` buffers and writes atomically on close. ``storage_options``
    never hold credentials (see the module docstring).
    """

    url: str
    storage_options: dict[str, Any] | None = field(default=None, compare=True)

    def __post_init__(self) -> None:
        object.__setattr__(self, "url", str(self.url))

    @classmethod
    def of(cls, where: str | Location, storage_options: dict[str, Any] | None = None) -> Location:
        """``where`` as a Location (a URL gets ``storage_options``; a Location is returned as is)."""
        return where if isinstance(where, Location) else cls(str(where), storage_options)

    @cached_property
    def _fs_path(self) -> tuple[fsspec.AbstractFileSystem, str]:
        return url_to_fs(self.url, self.storage_options)

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        """The fsspec filesystem (credentials merged in at run time)."""
        return self._fs_path[0]

    @property
    def path(self) -> str:
        """The path on :attr:`fs` (no protocol)."""
        return self._fs_path[1].rstrip("/") or self._fs_path[1]

    @property
    def is_local(self) -> bool:
        return is_local(self.url)

    def child(self, *names: str) -> Location:
        """The Location ``names`` below this one (same storage options)."""
        return Location(join(self.url, *names), self.storage_options)

    def __truediv__(self, name: str) -> Location:
        return self.child(name)

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:  # credentials never show, should a caller have put some in the options
        return f"Location({self.url!r}, {redact(self.storage_options) if self.storage_options else None!r})"

    def exists(self) -> bool:
        return self.fs.exists(self.path)

    def read(self) -> bytes:
        """The whole file; FileNotFoundError when it does not exist."""
        return self.fs.cat_file(self.path)

    def read_or_none(self) -> bytes | None:
        """The whole file, or None when it does not exist."""
        try:
            return self.read()
        except FileNotFoundError:
            return None

    def write_atomic(self, data: bytes | str) -> None:
        """Make the file hold ``data`` all at once (parents created): readers and crashes see the old
        content or the new one, never a part."""
        atomic_put(self.fs, self.path, data.encode() if isinstance(data, str) else bytes(data))

    def read_json(self) -> Any:
        """Parsed JSON of the file; FileNotFoundError when it does not exist."""
        return json.loads(self.read())

    def write_json(self, obj: Any, *, indent: int | None = 2, sort_keys: bool = True) -> None:
        """``obj`` as JSON, atomically (non-finite floats written as null; other values via ``str``)."""
        self.write_atomic(dumps_json(obj, indent=indent, sort_keys=sort_keys, default=str).encode())

    def remove(self) -> None:
        """Delete the file if it exists."""
        try:
            self.fs.rm_file(self.path)
        except FileNotFoundError:
            pass

    def makedirs(self) -> None:
        """Create the directory (a no-op on object stores)."""
        self.fs.makedirs(self.path, exist_ok=True)

    def open(self, mode: str = "rb", **kwargs: Any) -> IO:
        """Open for reading (fsspec's file), or for writing: ``"wb"``/``"w"`` collect what is written and
        replace the file atomically on close (nothing is written when the ``with`` block raises)."""
        if mode in ("wb", "w", "wt"):
            return _AtomicWriter(self, text=mode != "wb", encoding=kwargs.get("encoding", "utf-8"))  # type: ignore[return-value]
        if any(c in mode for c in "wax+"):
            raise ValueError(f"Location.open: mode {mode!r} is not supported (writes are whole: 'wb' or 'w')")
        return self.fs.open(self.path, mode, **kwargs)
