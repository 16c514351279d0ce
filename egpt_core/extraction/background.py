"""Store writes of an extraction in one background thread, so shard commits and feature-cache files
are written while the next batches run through the models.

Semantics kept from the inline writes:

* one writer thread, first in first out: shards are committed in the order they were extracted,
  each by :meth:`StoreWriter.commit_shard` (files, then the manifest, under the store lock), so a
  crash at any moment leaves what an inline commit leaves: a manifest naming only complete files;
* bounded: before a shard is handed over, everything handed over before it has been written (at
  most one shard's rows wait in memory besides the one being extracted);
* an error of a background write is raised, as itself, in the extraction's thread at the next
  hand-over or at :meth:`StoreWrites.finish`: the run fails as if the write had been inline;
* :meth:`StoreWrites.close` (after an error of the extraction itself) still waits for the writes
  handed over: a shard extracted before the failure is committed, never dropped.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from egpt_core.store import StoreWriter
from egpt_core.store.writer import ShardInfo

log = logging.getLogger(__name__)


class StoreWrites:
    """Shard commits and feature-cache writes of one extraction, in a background thread (``threaded``
    False: inline, in the caller's thread). ``committed``: the shards committed so far (infos)."""

    def __init__(self, writer: StoreWriter, threaded: bool = True):
        self.writer = writer
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store-writer") if threaded else None
        self.pending: list[tuple[str, Future]] = []
        self.committed: list[ShardInfo] = []

    def _submit(self, kind: str, fn: Callable, *args) -> None:
        if self.pool is None:
            self._done(kind, fn(*args))
            return
        self.pending.append((kind, self.pool.submit(fn, *args)))

    def _done(self, kind: str, result) -> None:
        if kind == "shard" and result is not None:
            self.committed.append(result)

    def wait(self) -> None:
        """Wait for every write handed over; the first error is raised (as itself)."""
        pending, self.pending = self.pending, []
        error: BaseException | None = None
        for kind, fut in pending:
            try:
                self._done(kind, fut.result())
            except BaseException as exc:  # noqa: BLE001 - re-raised below, after the later writes ended
                if error is None:
                    error = exc
                else:
                    log.warning("store %s: a further background write failed too: %s", self.writer.url, exc)
        if error is not None:
            raise error

    def put_features(self, key: str, features: torch.Tensor) -> None:
        """Cache a scene's event features [F + S, D] (see :meth:`StoreWriter.put_features`)."""
        self._submit("features", self.writer.put_features, key, {"features": features.contiguous()})

    def commit_shard(self, records: Sequence[dict], drafter: Sequence, target: Sequence) -> None:
        """Hand one extracted shard over for committing, after the writes handed over before it."""
        self.wait()
        self._submit("shard", self.writer.commit_shard, records, drafter, target)

    def finish(self) -> list[ShardInfo]:
        """Wait for every write (errors raised) and stop the thread -> the shards committed."""
        try:
            self.wait()
        finally:
            self._shutdown()
        return self.committed

    def close(self) -> None:
        """After the extraction failed: let the writes handed over end (their errors are logged: the
        extraction's own error is the one raised), then stop the thread."""
        try:
            self.wait()
        except BaseException as exc:  # noqa: BLE001 - the caller is raising its own error
            log.warning("store %s: a background write failed while the extraction was failing: %s",
                        self.writer.url, exc)
        finally:
            self._shutdown()

    def _shutdown(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)
            self.pool = None
