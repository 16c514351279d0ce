"""Stores written before per-pair digests and input fingerprints stay readable and extendable.

``data/store_0ff812c`` was written by the store code of commit 0ff812c (``data/make_store_0ff812c.py``):
no ``input_fingerprint`` column, no per-pair row digests, no header digest, no model/config
fingerprints in its meta.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from egpt_core.cli import main as egpt_main
from egpt_core.errors import ConfigError, StoreError
from egpt_core.store import StoreReader, StoreWriter

OLD = Path(__file__).parent / "data" / "store_0ff812c"
D = 8


@pytest.fixture
def old_store(tmp_path) -> Path:
    dst = tmp_path / "old"
    shutil.copytree(OLD, dst)
    return dst


def test_the_fixture_is_an_old_store():
    m = json.loads((OLD / "manifest.json").read_text())
    assert all("header" not in sh["sha256"] for sh in m["shards"]) and "dataset_fingerprint" not in m
    assert "model_fingerprints" not in m["meta"]
    import pyarrow.parquet as pq

    for sh in m["shards"]:
        assert "input_fingerprint" not in pq.read_schema(OLD / sh["files"]["pairs"]).names


def test_an_old_store_reads_on_every_path(old_store, capsys):
    r = StoreReader(str(old_store))
    assert r.counts == {"ok": 4, "failed": 1, "skipped": 0}
    table = r.pairs()
    assert table.column("input_fingerprint").null_count == table.num_rows == 5
    streamed = {p.pair_id: p for p in r.iter_pairs()}
    assert len(streamed) == 4
    fresh = StoreReader(str(old_store))
    for pid, p in streamed.items():  # byte ranges: the whole shard is verified once, then ranges are read
        g = fresh.get(pid)
        assert torch.equal(g.drafter, p.drafter) and torch.equal(g.target, p.target)
    ds = r.dataset()
    assert [ds[i]["pair_id"] for i in range(len(ds))] == list(streamed)
    assert r.lm_head().shape == (16, D)
    assert r.verify()["problems"] == []
    assert egpt_main(["inspect", "--json", str(old_store)]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["pairs"]["total"] == 5 and s["dataset_fingerprint"] is None


def test_an_old_store_with_altered_rows_is_refused_on_both_paths(old_store):
    r = StoreReader(str(old_store))
    sh = r.shards[0]
    path = old_store / sh["files"]["tensors"]
    raw = bytearray(path.read_bytes())
    raw[-40] ^= 0x80
    path.write_bytes(bytes(raw))
    with pytest.raises(StoreError, match=sh["files"]["tensors"]):
        list(StoreReader(str(old_store)).iter_shards())
    fresh = StoreReader(str(old_store))
    with pytest.raises(StoreError, match="modified after commit"):
        for pid in fresh.pair_ids():
            fresh.get(pid)


def test_an_old_store_is_extended_by_the_current_writer(old_store):
    meta = {"hidden_size": D, "dtype": "bfloat16", "mode": "shared_prefix", "compat_key": "old-compat-key",
            "model_fingerprints": {"drafter": "d0d0d0d0d0d0d0d0", "target": "t0t0t0t0t0t0t0t0"},
            "config_fingerprint": "cfg0"}
    w = StoreWriter(str(old_store), meta)
    assert len(w.committed_pair_ids()) == 5
    g = torch.Generator().manual_seed(1)
    rows = [torch.randn(4, D, generator=g) for _ in range(2)]
    w.commit_shard([{"pair_id": "new|q1", "scene_id": "new", "length": 4, "input_fingerprint": "event=a,video=b,question=c"}],
                   rows[:1], rows[1:])
    r = StoreReader(str(old_store))
    assert r.counts["ok"] == 5 and len(r.pairs()) == 6  # old and new shards in one table
    assert r.get("new|q1").drafter.shape == (4, D) and r.verify()["problems"] == []
    assert r.meta["model_fingerprints"]["drafter"] == "d0d0d0d0d0d0d0d0"  # recorded on the first new commit
    # from now on the store's model pair is enforced by field, not only through compat_key
    with pytest.raises(ConfigError, match="model_fingerprints"):
        StoreWriter(str(old_store), {**meta, "model_fingerprints": {"drafter": "other", "target": "t0t0t0t0t0t0t0t0"}})
