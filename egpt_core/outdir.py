"""Output directories: egpt writes only where it may, and one run at a time.

Every ``--out`` (adapter and L6 runs, evaluations, comparisons, merged-drafter exports, and any
stage that writes a run directory) is claimed with :func:`claim_output` before anything is written:

* an absent or empty destination is claimed: a marker file :data:`MARKER` records what wrote it
  (``kind``) and for which inputs (``identity``, a fingerprint the caller chooses);
* a destination holding anything not written by egpt (no marker) is refused, naming the path and
  what is there. A user's folder, a checkpoint, a bucket root are never overwritten or deleted;
* a previous output of another kind is refused; a previous output of the same kind for other inputs
  is refused unless the caller passes ``replace=True`` (``--no-resume`` / ``--overwrite``), which
  replaces only files egpt wrote there;
* one run owns a directory at a time: the claim holds a lock (:data:`LOCK`, the store's commit lock
  with its dead-holder breaking) until it is released; a second run fails at once, naming the holder.
  A crashed holder's lock is broken at once on the same host (its process is gone) and after
  ``stale_s`` elsewhere (a live holder refreshes it every ``stale_s / 6``).

:func:`put_dir` (in :mod:`egpt_core.runfiles`) writes a whole staged directory into such a
destination and deletes only the files its marker lists from an earlier put.

The marker's content is deterministic (no timestamps), so directory fingerprints stay reproducible.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import fsspec

from egpt_core.errors import ConfigError
from egpt_core.fsio import Location, is_local
from egpt_core.store import manifest as mf
from egpt_core.store.retrying import with_retries

log = logging.getLogger(__name__)

MARKER = ".egpt-output"
LOCK = ".egpt-lock"
FORMAT = "egpt-output/1"
#: names egpt keeps in an output directory besides the outputs themselves
_OWN_NAMES = (MARKER, LOCK)
#: a run lock not refreshed for this long, held on another host, is taken to be a crashed run's
STALE_S = 600.0


class OutputDirError(ConfigError):
    """An output destination egpt may not write (someone else's files, another output, in use)."""


@dataclass
class Marker:
    """What :data:`MARKER` says about a directory."""

    kind: str
    identity: str | None = None
    files: list[str] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        doc = {"format": FORMAT, "kind": self.kind, "identity": self.identity, **self.extra}
        if self.files is not None:
            doc["files"] = sorted(set(self.files))
        return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()


def _root(where: str | Location, storage_options: dict | None) -> tuple[str, fsspec.AbstractFileSystem, str]:
    """(url, filesystem with retries, root path) of an output directory given as a Location or a URL."""
    loc = Location.of(where, storage_options)
    return loc.url, with_retries(loc.fs), loc.path


def _is_own(name: str) -> bool:
    return name in _OWN_NAMES or name.startswith(f"{LOCK}.") or name.startswith(f"{MARKER}.tmp")


def _entries(fs: fsspec.AbstractFileSystem, root: str) -> list[str] | None:
    """Names directly under ``root`` (None when nothing is there); a file at ``root`` -> OutputDirError."""
    try:
        fs.invalidate_cache(root)
    except Exception:  # backends without a listing cache
        pass
    try:
        if fs.isfile(root):
            raise OutputDirError(f"{fs.unstrip_protocol(root)} is a file, not a directory; choose a directory for --out")
        listing = fs.ls(root, detail=False)
    except FileNotFoundError:
        return None
    return [str(p).rstrip("/").rsplit("/", 1)[-1] for p in listing if str(p).rstrip("/") != root]


def read_marker(url: str | Location, storage_options: dict | None = None) -> Marker | None:
    """The marker of an egpt output directory, or None (no marker, or not egpt's format)."""
    url, fs, root = _root(url, storage_options)
    return _read_marker(fs, root)


def _read_marker(fs: fsspec.AbstractFileSystem, root: str) -> Marker | None:
    raw = mf.read_bytes(fs, f"{root}/{MARKER}")
    if raw is None:
        return None
    try:
        doc = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("kind"), str):
        return None
    files = doc.get("files")
    extra = {k: v for k, v in doc.items() if k not in ("format", "kind", "identity", "files")}
    return Marker(kind=doc["kind"], identity=doc.get("identity"),
                  files=[str(f) for f in files] if isinstance(files, list) else None, extra=extra)


