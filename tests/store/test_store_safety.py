"""Tampered manifests and corrupted shards are refused / detected."""

from __future__ import annotations

import json

import pytest
from store_helpers import META, make_pairs

from egpt_core.errors import StoreError
from egpt_core.store import StoreReader, StoreWriter


@pytest.fixture
def store(tmp_path):
    url = str(tmp_path / "store")
    recs, d, t = make_pairs(6)
    w = StoreWriter(url, META)
    w.commit_shard(recs[:3], d[:3], t[:3])
    w.commit_shard(recs[3:], d[3:], t[3:])
    return tmp_path / "store"


def _tamper(root, fn):
    m = json.loads((root / "manifest.json").read_text())
    fn(m)
    (root / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize(
    "edit, words",
    [
        (lambda m: m["shards"][0].update(name="../x"), "'..'"),
        (lambda m: m["shards"][0].update(name="/etc/x"), "absolute"),
        (lambda m: m["shards"][0]["files"].update(pairs="../x"), "'..'"),
        (lambda m: m["shards"][0]["files"].update(pairs="/etc/x"), "absolute"),
        (lambda m: m["shards"][0]["files"].update(tensors="tensors/../../../etc/passwd"), "'..'"),
        (lambda m: m["shards"][0]["files"].update(tensors="s3://other-bucket/x.safetensors"), "URL"),
        (lambda m: m["shards"][0]["files"].update(tensors="file:///etc/passwd"), "URL"),
        (lambda m: m["shards"][0]["files"].update(pairs="tensors/shard-x.parquet"), "not under pairs/"),
        (lambda m: m.update(lm_head={"path": "/etc/passwd", "sha256": "x"}), "absolute"),
    ],
)
def test_manifest_paths_outside_the_store_are_refused(store, edit, words):
    _tamper(store, edit)
    with pytest.raises(StoreError) as e:
        StoreReader(str(store))
    assert words in str(e.value) and "Refusing" in str(e.value)
    with pytest.raises(StoreError):  # writers refuse to extend it, too
        StoreWriter(str(store), META)


def test_bad_manifests(store, tmp_path):
    with pytest.raises(StoreError, match="not a store"):
        StoreReader(str(tmp_path / "nothing-here"))
    (store / "manifest.json").write_text("{not json")
    with pytest.raises(StoreError, match="not valid JSON"):
        StoreReader(str(store))
    (store / "manifest.json").write_text(json.dumps({"format": "egpt-hidden-state-store", "schema_version": 99}))
    with pytest.raises(StoreError, match="schema_version"):
        StoreReader(str(store))


def test_verify_detects_corruption(store):
    r = StoreReader(str(store))
    ok = r.verify()
    assert ok["problems"] == [] and ok["files"] == 4
    sh = r.shards[1]
    p = store / sh["files"]["tensors"]
    raw = bytearray(p.read_bytes())
    raw[-3] ^= 0xFF  # one flipped byte inside the rows
    p.write_bytes(bytes(raw))
    with pytest.raises(StoreError) as e:
        r.verify()
    assert sh["files"]["tensors"] in str(e.value) and "sha256" in str(e.value)
    (store / r.shards[0]["files"]["pairs"]).unlink()
    rep = r.verify(raise_on_error=False)
    assert len(rep["problems"]) == 2 and any("missing" in x for x in rep["problems"])
    p.write_bytes(bytes(raw[:100]))  # truncated
    assert any("bytes" in x for x in r.verify(raise_on_error=False)["problems"])


def test_position_convention_is_the_models_one():
    import ast
    from pathlib import Path

    import egpt_core
    from egpt_core.store import POSITION_CONVENTION

    src = Path(egpt_core.__file__).parent / "models" / "positions.py"
    if not src.exists():
        pytest.skip("models area not present")
    consts = {n.targets[0].id: n.value.value for n in ast.parse(src.read_text()).body
              if isinstance(n, ast.Assign) and isinstance(n.value, ast.Constant) and isinstance(n.targets[0], ast.Name)}
    assert consts["POSITION_CONVENTION"] == POSITION_CONVENTION
