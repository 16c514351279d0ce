"""The store's typed contract (egpt_core/store/schema.py): stores written by earlier versions open
through it, a manifest field a reader relies on that is missing or mistyped is refused naming the
store and the field, and writers produce nothing readers would refuse.

``data/store_8d8bcce`` was written by the store code of commit 8d8bcce, the last before the schema
(``data/make_store_8d8bcce.py``), with the meta extraction wrote then; ``data/store_0ff812c`` is older.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from egpt_core.errors import ConfigError, StoreError
from egpt_core.store import StoreReader, StoreWriter
from egpt_core.store import manifest as mf
from egpt_core.store.commands import store_summary
from egpt_core.store.schema import PairRecord, StoreMeta

DATA = Path(__file__).parent / "data"
D = 8


@pytest.fixture
def store_8d8bcce(tmp_path) -> Path:
    dst = tmp_path / "s8d8bcce"
    shutil.copytree(DATA / "store_8d8bcce", dst)
    return dst


@pytest.mark.parametrize("name, drafter_fp, target_fp, lm_dtype, vocab", [
    ("store_0ff812c", "d0d0d0d0d0d0d0d0", "t0t0t0t0t0t0t0t0", "bfloat16", False),
    ("store_8d8bcce", "d1d1d1d1d1d1d1d1", "t1t1t1t1t1t1t1t1", "float32", True),
])
def test_stores_of_earlier_versions_open_typed_and_extend(tmp_path, name, drafter_fp, target_fp, lm_dtype, vocab):
    store = tmp_path / name
    shutil.copytree(DATA / name, store)
    r = StoreReader(str(store))
    info = r.info
    assert info.meta.hidden_size == D and info.meta.dtype == "bfloat16" and info.meta.mode == "shared_prefix"
    assert info.meta.model_fingerprint("drafter") == drafter_fp and info.meta.model_fingerprint("target") == target_fp
    assert info.lm_head.target_fingerprint == target_fp and info.lm_head.dtype == lm_dtype
    assert (info.lm_head.vocab is not None) == vocab and (r.target_vocab() is not None) == vocab
    assert [s.name for s in info.shards] == [s["name"] for s in r.shards]
    assert r.counts == {"ok": 4, "failed": 1, "skipped": 0} and info.totals.pairs == 5
    assert mf.store_fingerprint(r.manifest) == info.fingerprint  # the typed view rewrote nothing
    assert len(list(r.iter_pairs())) == 4 and r.verify()["problems"] == []

    # the current writer extends it, and what it commits opens again
    w = StoreWriter(str(store), {"hidden_size": D, "dtype": "bfloat16"})
    g = torch.Generator().manual_seed(3)
    rows = [torch.randn(2, D, generator=g) for _ in range(2)]
    w.commit_shard([PairRecord(pair_id="new|q1", scene_id="new", length=2)], rows[:1], rows[1:])
    r2 = StoreReader(str(store))
    assert r2.info.totals.pairs == 6 and r2.get("new|q1").target.shape == (2, D)
    assert r2.info.meta.model_fingerprint("target") == target_fp


def test_inspect_reports_the_typed_fields(store_8d8bcce):
    s = store_summary(str(store_8d8bcce))
    assert s["model_fingerprints"] == {"drafter": "d1d1d1d1d1d1d1d1", "target": "t1t1t1t1t1t1t1t1"}
    assert s["config_fingerprint"] and s["dataset_fingerprint"] and s["compat_key"]
    assert s["lm_head"]["target_fingerprint"] == "t1t1t1t1t1t1t1t1" and s["lm_head"]["shape"] == [16, D]


def _shard0(m):
    return m["shards"][0]


TAMPERINGS = [
    ("shards['89ea6aca7767'].rows", lambda m: _shard0(m).update(rows="many")),
    ("shards['89ea6aca7767'].sha256.tensors", lambda m: _shard0(m)["sha256"].update(tensors="not-a-digest")),
    ("shards['89ea6aca7767'].counts", lambda m: _shard0(m).pop("counts")),
    ("meta.hidden_size", lambda m: m["meta"].update(hidden_size=-8)),
    ("meta.dtype", lambda m: m["meta"].update(dtype="int8")),
    ("meta.model_fingerprints", lambda m: m["meta"].update(model_fingerprints=["d1", "t1"])),
    ("lm_head.target_fingerprint", lambda m: m["lm_head"].pop("target_fingerprint")),
    ("lm_head.vocab.sha256", lambda m: m["lm_head"]["vocab"].pop("sha256")),
    ("totals.rows", lambda m: m["totals"].update(rows=None)),
    ("fingerprint", lambda m: m.pop("fingerprint")),
]


@pytest.mark.parametrize("field, tamper", TAMPERINGS, ids=[t[0] for t in TAMPERINGS])
def test_a_bad_manifest_field_is_refused_naming_store_and_field(store_8d8bcce, field, tamper):
    path = store_8d8bcce / "manifest.json"
    m = json.loads(path.read_text())
    tamper(m)
    path.write_text(json.dumps(m))
    with pytest.raises(StoreError) as err:
        StoreReader(str(store_8d8bcce))
    assert str(store_8d8bcce) in str(err.value) and field in str(err.value)
    with pytest.raises(StoreError, match="manifest.json"):  # writers refuse it as well
        StoreWriter(str(store_8d8bcce), {"hidden_size": D, "dtype": "bfloat16"})


def test_unknown_manifest_fields_are_kept(store_8d8bcce):
    """Forward compatibility: fields a later version adds are neither refused nor dropped."""
    path = store_8d8bcce / "manifest.json"
    m = json.loads(path.read_text())
    m["meta"]["added_later"] = {"x": 1}
    _shard0(m)["added_later"] = 2
    path.write_text(json.dumps(m))
    r = StoreReader(str(store_8d8bcce))
    assert r.info.meta.model_extra["added_later"] == {"x": 1} and r.manifest["shards"][0]["added_later"] == 2


def test_a_writer_refuses_meta_readers_would_refuse(tmp_path):
    with pytest.raises(ConfigError, match="mode"):
        StoreWriter(str(tmp_path / "s"), {"hidden_size": D, "dtype": "bfloat16", "mode": 3})
    assert not (tmp_path / "s" / "manifest.json").exists()


def test_records_are_validated_through_pair_record(tmp_path):
    w = StoreWriter(str(tmp_path / "s"), {"hidden_size": D, "dtype": "float32"})
    x = torch.zeros(2, D)
    with pytest.raises(ValueError, match="pair p1: status"):
        w.commit_shard([{"pair_id": "p1", "status": "done"}], [x], [x])
    with pytest.raises(ValueError, match="pair p1: target_response_ids"):
        w.commit_shard([{"pair_id": "p1", "length": 2, "target_response_ids": [2**40]}], [x], [x])
    w.commit_shard([{"pair_id": "p1", "scene_id": None, "question_idx": None, "status": "failed"}], [None], [None])
    row = StoreReader(str(tmp_path / "s")).pairs().to_pylist()[0]
    assert (row["scene_id"], row["question_idx"], row["reason"]) == ("", -1, "unspecified")


def test_extraction_records_are_pair_records():
    from egpt_core.data import Pair
    from egpt_core.extraction.run import _record

    fields = set(PairRecord.model_fields)
    assert fields == set(mf.PAIR_COLUMNS) - {"row_offset", "shard"}  # the Parquet schema and the model agree
    scene = type("Scene", (), {"scene_id": "s1"})()
    rec = _record(Pair(pair_id="s1|q0", scene=scene, question_idx=0, question="What?"), input_fingerprint="event=a")
    assert set(rec) == fields and PairRecord.model_validate(rec).input_fingerprint == "event=a"


def test_the_schema_knows_the_fp8_store_dtype():
    assert StoreMeta(hidden_size=8, dtype="float8_e4m3fn").dtype == "float8_e4m3fn"
    with pytest.raises(ValidationError):
        StoreMeta(hidden_size=8, dtype="int8")