def _write_marker(fs: fsspec.AbstractFileSystem, root: str, marker: Marker) -> None:
    mf.atomic_put(fs, f"{root}/{MARKER}", marker.to_bytes())


def _a(kind: str) -> str:
    return f"{'an' if kind[:1].lower() in 'aeiou' else 'a'} {kind}"


def _describe(names: list[str]) -> str:
    shown = ", ".join(sorted(names)[:5])
    return f"{len(names)} entr{'y' if len(names) == 1 else 'ies'}: {shown}{', ...' if len(names) > 5 else ''}"


def check_output(url: str | Location, kind: str, identity: str | None, storage_options: dict | None = None, *,
                 replace: bool = False, replace_hint: str = "--overwrite") -> Marker | None:
    """Refuse ``url`` as the output of a ``kind`` run for ``identity`` unless egpt may write there.

    Returns the existing marker (None for an absent or empty destination). Writes nothing.
    ``identity=None`` accepts any earlier output of the same kind (for cheap derived outputs).
    """
    url, fs, root = _root(url, storage_options)
    return _check(fs, root, url, kind, identity, replace, replace_hint)


def _check(fs, root: str, url: str, kind: str, identity: str | None, replace: bool, replace_hint: str) -> Marker | None:
    names = _entries(fs, root)
    marker = _read_marker(fs, root) if names is not None and MARKER in names else None
    foreign = [n for n in (names or []) if not _is_own(n)]
    if marker is None:
        if foreign:
            raise OutputDirError(
                f"{url} is not empty and was not written by egpt ({_describe(foreign)}); refusing to write "
                f"{_a(kind)} there (egpt never overwrites or deletes files it did not write): choose a new or empty "
                "directory")
        return None
    if marker.kind != kind:
        raise OutputDirError(f"{url} holds {_a(marker.kind)} written by egpt, not {_a(kind)}; choose another directory")
    if identity is not None and marker.identity not in (None, identity) and not replace:
        raise OutputDirError(
            f"{url} holds {_a(kind)} of a different configuration or inputs (identity {marker.identity}, this run "
            f"{identity}); choose another directory, or pass {replace_hint} to replace it")
    return marker


