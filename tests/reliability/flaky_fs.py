"""``flaky://``: the local disk seen as an object store that fails a seeded fraction of operations.

A URL ``flaky:///abs/path`` names ``/abs/path`` on the local disk. The filesystem is deliberately NOT a
``LocalFileSystem`` subclass, so the store treats it like s3:// or gs://: whole-object PUTs
(``pipe_file``), a create-if-absent lock (``pipe_file(mode="create")``, atomic here through
``os.link``), reads through ``cat_file`` / ``open`` / ``info``. Like a real object store a PUT is atomic
(temp file + ``os.replace``): readers see the old object or the new one, never a part.

Faults are *transient*: each eligible call fails independently with probability ``rate`` (seeded
``random.Random``), before it has any effect, with :class:`InjectedFault` (a ``ConnectionError``, so
an ``OSError`` that is neither ``FileNotFoundError`` nor ``FileExistsError``). The same operation on
the same path never fails more than ``max_consecutive`` times in a row, so a retried operation
always succeeds eventually. With ``lost_ack`` a share of the write faults happen *after* the write
took effect (the PUT landed, its answer was lost), as on a real network. Configuration is module state (not URL, not storage options), so every
filesystem instance in the process shares one seeded stream and one set of counters::

    import flaky_fs
    with flaky_fs.faults(rate=0.05, seed=1) as plan:
        ...  # use flaky:///tmp/x/store
    plan.injected, plan.by_op

Import this module to register the protocol (``fsspec.register_implementation``).
"""

from __future__ import annotations

import contextlib
import io
import os
import random
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import fsspec
from fsspec.implementations.local import LocalFileSystem
from fsspec.spec import AbstractFileSystem

PROTOCOL = "flaky"
MESSAGE = "injected transient storage fault"

READ_OPS = frozenset({"cat_file", "open_read", "read", "info", "exists", "ls", "modified"})
WRITE_OPS = frozenset({"pipe_file", "open_write", "rm_file", "makedirs"})
ALL_OPS = READ_OPS | WRITE_OPS


class InjectedFault(ConnectionError):
    """A transient storage error injected by flaky://."""

    after_effect = False


