"""The store on S3 (a local moto server): whole-object PUTs, conditional-create lock, ranged reads."""

from __future__ import annotations

import json
import time
import uuid

import pytest
import torch
from store_helpers import META, make_pairs

from egpt_core.errors import StoreError
from egpt_core.store import StoreReader, StoreWriter, shard_name

moto_server = pytest.importorskip("moto.server")
boto3 = pytest.importorskip("boto3")
pytest.importorskip("s3fs")

BUCKET = "egpt-store-tests"


@pytest.fixture(scope="module")
def s3_opts():
    server = moto_server.ThreadedMotoServer(port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="test", aws_secret_access_key="test",
                 region_name="us-east-1").create_bucket(Bucket=BUCKET)
    yield {"endpoint_url": endpoint, "key": "test", "secret": "test", "client_kwargs": {"region_name": "us-east-1"}}
    server.stop()


def test_s3_store_round_trip(s3_opts, monkeypatch):
    url = f"s3://{BUCKET}/stores/{uuid.uuid4().hex}"
    recs, d, t = make_pairs(8)
    w1, w2 = StoreWriter(url, META, s3_opts), StoreWriter(url, META, s3_opts)
    assert w1.commit_shard(recs[:5], d[:5], t[:5]).pairs == 5
    b = w2.commit_shard(recs[3:], d[3:], t[3:])  # overlap dropped under the lock
    assert b.pairs == 3 and b.name == shard_name([x["pair_id"] for x in recs[5:]])
    assert w2.committed_pair_ids() == {x["pair_id"] for x in recs}

    r = StoreReader(url, s3_opts)
    assert sorted(r.pair_ids()) == [x["pair_id"] for x in recs]
    assert r.verify()["problems"] == []
    calls = []
    orig = r.fs.cat_file
    monkeypatch.setattr(r.fs, "cat_file", lambda p, start=None, end=None, **k: calls.append((start, end))
                        or orig(p, start=start, end=end, **k))
    g = r.get("p0006")  # ranged GETs only
    assert torch.equal(g.drafter, d[6].to(torch.bfloat16)) and torch.equal(g.target, t[6].to(torch.bfloat16))
    assert calls and all(s is not None for s, _ in calls)
    monkeypatch.undo()
    ds = r.dataset()
    assert len(ds) == 8 and torch.equal(ds[7]["target"], t[7].to(torch.bfloat16).float())

    # a live lock held by someone else blocks; a stale one is broken
    lock = f"{r.root}/_lock"
    r.fs.pipe_file(lock, json.dumps({"token": "x", "time": time.time()}).encode())
    busy = StoreWriter.__new__(StoreWriter)
    busy.__dict__.update(w1.__dict__, _lock_args={"timeout_s": 0.3, "stale_s": 60})
    with pytest.raises(StoreError, match="could not acquire"):
        busy.gc()
    r.fs.pipe_file(lock, json.dumps({"token": "x", "time": time.time() - 3600}).encode())
    assert w1.gc(min_tmp_age_s=0) == []
    assert not r.fs.exists(lock)
