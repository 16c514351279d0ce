"""Write/read round trips, determinism across filesystems, random access, datasets, openness."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import fsspec
import pytest
import torch
from store_helpers import META, D, make_pairs

from egpt_core.errors import ConfigError, StoreError
from egpt_core.store import (
    NON_FINITE,
    PAIR_COLUMNS,
    ShardGroupedSampler,
    StoreReader,
    StoreWriter,
    collate_pairs,
    shard_name,
)


def _write(url, n=10, shard=4, **kw):
    recs, d, t = make_pairs(n, **kw)
    w = StoreWriter(url, META)
    infos = [w.commit_shard(recs[i:i + shard], d[i:i + shard], t[i:i + shard]) for i in range(0, n, shard)]
    return w, recs, d, t, infos


def test_round_trip_bitwise(tmp_path):
    url = str(tmp_path / "store")
    _, recs, d, t, infos = _write(url, n=10, shard=4)
    assert [i.pairs for i in infos] == [4, 4, 2]
    r = StoreReader(url)
    assert r.hidden_size == D and r.dtype == torch.bfloat16
    assert r.counts == {"ok": 10, "failed": 0, "skipped": 0}
    assert r.manifest["totals"]["rows"] == sum(x["length"] for x in recs)
    got = {p.pair_id: p for p in r.iter_pairs()}
    assert list(got) == [x["pair_id"] for x in recs]
    for rec, dd, tt in zip(recs, d, t):
        p = got[rec["pair_id"]]
        assert p.drafter.dtype == torch.bfloat16
        assert torch.equal(p.drafter, dd.to(torch.bfloat16)) and torch.equal(p.target, tt.to(torch.bfloat16))
        assert p.target_response_ids == rec["target_response_ids"]
        assert p.drafter_prompt_ids == rec["drafter_prompt_ids"]
        assert (p.scene_id, p.question_idx, p.question, p.length) == (
            rec["scene_id"], rec["question_idx"], rec["question"], rec["length"])
    tab = r.pairs()
    assert tab.column_names == list(PAIR_COLUMNS)
    assert set(tab.column("shard").to_pylist()) == {i.name for i in infos}
    # shard names are the hash of their sorted pair ids
    assert infos[0].name == shard_name([x["pair_id"] for x in recs[:4]])
    shards = list(r.iter_shards())
    assert [s.name for s in shards] == [i.name for i in infos]
    assert shards[0].drafter.shape == (sum(x["length"] for x in recs[:4]), D)


def test_memory_and_local_stores_are_identical(tmp_path, mem_url):
    local = str(tmp_path / "store")
    for url in (local, mem_url):
        _, _, _, _, infos = _write(url, n=7, shard=3)
        w = StoreWriter(url, META)
        w.write_lm_head(torch.arange(5 * D, dtype=torch.float32).view(5, D), "lmfp")
    lfs, lroot = fsspec.core.url_to_fs(local)
    mfs, mroot = fsspec.core.url_to_fs(mem_url)
    lfiles = sorted(p[len(lroot) + 1:] for p in lfs.find(lroot))
    mfiles = sorted(p[len(mroot.rstrip("/")) + 1:] for p in mfs.find(mroot))
    assert lfiles == mfiles
    assert "manifest.json" in lfiles and len([f for f in lfiles if f.startswith("tensors/")]) == 3
    for rel in lfiles:
        a, b = lfs.cat_file(f"{lroot}/{rel}"), mfs.cat_file(f"{mroot}/{rel}")
        if rel == "manifest.json":
            ma, mb = json.loads(a), json.loads(b)
            for m in (ma, mb):
                m.pop("created"), m.pop("updated")
            assert ma == mb
        else:
            assert a == b, rel
    assert StoreReader(local).fingerprint == StoreReader(mem_url).fingerprint


def test_non_finite_rows_become_failed(mem_url):
    recs, d, t = make_pairs(4)
    d[1][0, 3] = float("nan")
    t[2][1, 0] = float("inf")
    w = StoreWriter(mem_url, {**META, "dtype": "float16"})
    big = torch.full_like(d[3], 1e6)  # overflows fp16 -> inf in the store dtype
    info = w.commit_shard(recs, [d[0], d[1], d[2], big], t)
    assert info.counts == {"ok": 1, "failed": 3, "skipped": 0}
    assert info.reasons == {NON_FINITE: 3}
    r = StoreReader(mem_url)
    assert r.manifest["reasons"] == {NON_FINITE: 3}
    failed = r.pairs(status="failed").to_pylist()
    assert {x["pair_id"] for x in failed} == {"p0001", "p0002", "p0003"}
    assert all(x["length"] == 0 and x["reason"] == NON_FINITE for x in failed)
    assert r.pair_ids() == ["p0000"]
    assert r.get("p0001").drafter.shape == (0, D)
    assert list(r.iter_shards())[0].drafter.shape[0] == recs[0]["length"]


def test_failed_and_skipped_records_and_validation(mem_url):
    recs, d, t = make_pairs(3)
    recs[1] = {"pair_id": "p0001", "status": "skipped", "reason": "shorter than min_tokens"}
    recs[2] = {"pair_id": "p0002", "status": "failed", "reason": "truncated .npy"}
    w = StoreWriter(mem_url, META)
    info = w.commit_shard(recs, [d[0], None, None], [t[0], None, None])
    assert info.counts == {"ok": 1, "failed": 1, "skipped": 1} and info.rows == recs[0]["length"]
    r = StoreReader(mem_url)
    assert r.pair_ids(status=None) == ["p0000", "p0001", "p0002"]
    assert r.pairs(status="skipped").column("reason").to_pylist() == ["shorter than min_tokens"]
    # caller bugs are refused clearly
    recs, d, t = make_pairs(2, prefix="x")
    with pytest.raises(ConfigError, match="hidden_size"):
        w.commit_shard(recs[:1], [torch.zeros(recs[0]["length"], D + 1)], t[:1])
    with pytest.raises(ValueError, match="rows but record length"):
        w.commit_shard(recs[:1], [d[0][:-1]], t[:1])
    with pytest.raises(ValueError, match="unknown fields"):
        w.commit_shard([{**recs[0], "bogus": 1}], d[:1], t[:1])
    with pytest.raises(ValueError, match="twice"):
        w.commit_shard([recs[0], recs[0]], [d[0], d[0]], [t[0], t[0]])


def test_random_access_equals_streaming_and_reads_only_ranges(tmp_path, monkeypatch):
    url = str(tmp_path / "store")
    _write(url, n=9, shard=5)
    r = StoreReader(url)
    streamed = {p.pair_id: p for p in r.iter_pairs()}
    r2 = StoreReader(url)
    for pid, p in streamed.items():
        g = r2.get(pid)
        assert torch.equal(g.drafter, p.drafter) and torch.equal(g.target, p.target)
        assert g.target_response_ids == p.target_response_ids
    with pytest.raises(KeyError):
        r2.get("nope")
    # get() must read byte ranges only: wreck every byte of the shard except header + this pair's rows
    pid = "p0006"
    want = r2.get(pid)
    sh = next(s for s in r2.shards if pid in r2._table(s).column("pair_id").to_pylist())
    path = tmp_path / "store" / sh["files"]["tensors"]
    raw = bytearray(path.read_bytes())
    keep = []
    h = r2._header(sh)
    row = r2.pairs().to_pylist()
    row = next(x for x in row if x["pair_id"] == pid)
    item = 2
    for key in ("drafter", "target"):
        b = h.data_start + h.tensors[key]["data_offsets"][0] + row["row_offset"] * D * item
        keep.append((b, b + row["length"] * D * item))
    for i in range(h.data_start, len(raw)):
        if not any(a <= i < b for a, b in keep):
            raw[i] = 0x7F
    path.write_bytes(bytes(raw))
    r3 = StoreReader(url)
    calls = []
    orig = r3.fs.cat_file
    monkeypatch.setattr(r3.fs, "cat_file", lambda p, start=None, end=None, **k: (
        "/tensors/" in str(p) and calls.append((start, end))) or orig(p, start=start, end=end, **k))
    got = r3.get(pid)
    assert torch.equal(got.drafter, want.drafter) and torch.equal(got.target, want.target)
    assert calls and all(s is not None and e is not None for s, e in calls)  # tensor shard: ranges only
    assert sum(e - s for s, e in calls) < len(raw) // 2
    with pytest.raises(StoreError, match="sha256"):
        r3.verify()


def test_dataset_and_collate(mem_url):
    _, recs, d, t, _ = _write(mem_url, n=7, shard=3)
    r = StoreReader(mem_url)
    ds = r.dataset()
    assert len(ds) == 7
    it = ds[4]
    assert it["drafter"].dtype == torch.float32 and it["drafter"].shape == (recs[4]["length"], D)
    assert torch.equal(it["target"], t[4].to(torch.bfloat16).float())
    assert it["pair_id"] == "p0004" and it["scene_id"] == recs[4]["scene_id"]
    assert len(ds._cache) <= 2
    sub = r.dataset(["p0005", "p0001"])
    assert [sub[i]["pair_id"] for i in range(2)] == ["p0005", "p0001"]
    batch = collate_pairs([ds[i] for i in range(4)])
    S = max(x["length"] for x in recs[:4])
    assert batch["drafter"].shape == (4, S, D) and batch["target"].shape == (4, S, D)
    assert batch["mask"].dtype == torch.bool and batch["mask"].sum().item() == sum(x["length"] for x in recs[:4])
    for b in range(4):
        L = recs[b]["length"]
        assert batch["mask"][b, :L].all() and not batch["mask"][b, L:].any()
        assert torch.equal(batch["drafter"][b, :L], ds[b]["drafter"]) and not batch["drafter"][b, L:].any()
    assert batch["lengths"].tolist() == [x["length"] for x in recs[:4]]
    assert batch["pair_ids"] == ["p0000", "p0001", "p0002", "p0003"]
    loader = torch.utils.data.DataLoader(ds, batch_size=3, sampler=ShardGroupedSampler(ds, seed=1),
                                         collate_fn=collate_pairs)
    seen = [p for b in loader for p in b["pair_ids"]]
    assert sorted(seen) == [x["pair_id"] for x in recs]
    shard_of = {ds.pair_ids[i]: ds.shard_of(i) for i in range(len(ds))}
    runs = [k for k, s in enumerate(seen) if k == 0 or shard_of[s] != shard_of[seen[k - 1]]]
    assert len(runs) == len(r.shards)  # one contiguous run per shard: each shard loads once per epoch


def test_lm_head_and_features(mem_url):
    w = StoreWriter(mem_url, META)
    head = torch.randn(11, D)
    info = w.write_lm_head(head, "target-fp")
    assert info["shape"] == [11, D] and info["dtype"] == "bfloat16"
    assert w.write_lm_head(head, "target-fp") == info  # idempotent
    with pytest.raises(ConfigError, match="LM head"):
        w.write_lm_head(head, "another-target")
    r = StoreReader(mem_url)
    assert torch.equal(r.lm_head(), head.to(torch.bfloat16))
    assert r.manifest["lm_head"]["target_fingerprint"] == "target-fp"
    feats = {"pooled": torch.randn(3, 8), "n_frames": torch.tensor([1])}
    assert w.get_features("abc123") is None and not w.has_features("abc123")
    w.put_features("abc123", feats)
    got = r.get_features("abc123")
    assert set(got) == {"pooled", "n_frames"} and torch.equal(got["pooled"], feats["pooled"])
    w.put_features("single", torch.ones(2))
    assert torch.equal(w.get_features("single")["features"], torch.ones(2))
    with pytest.raises(ValueError):
        w.put_features("../escape", feats)


def test_readable_with_only_pyarrow_and_safetensors(tmp_path):
    url = str(tmp_path / "store")
    _, recs, d, t, _ = _write(url, n=5, shard=3)
    expected = {
        x["pair_id"]: {"len": x["length"], "ids": x["target_response_ids"],
                       "d0": dd.to(torch.bfloat16).float()[0].tolist(), "tl": tt.to(torch.bfloat16).float()[-1].tolist()}
        for x, dd, tt in zip(recs, d, t)
    }
    (tmp_path / "expected.json").write_text(json.dumps(expected))
    script = textwrap.dedent(
        """
        import json, sys
        import pyarrow.parquet as pq
        from safetensors.torch import load_file
        root, exp = sys.argv[1], json.load(open(sys.argv[2]))
        man = json.load(open(f"{root}/manifest.json"))
        seen = {}
        for sh in man["shards"]:
            tab = pq.read_table(f"{root}/{sh['files']['pairs']}").to_pylist()
            ts = load_file(f"{root}/{sh['files']['tensors']}")
            for row in tab:
                a, n = row["row_offset"], row["length"]
                assert ts["offsets"][0].item() == 0
                seen[row["pair_id"]] = {"len": n, "ids": row["target_response_ids"],
                                        "d0": ts["drafter"][a].float().tolist(),
                                        "tl": ts["target"][a + n - 1].float().tolist()}
        assert seen == exp, "mismatch"
        assert "egpt_core" not in sys.modules
        print("OK", len(seen))
        """
    )
    out = subprocess.run([sys.executable, "-c", script, url, str(tmp_path / "expected.json")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "OK 5"


#: makes `import pandas` fail as on an install of this project's dependencies (pandas is not one)
NO_PANDAS = textwrap.dedent("""
    import importlib.abc, sys
    class NoPandas(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] == "pandas":
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    sys.meta_path.insert(0, NoPandas())
    """)


def test_readme_snippet_runs_with_pyarrow_and_safetensors_only(tmp_path):
    """README "Readable without this project" runs as written next to a store, with pandas unavailable
    (not a dependency), and reads the rows the store holds."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    after = readme[readme.index("Readable without this project"):]
    snippet = after[after.index("```python\n") + len("```python\n"):after.index("\n```", after.index("```python"))]
    _write(str(tmp_path / "store"), n=5, shard=3)
    script = "\n".join([
        NO_PANDAS,
        snippet,
        "import json; print(json.dumps({'pair_id': p['pair_id'], 'rows': drafter_rows.float().tolist()}))",
    ])
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    want = StoreReader(str(tmp_path / "store")).get(got["pair_id"])
    assert got["rows"] == want.drafter.float().tolist() and len(got["rows"]) == want.length > 0
