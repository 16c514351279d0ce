"""fsio.Location: one value for a place on storage, the same on the local disk, memory:// and S3
(moto's server on loopback); every write through it is whole."""

from __future__ import annotations

import json
import math
import uuid

import pytest

from egpt_core.evaluation.report import compare_runs, read_metrics
from egpt_core.fsio import Location
from egpt_core.store import StoreReader


@pytest.fixture(params=["local", "memory", "s3"])
def root(request, tmp_path) -> Location:
    if request.param == "local":
        return Location(str(tmp_path / "root"))
    if request.param == "memory":
        return Location(f"memory://loc-{uuid.uuid4().hex[:8]}")
    server = request.getfixturevalue("s3_server")
    bucket = request.getfixturevalue("s3_bucket")
    return Location(f"{bucket}/root", server)


def test_location_reads_and_writes_the_same_everywhere(root):
    f = root.child("a", "b.json")
    assert f.url.endswith("/a/b.json") and f.storage_options == root.storage_options and (root / "x").url.endswith("/x")
    assert not f.exists() and f.read_or_none() is None
    with pytest.raises(FileNotFoundError):
        f.read()
    f.write_json({"x": 1.5, "bad": math.nan, "inf": -math.inf})
    assert f.exists() and f.read_json() == {"bad": None, "inf": None, "x": 1.5}  # always valid JSON
    json.loads(f.read(), parse_constant=lambda c: pytest.fail(f"non-standard JSON token {c}"))
    with f.open("w") as out:
        out.write("text")
    with f.open("rb") as src:
        assert src.read() == b"text"
    with pytest.raises(RuntimeError), f.open("wb") as out:
        out.write(b"half")
        raise RuntimeError("failed mid-way")
    assert f.read() == b"text"  # nothing of the failed write reached the file
    f.remove()
    assert not f.exists()
    f.remove()  # removing what is gone is no error
    with pytest.raises(ValueError, match="mode"):
        f.open("ab")


def test_stage_functions_take_a_location(root, tmp_path):
    """Comparison outputs, metrics and stores are reached through one Location (its options travel
    with it), on S3 as on the local disk."""
    doc = {"name": "r1", "summary": {"cos_pooled": 0.5, "n_pairs": 2}, "inputs": {"store_fingerprint": "fp"}}
    root.child("e1", "metrics.json").write_json(doc)
    assert read_metrics(root.child("e1", "metrics.json"))["name"] == "r1"
    md = compare_runs([doc], root.child("cmp"))
    assert root.child("cmp", "comparison.md").read().decode() == md
    assert json.loads(root.child("cmp", "comparison.json").read())["runs"][0]["name"] == "r1"

    import torch

    from egpt_core.store import StoreWriter

    store = root.child("store")
    w = StoreWriter(store, {"hidden_size": 4, "dtype": "float32"})
    x = torch.ones(2, 4)
    w.commit_shard([{"pair_id": "p", "length": 2}], [x], [x])
    r = StoreReader(store)
    assert r.url == store.url and r.location == store and torch.equal(r.get("p").target, x)


def test_a_location_never_shows_credentials():
    loc = Location("s3://bucket/x", {"key": "AKIAEXAMPLEKEY123", "secret": "wJalrXUtnFEMI/K7MDENG", "endpoint_url": "http://h"})
    shown = repr(loc) + str(loc) + repr(loc.child("y"))
    assert "AKIAEXAMPLEKEY123" not in shown and "wJalrXUtnFEMI" not in shown and "http://h" in shown
