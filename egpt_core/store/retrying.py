"""Store-level retries of idempotent storage requests.

A transient fault of an object store (a reset connection, a 503, a timeout) used to fail the whole
task, and the task retry reloaded the models (minutes for 7B checkpoints) to redo one request. The
store's readers and writers now see their filesystem through :class:`RetryingFileSystem`: each
whole-object GET (``cat_file``, also byte ranges), whole-object PUT (``pipe_file``), listing,
``info``/``exists`` and delete is retried a few times with a short back-off, so a transient fault
costs one more request. They are safe to repeat: a GET reads the same bytes, a PUT writes the same
whole object (shard names are content hashes; the manifest is rewritten under the commit lock), a
delete of what is already gone is done. The commit lock's create-if-absent PUT is retried too: a
retry of a create that landed but lost its answer sees "exists", and the lock recognises its own
token (manifest.StoreLock).

Not retried: missing files, permission errors, and anything that is not an ``OSError`` (a corrupt
shard is a StoreError, never retried). Faults that outlast the attempts propagate as themselves, so
the task-level retry still sees them. Local and in-memory filesystems are used directly.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem
from fsspec.implementations.memory import MemoryFileSystem

log = logging.getLogger(__name__)

T = TypeVar("T")

#: attempts per request (1 = no store-level retries); back-off 0.05 s, 0.2 s, 0.8 s between them
ATTEMPTS = 4
BACKOFF_S = 0.05

#: errors that repeating the request cannot fix
_PERMANENT = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)

#: requests absorbed by a retry in this process (for logs, tests and benchmarks)
retried: dict[str, int] = {}


def call_with_retries(op: str, path: str, fn: Callable[[], T]) -> T:
    """``fn()``, repeated on a transient ``OSError`` up to :data:`ATTEMPTS` times in all."""
    attempts = max(1, int(ATTEMPTS))
    for i in range(attempts):
        try:
            return fn()
        except _PERMANENT:
            raise
        except OSError as exc:
            if i == attempts - 1:
                raise
            retried[op] = retried.get(op, 0) + 1
            log.info("storage %s %s failed (%s); retry %d of %d", op, path, exc, i + 1, attempts - 1)
            time.sleep(BACKOFF_S * 4**i)
    raise AssertionError("unreachable")


class RetryingFileSystem:
    """A filesystem whose idempotent requests are retried (:func:`call_with_retries`); everything
    else is the wrapped filesystem's own."""

    def __init__(self, fs: fsspec.AbstractFileSystem):
        self._fs = fs

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fs, name)

    @property
    def wrapped(self) -> fsspec.AbstractFileSystem:
        return self._fs

    def cat_file(self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any) -> bytes:
        return call_with_retries("GET", path, lambda: self._fs.cat_file(path, start=start, end=end, **kwargs))

    def pipe_file(self, path: str, value: bytes, mode: str = "overwrite", **kwargs: Any) -> None:
        if mode == "overwrite":
            return call_with_retries("PUT", path, lambda: self._fs.pipe_file(path, value, **kwargs))
        return call_with_retries("PUT", path, lambda: self._fs.pipe_file(path, value, mode=mode, **kwargs))

    def info(self, path: str, **kwargs: Any) -> dict:
        return call_with_retries("HEAD", path, lambda: self._fs.info(path, **kwargs))

    def exists(self, path: str, **kwargs: Any) -> bool:
        # fsspec's own exists() answers False on any error: a transient fault is not "missing"
        try:
            self.info(path, **kwargs)
            return True
        except FileNotFoundError:
            return False

    def ls(self, path: str, detail: bool = True, **kwargs: Any):
        return call_with_retries("LIST", path, lambda: self._fs.ls(path, detail=detail, **kwargs))

    def modified(self, path: str):
        return call_with_retries("HEAD", path, lambda: self._fs.modified(path))

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        return call_with_retries("MKDIR", path, lambda: self._fs.makedirs(path, exist_ok=exist_ok))

    def rm_file(self, path: str) -> None:
        state = {"tried": False}

        def rm() -> None:
            try:
                self._fs.rm_file(path)
            except FileNotFoundError:
                if not state["tried"]:
                    raise
                # an earlier attempt removed it and lost its answer: done
            finally:
                state["tried"] = True

        call_with_retries("DELETE", path, rm)


def with_retries(fs: fsspec.AbstractFileSystem) -> fsspec.AbstractFileSystem:
    """``fs`` seen through :class:`RetryingFileSystem` (local and in-memory filesystems as they are)."""
    if isinstance(fs, LocalFileSystem | MemoryFileSystem | RetryingFileSystem):
        return fs
    return RetryingFileSystem(fs)  # type: ignore[return-value]
