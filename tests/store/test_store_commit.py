"""Commit protocol: atomicity, resume, concurrent writers, compatibility, locks, garbage collection."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time

import pytest
from store_helpers import META, make_pairs

from egpt_core.errors import ConfigError, StoreError
from egpt_core.store import StoreReader, StoreWriter, shard_name


class Crash(Exception):
    pass


def _ids(recs):
    return [r["pair_id"] for r in recs]


def test_crash_between_shard_files_and_manifest(tmp_path, monkeypatch):
    url = str(tmp_path / "store")
    recs, d, t = make_pairs(6)
    w = StoreWriter(url, META)
    first = w.commit_shard(recs[:3], d[:3], t[:3])

    def crash(name):
        raise Crash(name)

    monkeypatch.setattr(w, "_before_manifest", crash)
    with pytest.raises(Crash):
        w.commit_shard(recs[3:], d[3:], t[3:])
    name = shard_name(_ids(recs[3:]))
    orphan = tmp_path / "store" / "tensors" / f"shard-{name}.safetensors"
    assert orphan.exists() and (tmp_path / "store" / "pairs" / f"shard-{name}.parquet").exists()
    assert not (tmp_path / "store" / "_lock").exists()  # released on the way out

    r = StoreReader(url)  # readers see only the committed shard; the orphan is invisible
    assert [s["name"] for s in r.shards] == [first.name]
    assert r.pair_ids() == _ids(recs[:3])
    assert r.verify()["problems"] == []
    assert len(list(r.iter_pairs())) == 3

    w2 = StoreWriter(url, META)  # the rerun after the crash
    assert w2.committed_pair_ids() == set(_ids(recs[:3]))
    todo = [i for i, x in enumerate(recs) if x["pair_id"] not in w2.committed_pair_ids()]
    redo = w2.commit_shard([recs[i] for i in todo], [d[i] for i in todo], [t[i] for i in todo])
    assert redo.name == name  # same pairs -> same name: the orphan was replaced, not duplicated
    r.refresh()
    assert r.pair_ids() == _ids(recs)
    assert r.verify()["problems"] == []
    assert sorted(os.listdir(tmp_path / "store" / "tensors")) == sorted(
        [f"shard-{first.name}.safetensors", f"shard-{name}.safetensors"])
    # idempotent rerun: nothing new to commit
    assert w2.commit_shard(recs, d, t) is None


def test_resume_reads_only_manifest_and_pair_ids(tmp_path):
    url = str(tmp_path / "store")
    recs, d, t = make_pairs(5)
    recs[4] = {"pair_id": recs[4]["pair_id"], "status": "failed", "reason": "truncated .npy"}
    w = StoreWriter(url, META)
    w.commit_shard(recs[:2], d[:2], t[:2])
    w.commit_shard(recs[2:], d[2:4] + [None], t[2:4] + [None])
    shutil.rmtree(tmp_path / "store" / "tensors")  # proves tensors are never read
    w2 = StoreWriter(url, META)
    assert w2.committed_pair_ids() == set(_ids(recs))
    assert w2.committed_pair_ids(status="failed") == {recs[4]["pair_id"]}
    assert StoreWriter(str(tmp_path / "fresh"), META).committed_pair_ids() == set()


@pytest.mark.parametrize("where", ["local", "memory"])
def test_second_writer_with_overlapping_pairs_adds_no_duplicates(tmp_path, mem_url, where):
    url = str(tmp_path / "store") if where == "local" else mem_url
    recs, d, t = make_pairs(10)
    w1, w2 = StoreWriter(url, META), StoreWriter(url, META)
    a = w1.commit_shard(recs[0:5], d[0:5], t[0:5])
    b = w2.commit_shard(recs[3:8], d[3:8], t[3:8])  # w2 has not seen w1's shard: 3, 4 are dropped
    assert a.pairs == 5 and b.pairs == 3 and b.name == shard_name(_ids(recs[5:8]))
    assert w1.commit_shard(recs[6:10], d[6:10], t[6:10]).pairs == 2
    assert w2.commit_shard(recs[0:2], d[0:2], t[0:2]) is None
    r = StoreReader(url)
    ids = r.pair_ids(status=None)
    assert sorted(ids) == _ids(recs) and len(ids) == len(set(ids))
    assert r.verify()["problems"] == []
    got = {p.pair_id: p for p in r.iter_pairs()}
    for x, dd in zip(recs, d):
        assert got[x["pair_id"]].drafter.float().sub(dd).abs().max() < 0.05
    # no orphan of the rewritten shard is left behind
    files = r.fs.find(r.root)
    assert not [f for f in files if shard_name(_ids(recs[3:8])) in f]
    assert r.counts["ok"] == 10 and r.manifest["totals"]["pairs"] == 10


def test_racing_writer_threads(tmp_path):
    url = str(tmp_path / "store")
    recs, d, t = make_pairs(24)
    errors = []

    def work(offset):
        try:
            w = StoreWriter(url, META)
            for k in range(6):
                idx = [(offset + k * 4 + j) % 24 for j in range(6)]
                w.commit_shard([recs[i] for i in idx], [d[i] for i in idx], [t[i] for i in idx])
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(o,)) for o in (0, 2, 13)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    r = StoreReader(url)
    ids = r.pair_ids()
    assert sorted(ids) == _ids(recs) and len(ids) == len(set(ids))
    assert r.verify()["problems"] == []


def test_incompatible_meta_is_refused(mem_url):
    StoreWriter(mem_url, META)
    for field, value in [("hidden_size", 32), ("dtype", "float16"), ("mode", "independent"),
                         ("position_convention", "last T positions"), ("compat_key", "other-models")]:
        with pytest.raises(ConfigError) as e:
            StoreWriter(mem_url, {**META, field: value})
        msg = str(e.value)
        assert repr(field) in msg and repr(value) in msg
    assert "'shared_prefix'" in str(pytest.raises(ConfigError, StoreWriter, mem_url, {**META, "mode": "retf"}).value)
    # fields a writer does not give are inherited; non-defining fields may differ
    w = StoreWriter(mem_url, {"dataset_fingerprint": "new"})
    assert w.hidden_size == META["hidden_size"] and w.meta["mode"] == "shared_prefix"
    recs, d, t = make_pairs(2)
    assert w.commit_shard(recs, d, t).pairs == 2
    assert StoreReader(mem_url).meta["dataset_fingerprint"] == "new"  # latest writer's non-defining meta
    assert StoreWriter(mem_url, {}).committed_pair_ids() == set(_ids(recs))
    with pytest.raises(ConfigError, match="hidden_size"):
        StoreWriter(mem_url + "-new", {"dtype": "bfloat16"})
    with pytest.raises(ConfigError, match="dtype"):
        StoreWriter(mem_url + "-new2", {**META, "dtype": "int8"})


def test_locks_stale_and_busy(tmp_path):
    url = str(tmp_path / "store")
    recs, d, t = make_pairs(4)
    w = StoreWriter(url, META, lock_timeout_s=0.3, stale_lock_s=60)
    lock = tmp_path / "store" / "_lock"
    lock.write_text(json.dumps({"token": "other", "host": "h", "pid": 1, "time": time.time()}))
    with pytest.raises(StoreError, match="could not acquire"):
        w.commit_shard(recs[:2], d[:2], t[:2])
    assert not list((tmp_path / "store" / "tensors").glob("*.tmp-*"))  # staged files cleaned up
    # a lock left by a crashed writer long ago is broken
    lock.write_text(json.dumps({"token": "dead", "host": "h", "pid": 1, "time": time.time() - 3600}))
    assert w.commit_shard(recs[:2], d[:2], t[:2]).pairs == 2
    # an empty lock file (crash between create and write) ages by mtime
    lock.write_text("")
    old = time.time() - 3600
    os.utime(lock, (old, old))
    assert w.commit_shard(recs[2:], d[2:], t[2:]).pairs == 2
    assert not lock.exists()


def test_gc_removes_orphans_only(tmp_path, monkeypatch):
    url = str(tmp_path / "store")
    recs, d, t = make_pairs(6)
    w = StoreWriter(url, META)
    keep = w.commit_shard(recs[:3], d[:3], t[:3])
    monkeypatch.setattr(w, "_before_manifest", lambda name: (_ for _ in ()).throw(Crash()))
    with pytest.raises(Crash):
        w.commit_shard(recs[3:], d[3:], t[3:])
    root = tmp_path / "store"
    young = root / "tensors" / "shard-abc.safetensors.tmp-123"
    old = root / "pairs" / "shard-def.parquet.tmp-456"
    young.write_bytes(b"x")
    old.write_bytes(b"x")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    w.put_features("feat1", make_pairs(1)[1][0])
    orphan = shard_name(_ids(recs[3:]))
    assert set(w.gc(dry_run=True)) == {f"pairs/shard-{orphan}.parquet", f"tensors/shard-{orphan}.safetensors",
                                       "pairs/shard-def.parquet.tmp-456"}
    removed = w.gc()
    assert len(removed) == 3 and young.exists() and not old.exists()
    assert w.get_features("feat1") is not None
    r = StoreReader(url)
    assert [s["name"] for s in r.shards] == [keep.name] and r.verify()["problems"] == []


def _proc_writer(url, offset, q):
    try:
        recs, d, t = make_pairs(24)
        w = StoreWriter(url, META)
        for k in range(6):
            idx = [(offset + k * 4 + j) % 24 for j in range(6)]
            w.commit_shard([recs[i] for i in idx], [d[i] for i in idx], [t[i] for i in idx])
        q.put(None)
    except Exception as exc:  # pragma: no cover - reported to the parent
        q.put(repr(exc))


def test_racing_writer_processes(tmp_path):
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    url = str(tmp_path / "store")
    q = ctx.Queue()
    procs = [ctx.Process(target=_proc_writer, args=(url, o, q)) for o in (0, 5, 11)]
    for p in procs:
        p.start()
    results = [q.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert results == [None, None, None]
    r = StoreReader(url)
    ids = r.pair_ids()
    assert sorted(ids) == [f"p{i:04d}" for i in range(24)] and len(ids) == len(set(ids))
    assert r.verify()["problems"] == []
    assert not list((tmp_path / "store").rglob("*.tmp-*")) and not (tmp_path / "store" / "_lock").exists()