class RunLock(mf.StoreLock):
    """The store's lock object, held for a whole run in an output directory: no waiting (a second run
    fails at once), refreshed by a heartbeat so that only a crashed holder's lock goes stale."""

    lock_name = LOCK

    def __init__(self, fs: fsspec.AbstractFileSystem, root: str, url: str, kind: str, stale_s: float = STALE_S):
        super().__init__(fs, root, url, timeout_s=0.0, stale_s=stale_s)
        self.kind = kind
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def busy_error(self, holder: dict | None) -> Exception:
        h = holder or {}
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(h["time"])) if isinstance(h.get("time"), int | float) else "?"
        return OutputDirError(
            f"{self.store} is in use by another egpt run (pid {h.get('pid')} on host {h.get('host')}, lock "
            f"refreshed {since}); one run writes an output directory at a time: wait for it or choose another "
            f"directory. If no run is active, delete {self.store.rstrip('/')}/{LOCK}")

    def acquire(self) -> None:
        super().acquire()
        self._stop.clear()
        self._beat = threading.Thread(target=self._heartbeat, name=f"egpt-run-lock:{self.store}", daemon=True)
        self._beat.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.stale_s / 6):
            try:
                self.refresh()
            except Exception as exc:  # next beat tries again; a missed beat is harmless within stale_s
                log.warning("could not refresh the run lock %s: %s", self.path, exc)

    def refresh(self) -> None:
        """Rewrite the lock with the current time if we still hold it."""
        holder = self._holder()
        if holder is None or holder.get("token") != self.token:
            return
        mf.atomic_put(self.fs, self.path, json.dumps(dict(holder, time=time.time())).encode())

    def release(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
            self._beat = None
        super().release()


class OutputClaim:
    """A claimed output directory: holds its run lock until released (``with`` block end). A run that
    fails before writing anything leaves no trace: the marker (and a directory it created) is removed,
    so nothing blocks the corrected rerun."""

    def __init__(self, url: str, kind: str, identity: str | None, marker: Marker | None, lock: RunLock,
                 fs: fsspec.AbstractFileSystem, root: str, existed: bool):
        self.url, self.kind, self.identity = url, kind, identity
        self.previous = marker
        self._lock, self._fs, self._root, self._existed = lock, fs, root, existed

    def release(self, failed: bool = False) -> None:
        if self._lock is None:
            return
        lock, self._lock = self._lock, None
        empty = False
        try:
            if failed and self.previous is None:
                names = _entries(self._fs, self._root) or []
                if all(_is_own(n) for n in names):  # nothing but our marker/lock: undo the claim
                    try:
                        self._fs.rm_file(f"{self._root}/{MARKER}")
                    except FileNotFoundError:
                        pass
                    empty = True
        finally:
            lock.release()
        if empty and not self._existed and is_local(self.url):
            try:
                os.rmdir(self._root)
            except OSError:
                pass

    def __enter__(self) -> OutputClaim:
        return self

    def __exit__(self, exc_type, *exc: object) -> None:
        self.release(failed=exc_type is not None)


def claim_output(url: str | Location, kind: str, identity: str | None, storage_options: dict | None = None, *,
                 replace: bool = False, replace_hint: str = "--overwrite") -> OutputClaim:
    """Check ``url`` (see :func:`check_output`), take its run lock, check again under the lock and
    record ``kind``/``identity`` in its marker. Release the returned claim when the run ends (use it
    as a context manager: a run that fails before writing anything then leaves nothing behind)."""
    url, fs, root = _root(url, storage_options)
    existed = _entries(fs, root) is not None
    _check(fs, root, url, kind, identity, replace, replace_hint)  # refuse before writing anything
    run_lock = RunLock(fs, root, url, kind)
    if is_local(url):
        fs.makedirs(root, exist_ok=True)
    run_lock.acquire()
    try:
        marker = _check(fs, root, url, kind, identity, replace, replace_hint)
        if marker is None or marker.identity != identity:
            files = marker.files if marker is not None else None
            extra = marker.extra if marker is not None else {}
            _write_marker(fs, root, Marker(kind=kind, identity=identity, files=files, extra=extra))
    except BaseException:
        run_lock.release()
        raise
    return OutputClaim(url, kind, identity, marker, run_lock, fs, root, existed)


def record_files(url: str | Location, files: list[str], storage_options: dict | None = None, *, kind: str = "files") -> list[str]:
    """Set the marker's file list to ``files`` (a directory written whole by :func:`put_dir`); returns
    the files the previous list named that ``files`` does not (egpt's own stale files). A directory
    without a marker becomes a ``kind`` output."""
    url, fs, root = _root(url, storage_options)
    marker = _read_marker(fs, root) or Marker(kind=kind)
    old = set(marker.files or [])
    marker.files = sorted(set(files))
    _write_marker(fs, root, marker)
    return sorted(old - set(files))


def add_files(url: str | Location, files: list[str], storage_options: dict | None = None, *, kind: str = "files") -> None:
    """Add ``files`` to the marker's list before they are written (a crash mid-write leaves them
    recognised as egpt's)."""
    url, fs, root = _root(url, storage_options)
    marker = _read_marker(fs, root) or Marker(kind=kind)
    marker.files = sorted(set(marker.files or []) | set(files))
    _write_marker(fs, root, marker)
