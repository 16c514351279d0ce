"""Background read-ahead of shards (egpt_core.store.prefetch): order, bound, errors where they belong,
clean shutdown; used by iter_shards/iter_pairs (evaluation) and PairDataset (adapter training); and
a reader whose memory does not grow with the shards it has read."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from store_helpers import META, make_pairs

from egpt_core.errors import StoreError
from egpt_core.store import StoreReader, StoreWriter
from egpt_core.store import reader as reader_mod
from egpt_core.store.prefetch import ShardLoader, background


def _store(url: str, n_shards: int, per: int = 3) -> None:
    recs, dr, tg = make_pairs(n_shards * per)
    w = StoreWriter(url, META)
    for s in range(n_shards):
        w.commit_shard(recs[s * per:(s + 1) * per], dr[s * per:(s + 1) * per], tg[s * per:(s + 1) * per])


def _threads(prefix: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(prefix)]


def _wait(cond, timeout: float = 20.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


def test_background_keeps_order_and_stays_bounded():
    made, taken = [], []

    def items():
        for i in range(50):
            made.append(i)
            yield i

    for x in background(items, depth=3, name="t-bounded"):
        taken.append(x)
        time.sleep(0.002)
        # produced ahead: at most depth in the queue + one blocked in put()
        assert len(made) - len(taken) <= 3 + 1
    assert taken == list(range(50))


def test_background_raises_where_the_error_happened_and_stops():
    def items():
        yield 1
        yield 2
        raise ValueError("shard 3 is broken")

    got = []
    with pytest.raises(ValueError, match="shard 3 is broken"):
        for x in background(items, depth=2, name="t-raise"):
            got.append(x)
    assert got == [1, 2]
    assert _wait(lambda: not _threads("t-raise"))


def test_background_closed_early_stops_the_producer():
    finished = threading.Event()

    def items():
        try:
            yield from range(10_000)
        finally:
            finished.set()

    it = background(items, depth=2, name="t-close")
    assert next(it) == 0
    it.close()
    assert finished.is_set()  # close() joined the producer, which ran its cleanup
    assert not _threads("t-close")


def test_iter_shards_reads_ahead_in_a_thread(tmp_path, monkeypatch):
    url = str(tmp_path / "s")
    _store(url, 4)
    loads: list[tuple[str, str]] = []
    second_loaded = threading.Event()
    orig = StoreReader._load_tensors

    def spy(self, sh):
        out = orig(self, sh)
        loads.append((sh["name"], threading.current_thread().name))
        if len(loads) == 2:
            second_loaded.set()
        return out

    monkeypatch.setattr(StoreReader, "_load_tensors", spy)
    r = StoreReader(url)
    it = r.iter_shards()
    first = next(it)
    # while the consumer still holds shard 0, shard 1 is read without the consumer asking
    assert second_loaded.wait(20), loads
    assert [n for n, _ in loads[:2]] == [sh["name"] for sh in r.shards[:2]] and first.name == r.shards[0]["name"]
    assert all(th != threading.current_thread().name for _, th in loads)
    rest = [s.name for s in it]
    assert [first.name] + rest == [sh["name"] for sh in r.shards]
    assert not _threads(f"prefetch {url}")


def test_corrupt_shard_raises_at_its_turn_through_prefetch(tmp_path):
    url = str(tmp_path / "s")
    _store(url, 4)
    r = StoreReader(url)
    bad = Path(url) / r.shards[2]["files"]["tensors"]
    data = bytearray(bad.read_bytes())
    data[-3] ^= 0xFF
    bad.write_bytes(bytes(data))
    seen = []
    with pytest.raises(StoreError, match=r.shards[2]["name"]):
        for p in StoreReader(url).iter_pairs():
            seen.append(p.pair_id)
    assert len(seen) == 6  # the two good shards before it, nothing after
    assert _wait(lambda: not _threads(f"prefetch {url}"))


def test_pair_dataset_reads_the_next_shard_ahead(tmp_path, monkeypatch):
    url = str(tmp_path / "s")
    _store(url, 4)
    threads: dict[int, str] = {}
    ahead = threading.Event()
    orig = reader_mod.PairDataset._load

    def spy(self, si):
        out = orig(self, si)
        threads[si] = threading.current_thread().name
        if si == 1:
            ahead.set()
        return out

    monkeypatch.setattr(reader_mod.PairDataset, "_load", spy)
    ds = StoreReader(url).dataset(cache_shards=2)
    ds[0]  # shard 0: loaded on demand
    assert ahead.wait(20)  # shard 1 follows in the background before anyone asks for it
    assert threads[0] == threading.current_thread().name and threads[1].startswith("shard-prefetch")
    items = [ds[i] for i in range(len(ds))]
    assert [it["pair_id"] for it in items] == ds.pair_ids
    assert len(ds._cache) <= 2
    ds.close()


def test_pair_dataset_prefetch_error_raised_by_the_item_that_needs_it(tmp_path):
    url = str(tmp_path / "s")
    _store(url, 3)
    r = StoreReader(url)
    bad = Path(url) / r.shards[1]["files"]["tensors"]
    data = bytearray(bad.read_bytes())
    data[-3] ^= 0xFF
    bad.write_bytes(bytes(data))
    ds = StoreReader(url).dataset(cache_shards=3)
    for i in range(3):
        ds[i]  # shard 0 fine (shard 1 is being read ahead meanwhile)
    with pytest.raises(StoreError, match=r.shards[1]["name"]):
        ds[3]
    ds[6]  # shard 2 still readable
    ds.close()


def test_shard_loader_bounded_and_closes():
    started = []
    gate = threading.Event()

    def load(i):
        started.append(i)
        gate.wait(10)
        return i * 10

    ld = ShardLoader(load, depth=2)
    for i in range(5):
        ld.request(i)
    assert ld.pending(0) and ld.pending(1) and not ld.pending(2)  # at most depth pending
    gate.set()
    assert ld.get(1) == 10 and ld.get(3) == 30  # pending -> its result; not pending -> inline
    ld.close()
    assert sorted(started) == [0, 1, 3]


def test_reader_keeps_a_bounded_number_of_pairs_tables(tmp_path):
    url = str(tmp_path / "s")
    n = reader_mod.TABLE_CACHE + 8
    _store(url, n, per=1)
    r = StoreReader(url)
    assert len(list(r.iter_pairs())) == n
    assert len(r.pair_ids()) == n and r.get(r.pair_ids()[0]).pair_id == r.pair_ids()[0]
    assert len(r._tables) <= reader_mod.TABLE_CACHE


_FORKED: dict = {}


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs fork")
def test_pair_dataset_in_a_forked_worker_reads_without_the_parents_thread(tmp_path):
    import multiprocessing as mp

    url = str(tmp_path / "s")
    _store(url, 3)
    ds = StoreReader(url).dataset(cache_shards=2)
    ds[0]  # the parent's read-ahead thread exists now
    _FORKED["ds"] = ds  # inherited by fork, not pickled (as a fork-started DataLoader worker's dataset)
    with mp.get_context("fork").Pool(1) as pool:
        got = pool.apply_async(_read_all_forked).get(timeout=120)  # the parent's thread is not in the child
    assert got == ds.pair_ids
    ds.close()


def _read_all_forked() -> list[str]:
    ds = _FORKED["ds"]
    ds._cache.clear()
    return [ds[i]["pair_id"] for i in range(len(ds))]


def test_pair_dataset_pickles_for_spawned_workers(tmp_path):
    import pickle

    url = str(tmp_path / "s")
    _store(url, 3)
    ds = StoreReader(url).dataset(cache_shards=2)
    ds[0]
    copy = pickle.loads(pickle.dumps(ds))
    assert [copy[i]["pair_id"] for i in range(len(copy))] == ds.pair_ids
    ds.close()
    copy.close()