@dataclass
class FaultPlan:
    """Fault rate, seed, eligible operations and counters (shared by every flaky:// instance)."""

    rate: float = 0.0
    seed: int = 0
    ops: frozenset[str] = ALL_OPS
    max_consecutive: int = 2
    match: str | None = None  # only paths containing this substring are eligible
    fail_calls: frozenset[int] = frozenset()  # eligible call numbers (1-based) that always fail
    lost_ack: float = 0.0  # share of write faults injected after the write took effect
    calls: Counter = field(default_factory=Counter)   # eligible calls, by op
    by_op: Counter = field(default_factory=Counter)   # injected faults, by op
    log: list[tuple[str, str]] = field(default_factory=list)  # (op, path) of each fault
    _rng: random.Random = field(default_factory=random.Random)
    _streak: dict[tuple[str, str], int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self._rng.seed(self.seed)

    @property
    def injected(self) -> int:
        return sum(self.by_op.values())

    def check(self, op: str, path: str) -> None:
        """Raise InjectedFault for this call with probability ``rate`` (never more than
        ``max_consecutive`` times in a row for the same op and path)."""
        fault = self.draw(op, path)
        if fault is not None:
            raise fault

    def draw(self, op: str, path: str) -> InjectedFault | None:
        """The fault for this call, or None. ``fault.after_effect``: a write that lands but whose
        answer is lost (the caller sees an error for a PUT that happened)."""
        if op not in self.ops or (self.match is not None and self.match not in str(path)):
            return None
        with self._lock:
            self.calls[op] += 1
            key = (op, str(path))
            forced = sum(self.calls.values()) in self.fail_calls
            if not forced and (self.rate <= 0 or self._rng.random() >= self.rate
                               or self._streak.get(key, 0) >= self.max_consecutive):
                self._streak.pop(key, None)
                return None
            self._streak[key] = self._streak.get(key, 0) + 1
            after = op in WRITE_OPS and self.lost_ack > 0 and self._rng.random() < self.lost_ack
            self.by_op[f"{op} (lost ack)" if after else op] += 1
            self.log.append((op, str(path)))
            n = self.injected
        fault = InjectedFault(f"{MESSAGE} #{n} ({op} {path}{', after it took effect' if after else ''})")
        fault.after_effect = after
        return fault

    def summary(self) -> str:
        ops = ", ".join(f"{op} {n}" for op, n in sorted(self.by_op.items())) or "none"
        return f"{self.injected} faults injected in {sum(self.calls.values())} storage calls ({ops})"


PLAN = FaultPlan()


def configure(rate: float = 0.0, seed: int = 0, ops: frozenset[str] | set[str] | None = None,
              max_consecutive: int = 2, match: str | None = None, fail_calls=(), lost_ack: float = 0.0) -> FaultPlan:
    """Replace the module's fault plan (fresh counters); returns it."""
    global PLAN
    PLAN = FaultPlan(rate=rate, seed=seed, ops=frozenset(ops) if ops is not None else ALL_OPS,
                     max_consecutive=max_consecutive, match=match, fail_calls=frozenset(fail_calls),
                     lost_ack=lost_ack)
    return PLAN


@contextlib.contextmanager
def faults(rate: float = 0.0, seed: int = 0, ops: frozenset[str] | set[str] | None = None,
           max_consecutive: int = 2, match: str | None = None, fail_calls=(),
           lost_ack: float = 0.0) -> Iterator[FaultPlan]:
    """Inject faults inside the block; afterwards flaky:// behaves (counters stay readable)."""
    plan = configure(rate, seed, ops, max_consecutive, match, fail_calls, lost_ack)
    try:
        yield plan
    finally:
        plan.rate, plan.fail_calls = 0.0, frozenset()


def url(path: str | os.PathLike) -> str:
    """flaky:// URL of a local absolute path."""
    return f"{PROTOCOL}://{os.path.abspath(os.fspath(path))}"


class _FlakyReader(io.RawIOBase):
    """A read-only file whose ``read``/``readinto`` calls may fail (the connection drops mid-GET)."""

    def __init__(self, f, path: str):
        self._f, self._path = f, path

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        PLAN.check("read", self._path)
        return self._f.readinto(b)

    def read(self, size: int = -1) -> bytes:
        PLAN.check("read", self._path)
        return self._f.read(size)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._f.seek(offset, whence)

    def tell(self) -> int:
        return self._f.tell()

    @property
    def size(self) -> int:
        return os.fstat(self._f.fileno()).st_size

    def close(self) -> None:
        self._f.close()
        super().close()


class _PutOnClose(io.BytesIO):
    """Write mode: buffered, then one atomic whole-object PUT on close (object-store semantics)."""

    def __init__(self, fs: FlakyFileSystem, path: str):
        super().__init__()
        self._fs, self._path = fs, path

    def close(self) -> None:
        if not self.closed:
            data = self.getvalue()
            super().close()
            self._fs._put(self._path, data)


class FlakyFileSystem(AbstractFileSystem):
    """Local disk behind an object-store facade that injects transient faults (see module doc)."""

    protocol = (PROTOCOL,)
    root_marker = "/"
    cachable = False

    def __init__(self, **storage_options):
        super().__init__(**storage_options)
        self.local = LocalFileSystem()

    @classmethod
    def _strip_protocol(cls, path):
        path = str(path)
        if path.startswith(f"{PROTOCOL}://"):
            path = path[len(PROTOCOL) + 3:]
        path = "/" + path.lstrip("/")
        return path.rstrip("/") or "/"

    def unstrip_protocol(self, name: str) -> str:
        return f"{PROTOCOL}://{self._strip_protocol(name)}"

    # -- writes -----------------------------------------------------------------------------------
    def _put(self, path: str, data: bytes, create: bool = False) -> None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{os.path.dirname(path)}/.flaky-put-{uuid.uuid4().hex}"
        with open(tmp, "wb") as f:
            f.write(data)
        try:
            if create:
                os.link(tmp, path)  # atomic create-if-absent (FileExistsError if present)
            else:
                os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    def pipe_file(self, path, value, mode="overwrite", **kwargs):
        path = self._strip_protocol(path)
        fault = PLAN.draw("pipe_file", path)
        if fault is not None and not fault.after_effect:
            raise fault
        self._put(path, bytes(value), create=(mode == "create"))
        if fault is not None:
            raise fault

    def rm_file(self, path):
        path = self._strip_protocol(path)
        fault = PLAN.draw("rm_file", path)
        if fault is not None and not fault.after_effect:
            raise fault
        self.local.rm_file(path)
        if fault is not None:
            raise fault

    def _rm(self, path):
        self.rm_file(path)

    def makedirs(self, path, exist_ok=False):
        path = self._strip_protocol(path)
        fault = PLAN.draw("makedirs", path)
        if fault is not None and not fault.after_effect:
            raise fault
        self.local.makedirs(path, exist_ok=exist_ok)
        if fault is not None:
            raise fault

    def mkdir(self, path, create_parents=True, **kwargs):
        self.makedirs(path, exist_ok=True)

    # -- reads ------------------------------------------------------------------------------------
    def cat_file(self, path, start=None, end=None, **kwargs):
        path = self._strip_protocol(path)
        PLAN.check("cat_file", path)
        return self.local.cat_file(path, start=start, end=end)

    def info(self, path, **kwargs):
        path = self._strip_protocol(path)
        PLAN.check("info", path)
        return self.local.info(path)

    def exists(self, path, **kwargs):
        path = self._strip_protocol(path)
        PLAN.check("exists", path)  # a failed HEAD raises; it does not answer "absent"
        return self.local.exists(path)

    def ls(self, path, detail=True, **kwargs):
        path = self._strip_protocol(path)
        PLAN.check("ls", path)
        return self.local.ls(path, detail=detail)

    def modified(self, path):
        path = self._strip_protocol(path)
        PLAN.check("modified", path)
        return self.local.modified(path)

    def invalidate_cache(self, path=None):
        pass

    def _open(self, path, mode="rb", block_size=None, autocommit=True, cache_options=None, **kwargs):
        path = self._strip_protocol(path)
        if "r" in mode:
            PLAN.check("open_read", path)
            return io.BufferedReader(_FlakyReader(open(path, "rb"), path))
        PLAN.check("open_write", path)
        return _PutOnClose(self, path)


fsspec.register_implementation(PROTOCOL, FlakyFileSystem, clobber=True)
