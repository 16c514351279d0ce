"""Background read-ahead for store readers: the next shards are fetched, verified and decoded in a
thread while the consumer works on the current one.

:func:`background` runs any iterator in a daemon thread feeding a bounded queue (``depth`` items
ahead, so memory stays bounded by ``depth + 1`` items); an exception raised by the producer is
re-raised in the consumer at the position where it happened; closing the consumer (``break``, an
error, garbage collection) stops the producer and joins its thread.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from typing import TypeVar

T = TypeVar("T")

_DONE = object()
_JOIN_TIMEOUT_S = 30.0


class _Raised:
    def __init__(self, exc: BaseException):
        self.exc = exc


def background(items: Iterable[T] | Callable[[], Iterable[T]], depth: int = 2,
               name: str = "store-prefetch") -> Iterator[T]:
    """Yield what ``items`` yields, produced up to ``depth`` items ahead in a background thread.

    ``items`` may be an iterable or a zero-argument callable returning one (then it is created in the
    thread too). ``depth`` <= 0 iterates inline (no thread)."""
    if depth <= 0:
        yield from (items() if callable(items) else items)
        return
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(x) -> bool:
        while not stop.is_set():
            try:
                q.put(x, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            it = items() if callable(items) else items
            for x in it:
                if not put(x):
                    break
            else:
                put(_DONE)
                return
            close = getattr(it, "close", None)
            if close is not None:
                close()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer
            put(_Raised(exc))

    th = threading.Thread(target=produce, name=name, daemon=True)
    th.start()
    try:
        while True:
            x = q.get()
            if x is _DONE:
                return
            if isinstance(x, _Raised):
                raise x.exc
            yield x
    finally:
        stop.set()
        while True:  # unblock a producer waiting on a full queue, drop what it made
            try:
                q.get_nowait()
            except queue.Empty:
                break
        th.join(timeout=_JOIN_TIMEOUT_S)


class ShardLoader:
    """Loads shards by index in one background thread, a bounded number ahead.

    ``load(i)`` returns a shard's tensors; :meth:`request` schedules loads (ignored when ``depth``
    loads are already pending or the shard is pending), :meth:`get` returns a shard, waiting for a
    pending load or loading inline, and re-raises a load's exception. :meth:`close` cancels what has
    not started and joins the thread.
    """

    def __init__(self, load: Callable[[int], T], depth: int = 2):
        from concurrent.futures import ThreadPoolExecutor

        self._load = load
        self.depth = max(0, int(depth))
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-prefetch") if self.depth else None
        self._pending: dict[int, Future] = {}
        self._lock = threading.Lock()

    def request(self, shard: int) -> None:
        if self._pool is None:
            return
        with self._lock:
            if shard in self._pending or len(self._pending) >= self.depth:
                return
            self._pending[shard] = self._pool.submit(self._load, shard)

    def pending(self, shard: int) -> bool:
        with self._lock:
            return shard in self._pending

    def get(self, shard: int) -> T:
        with self._lock:
            fut = self._pending.pop(shard, None)
        if fut is None:
            return self._load(shard)
        return fut.result()

    def close(self) -> None:
        with self._lock:
            futs, self._pending = list(self._pending.values()), {}
        for f in futs:
            f.cancel()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
